"""Regression end to end: config rules, the standardised target (fitted on train only, saved, older files still
classification), every fusion's single output, the loss and a planted linear signal learned in-process, metrics
against scikit-learn / scipy, prediction files, the Predictor, and (slow) train.py / evaluate.py on 1 and 2 ranks,
export.py and evaluate --onnx."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_one_line_error, run_cli, write_config

import mmbert
from mmbert.config import DataConfig, load_config
from mmbert.data.dataset import collate
from mmbert.data.pipeline import build_dataset
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import load_tokenizer
from mmbert.errors import ArtifactError, ConfigError, DataError
from mmbert.models.classifier import ModelSpec, MultimodalClassifier, load_encoder, scores
from mmbert.models.registry import fusion_names

NUM = ["Age", "Positive Feedback Count", "Recommended IND"]
CAT = ["Division Name", "Department Name", "Class Name"]
REG_DATA = {"label_column": "Rating", "task": "regression", "numeric_columns": NUM}


def _cfg(tmp_path, tiny_bert, data=None, train=None, **kw):
    return load_config(write_config(tmp_path / "c.yaml", tiny_bert, "d.csv", data={**REG_DATA, **(data or {})},
                                    train=train or {}, **kw))


# ----------------------------------------------------------------------------- config

def test_task_resolution_and_per_task_metric_defaults(tmp_path, tiny_bert):
    cfg = _cfg(tmp_path, tiny_bert)
    from mmbert.task import loss_of, metric_mode_of, metric_of, task_of

    assert (metric_of(cfg), metric_mode_of(cfg), cfg.train.loss) == ("rmse", "min", "auto")
    auto = _cfg(tmp_path, tiny_bert, data={"task": "auto", "label_type": "float"}, train={"metric": "r2"})
    assert (metric_of(auto), metric_mode_of(auto)) == ("r2", "max")

    assert task_of(auto.data) == "regression" and loss_of(auto) == "mse"
    # classification configs that omit or set the metric resolve as before
    plain = load_config(write_config(tmp_path / "p.yaml", tiny_bert, "d.csv"))
    assert (metric_of(plain), metric_mode_of(plain), loss_of(plain)) == ("roc_auc", "max", "cross_entropy")
    assert task_of(plain.data) == "classification"
    ll = load_config(write_config(tmp_path / "l.yaml", tiny_bert, "d.csv", train={"metric": "log_loss",
                                                                                   "metric_mode": "min"}))
    assert (metric_of(ll), metric_mode_of(ll)) == ("log_loss", "min")
    shipped = load_config("womens_clothing_regression")  # the packaged regression config
    assert task_of(shipped.data) == "regression" and shipped.data.label_column == "Rating"
    assert "Rating" not in shipped.data.numeric_columns + shipped.data.serialize_columns


@pytest.mark.parametrize("data,train,fragments", [
    ({"labels": [1, 2]}, {}, ["data.labels", "regression"]),
    ({}, {"class_weights": [1.0, 2.0]}, ["train.class_weights", "regression"]),
    ({}, {"metric": "roc_auc"}, ["train.metric", "'roc_auc' is not a regression metric", "rmse, mae"]),
    ({}, {"loss": "cross_entropy"}, ["train.loss", "valid: auto, mse, huber"]),
    ({}, {"huber_delta": 0}, ["train.huber_delta", "> 0"]),
    ({"label_type": "int"}, {}, ["data.label_type", "'int'"]),
    ({"task": "classification", "label_type": "float"}, {}, ["data.label_type", "float labels mean regression"]),
    ({"task": "classification"}, {"metric": "rmse"}, ["'rmse' is not a classification metric", "roc_auc"]),
    ({"task": "classification"}, {"loss": "mse"}, ["train.loss", "'mse' is not a classification loss"]),
], ids=["labels", "class_weights", "cls_metric", "cls_loss", "huber_delta", "int_labels", "float_cls",
        "reg_metric_on_cls", "mse_on_cls"])
def test_config_errors(tmp_path, tiny_bert, data, train, fragments):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, tiny_bert, data=data, train=train)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


# ----------------------------------------------------------------------------- preprocessing

def _reg_data_cfg(**kw) -> DataConfig:
    return DataConfig(text_columns=["Title", "Review Text"], numeric_columns=NUM, categorical_columns=CAT,
                      label_column="Rating", task="regression", max_tokens=24, max_chunks=2, **kw)


def test_target_standardised_on_train_only_and_saved(reviews, tmp_path, tiny_bert):
    train, val = reviews.iloc[:100], reviews.iloc[100:160].copy()
    val["Rating"] = val["Rating"] + 100.0  # val values must not move the fitted statistics
    pre = Preprocessor.fit(train, _reg_data_cfg(), "tok", "train.csv")
    y = train["Rating"].to_numpy(dtype=float)
    assert (pre.task, pre.label_type, pre.classes, pre.num_outputs) == ("regression", "float", [], 1)
    assert pre.target_mean == pytest.approx(y.mean(), abs=1e-12) and pre.target_std == pytest.approx(y.std(), abs=1e-12)
    pre.save(str(tmp_path / "p.json"))
    back = Preprocessor.load(str(tmp_path / "p.json"))
    assert back == pre
    enc = back.transform(val, "val.csv")
    assert enc.labels.dtype == np.float64 and np.array_equal(enc.labels, val["Rating"].to_numpy(dtype=float))
    ds = build_dataset(back, load_tokenizer(tiny_bert), val, "val.csv")
    assert collate(ds, [0, 1], 0)["labels"].dtype == torch.float64


@pytest.mark.parametrize("value,fragment", [("five", "'five' is not a finite number"), (np.inf, "not a finite number"),
                                            (None, "the label is missing"), ("", "the label is missing")])
def test_bad_train_target_names_file_column_row(reviews, value, fragment):
    df = reviews.iloc[:50].copy().astype({"Rating": object})
    df.loc[17, "Rating"] = value
    with pytest.raises(DataError) as e:
        Preprocessor.fit(df, _reg_data_cfg(), "tok", "train.csv")
    assert str(e.value).startswith("train.csv: column 'Rating', row 17: ") and fragment in str(e.value)


def test_constant_target_and_tampered_stats_are_clear_errors(reviews, tmp_path):
    df = reviews.iloc[:50].copy()
    df["Rating"] = 4
    with pytest.raises(DataError, match="train.csv: regression target 'Rating' is constant .*std is 0"):
        Preprocessor.fit(df, _reg_data_cfg(), "tok", "train.csv")
    pre = Preprocessor.fit(reviews.iloc[:50], _reg_data_cfg(), "tok", "train.csv")
    raw = {**pre.to_dict(), "target_std": 0.0}
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="'target_std' must be a finite number > 0"):
        Preprocessor.load(str(tmp_path / "bad.json"))


def test_old_preprocessing_and_spec_files_load_as_classification(reviews, tmp_path):
    from mmbert.artifact import SPEC_FIELDS, read_spec

    cls_cfg = DataConfig(text_columns=["Title"], numeric_columns=NUM, label_column="Recommended IND")
    raw = Preprocessor.fit(reviews.iloc[:50], cls_cfg, "tok", "f").to_dict()
    for k in ("task", "target_mean", "target_std"):
        raw.pop(k)
    (tmp_path / "preprocessing.json").write_text(json.dumps(raw))
    old = Preprocessor.load(str(tmp_path / "preprocessing.json"))
    assert (old.task, old.classes, old.num_outputs) == ("classification", [0, 1], 2)
    spec = {k: v for k, v in _spec("concat", "classification").to_dict().items() if k in SPEC_FIELDS}
    spec["num_classes"] = 2
    (tmp_path / "model_spec.json").write_text(json.dumps(spec))
    assert read_spec(str(tmp_path)).task == "classification"


# ----------------------------------------------------------------------------- model

def _spec(fusion, task="regression", **kw) -> ModelSpec:
    return ModelSpec(fusion=fusion, hidden_dim=32, num_heads=2, dropout=0.0, pooling="cls", num_numeric=len(NUM),
                     cardinalities=[3, 6, 20], cat_embedding_dim=8, num_classes=1, encoder="tiny", task=task,
                     **({"target_mean": 4.2, "target_std": 1.1} if task == "regression" else {}), **kw)


@pytest.fixture(scope="module")
def batch(reviews, tiny_bert):
    pre = Preprocessor.fit(reviews.iloc[:120], _reg_data_cfg(), "tok", "f")
    ds = build_dataset(pre, load_tokenizer(tiny_bert), reviews.iloc[:120], "f")
    return collate(ds, np.arange(7), 0)


@pytest.mark.parametrize("fusion", fusion_names())
def test_every_fusion_gives_one_output_and_scores_in_original_units(fusion, batch, tiny_bert):
    torch.manual_seed(0)
    encoder = None if fusion == "tab_only" else load_encoder(tiny_bert, pretrained=True)
    model = MultimodalClassifier(_spec(fusion), encoder).eval()
    with torch.no_grad():
        out = model.forward_batch(batch)
    assert out.shape == (7, 1)
    s = scores(out, model.spec)
    assert s.dtype == torch.float32 and s.shape == (7, 1)
    torch.testing.assert_close(s, out * 1.1 + 4.2)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_loss_is_taken_on_the_standardised_target(tmp_path, tiny_bert, loss):
    from types import SimpleNamespace

    from mmbert.task import loss_function

    cfg = _cfg(tmp_path, tiny_bert, train={"loss": loss, "huber_delta": 0.5})
    fn = loss_function(cfg, SimpleNamespace(target_mean=10.0, target_std=2.0))
    out = torch.tensor([[0.0], [1.0], [-2.0]])
    y = torch.tensor([10.0, 14.0, 9.0], dtype=torch.float64)  # standardised: 0, 2, -0.5
    z = torch.tensor([0.0, 2.0, -0.5])
    want = (((out[:, 0] - z) ** 2).sum() if loss == "mse"
            else torch.nn.functional.huber_loss(out[:, 0], z, delta=0.5, reduction="sum"))
    assert fn(out, y).item() == pytest.approx(want.item(), rel=1e-6)
    assert fn(out, y).item() == pytest.approx(0 + 1 + 2.25 if loss == "mse" else 0 + 0.375 + 0.5 * (1.5 - 0.25), rel=1e-6)


# ----------------------------------------------------------------------------- metrics

def test_regression_metrics_against_sklearn_and_scipy():
    from scipy.stats import spearmanr
    from sklearn import metrics as M

    from mmbert.metrics import compute_regression_metrics, summary_table

    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5])
    p = np.array([1.2, 1.9, 3.4, 3.6, 4.1, 2.9, 3.0])
    m = compute_regression_metrics(y, p)
    assert m["n"] == 7
    assert m["rmse"] == pytest.approx(np.sqrt(M.mean_squared_error(y, p)), rel=1e-12)
    assert m["mse"] == pytest.approx(M.mean_squared_error(y, p), rel=1e-12)
    assert m["mae"] == pytest.approx(M.mean_absolute_error(y, p), rel=1e-12)
    assert m["r2"] == pytest.approx(M.r2_score(y, p), rel=1e-12)
    assert m["spearman"] == pytest.approx(spearmanr(y, p).statistic, rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(1.59 / 7), abs=1e-12)  # by hand: squared errors sum to 1.59
    assert "rmse" in summary_table(m)
    flat = compute_regression_metrics(np.ones(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert flat["r2"] is None and flat["spearman"] is None and flat["mae"] == 1.5


# ----------------------------------------------------------------------------- training, evaluation, Predictor

def _planted(n: int, seed: int) -> pd.DataFrame:
    """y = 30 + 8 x1 - 5 x2 + 6 [c == b] + small noise: a signal a tab_only model must learn."""
    g = np.random.default_rng(seed)
    x1, x2, c = g.normal(size=n), g.normal(size=n), g.choice(["a", "b"], size=n)
    y = 30 + 8 * x1 - 5 * x2 + 6 * (c == "b") + 0.1 * g.normal(size=n)
    return pd.DataFrame({"rid": [f"r{i}" for i in range(n)], "note": ["x"] * n, "x1": x1, "x2": x2, "c": c, "y": y})


@pytest.fixture(scope="module")
def planted_run(tiny_bert, tmp_path_factory):
    work = tmp_path_factory.mktemp("planted")
    _planted(320, 0).to_csv(work / "train.csv", index=False)
    _planted(64, 1).to_csv(work / "new.csv", index=False)
    cfg = write_config(work / "c.yaml", tiny_bert, str(work / "train.csv"),
                       data={"text_columns": ["note"], "numeric_columns": ["x1", "x2"], "categorical_columns": ["c"],
                             "label_column": "y", "label_type": "float", "id_column": "rid"},
                       model={"fusion": "tab_only"},
                       train={"lr": 3e-3, "head_lr": None, "batch_size": 16, "log_every": 5, "eval_every": 20,
                              "seed": 0, "eval_each_epoch": False})  # head_lr pinned: one rate for every part
    run = mmbert.train(cfg, output_dir=str(work / "run"), max_steps=120)
    return work, run


def test_planted_linear_signal_is_learned_and_best_is_the_minimum_rmse(planted_run):
    work, run = planted_run
    recs = [json.loads(ln) for ln in open(run.metrics_file)]
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("split") == "val"]
    assert losses[-1] < 0.1 * losses[0]
    assert [r["step"] for r in evals] == [20, 40, 60, 80, 100, 120]
    val_y = pd.read_csv(work / "train.csv")["y"]
    assert evals[-1]["rmse"] < 0.3 * val_y.std() and evals[-1]["r2"] > 0.9  # the mean predictor: r2 0
    best = min(evals, key=lambda r: r["rmse"])
    assert (run.summary["metric"], run.summary["best_step"]) == ("rmse", best["step"])
    assert run.summary["best_metric"] == pytest.approx(best["rmse"])
    spec = json.load(open(os.path.join(run.model_dir, "model_spec.json")))
    assert (spec["task"], spec["num_classes"]) == ("regression", 1)


def test_evaluate_files_metrics_plots_and_predictor(planted_run, capsys):
    work, run = planted_run
    new = pd.read_csv(work / "new.csv")
    res = mmbert.evaluate(run.model_dir, output_dir=str(work / "eval"), data=str(work / "new.csv"), progress=False)
    pred = pd.read_csv(res.predictions, sep="\t", dtype={"rid": str})
    assert list(pred.columns) == ["row", "rid", "label", "prediction"]
    assert pred["row"].tolist() == list(range(64)) and pred["rid"].tolist() == new["rid"].tolist()
    np.testing.assert_allclose(pred["label"], new["y"], rtol=1e-6)
    from mmbert.metrics import compute_regression_metrics

    m = json.load(open(os.path.join(work, "eval", "metrics.json")))
    ref = compute_regression_metrics(new["y"].to_numpy(), pred["prediction"].to_numpy())
    for k in ("rmse", "mae", "r2", "spearman"):
        assert m[k] == pytest.approx(ref[k], rel=1e-5), k
    assert m["r2"] > 0.9 and "data_report" in m and "per_class" not in m and "classes" not in m
    for f in ("predicted_vs_actual.png", "residual_histogram.png"):
        assert os.path.getsize(work / "eval" / f) > 0, f
    assert not os.path.exists(work / "eval" / "test_result_rank0.tsv")  # one process: predictions.tsv alone
    assert not os.path.exists(work / "eval" / "roc_curve.png")
    assert "rmse" in capsys.readouterr().out

    model = mmbert.load(run.model_dir)
    assert (model.task, model.classes, model.metadata["task"]) == ("regression", [], "regression")
    got = model.predict(new.drop(columns=["y"]))
    assert got.name == "y" and (got.index == new.index).all()
    np.testing.assert_allclose(got.to_numpy(), pred["prediction"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="regression model: it has no class probabilities"):
        model.predict_proba(new)

    # without labels: a prediction run, the predictions' histogram
    new.drop(columns=["y"]).to_csv(work / "unlabelled.csv", index=False)
    mmbert.evaluate(run.model_dir, output_dir=str(work / "pred"), data=str(work / "unlabelled.csv"), progress=False)
    assert list(pd.read_csv(work / "pred" / "predictions.tsv", sep="\t").columns) == ["row", "rid", "prediction"]
    assert os.path.isfile(work / "pred" / "prediction_histogram.png")
    assert "predicted y: mean" in capsys.readouterr().out


# ----------------------------------------------------------------------------- slow: real processes

@pytest.mark.slow
def test_train_evaluate_two_ranks_export_onnx_parity(no_dropout_bert, reviews, tmp_path):
    """train.py on 1 process and 2 FSDP ranks (same global batch: same losses and weights); evaluate.py on 1 and
    2 ranks (the same predictions, every row once); export.py verifies the graph; evaluate --onnx and mmbert
    predict serve the same predictions."""
    from safetensors.torch import load_file

    data = tmp_path / "d.parquet"
    reviews.iloc[:200].to_parquet(data)
    cfg = write_config(tmp_path / "c.yaml", no_dropout_bert, str(data), data=REG_DATA,
                       train={"select_best": False, "eval_each_epoch": False})
    for name, nproc, bs in (("one", 1, 16), ("fsdp", 2, 8)):
        run_cli(["train.py", "--config", cfg, "--strategy", "fsdp" if nproc > 1 else "none", "--max-steps", "3",
                 "--batch-size", str(bs), "--output-dir", str(tmp_path / name), "--set", "data.max_eval_rows=40"],
                nproc=nproc)
    loss = {n: [json.loads(ln)["loss"] for ln in open(tmp_path / n / "metrics.jsonl") if '"loss"' in ln]
            for n in ("one", "fsdp")}
    assert len(loss["one"]) == 3
    np.testing.assert_allclose(loss["fsdp"], loss["one"], atol=1e-5)
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "fsdp"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    model = str(tmp_path / "one" / "final")
    for nproc in (1, 2):
        run_cli(["evaluate.py", "--model-dir", model, "--data", str(data), "--output-dir", str(tmp_path / f"e{nproc}"),
                 "--no-progress", "--no-plots"], nproc=nproc)
    one, two = (pd.read_csv(tmp_path / f"e{n}" / "predictions.tsv", sep="\t") for n in (1, 2))
    assert list(one.columns) == ["row", "label", "prediction"] and one["row"].tolist() == list(range(200))
    np.testing.assert_allclose(two["prediction"], one["prediction"], atol=1e-5)
    ranks = pd.concat([pd.read_csv(tmp_path / "e2" / f"test_result_rank{r}.tsv", sep="\t") for r in (0, 1)])
    assert sorted(ranks["row"].tolist()) == list(range(200))  # every row once across the rank files
    assert one["prediction"].std() > 1e-3, "predictions barely vary: the comparisons would prove little"

    r = run_cli(["export.py", "--model-dir", model, "--output-dir", str(tmp_path / "exp"), "--quantize", "int8"])
    manifest = json.load(open(tmp_path / "exp" / "onnx_manifest.json"))
    report = manifest["exports"]["model.onnx"]
    assert (report["output"], report["task"]) == ("prediction", "regression") and report["max_abs_diff"] < 1e-4, r.stdout
    assert report["int8"]["max_abs_drift_vs_fp32"] <= report["int8"]["tolerance"]  # in target standard deviations
    run_cli(["evaluate.py", "--onnx", str(tmp_path / "exp"), "--data", str(data), "--output-dir",
             str(tmp_path / "eo"), "--no-progress", "--no-plots"])
    onnx = pd.read_csv(tmp_path / "eo" / "predictions.tsv", sep="\t")
    np.testing.assert_allclose(onnx["prediction"], one["prediction"], atol=1e-4)
    m1, mo = (json.load(open(tmp_path / d / "metrics.json")) for d in ("e1", "eo"))
    assert mo["rmse"] == pytest.approx(m1["rmse"], abs=1e-4)
    run_cli(["-m", "mmbert", "predict", str(tmp_path / "exp"), "--data", str(data), "--output",
             str(tmp_path / "p.csv")])
    served = pd.read_csv(tmp_path / "p.csv")
    assert list(served.columns) == ["row", "prediction"]
    np.testing.assert_allclose(served["prediction"], one["prediction"], atol=1e-4)
    assert mmbert.load(str(tmp_path / "exp")).task == "regression"
    int8 = mmbert.load(str(tmp_path / "exp" / "model.int8.onnx")).predict(pd.read_parquet(data))
    std = json.load(open(tmp_path / "exp" / "preprocessing.json"))["target_std"]
    assert np.abs(int8.to_numpy() - one["prediction"].to_numpy()).max() < 0.1 * std


@pytest.mark.slow
def test_train_cli_bad_target_is_one_line(tiny_bert, reviews, tmp_path):
    df = reviews.iloc[:60].copy().astype({"Rating": object})
    df.loc[33, "Rating"] = "n/a stars"
    df.to_csv(tmp_path / "bad.csv", index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "bad.csv"), data=REG_DATA)
    r = run_cli(["train.py", "--config", cfg, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-cache"],
                check=False)
    assert_one_line_error(r, "bad.csv", "column 'Rating', row 33", "'n/a stars' is not a finite number")
