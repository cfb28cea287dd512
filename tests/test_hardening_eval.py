"""Hardening of the evaluation side (reliability issue, cases 1, 6, 7, 9, 10): stale cached data, ids
that must come back exactly, NaN models, fewer rows than ranks, and model directories that lie.

CLI cases run evaluate.py / train.py in real processes (torchrun + gloo for several ranks) and check the
user-facing contract of docs/HARDENING.md: exit 2, one `error: ` line, no traceback, nothing written."""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model_dir, run_cli, write_config
from test_hardening import assert_one_line_error


# ----------------------------------------------------------------------------- case 1: stale data cache

@pytest.mark.parametrize("new_rows", [4, 6], ids=["same size", "different size"])
def test_rewritten_file_with_restored_mtime_is_read_again(tmp_path, monkeypatch, new_rows):
    """cp -p / rsync -t / tar restore the old mtime over new content: the new rows must be read, never the
    cached old ones (the datasets cache keyed a local file on path + mtime)."""
    from mmbert.data.io import load_table

    monkeypatch.setenv("MMBERT_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.csv"
    pd.DataFrame({"id": [1, 2, 3, 4], "x": [0.5] * 4}).to_csv(path, index=False)
    before = os.stat(path)
    assert load_table(str(path))["id"].tolist() == [1, 2, 3, 4]
    new = pd.DataFrame({"id": [5 + i for i in range(new_rows)], "x": [0.5] * new_rows})
    new.to_csv(path, index=False)
    if new_rows == 4:
        assert os.path.getsize(path) == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert load_table(str(path))["id"].tolist() == new["id"].tolist()


# ----------------------------------------------------------------------------- a model directory

@pytest.fixture(scope="module")
def work(tmp_path_factory, reviews):
    """train.csv (120 rows with a text id column `rid`) and a model dir whose preprocessing names `rid` as
    the id column: a random tiny model, nothing trained."""
    d = tmp_path_factory.mktemp("hardening_eval")
    train = reviews.iloc[:120].copy()
    train.insert(0, "rid", [f"r{i}" for i in range(len(train))])
    train.to_csv(d / "train.csv", index=False)
    return d


@pytest.fixture(scope="module")
def model_dir(work, tiny_bert):
    return make_model_dir(work, tiny_bert, id_column="rid")


def eval_cli(model: str, data: str, out, *args: str, nproc: int = 1, timeout: int = 300):
    return run_cli(["evaluate.py", "--model-dir", model, "--data", data, "--output-dir", str(out),
                    "--no-progress", "--no-plots", "--timeout-s", "60", *args], nproc=nproc, timeout=timeout,
                   check=False)


def assert_every_rank_stops(r, *fragments: str):
    """Several ranks: each stops with the same one-line `[rank R] error: ...` (torchrun may end a rank before
    it prints, once another rank has exited: so at least one line, and every line the same error), no
    traceback of ours; torchrun's summary of the failed workers follows."""
    assert r.returncode != 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[rank ") and "] error: " in ln]
    assert lines, r.stderr[-3000:]
    assert all(all(f in ln for f in fragments) for ln in lines), (fragments, lines)
    assert "mmbert/" not in r.stderr, r.stderr[-3000:]  # no frame of ours: no traceback from the package


def outputs(out) -> list[str]:
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


# ----------------------------------------------------------------------------- case 6: ids come back exactly

IDS = ["00123", "9007199254740993", "a\rb", "c\nd", "e\tf", '"q" x', "NA", " sp ", None, "-0", "1e3", "r5"]


def read_back(path) -> tuple[list[str], list[str]]:
    """The id column as a user reads it: pandas with dtype=str and keep_default_na=False, and Python's csv."""
    by_pandas = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)["rid"].tolist()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    by_csv = [row[rows[0].index("rid")] for row in rows[1:]]
    return by_pandas, by_csv


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ids_come_back_exactly_in_every_prediction_file(work, model_dir, tmp_path, fmt):
    """Leading zeros, a 17-digit integer, tabs / newlines / a lone \\r / quotes, `NA`, a missing id: the
    merged predictions.tsv and both rank files give back exactly the input's ids (a missing id: empty)."""
    df = pd.read_csv(work / "train.csv").iloc[:len(IDS)].copy()
    df["rid"] = pd.array(IDS, dtype=object)
    path = tmp_path / f"ids.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False, quoting=csv.QUOTE_NONNUMERIC)  # the \r inside quotes, as any writer does
    else:
        df.to_parquet(path)
    expect = ["" if v is None else v for v in IDS]
    r = eval_cli(model_dir, str(path), tmp_path / "out", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = tmp_path / "out" / "predictions.tsv"
    assert read_back(pred) == (expect, expect)
    assert pd.read_csv(pred, sep="\t", dtype=str, keep_default_na=False)["row"].tolist() == [
        str(i) for i in range(len(IDS))]
    shards: dict[int, str] = {}
    for rank in (0, 1):
        f = tmp_path / "out" / f"test_result_rank{rank}.tsv"
        rows = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)["row"].astype(int).tolist()
        got, by_csv = read_back(f)
        assert got == by_csv == [expect[i] for i in rows]
        shards.update(zip(rows, got))
    assert sorted(shards) == list(range(len(IDS)))


def test_integer_ids_of_a_parquet_file_with_missing_values_stay_integers(tmp_path, monkeypatch):
    """Parquet/JSON ids are cast to text in Arrow: a nullable int64 column does not go through float."""
    from mmbert.data.io import load_table

    monkeypatch.setenv("MMBERT_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.parquet"
    pd.DataFrame({"rid": pd.array([9007199254740993, None, 123], dtype="Int64"), "x": [1.0, 2, 3]}).to_parquet(path)
    ids = load_table(str(path), ["rid"])["rid"]
    assert ids[0] == "9007199254740993" and pd.isna(ids[1]) and ids[2] == "123"
    assert load_table(str(path))["x"].tolist() == [1.0, 2.0, 3.0]  # other columns keep their types


# ----------------------------------------------------------------------------- case 7: a NaN model

@pytest.fixture(scope="module")
def nan_model(model_dir, work):
    from safetensors.torch import load_file, save_file

    d = work / "nan_final"
    shutil.copytree(model_dir, d)
    sd = load_file(d / "model.safetensors")
    sd["fusion_head.fusion.head.out.bias"][0] = float("nan")
    save_file(sd, d / "model.safetensors")
    return str(d)


@pytest.mark.parametrize("nproc", [1, 2])
def test_nan_model_stops_before_any_file_is_written(work, nan_model, tmp_path, nproc):
    """NaN outputs: one line naming how many rows and the first one, on every rank, and no prediction file
    (not even a rank's own): every rank decides on the same merged probabilities before writing."""
    data = str(work / "train.csv")
    r = eval_cli(nan_model, data, tmp_path / "out", nproc=nproc)
    fragments = ["NaN/inf probabilities", "for 120 of 120 rows", "first: row 0", nan_model]
    if nproc == 1:
        assert_one_line_error(r, *fragments)
    else:
        assert_every_rank_stops(r, *fragments)
    assert outputs(tmp_path / "out") == []


def test_metrics_of_a_one_class_split_are_none_never_nan():
    """Undefined metrics (one class present) are None in every report: the same keys, never nan or 0.0."""
    from mmbert.evaluation.metrics import compute_metrics

    undefined = ("roc_auc", "pr_auc", "best_threshold_f1", "best_threshold")
    for labels in ([0, 0, 0], [1, 1, 1], [0]):
        m = compute_metrics(np.asarray(labels), np.tile([[0.3, 0.7]], (len(labels), 1)), ["0", "1"])
        assert all(m[k] is None for k in undefined), m
    m = compute_metrics(np.asarray([0, 1]), np.asarray([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), ["a", "b", "c"])
    assert m["roc_auc"] is None and m["pr_auc"] == 1.0


# ----------------------------------------------------------------------------- case 9: fewer rows than ranks

def test_eval_shard_gives_every_rank_the_same_number_of_positions():
    from mmbert.data.samplers import eval_shard

    for n in range(1, 8):
        for world in range(1, 6):
            parts = [eval_shard(n, r, world, np.arange(n)) for r in range(world)]
            assert len({len(s) for s, _ in parts}) == 1
            own = np.concatenate([s[real] for s, real in parts])
            assert sorted(own.tolist()) == list(range(n))


def test_three_ranks_evaluate_one_row(work, model_dir, tmp_path):
    path = tmp_path / "one.csv"
    pd.read_csv(work / "train.csv").iloc[[7]].to_csv(path, index=False)
    r = eval_cli(model_dir, str(path), tmp_path / "out", nproc=3)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert pred["row"].tolist() == ["0"] and pred["rid"].tolist() == ["r7"]
    ranks = [pd.read_csv(tmp_path / "out" / f"test_result_rank{i}.tsv", sep="\t") for i in range(3)]
    assert [len(x) for x in ranks] == [1, 0, 0]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 1


def test_three_rank_ddp_training_with_one_val_row_finishes(work, tiny_bert, tmp_path):
    """Validation shards through the same eval_shard: the two ranks without a row score a padding repeat,
    so every rank runs the same collectives. A 60 s collective timeout makes a hang fail fast."""
    val = tmp_path / "val.csv"
    pd.read_csv(work / "train.csv").iloc[[3]].to_csv(val, index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, None,
                       data={"split": {"train_file": str(work / "train.csv"), "val_file": str(val)}},
                       dist={"timeout_s": 60})
    out = tmp_path / "run"
    r = run_cli(["train.py", "--config", cfg, "--strategy", "ddp", "--max-steps", "2", "--batch-size", "4",
                 "--output-dir", str(out)], nproc=3, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists()
    evals = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"split": "val"' in ln]
    assert evals and evals[-1]["n"] == 1


# ----------------------------------------------------------------------------- case 10: artifacts that lie

def _edit_json(rel: str, **changes):
    def edit(d):
        raw = json.loads((d / rel).read_text())
        for key, value in changes.items():
            if callable(value):
                value(raw)
            else:
                raw[key] = value
        (d / rel).write_text(json.dumps(raw))
    return edit


def _reshape_tensor(d):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    sd["fusion_head.fusion.head.out.bias"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors")


def _python_tag(d):
    marker = d / "PWNED"
    text = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(f"pwn: !!python/object/apply:os.system ['touch {marker}']\n" + text)


def _first_cardinality(raw):
    raw["cardinalities"][0] = 50_000_000


def _zero_std(raw):
    raw["numeric_stats"]["Age"]["std"] = 0


TAMPERED = {  # case -> (edit of a copy of the model dir, fragments of the one-line error)
    "spec cardinality 5e7": (_edit_json("model_spec.json", cardinalities=_first_cardinality),
                             ["model_spec.json", "'cardinalities'", "50000000"]),
    "spec hidden_dim 64": (_edit_json("model_spec.json", hidden_dim=64), ["model.safetensors", "model_spec.json"]),
    "spec hidden_dim 1e9": (_edit_json("model_spec.json", hidden_dim=10**9), ["model_spec.json"]),
    "spec num_classes float": (_edit_json("model_spec.json", num_classes=5e7),
                               ["model_spec.json", "'num_classes' must be an integer"]),
    "encoder vocab 1e10": (_edit_json("encoder/config.json", vocab_size=10**10),
                           ["model.safetensors", "encoder/config.json (field 'vocab_size')"]),
    "encoder layers 1e9": (_edit_json("encoder/config.json", num_hidden_layers=10**9),
                           ["encoder/config.json", "'num_hidden_layers'"]),
    "tensor of the wrong shape": (_reshape_tensor, ["model.safetensors", "fusion_head.fusion.head.out.bias",
                                                    "has shape [3]", "implies [2]"]),
    "max_tokens -5": (_edit_json("preprocessing.json", max_tokens=-5),
                      ["preprocessing.json", "'max_tokens' must be an integer >= 8", "-5"]),
    "max_tokens beyond positions": (_edit_json("preprocessing.json", max_tokens=10**6),
                                    ["preprocessing.json", "'max_tokens'", "max_position_embeddings"]),
    "numeric std 0": (_edit_json("preprocessing.json", numeric_stats=_zero_std),
                      ["preprocessing.json", "'numeric_stats.Age'"]),
    "yaml python tag": (_python_tag, ["config.yaml", "not valid YAML"]),
}
MEMORY_LIMIT = 3 * 2**30  # address space of the evaluate process: a multi-GB allocation fails loudly


def limited_eval(model: str, out, *args: str):
    """evaluate.py under RLIMIT_AS = MEMORY_LIMIT."""
    limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
               "sys.argv = sys.argv[1:]; runpy.run_path('evaluate.py', run_name='__main__')").format(MEMORY_LIMIT)
    return run_cli(["-c", limited, "evaluate.py", "--model-dir", model, "--output-dir", str(out), "--no-progress",
                    "--no-plots", *args], timeout=120, check=False)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_model_dir_is_one_line_before_allocating(work, model_dir, tmp_path, case):
    edit, fragments = TAMPERED[case]
    d = tmp_path / "final"
    shutil.copytree(model_dir, d)
    edit(d)
    rows = ["--split", "val"] if case == "yaml python tag" else ["--data", str(work / "train.csv")]
    r = limited_eval(str(d), tmp_path / "out", *rows)
    assert_one_line_error(r, *fragments)
    assert outputs(tmp_path / "out") == [] and not (d / "PWNED").exists()


def test_untampered_model_dir_scores_under_the_memory_limit(work, model_dir, tmp_path):
    """The limit of the tampering test leaves room for a real evaluation."""
    r = limited_eval(model_dir, tmp_path / "out", "--data", str(work / "train.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
