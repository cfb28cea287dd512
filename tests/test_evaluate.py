"""evaluate.py with real processes (torchrun, gloo on CPU): every row once, in input order, on any world size;
ids that come back exactly, NaN models, fewer rows than ranks (evaluation and training validation), and
model directories that lie, refused before allocating. CLI stops follow docs/RELIABILITY.md: exit 2, one
`error: ` line, no traceback, nothing written."""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, make_model_dir, run_cli, write_config

PNGS = ("roc_curve.png", "pr_curve.png", "confusion_matrix.png", "probability_histogram.png")
SCALARS = ("n", "accuracy", "f1", "precision", "recall", "roc_auc", "pr_auc", "mcc", "log_loss",
           "best_threshold_f1", "best_threshold", "f1_macro", "f1_micro", "precision_macro", "recall_macro")


def train_tiny(tmp, tiny_bert, data: str, **data_cfg) -> str:
    out = str(tmp / "run")
    cfg = write_config(tmp / "c.yaml", tiny_bert, data, data=data_cfg, train={"output_dir": out})
    run_cli(["train.py", "--config", cfg, "--max-steps", "2", "--strategy", "none"])
    return os.path.join(out, "final")


def evaluate(model_dir: str, out: str, *args: str, nproc: int = 1, check: bool = True):
    return run_cli(["evaluate.py", "--model-dir", model_dir, "--output-dir", out, "--batch-size", "8",
                    "--no-progress", *args], nproc=nproc, check=check)


def read_tsv(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, dtype={"rid": str, "label": str, "pred": str})


def metrics(out: str) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def assert_same_run(out: str, ref: str, prob_cols: list[str]):
    """Same rows, ids, labels and predictions; probabilities and metrics equal up to float32 rounding
    (batches differ in composition and padding between world sizes)."""
    a, b = read_tsv(os.path.join(out, "predictions.tsv")), read_tsv(os.path.join(ref, "predictions.tsv"))
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        if c in prob_cols:
            np.testing.assert_allclose(a[c], b[c], rtol=0, atol=1e-5)
        else:
            assert a[c].tolist() == b[c].tolist(), c
    if os.path.exists(os.path.join(ref, "metrics.json")):
        ma, mb = metrics(out), metrics(ref)
        assert ma["confusion_matrix"] == mb["confusion_matrix"] and ma["classes"] == mb["classes"]
        for k in SCALARS:
            assert (k in ma) == (k in mb), k
            if k in ma and mb[k] is not None:
                assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
            elif k in ma:
                assert ma[k] is None, k


def assert_rank_files_partition(out: str, nproc: int, n: int):
    files = sorted(glob.glob(os.path.join(out, "test_result_rank*.tsv")))
    assert [os.path.basename(f) for f in files] == [f"test_result_rank{r}.tsv" for r in range(nproc)]
    parts = [read_tsv(f) for f in files]
    rows = np.concatenate([p["row"].to_numpy() for p in parts])
    assert len(rows) == n and len(set(rows.tolist())) == n  # all rows once between them, no padding repeats
    for p in parts:  # balanced shards, each in input order
        assert abs(len(p) - n / nproc) < 1 and (np.diff(p["row"].to_numpy()) > 0).all()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def binary_model(tiny_bert, reviews, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("binary")
    data = str(tmp / "train.parquet")
    reviews.iloc[:240].to_parquet(data)
    return train_tiny(tmp, tiny_bert, data)


@pytest.fixture(scope="module")
def data101(reviews, tmp_path_factory) -> str:
    """101 labelled rows (an uneven count for 2 and 3 ranks) with a unique id column that is not sorted."""
    df = reviews.iloc[200:301].copy()
    df.insert(0, "rid", [f"r{i:04d}" for i in np.random.default_rng(7).permutation(5000)[:len(df)]])
    path = str(tmp_path_factory.mktemp("d101") / "data101.csv")
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def single(binary_model, data101, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval1"))
    evaluate(binary_model, out, "--data", data101, "--id-column", "rid")
    return out


# ----------------------------------------------------------------------------- binary

@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_agree_with_one_process_and_count_every_row_once(binary_model, data101, single, tmp_path, nproc):
    out = str(tmp_path / "out")
    r = evaluate(binary_model, out, "--data", data101, "--id-column", "rid", nproc=nproc)
    assert "roc_auc" in r.stdout and "confusion matrix" in r.stdout  # the summary table, once
    assert r.stdout.count("== evaluation") == 1
    source = pd.read_csv(data101, dtype={"rid": str})
    pred = read_tsv(os.path.join(out, "predictions.tsv"))
    assert pred["rid"].tolist() == source["rid"].tolist()  # exactly the 101 ids, in input order
    assert pred["row"].tolist() == list(range(101))
    assert list(pred.columns) == ["row", "rid", "label", "prob_0", "prob_1", "pred"]
    assert pred["label"].tolist() == source["Recommended IND"].astype(str).tolist()
    np.testing.assert_allclose(pred["prob_0"] + pred["prob_1"], 1, atol=1e-6)
    assert pred["pred"].tolist() == np.where(pred["prob_1"] > pred["prob_0"], "1", "0").tolist()
    assert_rank_files_partition(out, nproc, 101)
    ranks = pd.concat([read_tsv(f) for f in glob.glob(os.path.join(out, "test_result_rank*.tsv"))])
    assert sorted(ranks["rid"]) == sorted(source["rid"])

    from sklearn.metrics import average_precision_score, roc_auc_score

    m = metrics(out)
    y = pred["label"].astype(int).to_numpy()
    assert m["n"] == 101 and sum(map(sum, m["confusion_matrix"])) == 101
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, pred["prob_1"]), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, pred["prob_1"]), abs=1e-12)
    assert 0 <= m["best_threshold"] <= 1 and m["best_threshold_f1"] >= m["f1"] - 1e-12
    for png in PNGS:
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    assert_same_run(out, single, ["prob_0", "prob_1"])


@pytest.mark.slow
def test_prediction_run_without_label_column(binary_model, data101, single, tmp_path):
    nolabel = str(tmp_path / "nolabel.tsv")
    pd.read_csv(data101, dtype={"rid": str}).drop(columns=["Recommended IND"]).to_csv(nolabel, sep="\t", index=False)
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("metrics.json", "roc_curve.png", "test_result_rank5.tsv"):  # an earlier run's files
        (out / stale).write_text("old")
    evaluate(binary_model, str(out), "--data", nolabel, "--id-column", "rid", nproc=2)
    pred = read_tsv(str(out / "predictions.tsv"))
    assert list(pred.columns) == ["row", "rid", "prob_0", "prob_1", "pred"] and len(pred) == 101
    assert sorted(os.listdir(out)) == ["predictions.tsv", "probability_histogram.png",
                                       "test_result_rank0.tsv", "test_result_rank1.tsv"]
    assert_rank_files_partition(str(out), 2, 101)
    ref = read_tsv(os.path.join(single, "predictions.tsv"))
    assert pred["rid"].tolist() == ref["rid"].tolist() and pred["pred"].tolist() == ref["pred"].tolist()
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]], ref[["prob_0", "prob_1"]], atol=1e-5)


@pytest.mark.slow
def test_split_from_model_config_reproduces_training_validation(binary_model, tmp_path):
    """--split val takes the rows from the config.yaml in the model dir (fractions + seed here) and the
    data.path recorded there; its metrics equal the validation that selected this model in train.py."""
    out = str(tmp_path / "val")
    evaluate(binary_model, out, "--split", "val")
    with open(os.path.join(os.path.dirname(binary_model), "metrics.jsonl")) as f:
        val = [json.loads(line) for line in f if '"split": "val"' in line][-1]
    m = metrics(out)
    assert m["n"] == val["n"] == 60 and m["confusion_matrix"] == val["confusion_matrix"]
    for k in ("accuracy", "roc_auc", "pr_auc", "log_loss"):
        assert m[k] == pytest.approx(val[k], rel=1e-5), k
    from mmbert.data.pipeline import fraction_split

    assert read_tsv(os.path.join(out, "predictions.tsv"))["row"].tolist() == fraction_split(240, [0.75, 0.25], 0)["val"].tolist()


@pytest.mark.slow
def test_indices_keep_list_order_and_max_eval_rows(binary_model, data101, single, tmp_path):
    idx = tmp_path / "idx.txt"
    idx.write_text("\n".join(map(str, [90, 3, 55, 7, 100, 0, 42])) + "\n")
    out = str(tmp_path / "out")
    evaluate(binary_model, out, "--data", data101, "--indices", str(idx), "--max-eval-rows", "6", "--id-column", "rid")
    pred = read_tsv(os.path.join(out, "predictions.tsv"))
    assert pred["row"].tolist() == [90, 3, 55, 7, 100, 0]  # the index list's order, first 6
    ref = read_tsv(os.path.join(single, "predictions.tsv")).set_index("row").loc[[90, 3, 55, 7, 100, 0]]
    assert pred["rid"].tolist() == ref["rid"].tolist()
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]], ref[["prob_0", "prob_1"]], atol=1e-5)
    assert metrics(out)["n"] == 6


# ----------------------------------------------------------------------------- multiclass and errors

@pytest.fixture(scope="module")
def bands(tiny_bert, reviews, tmp_path_factory):
    """A 3-class string label from Rating (low 1-2, mid 3, high 4-5); Rating itself is not a feature."""
    df = reviews.iloc[:301].copy()
    df["band"] = np.select([df["Rating"] <= 2, df["Rating"] == 3], ["low", "mid"], "high")
    tmp = tmp_path_factory.mktemp("bands")
    train = str(tmp / "train.parquet")
    df.iloc[:200].to_parquet(train)
    test = str(tmp / "test.jsonl")
    df.iloc[200:].to_json(test, orient="records", lines=True)
    model = train_tiny(tmp, tiny_bert, train, label_column="band",
                       numeric_columns=["Age", "Positive Feedback Count"])
    return model, test, df.iloc[200:]


@pytest.mark.slow
def test_multiclass_string_labels(bands, tmp_path):
    model, test, df = bands
    out2 = str(tmp_path / "two")
    evaluate(model, out2, "--data", test, nproc=2)  # 101 rows: uneven shards
    pred = read_tsv(os.path.join(out2, "predictions.tsv"))
    classes = ["high", "low", "mid"]  # the label map: sorted strings of the train split
    assert list(pred.columns) == ["row", "label", *[f"prob_{c}" for c in classes], "pred"]
    assert pred["label"].tolist() == df["band"].tolist() and len(pred) == 101
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert pred["pred"].tolist() == [classes[j] for j in probs.argmax(1)]
    assert_rank_files_partition(out2, 2, 101)

    from sklearn.metrics import f1_score, roc_auc_score

    m = metrics(out2)
    y = np.array([classes.index(v) for v in pred["label"]])
    assert m["classes"] == classes and np.asarray(m["confusion_matrix"]).shape == (3, 3)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
    assert m["f1_macro"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert m["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert set(m["per_class"]) == set(classes) and "best_threshold" not in m
    for png in PNGS:
        assert os.path.exists(os.path.join(out2, png)), png


@pytest.mark.slow
def test_label_outside_label_map_is_one_line_naming_the_row(bands, tmp_path):
    model, test, _ = bands
    df = pd.read_json(test, lines=True)
    df.loc[17, "band"] = "extreme"
    bad = str(tmp_path / "bad.csv")
    df.to_csv(bad, index=False)
    r = evaluate(model, str(tmp_path / "out"), "--data", bad, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "row 17" in lines[0] and "'extreme'" in lines[0] and bad in lines[0]
    assert "Traceback" not in r.stdout + r.stderr


def test_bad_arguments_are_one_line(tmp_path):
    from mmbert.errors import ConfigError
    from mmbert.cli import parse_eval_args

    base = ["--model-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    for extra, words in ((["--split", "test", "--indices", "x.txt"], "not allowed with"),
                         (["--batch-size", "0"], "--batch-size"),
                         (["--split", "dev"], "invalid choice")):
        with pytest.raises(ConfigError, match=words):
            parse_eval_args(base + extra)


# ----------------------------------------------------------------------------- EvalOptions

def test_eval_options_resolved_returns_a_new_checked_copy(tmp_path):
    import copy

    from mmbert.evaluation.options import EvalOptions

    opts = EvalOptions(model_dir=tmp_path / "m", output_dir=tmp_path / "o", importance=True)
    before = copy.deepcopy(opts)
    got = opts.resolved()
    assert opts == before and opts.model_dirs == [] and opts.importance_repeats is None  # left as it was
    assert got is not opts and got.model_dir == [str(tmp_path / "m")] and got.model_dirs == [str(tmp_path / "m")]
    assert (got.output_dir, got.main_model_dir) == (str(tmp_path / "o"), str(tmp_path / "m"))
    assert (got.importance_repeats, got.importance_seed, got.importance_rows) == (3, 0, None)
    assert EvalOptions(model_dir=["m"], output_dir="o").resolved().importance_repeats is None  # only with importance
    assert (got.plots, got.progress, got.cache, got.timeout_s, got.batch_size) == (True, True, True, 1800, 32)

    onnx = tmp_path / "export" / "model.onnx"
    onnx.parent.mkdir()
    for given in (str(onnx), str(onnx.parent)):  # the export folder stands in for --model-dir
        o = EvalOptions(onnx=given, output_dir="o").resolved()
        assert o.model_dir == o.model_dirs == [str(onnx.parent)] and o.model_name() == given


@pytest.mark.parametrize("changes, message", [
    ({"output_dir": None}, "evaluate.py: --output-dir is required"),
    ({"split": "test", "indices": "x.txt"}, "evaluate.py: argument --indices: not allowed with argument --split"),
    ({"split": "dev"}, "evaluate.py: argument --split: invalid choice: 'dev' (choose from 'train', 'val', 'test')"),
    ({"precision": "int8"}, "evaluate.py: argument --precision: invalid choice: 'int8'"),
    ({"batch_size": 0}, "evaluate.py: --batch-size must be >= 1, got 0"),
    ({"batch_size": "8"}, "evaluate.py: --batch-size must be an integer, got '8'"),
    ({"max_eval_rows": 0}, "evaluate.py: --max-eval-rows must be >= 1, got 0"),
    ({"num_threads": 0}, "evaluate.py: --num-threads must be >= 1, got 0"),
    ({"timeout_s": -1}, "evaluate.py: --timeout-s must be >= 1, got -1"),
    ({"importance": True, "importance_repeats": 0}, "evaluate.py: --importance-repeats must be >= 1, got 0"),
    ({"importance": True, "importance_rows": 0}, "evaluate.py: --importance-rows must be >= 1, got 0"),
    ({"importance_rows": 5}, "evaluate.py: --importance-rows needs --importance"),
    ({"importance_seed": 1}, "evaluate.py: --importance-seed needs --importance"),
    ({"onnx": "m.onnx", "precision": "fp16"}, "evaluate.py: --precision applies to PyTorch scoring"),
    ({"model_dir": []}, "evaluate.py: give --model-dir (a trained model) or --onnx (an exported one)"),
])
def test_eval_options_checks_are_one_line_naming_the_flag(tmp_path, changes, message):
    import copy

    from mmbert.errors import ConfigError
    from mmbert.evaluation.options import EvalOptions

    opts = EvalOptions(**{"model_dir": [str(tmp_path)], "output_dir": str(tmp_path / "o"), **changes})
    before = copy.deepcopy(opts)
    with pytest.raises(ConfigError) as e:
        opts.resolved()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert opts == before
    with pytest.raises(ConfigError, match="^mmbert.evaluate: "):  # the caller's name leads the line
        opts.resolved("mmbert.evaluate")


def test_eval_options_are_torch_free_and_flag_ready():
    """The command line imports the options before anything heavy; every field the flags are made of has help."""
    import dataclasses
    import subprocess
    import sys

    code = "import sys, mmbert.evaluation.options; print(sorted({'torch', 'argparse'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    from mmbert.evaluation.options import EvalOptions

    flags = [f for f in dataclasses.fields(EvalOptions) if f.init]
    assert all(f.metadata.get("help") for f in flags)
    assert "model_dirs" not in {f.name for f in flags}  # filled by resolved(), never given


def test_binary_and_multiclass_prediction_columns_are_prob_per_class():
    from types import SimpleNamespace

    from mmbert.evaluation.outputs import score_columns

    binary = score_columns(SimpleNamespace(task="classification", class_names=["no", "yes"]),
                           np.asarray([[0.8, 0.2], [0.3, 0.7]], np.float32))
    assert list(binary) == ["prob_no", "prob_yes", "pred"] and binary["pred"].tolist() == ["no", "yes"]
    np.testing.assert_allclose(binary["prob_yes"], [0.2, 0.7])
    three = score_columns(SimpleNamespace(task="classification", class_names=["a", "b", "c"]),
                          np.asarray([[0.1, 0.2, 0.7]], np.float32))
    assert list(three) == ["prob_a", "prob_b", "prob_c", "pred"] and three["pred"].tolist() == ["c"]


def test_metrics_and_pictures_in_process(tmp_path):
    """The shared metric code against scikit-learn, and pictures for degenerate data (one class present)."""
    from sklearn import metrics as M

    from mmbert.metrics import compute_metrics, summary_table
    from mmbert.evaluation.plots import write_plots

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, probs, ["no", "yes"])
    assert m["roc_auc"] == pytest.approx(M.roc_auc_score(y, p1))
    assert m["pr_auc"] == pytest.approx(M.average_precision_score(y, p1))
    assert m["mcc"] == pytest.approx(M.matthews_corrcoef(y, p1 >= 0.5))
    assert m["log_loss"] == pytest.approx(M.log_loss(y, probs))
    f1_at = M.f1_score(y, p1 >= m["best_threshold"])
    assert m["best_threshold_f1"] == pytest.approx(f1_at) and f1_at >= max(
        M.f1_score(y, p1 >= t) for t in np.linspace(0, 1, 101)) - 1e-12
    assert "best_threshold" in summary_table(m)

    one = compute_metrics(np.ones(5, int), probs[:5], ["no", "yes"])  # a single class: undefined, not a crash
    assert one["roc_auc"] is None and one["best_threshold"] is None and "n/a" in summary_table(one)
    paths = write_plots(str(tmp_path), probs[:5], ["no", "yes"], np.ones(5, int), one["confusion_matrix"])
    assert len(paths) == 4 and all(os.path.getsize(p) > 1000 for p in paths)
    three = rng.dirichlet(np.ones(3), 30)
    assert len(write_plots(str(tmp_path), three, ["a", "b", "c"])) == 1  # no labels: the histogram only


# ----------------------------------------------------------------------------- a model with ids
# These module fixtures stand in for conftest's `work` / `model_dir`: train.csv with a text id column `rid`.

@pytest.fixture(scope="module")
def work(tmp_path_factory, reviews):
    """train.csv (120 rows with a text id column `rid`) and a model dir whose preprocessing names `rid` as
    the id column: a random tiny model, nothing trained."""
    d = tmp_path_factory.mktemp("eval_ids")
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


# ----------------------------------------------------------------------------- ids come back exactly

IDS = ["00123", "9007199254740993", "a\rb", "c\nd", "e\tf", '"q" x', "NA", " sp ", None, "-0", "1e3", "r5"]


def read_back(path) -> tuple[list[str], list[str]]:
    """The id column as a user reads it: pandas with dtype=str and keep_default_na=False, and Python's csv."""
    by_pandas = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)["rid"].tolist()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    by_csv = [row[rows[0].index("rid")] for row in rows[1:]]
    return by_pandas, by_csv


@pytest.mark.slow
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


def test_one_process_writes_predictions_without_a_rank_file(work, model_dir, tmp_path):
    """One process: predictions.tsv holds its rows, so no test_result_rank0.tsv repeats them (an earlier run's
    rank file is removed); run through EvalOptions, as the command line and mmbert.evaluate do."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_result_rank0.tsv").write_text("old")
    code = ("import sys; from mmbert.evaluation.options import EvalOptions; "
            "from mmbert.evaluation.run import evaluate; evaluate(EvalOptions(model_dir=[sys.argv[1]], output_dir=sys.argv[2], data=sys.argv[3], plots=False, "
            "progress=False, cache=False, num_threads=1))")
    r = run_cli(["-c", code, model_dir, str(out), str(work / "train.csv")])
    assert outputs(out) == ["metrics.json", "predictions.tsv"]
    assert f"outputs in {out}: predictions.tsv, metrics.json\n" in r.stdout
    pred = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"label": str, "pred": str})
    assert list(pred.columns) == ["row", "rid", "label", "prob_0", "prob_1", "pred"] and len(pred) == 120


# ----------------------------------------------------------------------------- a NaN model, undefined metrics

@pytest.fixture(scope="module")
def nan_model(model_dir, work):
    from safetensors.torch import load_file, save_file

    from mmbert.artifact import seal_model_dir

    d = work / "nan_final"
    shutil.copytree(model_dir, d)
    sd = load_file(d / "model.safetensors")
    sd["fusion_head.fusion.head.out.bias"][0] = float("nan")
    save_file(sd, d / "model.safetensors")
    seal_model_dir(str(d))  # as if trained to NaN: the folder's digest matches, the NaN check must hold
    return str(d)


@pytest.mark.slow
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
    from mmbert.metrics import compute_metrics

    undefined = ("roc_auc", "pr_auc", "best_threshold_f1", "best_threshold")
    for labels in ([0, 0, 0], [1, 1, 1], [0]):
        m = compute_metrics(np.asarray(labels), np.tile([[0.3, 0.7]], (len(labels), 1)), ["0", "1"])
        assert all(m[k] is None for k in undefined), m
    m = compute_metrics(np.asarray([0, 1]), np.asarray([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), ["a", "b", "c"])
    assert m["roc_auc"] is None and m["pr_auc"] == 1.0


# ----------------------------------------------------------------------------- fewer rows than ranks

@pytest.mark.slow
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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- model directories that lie

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


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_model_dir_is_one_line_before_allocating(work, model_dir, tmp_path, case):
    from mmbert.artifact import seal_model_dir

    edit, fragments = TAMPERED[case]
    d = tmp_path / "final"
    shutil.copytree(model_dir, d)
    edit(d)
    seal_model_dir(str(d))  # a hostile folder can carry a matching digest: each check must hold by itself
    rows = ["--split", "val"] if case == "yaml python tag" else ["--data", str(work / "train.csv")]
    r = limited_eval(str(d), tmp_path / "out", *rows)
    assert_one_line_error(r, *fragments)
    assert outputs(tmp_path / "out") == [] and not (d / "PWNED").exists()


@pytest.mark.slow
def test_untampered_model_dir_scores_under_the_memory_limit(work, model_dir, tmp_path):
    """The limit of the tampering test leaves room for a real evaluation."""
    r = limited_eval(model_dir, tmp_path / "out", "--data", str(work / "train.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
