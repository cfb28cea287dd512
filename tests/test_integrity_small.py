"""Issue 26, the smaller cases: a read-only HOME, `$` in names on the pictures, DatasetDict split names,
`hub:` without a name, empty model lists and duplicate columns, the state a Python API call leaves in the
user's process, a read-only TensorBoard folder, and the missing-column line of a wide table."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, assert_one_line_error, make_model_dir, run_cli, train_cli, write_config

from mmbert.config import load_config
from mmbert.errors import ArtifactError, DataError

DOLLARS = ["Cost ($) per_$unit", "a $x^2$ b", "50% off_{now}"]


@contextlib.contextmanager
def records(name: str):
    """The records a logger emits, whatever handlers and propagation earlier tests left on its parents."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = got.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield got
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ----------------------------------------------------------------------------- 8: HOME that cannot be written

def _locked_home_env(tmp_path, **extra) -> dict:
    """HOME=/proc (no folder can be made there, even by root), none of the cache variables set, and the
    temporary directory inside tmp_path (so the fallback is this test's own)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "MMBERT_DATASETS_CACHE", "HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR")}
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(HOME="/proc", TMPDIR=str(tmp), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", **extra)
    return env


def _run(args: list[str], env: dict):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _cache_warnings(r) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if "cannot be written" in ln]


@pytest.mark.slow
def test_read_only_home_trains_evaluates_and_predicts_with_one_warning(work, tiny_bert, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(work / "good.csv"), dist={"strategy": "none"})
    env = _locked_home_env(tmp_path)
    fallback = tmp_path / "tmp" / f"mmbert-cache-{os.getuid()}"
    r = _run(["train.py", "--config", cfg, "--output-dir", str(tmp_path / "run"), "--max-steps", "1"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_cache_warnings(r)) == 1 and str(fallback) in _cache_warnings(r)[0], r.stdout + r.stderr
    assert os.listdir(fallback / "datasets") and os.listdir(fallback / "tokenized")  # both caches, in the fallback
    r = _run(["evaluate.py", "--model-dir", str(tmp_path / "run" / "final"), "--data", str(work / "good.csv"),
              "--output-dir", str(tmp_path / "ev"), "--no-progress"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_cache_warnings(r)) == 1 and "Matplotlib" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert all((tmp_path / "ev" / p).stat().st_size > 0 for p in ("roc_curve.png", "confusion_matrix.png"))
    r = _run(["-m", "mmbert", "predict", str(tmp_path / "run" / "final"), "--data", str(work / "good.csv"),
              "--output", str(tmp_path / "p.tsv")], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "p.tsv", sep="\t")) == 160 and len(_cache_warnings(r)) == 1


@pytest.mark.slow
def test_read_only_home_uses_the_caches_the_user_set(work, tiny_bert, tmp_path):
    """HF_DATASETS_CACHE (the datasets cache the user set) takes load_table's cache, data.cache_dir the token cache:
    no warning, nothing in the temporary directory; --no-cache needs no token cache at all."""
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(work / "good.csv"), dist={"strategy": "none"})
    env = _locked_home_env(tmp_path, HF_DATASETS_CACHE=str(tmp_path / "hf"))
    r = _run(["train.py", "--config", cfg, "--output-dir", str(tmp_path / "a"), "--max-steps", "1",
              "--set", f"data.cache_dir={tmp_path / 'tok'}"], env)
    assert r.returncode == 0 and not _cache_warnings(r), r.stdout[-2000:] + r.stderr[-3000:]
    assert os.listdir(tmp_path / "hf" / "mmbert" / "datasets") and os.listdir(tmp_path / "tok")
    assert not os.listdir(tmp_path / "tmp")
    env = _locked_home_env(tmp_path, MMBERT_DATASETS_CACHE=str(tmp_path / "own"))
    r = _run(["train.py", "--config", cfg, "--output-dir", str(tmp_path / "b"), "--max-steps", "1", "--no-cache"], env)
    assert r.returncode == 0 and not _cache_warnings(r), r.stdout[-2000:] + r.stderr[-3000:]
    assert os.listdir(tmp_path / "own") and not os.listdir(tmp_path / "tmp")


# ----------------------------------------------------------------------------- 10: `$` in names on the pictures

def test_pictures_take_dollar_signs_in_class_and_column_names_literally(tmp_path):
    from mmbert.evaluation.plots import regression_plots, write_plots

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 60).astype(np.float32)
    labels = np.arange(60) % 3
    cm = np.bincount(labels * 3 + probs.argmax(1), minlength=9).reshape(3, 3).tolist()
    for d in ("multi", "binary"):
        (tmp_path / d).mkdir()
    paths = write_plots(str(tmp_path / "multi"), probs, DOLLARS, labels, cm)
    binary = probs[:, :2] / probs[:, :2].sum(1, keepdims=True)
    paths += write_plots(str(tmp_path / "binary"), binary, DOLLARS[:2], labels % 2, [[10, 20], [15, 15]])
    y = rng.normal(size=60)
    paths += [str(tmp_path / p) for p in regression_plots(str(tmp_path), y + rng.normal(size=60), DOLLARS[0], y)]
    paths += [str(tmp_path / p) for p in regression_plots(str(tmp_path), y, DOLLARS[0])]
    assert len(paths) == 11
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p


# ----------------------------------------------------------------------------- 12: DatasetDict split names

def _save_dict(frames: pd.DataFrame, path, names: list[str]):
    parts = np.array_split(np.arange(len(frames)), len(names))
    datasets.DatasetDict({n: datasets.Dataset.from_pandas(frames.iloc[rows], preserve_index=False)
                          for n, rows in zip(names, parts)}).save_to_disk(str(path))


def test_dataset_dict_eval_and_holdout_are_validation_and_test(reviews, tiny_bert, tmp_path):
    from mmbert.data.pipeline import load_splits

    frames = reviews.iloc[:90]
    _save_dict(frames, tmp_path / "dd", ["train", "eval", "holdout"])
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "dd"), data={"split": {}}))
    with records("mmbert.main") as got:
        splits = load_splits(cfg.data)
    assert {k: (len(v.df), v.file) for k, v in splits.items()} == {
        "train": (30, f"{tmp_path / 'dd'}[train]"), "val": (30, f"{tmp_path / 'dd'}[eval]"),
        "test": (30, f"{tmp_path / 'dd'}[holdout]")}
    assert splits["val"].df["Title"].tolist() == frames["Title"].iloc[30:60].tolist()
    assert not [r for r in got if "DatasetDict" in r.getMessage()]


def test_dataset_dict_without_validation_or_with_unknown_splits_says_so_in_one_warning(reviews, tiny_bert, tmp_path):
    from mmbert.data.pipeline import load_splits

    _save_dict(reviews.iloc[:90], tmp_path / "dd", ["train", "holdout", "unsupervised"])
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "dd"), data={"split": {}}))
    with records("mmbert.main") as got:
        splits = load_splits(cfg.data)
    assert sorted(splits) == ["test", "train"]
    lines = [r.getMessage() for r in got if r.levelno == logging.WARNING and "DatasetDict" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "no validation split" in lines[0] and "unsupervised not used" in lines[0]


# ----------------------------------------------------------------------------- 13: `hub:` without a name

@pytest.mark.parametrize("data", ["hub:", "hub::default", "hub:org/"])
def test_hub_without_a_dataset_name_gives_the_expected_form(data):
    from mmbert.data.io import load_table

    with pytest.raises(DataError, match=r"names no hub dataset: give it as hub:ORG/NAME"):
        load_table(data)


def test_train_cli_with_empty_hub_name_is_one_line(train_cfg, tmp_path):
    assert_one_line_error(train_cli(train_cfg, tmp_path / "out", "--data", "hub:"), "'hub:'", "hub:ORG/NAME")


# ----------------------------------------------------------------------------- 14: empty model list, duplicates

def test_load_of_an_empty_list_is_one_clear_error():
    import mmbert

    with pytest.raises(ArtifactError, match="list of model directories is empty"):
        mmbert.load([])


def test_predict_on_duplicate_column_names_names_them(work, tiny_bert):
    import mmbert

    model = mmbert.load(make_model_dir(work, tiny_bert))
    df = pd.read_csv(work / "train.csv").iloc[:4]
    doubled = pd.concat([df, df[["Age", "Title"]]], axis=1)
    for call in (model.predict, model.predict_proba, model.scores):
        with pytest.raises(DataError, match=r"column names 'Age', 'Title' appear more than once"):
            call(doubled)
    assert len(model.predict(df)) == 4


# ----------------------------------------------------------------------------- 15: the user's process state

API_SCRIPT = r"""
import json, logging, os, sys, torch, transformers, mmbert
cfg, out = sys.argv[1], sys.argv[2]
logging.getLogger("mmbert").setLevel(logging.ERROR)
def state():
    names = ["", "mmbert", "mmbert.main", "transformers"]
    return {"threads": torch.get_num_threads(), "hook": repr(sys.excepthook), "env": dict(os.environ),
            "rng": torch.get_rng_state().sum().item(),
            "loggers": {n: [repr(logging.getLogger(n).handlers), logging.getLogger(n).level,
                            logging.getLogger(n).propagate] for n in names}}
torch.set_num_threads(1)
os.environ["MMBERT_TEST_MARK"] = "kept"
before, after = state(), []
for i in range(2):
    mmbert.train(cfg, output_dir=os.path.join(out, str(i)), max_steps=1)
    after.append(state())
try:
    mmbert.train(cfg, output_dir=os.path.join(out, "bad"), max_steps=1, overrides={"data.numeric_columns": ["Nope"]})
except mmbert.errors.DataError:
    after.append(state())
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the caller's own group
mmbert.train(cfg, output_dir=os.path.join(out, "own"), max_steps=1)
kept = dist.is_initialized()
print("STATE " + json.dumps({"before": before, "after": after, "own_group_kept": kept}))
"""


@pytest.mark.slow
def test_api_train_leaves_the_process_as_it_found_it(train_cfg, tmp_path):
    r = run_cli(["-c", API_SCRIPT, train_cfg, str(tmp_path)], env={"OMP_NUM_THREADS": "1"})
    got = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("STATE "))[6:])
    assert len(got["after"]) == 3  # two runs and a failed one
    assert got["own_group_kept"]  # a process group the caller made is used and left to the caller
    for after in got["after"]:
        for key in ("threads", "hook", "loggers", "rng", "env"):
            assert after[key] == got["before"][key], (key, after[key], got["before"][key])


# ----------------------------------------------------------------------------- 16: read-only TensorBoard folder

@contextlib.contextmanager
def read_only_dir(path):
    """A folder nobody can write in, root included (the tests run as root: chmod alone does not stop it)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o500)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here: no folder is read-only for root")
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o700)


TRACKER_SCRIPT = r"""
import logging, sys
from mmbert.config import load_config
from mmbert.training.tracking import build_trackers
logging.basicConfig(format="%(levelname)s %(message)s")
cfg = load_config(sys.argv[1], [("train.output_dir", sys.argv[2]), ("train.report_to", ["tensorboard"])])
print("TRACKERS", len(build_trackers(cfg, is_main=True)))
"""


def test_read_only_tensorboard_folder_is_one_warning_line(train_cfg, tmp_path):
    """In its own process: pytest catches the writer thread's exception itself, where a user sees it on stderr."""
    pytest.importorskip("tensorboard")
    with read_only_dir(tmp_path / "tensorboard"):
        r = run_cli(["-c", TRACKER_SCRIPT, train_cfg, str(tmp_path)])
    assert "TRACKERS 0" in r.stdout, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("WARNING train.report_to: tensorboard could not start") and \
        str(tmp_path / "tensorboard") in lines[0], lines[0]


# ----------------------------------------------------------------------------- 17: missing column, wide table

def test_missing_column_of_a_wide_table_names_it_and_the_closest_columns(work, tiny_bert):
    import mmbert
    from mmbert.data.pipeline import check_columns

    wide = pd.read_csv(work / "train.csv").iloc[:3].rename(columns={"Age": "age "})
    wide = pd.concat([wide, pd.DataFrame(0, index=wide.index, columns=[f"feature_{i:04d}" for i in range(800)])],
                     axis=1)
    with pytest.raises(DataError) as train_err:
        check_columns(wide, ["Title", "Age", "Ratingg"], "wide.csv")
    pre = mmbert.load(make_model_dir(work, tiny_bert)).preprocessor
    with pytest.raises(DataError) as eval_err:
        pre.check_columns(wide, "wide.csv", require_label=True)
    for e, named in ((train_err, "columns 'Age', 'Ratingg' are missing"), (eval_err, "column 'Age' is missing")):
        msg = str(e.value)
        assert msg.startswith(f"wide.csv: configured {named}") and "'age '" in msg, msg
        assert len(msg) < 600 and "feature_0400" not in msg and "810 columns" in msg, msg
    assert "'Ratingg' -> 'Rating'" in str(train_err.value)
