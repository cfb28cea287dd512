"""Issue 26, the data side: a resume trains on the run's own fitted preprocessing and refuses data that changed
under its weights unless told (1 and 2 ranks); the token cache checks its files' content (labels flipped at the
same size are rebuilt, for training's and evaluate's caches); cache folders follow the umask and another user
either maps them or is told it is a permission problem; a regression target with a tiny spread trains."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, assert_one_line_error, run_cli, write_config

from mmbert.config import load_config
from mmbert.data import cache
from mmbert.data.preprocess import Preprocessor
from mmbert.distributed.env import DistEnv
from mmbert.errors import DataError

ENV = DistEnv(0, 1, 0, 1, None, "none")


# ----------------------------------------------------------------------------- resume on changed data (case 3)

def _change_data(path):
    """A category renamed (the vocabulary's indices shift), a new one added (its size grows), a column rescaled."""
    df = pd.read_csv(path)
    df["Department Name"] = df["Department Name"].replace("Bottoms", "Zbottoms")
    df.loc[df.index[:6], "Class Name"] = "Capes"
    df["Age"] = df["Age"] * 12
    df.to_csv(path, index=False)


def _resume_cfg(tmp_path, tiny_bert, reviews):
    reviews.iloc[:120].to_csv(tmp_path / "d.csv", index=False)
    return write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"),
                        data={"cache_dir": str(tmp_path / "tok")},
                        train={"batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False,
                               "warmup_ratio": 0.0, "checkpoint_every": 2})


def _loss_steps(out) -> list[int]:
    with open(out / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


def _resume_on_changed_data(tmp_path, cfg, nproc: int, strategy: str):
    """Train 2 steps, change the data, resume: refused (returned), then accepted; the final preprocessing is
    the original run's."""
    out, data = tmp_path / "run", tmp_path / "d.csv"

    def train(*args, check=True):
        return run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--strategy", strategy, *args],
                       nproc=nproc, check=check)

    train("--max-steps", "2")
    original = json.loads((out / "final" / "preprocessing.json").read_text())
    _change_data(data)
    refused = train("--max-steps", "4", "--resume", "auto", check=False)
    assert _loss_steps(out) == [1, 2]
    accepted = train("--max-steps", "4", "--resume", "auto", "--accept-changed-data")
    assert _loss_steps(out) == [1, 2, 3, 4]
    for path in (out / "final" / "preprocessing.json", out / "preprocessing.json"):
        assert json.loads(path.read_text()) == original, path  # category indices and scalers as the run fitted them
    log = accepted.stdout + accepted.stderr
    assert f"data file {data} changed since checkpoint" in log and "unseen_categories" in log
    return refused, out


@pytest.mark.slow
def test_resume_on_changed_data_is_refused_or_trains_under_the_runs_own_fit(tiny_bert, reviews, tmp_path):
    cfg = _resume_cfg(tmp_path, tiny_bert, reviews)
    refused, out = _resume_on_changed_data(tmp_path, cfg, 1, "none")
    assert_one_line_error(refused, f"data file {tmp_path / 'd.csv'} changed since checkpoint "
                                   f"{out / 'checkpoints' / 'step_2'}", "--accept-changed-data", "--overwrite")
    # the accepted resume's checkpoints record the data it trained on: continuing on it needs no flag
    run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--strategy", "none", "--max-steps", "5",
             "--resume", "auto"])
    assert _loss_steps(out) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_two_ranks_take_rank_0s_decision_on_changed_data(tiny_bert, reviews, tmp_path):
    cfg = _resume_cfg(tmp_path, tiny_bert, reviews)
    refused, out = _resume_on_changed_data(tmp_path, cfg, 2, "fsdp")
    # one line per rank (torchrun may stop rank 1 once rank 0 has exited, before it prints), no mmbert traceback
    assert refused.returncode != 0 and "mmbert/" not in refused.stderr, refused.stderr[-3000:]
    lines = re.findall(r"\[rank (\d)\] error: data file (\S+) changed since checkpoint .*--accept-changed-data",
                       refused.stderr)
    assert ("0", str(tmp_path / "d.csv")) in lines and {f for _, f in lines} == {str(tmp_path / "d.csv")}, \
        refused.stderr[-3000:]


# ----------------------------------------------------------------------------- token cache content (case 4)

@pytest.fixture
def cfg_path(tiny_bert, reviews, tmp_path):
    reviews.iloc[:120].to_csv(tmp_path / "d.csv", index=False)
    return write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"),
                        data={"cache_dir": str(tmp_path / "tok")})


def build_and_read(cfg, calls: list):
    from mmbert.assembly import _tokenized_splits
    from mmbert.data.tokenize import load_tokenizer

    tok = load_tokenizer(cfg.model.encoder)

    def build():
        calls.append(1)
        return _tokenized_splits(cfg, tok, True)

    return cache.cached_run_data(cfg, ENV, tok, build)


def _only_folder(root) -> str:
    (name,) = os.listdir(root)
    return os.path.join(root, name)


def _flip_labels(path: str):
    """The split rewritten as a writer would, with every label inverted: same schema, same size."""
    import pyarrow as pa
    import pyarrow.compute as pc

    with pa.OSFile(path) as f:  # read into memory, not mapped: the file is rewritten below
        table = pa.ipc.open_file(f).read_all()
    i = table.column_names.index("label")
    table = table.set_column(i, "label", pc.subtract(1, table.column("label")))
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=len(table))


def _overwrite_middle(path: str):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 64)


def _swap_vocabulary(path: str):
    """Two categories of one column swapped: the same bytes in another order."""
    raw = json.load(open(path))
    vocab = raw["vocabularies"]["Department Name"]
    vocab[0], vocab[1] = vocab[1], vocab[0]
    json.dump(raw, open(path, "w"), indent=1, ensure_ascii=False)


@pytest.mark.parametrize("name,damage", [("train.arrow", _flip_labels), ("train.arrow", _overwrite_middle),
                                         ("preprocessing.json", _swap_vocabulary)],
                         ids=["labels flipped", "bytes overwritten", "vocabulary swapped"])
def test_same_size_damage_is_rebuilt_with_one_warning(cfg_path, name, damage, caplog):
    cfg = load_config(cfg_path)
    calls = []
    pre, got, _ = build_and_read(cfg, calls)
    labels = got["train"].enc.labels.copy()
    del got  # its arrays map the file damaged below
    path = os.path.join(_only_folder(cfg.data.cache_dir), name)
    size = os.path.getsize(path)
    damage(path)
    assert os.path.getsize(path) == size
    caplog.clear()
    pre2, got2, _ = build_and_read(cfg, calls)
    assert calls == [1, 1]  # rebuilt, not mapped
    np.testing.assert_array_equal(got2["train"].enc.labels, labels)
    assert pre2 == pre
    warnings = [r.getMessage() for r in caplog.records if "damaged or stale" in r.getMessage()]
    assert len(warnings) == 1 and f"{name} differs from what was written (its sha256)" in warnings[0], warnings


def test_evaluates_rows_cache_checks_its_content_too(model_dir, work, tiny_bert, tmp_path, caplog):
    from mmbert.data.tokenize import load_tokenizer
    from mmbert.evaluation.options import EvalOptions
    from mmbert.evaluation.rows import scored_rows

    args = EvalOptions(model_dir=[model_dir], output_dir=str(tmp_path / "out"), data=str(work / "good.csv"),
                       cache_dir=str(tmp_path / "tok")).resolved()
    tok = load_tokenizer(tiny_bert)

    def rows():  # as evaluate.py does: the model's preprocessing as loaded (scored_rows sets its id column)
        return scored_rows(args, ENV, Preprocessor.load(os.path.join(model_dir, "preprocessing.json")), tok)[0]

    labels = rows().enc.labels.copy()
    path = os.path.join(_only_folder(tmp_path / "tok"), "data.arrow")
    _flip_labels(path)
    caplog.clear()
    ds = rows()
    np.testing.assert_array_equal(ds.enc.labels, labels)
    assert "data.arrow differs from what was written (its sha256)): rebuilding it" in caplog.text


# ----------------------------------------------------------------------------- shared caches (case 7)

def test_cache_folders_and_files_follow_the_umask(cfg_path):
    old = os.umask(0o022)
    try:
        build_and_read(load_config(cfg_path), [])
    finally:
        os.umask(old)
    folder = _only_folder(load_config(cfg_path).data.cache_dir)
    assert oct(os.stat(folder).st_mode & 0o777) == oct(0o755)
    assert {oct(os.stat(os.path.join(folder, f)).st_mode & 0o777) for f in os.listdir(folder)} == {oct(0o644)}


CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
from mmbert.data import cache
from mmbert.distributed.env import DistEnv

def build():
    raise AssertionError("rebuilt")

folder = sys.argv[1]
try:
    _, _, meta = cache.node_cache(DistEnv(0, 1, 0, 1, None, "none"), os.path.dirname(folder),
                                  lambda: os.path.basename(folder), build, hint="set data.cache_dir")
    print(json.dumps({{"rows": meta["splits"]["train"]["rows"]}}))
except Exception as e:
    print(json.dumps({{"error": str(e)}}))
"""


@pytest.fixture
def shared_root():
    """A cache folder other users can reach (pytest's tmp_path is private to its user)."""
    root = tempfile.mkdtemp(prefix="mmbert-shared-", dir="/tmp")
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _as_another_user(folder: str) -> dict:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        CHILD.format(root=ROOT), folder], capture_output=True, text=True, timeout=300, cwd="/tmp",
                       env=dict(os.environ, HOME="/tmp"))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to act as another user")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_another_user_maps_a_cache_or_is_told_it_may_not(cfg_path, shared_root, umask):
    cfg = load_config(cfg_path, [("data.cache_dir", os.path.join(shared_root, "tok"))])
    os.makedirs(cfg.data.cache_dir, mode=0o755)
    old = os.umask(umask)
    try:
        build_and_read(cfg, [])
    finally:
        os.umask(old)
    folder = _only_folder(cfg.data.cache_dir)
    got = _as_another_user(folder)
    if umask == 0o022:
        assert got == {"rows": 90}
    else:  # the owner's private umask: named as a permission problem, never rebuilt
        assert got == {"error": f"token cache {folder} cannot be read: permission denied (made by "
                                f"another user with a private umask?); ask its owner to make it readable (chmod -R "
                                f"a+rX), or set data.cache_dir"}


# ----------------------------------------------------------------------------- a tiny regression spread (case 11)

def _reg_cfg():
    from mmbert.config import DataConfig

    return DataConfig(text_columns=["Title"], numeric_columns=["Age"], label_column="Rating", task="regression")


def test_a_tiny_target_spread_is_standardised_and_only_equal_values_are_constant(reviews):
    import torch

    from mmbert.task import loss_function

    df = reviews.iloc[:50].copy()
    df["Rating"] = 1e-14 * np.arange(50)
    pre = Preprocessor.fit(df, _reg_cfg(), "tok", "train.csv")
    assert pre.target_std == pytest.approx(np.std(1e-14 * np.arange(50)), rel=1e-12)
    cfg = argparse.Namespace(train=argparse.Namespace(loss="mse"), data=_reg_cfg())
    mse = loss_function(cfg, pre)
    y = torch.tensor(df["Rating"].to_numpy())
    assert float(mse(torch.zeros(50, 1), y)) == pytest.approx(50.0, rel=1e-5)  # z has mean 0, std 1
    df["Rating"] = 0.1
    with pytest.raises(DataError, match=r"train.csv: regression target 'Rating' is constant \(0.1\)"):
        Preprocessor.fit(df, _reg_cfg(), "tok", "train.csv")
    df["Rating"] = 1.0 + 1e-14 * np.arange(50)  # a spread float32 scores cannot show: its own message
    with pytest.raises(DataError, match=r"varies too little to be predicted: std 1.44e-13 around mean 1.0000000000002"
                                        r"\d* is below float32's resolution there \(1.19e-07\); subtract a constant"):
        Preprocessor.fit(df, _reg_cfg(), "tok", "train.csv")


@pytest.mark.slow
def test_train_py_learns_a_target_of_tiny_spread(tiny_bert, reviews, tmp_path):
    df = reviews.iloc[:120].copy()
    df["Rating"] = df["Rating"] * 1e-14
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"),
                       data={"label_column": "Rating", "task": "regression", "cache": False,
                             "numeric_columns": ["Age", "Positive Feedback Count", "Recommended IND"]},
                       dist={"strategy": "none"})
    out = tmp_path / "run"
    run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--max-steps", "2"])
    pre = json.loads((out / "final" / "preprocessing.json").read_text())
    assert 1e-15 < pre["target_std"] < 1e-13
    with open(out / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r.get("split") == "val"]
    assert evals and all(np.isfinite(r["rmse"]) and r["rmse"] < 1e-13 for r in evals), evals

