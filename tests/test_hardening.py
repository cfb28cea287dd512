"""Hardening (issue 9): bad input, faults and untrusted artifacts, with nothing lost.

The matrix of cases and what each one does is in docs/HARDENING.md; every row names its test, here or
in the other test files. CLI cases run train.py / evaluate.py in real processes and check the user-facing
contract: exit code 2, exactly one stderr line starting with `error: `, no traceback, and the file /
column / row / key named."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, make_model_dir, run_cli, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmbert.errors import ArtifactError, ConfigError, MMBertError

LABEL = "Recommended IND"


def assert_one_line_error(r, *fragments: str):
    """exit 2, one stderr line `error: ...` naming every fragment, no traceback anywhere."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- broken data files

@pytest.fixture(scope="module")
def work(tmp_path_factory, reviews):
    """A folder with a good 160-row file and one broken file per bad-input case."""
    d = tmp_path_factory.mktemp("hardening")
    df = reviews.iloc[:160].copy()
    df.to_csv(d / "good.csv", index=False)
    (d / "empty.csv").write_bytes(b"")
    df.iloc[:0].to_csv(d / "header_only.csv", index=False)
    df.drop(columns=["Age"]).to_csv(d / "no_age.csv", index=False)
    text = df.astype({"Age": object})
    text.loc[123, "Age"] = "forty-two"
    text.to_csv(d / "age_text.csv", index=False)
    seven = df.copy()
    seven.loc[131, LABEL] = 7
    seven.to_csv(d / "label7.csv", index=False)
    seven.iloc[120:].to_csv(d / "val_label7.csv", index=False)  # row 11 of this file holds the 7
    df.iloc[:120].to_csv(d / "train.csv", index=False)
    latin = df.copy()
    latin.loc[57, "Title"] = "MARKER"
    latin.to_csv(d / "latin1.csv", index=False)
    raw = (d / "latin1.csv").read_bytes()
    (d / "latin1.csv").write_bytes(raw.replace(b"MARKER", b"caf\xe9 latin-1"))  # 0xE9 alone is not UTF-8
    return d


BAD_FILES = {  # case -> (file, fragments the one-line message must name besides the file)
    "missing file": ("does_not_exist.csv", ["not found"]),
    "empty file": ("empty.csv", ["is empty"]),
    "header only": ("header_only.csv", ["header but no rows"]),
    "non-UTF-8 bytes": ("latin1.csv", ["line {latin1_line}", "not valid UTF-8"]),
    "missing column": ("no_age.csv", ["column 'Age' is missing"]),
    "non-numeric text": ("age_text.csv", ["'Age'", "row 123", "forty-two"]),
}


def expected(work, name: str, fragments: list[str]) -> list[str]:
    if name == "latin1.csv":  # the physical line of the bad byte (quoted newlines: not simply row + 2)
        raw = (work / name).read_bytes()
        line = raw[:raw.index(b"caf\xe9")].count(b"\n") + 1
        fragments = [f.format(latin1_line=line) for f in fragments]
    return fragments


@pytest.fixture(scope="module")
def train_cfg(work, tiny_bert):
    return write_config(work / "c.yaml", tiny_bert, str(work / "good.csv"), dist={"strategy": "none"})


def train_cli(cfg: str, out, *args: str, **kw):
    return run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--max-steps", "1", *args],
                   check=False, **kw)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_train_bad_data_file_is_one_line(work, train_cfg, tmp_path, case):
    name, fragments = BAD_FILES[case]
    path = str(work / name)
    fragments = expected(work, name, fragments)
    r = train_cli(train_cfg, tmp_path / "run", "--data", path)
    assert_one_line_error(r, path, *fragments)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_broken_row_names_the_file_and_line(tmp_path):
    from mmbert.data.io import load_table
    from mmbert.errors import DataError

    path = tmp_path / "broken.csv"
    path.write_text("a,b\n1,2\n3,4,5\n6,7\n")
    with pytest.raises(DataError, match=rf"cannot read data file {path}: .*line 3"):
        load_table(str(path))


def test_train_label_outside_the_label_map(work, tiny_bert, tmp_path):
    """Binary train file (0/1); the val file has a `7`: the label map is fitted on train, so the 7 is named."""
    val = str(work / "val_label7.csv")
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, None,
                       data={"split": {"train_file": str(work / "train.csv"), "val_file": val}})
    r = train_cli(cfg, tmp_path / "run")
    assert_one_line_error(r, val, f"column '{LABEL}'", "row 11", "label 7", "[0, 1]")


def test_stray_label_in_the_train_split_is_warned_about_by_row(work, tok):
    """In the train split there is no label map yet: a `7` in 0/1 data becomes a third class. Training logs the
    label map with its counts and warns about a class with a single row, naming file, column and row."""
    import logging

    from mmbert.config import DataConfig
    from mmbert.data.pipeline import build_dataset, log_label_map
    from mmbert.data.preprocess import Preprocessor

    df = pd.read_csv(work / "label7.csv")
    cfg = DataConfig(text_columns=["Title"], numeric_columns=["Age"], label_column=LABEL, max_tokens=16, max_chunks=1)
    pre = Preprocessor.fit(df, cfg, "tok", "label7.csv")
    assert pre.classes == [0, 1, 7]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mmbert.main")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_label_map(pre, build_dataset(pre, tok, df, "label7.csv"), "label7.csv")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    counts = df[LABEL].value_counts()
    assert f"label map of '{LABEL}' (train rows): 0={counts[0]}, 1={counts[1]}, 7=1" in messages
    warning = [m for r, m in zip(records, messages) if r.levelno == logging.WARNING and "only train row" in m]
    assert warning == [f"label7.csv: column '{LABEL}', row 131: label 7 is the only train row of its class (every "
                       f"distinct train label is a class): check for a stray value"]


def test_pinned_label_map_stops_at_a_stray_train_label(work, tiny_bert, tmp_path):
    """With data.labels the map is fixed up front, so the `7` in the train file is an error naming its row,
    not a third class."""
    train = str(work / "label7.csv")
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, None,
                       data={"split": {"train_file": train, "val_file": str(work / "train.csv")}})
    r = train_cli(cfg, tmp_path / "run", "--set", "data.labels=[0, 1]")
    assert_one_line_error(r, train, f"column '{LABEL}'", "row 131", "label 7", "[0, 1] pinned by data.labels")


def test_pinned_label_map_keeps_its_order_and_names(work):
    """The pinned order is the class order (binary: the second is the positive class); string maps work too."""
    from mmbert.config import DataConfig
    from mmbert.data.preprocess import Preprocessor

    df = pd.read_csv(work / "train.csv")
    cfg = DataConfig(text_columns=["Title"], label_column=LABEL, labels=[1, 0])
    pre = Preprocessor.fit(df, cfg, "tok", "train.csv")
    assert pre.classes == [1, 0] and pre.labels_pinned
    labels = df[LABEL].to_numpy()
    assert (pre.encode_labels(df, "train.csv") == 1 - labels).all()
    named = df.assign(**{LABEL: np.where(labels == 1, "yes", "no")})
    cfg = DataConfig(text_columns=["Title"], label_column=LABEL, labels=["no", "yes", "maybe"])
    pre = Preprocessor.fit(named, cfg, "tok", "named.csv")
    assert pre.classes == ["no", "yes", "maybe"] and pre.label_type == "string"
    assert (pre.encode_labels(named, "named.csv") == labels).all()


@pytest.mark.parametrize("args,fragments", [
    (["--set", "data.labels=[1]"], ["'data.labels'", "at least 2 distinct"]),
    (["--set", "data.labels=[0, 1, 0]"], ["'data.labels'", "at least 2 distinct"]),
    (["--set", "train.bach_size=4"], ["'train.bach_size'"]),  # unknown key
    (["--set", "train.lr=fast"], ["'train.lr'", "fast"]),  # wrong type
    (["--set", "model.fusion=attention"], ["'model.fusion'", "attention"]),  # unknown fusion
    (["--strategy", "horovod"], ["--strategy", "horovod"]),  # unknown strategy
], ids=["one pinned label", "repeated pinned label", "unknown key", "wrong type", "unknown fusion",
        "unknown strategy"])
def test_train_bad_config_is_one_line(train_cfg, tmp_path, args, fragments):
    assert_one_line_error(train_cli(train_cfg, tmp_path / "run", *args), *fragments)


def test_train_wrong_class_weight_length(train_cfg, tmp_path):
    r = train_cli(train_cfg, tmp_path / "run", "--set", "train.class_weights=[1, 2, 3]")
    assert_one_line_error(r, "'train.class_weights'", "3 values", "2 classes")


@pytest.mark.parametrize("encoder,fragments", [
    ("no-such-org/no-such-model", ["tokenizer 'no-such-org/no-such-model'", "HF_HUB_OFFLINE=1"]),
    ("/no/such/encoder/folder", ["encoder folder not found: /no/such/encoder/folder"]),
], ids=["hub id", "folder"])
def test_train_encoder_not_found_offline(train_cfg, tmp_path, encoder, fragments):
    r = train_cli(train_cfg, tmp_path / "run", "--encoder", encoder, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r, *fragments)


def test_train_refuses_an_output_dir_with_a_finished_run(train_cfg, tmp_path):
    """Never clobber work: without --resume or --overwrite the run stops before touching anything
    (the full cycle, --overwrite included, runs in tests/test_distributed.py::test_finished_run_is_not_clobbered)."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"finished work")
    r = train_cli(train_cfg, tmp_path / "run")
    assert_one_line_error(r, f"output directory {tmp_path / 'run'} holds a finished run", "--resume auto",
                          "--overwrite")
    assert (final / "model.safetensors").read_bytes() == b"finished work"
    assert sorted(os.listdir(tmp_path / "run")) == ["final"]


def test_debug_flag_shows_the_traceback(train_cfg, tmp_path):
    r = train_cli(train_cfg, tmp_path / "run", "--data", str(tmp_path / "nope.csv"), "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "DataError" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: data file not found: {tmp_path / 'nope.csv'}"


def test_train_unwritable_output_dir_fails_before_training(work, train_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # cannot be created: its parent is a file (permissions do not stop root)
    r = train_cli(train_cfg, out)
    assert_one_line_error(r, f"output directory {out} is not writable")
    assert "launcher=" not in r.stdout  # stopped before loading data or a model


def test_disk_full_output_dir_fails_before_training(tmp_path, monkeypatch, train_cfg):
    from mmbert.config import load_config
    from mmbert.distributed.env import DistEnv
    from mmbert.training import loop

    class Usage:
        total, used, free = 10 * 2**30, 10 * 2**30 - 2**20, 2**20

    monkeypatch.setattr(loop.shutil, "disk_usage", lambda p: Usage)
    cfg = load_config(train_cfg)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "none")
    with pytest.raises(ConfigError, match=r"output directory .*run has only 1 MiB free"):
        loop.prepare_output_dir(str(tmp_path / "run"), cfg, env)


# ----------------------------------------------------------------------------- evaluate: bad input, artifacts

@pytest.fixture(scope="module")
def model_dir(work, tiny_bert):
    """A consolidated model dir (random tiny model, preprocessing fitted on the first 120 rows), no training."""
    return make_model_dir(work, tiny_bert)


def eval_cli(model: str, data: str, out, *args: str):
    return run_cli(["evaluate.py", "--model-dir", model, "--data", data, "--output-dir", str(out),
                    "--no-progress", "--no-plots", *args], check=False)


EVAL_BAD_FILES = dict(BAD_FILES, **{"label outside the label map": ("label7.csv", [f"'{LABEL}'", "row 131",
                                                                                  "label 7", "[0, 1]"])})


@pytest.mark.parametrize("case", list(EVAL_BAD_FILES))
def test_evaluate_bad_data_file_is_one_line(work, model_dir, tmp_path, case):
    name, fragments = EVAL_BAD_FILES[case]
    path = str(work / name)
    fragments = expected(work, name, fragments)
    r = eval_cli(model_dir, path, tmp_path / "out")
    assert_one_line_error(r, path, *fragments)
    assert not (tmp_path / "out" / "predictions.tsv").exists()


def test_evaluate_model_dir_not_found(work, tmp_path):
    r = eval_cli(str(tmp_path / "no_model"), str(work / "good.csv"), tmp_path / "out")
    assert_one_line_error(r, f"model directory not found: {tmp_path / 'no_model'}")


def test_evaluate_unseen_categories_and_duplicate_ids_are_counted_and_reported(work, model_dir, tmp_path):
    """Usable data: unseen categories map to index 0 (unknown) and duplicate ids are kept (rows are told
    apart by `row`); both are counted in a warning, and every row is scored once."""
    df = pd.read_csv(work / "good.csv").iloc[120:].copy()
    df.loc[df.index[[0, 3, 5]], "Class Name"] = "Spacesuits"
    seen = set(pd.read_csv(work / "train.csv")["Class Name"].dropna())
    unseen = int((df["Class Name"].notna() & ~df["Class Name"].isin(seen)).sum())
    assert unseen >= 3
    df.insert(0, "rid", [f"id{i % 30}" for i in range(len(df))])  # 40 rows, 10 ids seen twice
    path = str(tmp_path / "unseen.csv")
    df.to_csv(path, index=False)
    r = eval_cli(model_dir, path, tmp_path / "out", "--id-column", "rid")
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert f"unseen_categories = {{'Class Name': {unseen}}}" in log and "duplicate_ids = 10" in log
    pred = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert pred["row"].tolist() == list(range(40)) and pred["rid"].tolist() == df["rid"].tolist()
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())["data_report"]
    assert report["unseen_categories"] == {"Class Name": unseen} and report["duplicate_ids"] == 10


@pytest.mark.parametrize("name", ["model.safetensors", "preprocessing.json"])
def test_truncated_artifact_file_is_one_line(work, model_dir, tmp_path, name):
    broken = tmp_path / "final"
    shutil.copytree(model_dir, broken)
    f = broken / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = eval_cli(str(broken), str(work / "good.csv"), tmp_path / "out")
    assert_one_line_error(r, str(f), "truncated or corrupted")


class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_in_a_model_dir_are_never_loaded(model_dir, work, tmp_path, monkeypatch):
    """Pickles where PyTorch/HF would look for weights (and a custom-code config) are ignored: the model
    dir loads from safetensors + JSON only, with trust_remote_code off, and scores normally."""
    import pickle

    from mmbert.artifact import load_artifact

    d = tmp_path / "final"
    shutil.copytree(model_dir, d)
    marker = tmp_path / "PWNED"
    for rel in ("pytorch_model.bin", "model.pt", "model.pkl", "encoder/pytorch_model.bin",
                "tokenizer/pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        with open(d / rel, "wb") as f:
            pickle.dump(_Payload(str(marker)), f)
    # custom code offered through auto_map: never imported unless trust_remote_code is asked for
    (d / "encoder" / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((d / "encoder" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (d / "encoder" / "config.json").write_text(json.dumps(cfg))

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, pre, tok = load_artifact(str(d))
    ref, _, _ = load_artifact(model_dir)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert not marker.exists()


def test_package_has_no_pickle_loaders_or_remote_code():
    """No torch.load / pickle in the package: the only loaders are safetensors, JSON and YAML safe_load."""
    import re

    hits = []
    for base, _, files in os.walk(os.path.join(ROOT, "mmbert")):
        for name in files:
            if name.endswith(".py"):
                src = open(os.path.join(base, name), encoding="utf-8").read()
                for m in re.finditer(r"torch\.load\((?![^)]*weights_only=True)|"
                                     r"^\s*(import|from) (pickle|dill|joblib)\b|pickle\.loads?\(|allow_pickle=True|"
                                     r"yaml\.(unsafe_)?load\(|trust_remote_code=True", src, re.M):
                    hits.append(f"{name}: {m.group(0)}")
    assert hits == []


# ----------------------------------------------------------------------------- text edge cases

@pytest.fixture(scope="module")
def tok(tiny_bert):
    from mmbert.data.tokenize import load_tokenizer

    return load_tokenizer(tiny_bert)


def test_empty_and_whitespace_texts_are_counted_and_give_one_empty_chunk(tok):
    from mmbert.config import DataConfig
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.preprocess import Preprocessor

    df = pd.DataFrame({"a": ["fine", "", "   \n\t", None, np.nan, "ok"], "b": [None, " ", "", "  ", None, "x"],
                       "x": [1.0, 2, 3, 4, 5, 6], "y": [0, 1, 0, 1, 0, 1]})
    pre = Preprocessor.fit(df, DataConfig(text_columns=["a", "b"], numeric_columns=["x"], label_column="y",
                                          max_tokens=16, max_chunks=2), "tok", "t.csv")
    ds = build_dataset(pre, tok, df, "t.csv")
    assert ds.enc.texts == ["fine", "", "", "", "", "ok. x"]
    assert ds.enc.report["empty_texts"] == 4
    for i in (1, 2, 3, 4):  # one [CLS] [SEP] chunk: the model masks it (tests/test_model.py)
        assert [c.tolist() for c in ds.chunks[i]] == [[tok.cls_token_id, tok.sep_token_id]]


@pytest.mark.parametrize("kind", ["sentences", "long words", "one word"])
def test_100k_character_text_is_capped_by_max_chunks_and_reported(tok, kind):
    """A 100k-character text keeps exactly the first max_chunks chunks of its full tokenization, and is
    counted as cut when it has more; a text slightly over the character cap loses nothing."""
    from mmbert.data.tokenize import chunk_tokenize

    text = {"sentences": "The dress fits well and the colour is lovely. " * 2200,
            "long words": ("a" * 150 + " ") * 700,  # each word one [UNK]: 700 tokens
            "one word": "a" * 100_000}[kind]  # one [UNK]: nothing to cut
    short = "x" * 600 + " fits well" * 10  # just over 3 x 14 x 16 characters: the cap must not cut it
    assert len(text) >= 100_000
    full = [tok(t, add_special_tokens=False)["input_ids"] for t in (text, short)]
    chunks, truncated = chunk_tokenize(tok, [text, short], max_tokens=16, max_chunks=3)
    assert truncated == (1 if len(full[0]) > 42 else 0)
    assert truncated == {"sentences": 1, "long words": 1, "one word": 0}[kind]
    for ch, ids in zip(chunks, full):
        assert len(ch) <= 3 and all(c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id for c in ch)
        assert [t for c in ch for t in c[1:-1]] == ids[:42]


def test_infinite_and_huge_numerics_are_missing_or_clipped_and_counted():
    """+-inf, and values beyond float32's range (infinite for the model), are missing (median + indicator);
    standardised values beyond +-1e4 are clipped: every case counted, every model input finite."""
    from mmbert.config import DataConfig
    from mmbert.data.preprocess import Preprocessor

    df = pd.DataFrame({"t": ["a"] * 6, "x": [1.0, np.inf, 3.0, -np.inf, 1e39, 5.0], "y": [0, 1] * 3})
    pre = Preprocessor.fit(df, DataConfig(text_columns=["t"], numeric_columns=["x"], label_column="y"), "tok", "f")
    assert pre.numeric_stats["x"]["median"] == 3.0  # from the finite values only
    enc = pre.transform(df, "f")
    assert enc.missing[:, 0].tolist() == [0, 1, 0, 1, 1, 0]
    assert np.isfinite(enc.numeric).all()
    assert enc.report == {"infinite_numeric_as_missing": {"x": 3}}
    test = df.assign(x=[1e30, -1e30, 2.0, np.nan, 4.0, 1e38])
    enc = pre.transform(test, "f")
    assert enc.report == {"numeric_clipped": {"x": 3}}
    assert enc.numeric[:, 0].tolist()[:2] == [1e4, -1e4] and np.isfinite(enc.numeric).all()


def test_incomplete_checkpoint_is_refused_by_name(tmp_path):
    from mmbert.distributed.checkpoint import load_checkpoint

    partial = tmp_path / "checkpoints" / "step_6"
    partial.mkdir(parents=True)
    (partial / "train_state.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"step_6 is incomplete \(no COMPLETE marker\)"):
        load_checkpoint(str(partial), None, None, 0)


# ----------------------------------------------------------------------------- faults: SIGKILL and resume

def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"])


@pytest.mark.slow
def test_sigkill_of_one_rank_stops_the_job_and_resume_auto_finishes(tiny_bert, work, tmp_path):
    """2 ranks (torchrun, gloo, FSDP, no restarts), a checkpoint every step; rank 0 is SIGKILLed once a
    checkpoint exists. The job must end non-zero on its own (no hang), no final/ model is written, and
    `--resume auto` continues from the newest complete checkpoint (skipping a step dir without COMPLETE
    and a .tmp_step_N, even one holding a COMPLETE file) to the end, with one continuous step count."""
    from mmbert.distributed.checkpoint import COMPLETE, list_complete

    steps = 30
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(work / "good.csv"),
                       train={"select_best": False, "eval_each_epoch": False, "checkpoint_every": 1})
    out = tmp_path / "run"
    root = str(out / "checkpoints")
    args = ["train.py", "--config", cfg, "--strategy", "fsdp", "--max-steps", str(steps), "--batch-size", "4",
            "--output-dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--max-restarts", "0"] + args,
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list_complete(root) or list_complete(root)[-1][0] < 2:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        victim = next(p for p in workers if _rank_of(p) == 0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        rc = proc.wait(timeout=150)  # no hang: torchrun stops the surviving rank, collectives time out anyway
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "killed.log").read_text()
    assert rc != 0, text[-3000:]
    assert time.time() - killed_at < 150
    assert not (out / "final").exists()
    done = list_complete(root)
    assert done and done[-1][0] < steps, text[-3000:]
    last, last_dir = done[-1]

    # leftovers a kill can leave: a renamed-looking step dir without COMPLETE, a .tmp_step_N (even complete)
    for name in (f"step_{last + 5}", f".tmp_step_{last + 6}"):
        shutil.copytree(last_dir, os.path.join(root, name))
    os.remove(os.path.join(root, f"step_{last + 5}", COMPLETE))

    r = run_cli(args + ["--resume", "auto"], nproc=2, timeout=400)
    assert f"resumed from {last_dir} at step {last}" in r.stdout + r.stderr
    records = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))  # continuous, nothing twice
    with open(out / "final" / "train_summary.json") as f:
        assert json.load(f)["steps"] == steps
    assert list_complete(root)[-1][0] == steps


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_bit_identical_losses_and_weights(tiny_bert, work, tmp_path):
    """One process, 3 steps twice with the same seed (dropout on in the encoder): the same bits."""
    from safetensors.torch import load_file

    from mmbert.config import load_config
    from mmbert.training.loop import train

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", tiny_bert, str(work / "good.csv"),
                                       train={"output_dir": str(out), "max_steps": 3, "select_best": False,
                                              "eval_each_epoch": False, "seed": 5},
                                       dist={"strategy": "none"}))
        train(cfg)
        losses = [json.loads(ln)["loss"] for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
        runs.append((losses, load_file(out / "final" / "model.safetensors")))
    (la, wa), (lb, wb) = runs
    assert len(la) == 3 and la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- property-based preprocessing

_texts = st.one_of(st.none(), st.just(""), st.just(" \t\n"), st.text(max_size=40),
                   st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=600))
_numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                     st.sampled_from(["", " ", "3.5", "1e3", "-7", "NaN", "inf"]), st.booleans())
_cats = st.one_of(st.none(), st.just(float("nan")), st.text(max_size=5), st.integers(0, 5),
                  st.floats(0, 5).map(float))


@st.composite
def tables(draw, label_kind: str):
    n = draw(st.integers(1, 12))

    def col(s):
        return draw(st.lists(s, min_size=n, max_size=n))

    labels = col(st.sampled_from([0, 1, 2] if label_kind == "int" else ["no", "yes"]))
    df = pd.DataFrame({"t1": col(_texts), "t2": col(_texts), "x": col(_numbers), "c": col(_cats), "y": labels})
    # now and then one bad cell: a missing label, text in the numeric column
    if draw(st.integers(0, 7)) == 0:
        df.loc[draw(st.integers(0, n - 1)), "y"] = None
    if draw(st.integers(0, 7)) == 0:
        df["x"] = df["x"].astype(object)
        df.loc[draw(st.integers(0, n - 1)), "x"] = "abc"
    # odd dtypes for the same values: pandas' nullable / categorical / string types, float32, bool
    for c, dtypes in (("x", ["Float64", "float32", "string", "bool"]), ("c", ["category", "string", "Int64"]),
                      ("y", ["Int64", "string", "category"])):
        dtype = draw(st.sampled_from([None, *dtypes]))
        if dtype is not None:
            try:
                df[c] = df[c].astype(dtype)
            except (TypeError, ValueError, OverflowError):
                pass  # these values cannot take that dtype: keep them as they are
    return df


@st.composite
def train_and_test(draw):
    kind = draw(st.sampled_from(["int", "str"]))
    return draw(tables(kind)), draw(tables(kind))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tables=train_and_test())
def test_random_tables_give_valid_tensors_or_a_clear_error(tok, tables):
    from mmbert.config import DataConfig
    from mmbert.data.dataset import collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.preprocess import Preprocessor

    train, test = tables
    test.index = test.index + 1000  # rows of another file
    cfg = DataConfig(text_columns=["t1", "t2"], numeric_columns=["x"], categorical_columns=["c"], label_column="y",
                     max_tokens=12, max_chunks=2)
    try:
        pre = Preprocessor.fit(train, cfg, "tok", "train.csv")
        for df, file in ((train, "train.csv"), (test, "test.csv")):
            ds = build_dataset(pre, tok, df, file)
            b = collate(ds, np.arange(len(ds)), tok.pad_token_id)
            n = len(df)
            B, C, T = b["input_ids"].shape
            assert B == n and 1 <= C <= 2 and 2 <= T <= 12
            assert b["attention_mask"].shape == (B, C, T) and b["chunk_mask"][:, 0].all()
            assert torch.isfinite(b["numeric"]).all() and b["numeric"].shape == (n, 1)
            assert set(b["missing"].unique().tolist()) <= {0.0, 1.0}
            assert ((b["categorical"] >= 0) & (b["categorical"] <= len(pre.vocabularies["c"]))).all()
            assert ((b["labels"] >= 0) & (b["labels"] < pre.num_classes)).all() and pre.num_classes >= 2
            assert ds.enc.rows.tolist() == df.index.tolist()
    except MMBertError as e:
        msg = str(e)
        assert "\n" not in msg and ("train.csv" in msg or "test.csv" in msg), msg
