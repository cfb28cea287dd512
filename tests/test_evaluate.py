"""evaluate.py with real processes (torchrun, gloo on CPU): every row once, in input order, on any world size."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, write_config

pytestmark = pytest.mark.slow

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
    assert list(pred.columns) == ["row", "rid", "label", "prob", "pred"]
    assert pred["label"].tolist() == source["Recommended IND"].astype(str).tolist()
    assert pred["pred"].tolist() == np.where(pred["prob"] >= 0.5, "1", "0").tolist()
    assert_rank_files_partition(out, nproc, 101)
    ranks = pd.concat([read_tsv(f) for f in glob.glob(os.path.join(out, "test_result_rank*.tsv"))])
    assert sorted(ranks["rid"]) == sorted(source["rid"])

    from sklearn.metrics import average_precision_score, roc_auc_score

    m = metrics(out)
    y = pred["label"].astype(int).to_numpy()
    assert m["n"] == 101 and sum(map(sum, m["confusion_matrix"])) == 101
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, pred["prob"]), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, pred["prob"]), abs=1e-12)
    assert 0 <= m["best_threshold"] <= 1 and m["best_threshold_f1"] >= m["f1"] - 1e-12
    for png in PNGS:
        assert os.path.getsize(os.path.join(out, png)) > 1000, png
    assert_same_run(out, single, ["prob"])


def test_prediction_run_without_label_column(binary_model, data101, single, tmp_path):
    nolabel = str(tmp_path / "nolabel.tsv")
    pd.read_csv(data101, dtype={"rid": str}).drop(columns=["Recommended IND"]).to_csv(nolabel, sep="\t", index=False)
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("metrics.json", "roc_curve.png", "test_result_rank5.tsv"):  # an earlier run's files
        (out / stale).write_text("old")
    evaluate(binary_model, str(out), "--data", nolabel, "--id-column", "rid", nproc=2)
    pred = read_tsv(str(out / "predictions.tsv"))
    assert list(pred.columns) == ["row", "rid", "prob", "pred"] and len(pred) == 101
    assert sorted(os.listdir(out)) == ["predictions.tsv", "probability_histogram.png",
                                       "test_result_rank0.tsv", "test_result_rank1.tsv"]
    assert_rank_files_partition(str(out), 2, 101)
    ref = read_tsv(os.path.join(single, "predictions.tsv"))
    assert pred["rid"].tolist() == ref["rid"].tolist() and pred["pred"].tolist() == ref["pred"].tolist()
    np.testing.assert_allclose(pred["prob"], ref["prob"], atol=1e-5)


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


def test_indices_keep_list_order_and_max_rows(binary_model, data101, single, tmp_path):
    idx = tmp_path / "idx.txt"
    idx.write_text("\n".join(map(str, [90, 3, 55, 7, 100, 0, 42])) + "\n")
    out = str(tmp_path / "out")
    evaluate(binary_model, out, "--data", data101, "--indices", str(idx), "--max-rows", "6", "--id-column", "rid")
    pred = read_tsv(os.path.join(out, "predictions.tsv"))
    assert pred["row"].tolist() == [90, 3, 55, 7, 100, 0]  # the index list's order, first 6
    ref = read_tsv(os.path.join(single, "predictions.tsv")).set_index("row").loc[[90, 3, 55, 7, 100, 0]]
    assert pred["rid"].tolist() == ref["rid"].tolist()
    np.testing.assert_allclose(pred["prob"], ref["prob"], atol=1e-5)
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
    from mmbert.evaluation.run import parse_eval_args

    base = ["--model-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    for extra, words in ((["--split", "test", "--indices", "x.txt"], "not allowed with"),
                         (["--batch-size", "0"], "--batch-size"),
                         (["--split", "dev"], "invalid choice")):
        with pytest.raises(ConfigError, match=words):
            parse_eval_args(base + extra)


def test_metrics_and_pictures_in_process(tmp_path):
    """The shared metric code against scikit-learn, and pictures for degenerate data (one class present)."""
    from sklearn import metrics as M

    from mmbert.evaluation.metrics import compute_metrics, summary_table
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
