"""The Python API (mmbert.train / load / evaluate / export_onnx) and the `mmbert` command, on a tiny model trained
for real in this process: predictions in the label's own values, the same probabilities through every path
(Predictor, evaluate's files, the ONNX export, `mmbert predict`), and clear errors."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, write_config

import mmbert
from mmbert.errors import ArtifactError, ConfigError, DataError


@pytest.fixture(scope="module")
def trained(tiny_bert, reviews, tmp_path_factory):
    """A 4-step run on 200 rows whose label is text ('no'/'yes'), trained through mmbert.train."""
    work = tmp_path_factory.mktemp("api")
    df = reviews.iloc[:200].copy()
    df["Recommended IND"] = df["Recommended IND"].map({0: "no", 1: "yes"})
    df.insert(0, "review_id", [f"r{i:04d}" for i in range(len(df))])
    df.to_csv(work / "train.csv", index=False)
    cfg = write_config(work / "c.yaml", tiny_bert, str(work / "train.csv"), data={"id_column": "review_id"})
    run = mmbert.train(cfg, output_dir=str(work / "run"), max_steps=4, overrides={"train.eval_every": 2})
    return work, run, df


@pytest.mark.slow
def test_train_returns_the_run(trained):
    work, run, _ = trained
    assert run.model_dir == str(work / "run" / "final") and os.path.isfile(os.path.join(run.model_dir, "model.safetensors"))
    assert run.summary["steps"] == 4 and run.summary["best_step"] in (2, 4)
    assert os.path.isfile(run.metrics_file)


@pytest.mark.slow
def test_predict_gives_the_training_labels(trained):
    _, run, df = trained
    model = mmbert.load(run.model_dir)
    assert model.classes == ["no", "yes"] and model.backend == "torch"
    assert model.metadata["label_column"] == "Recommended IND" and model.metadata["train_summary"]["steps"] == 4
    rows = df.iloc[150:170].drop(columns=["Recommended IND"])
    proba = model.predict_proba(rows)
    assert list(proba.columns) == ["no", "yes"] and (proba.index == rows.index).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    pred = model.predict(rows)
    assert pred.name == "Recommended IND" and (pred.index == rows.index).all()
    assert pred.tolist() == [["no", "yes"][k] for k in proba.to_numpy().argmax(1)]
    # batch size and row order change nothing; a list of dicts is a table too
    np.testing.assert_allclose(model.predict_proba(rows.iloc[::-1], batch_size=3).iloc[::-1], proba, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(rows.to_dict("records"), as_pandas=False), proba, atol=1e-6)
    assert model.predict_proba(rows.iloc[:0]).shape == (0, 2)
    # a run's output folder means its final/
    np.testing.assert_allclose(mmbert.load(os.path.dirname(run.model_dir)).predict_proba(rows), proba, atol=0)


@pytest.mark.slow
def test_evaluate_agrees_with_the_predictor(trained):
    work, run, df = trained
    res = mmbert.evaluate(run.model_dir, output_dir=str(work / "eval"), split="val", plots=False, progress=False)
    assert res.metrics["n"] == 50 and 0 <= res.metrics["roc_auc"] <= 1
    files = pd.read_csv(res.predictions, sep="\t", dtype={"review_id": str})
    rows = df.loc[files["row"]]
    assert files["review_id"].tolist() == rows["review_id"].tolist()
    np.testing.assert_allclose(files["prob_yes"], mmbert.load(run.model_dir).predict_proba(rows)["yes"], atol=1e-6)


@pytest.mark.slow
def test_export_and_onnx_predictor(trained):
    work, run, df = trained
    report = mmbert.export_onnx(run.model_dir, str(work / "onnx"), quantize="int8")
    assert report["files"] == ["model.int8.onnx", "model.onnx"] and report["max_abs_diff"] <= 1e-4
    rows = df.iloc[100:130]
    ref = mmbert.load(run.model_dir).predict_proba(rows)
    onnx = mmbert.load(str(work / "onnx"))
    assert onnx.backend == "onnxruntime" and onnx.metadata["precision"] == "fp32" and onnx.classes == ["no", "yes"]
    np.testing.assert_allclose(onnx.predict_proba(rows), ref, atol=1e-4)
    q = mmbert.load(str(work / "onnx" / "model.int8.onnx"))
    assert q.metadata["precision"] == "int8" and np.abs(q.predict_proba(rows) - ref).to_numpy().max() < 0.1
    with pytest.raises(ConfigError, match="unknown option 'quantise'"):
        mmbert.export_onnx(run.model_dir, str(work / "onnx2"), quantise="int8")


@pytest.mark.slow
def test_mmbert_predict_command(trained):
    work, run, df = trained
    df.iloc[:40].drop(columns=["Recommended IND"]).to_csv(work / "new.csv", index=False)
    for target in (run.model_dir, str(work / "onnx")):
        out = work / f"pred_{os.path.basename(target)}.csv"
        r = subprocess.run([sys.executable, "-m", "mmbert", "predict", target, "--data", str(work / "new.csv"),
                            "--output", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        got = pd.read_csv(out, dtype={"review_id": str})
        assert list(got.columns) == ["row", "review_id", "prob_no", "prob_yes", "pred"]
        assert got["row"].tolist() == list(range(40))
        assert got["review_id"].tolist() == df["review_id"].iloc[:40].tolist()
        ref = mmbert.load(run.model_dir).predict_proba(df.iloc[:40])["yes"].to_numpy()
        np.testing.assert_allclose(got["prob_yes"], ref, atol=1e-4)
        assert got["pred"].tolist() == np.where(ref > 0.5, "yes", "no").tolist()


@pytest.mark.slow
def test_new_rows_need_no_id_and_keep_their_index(trained, tmp_path):
    """Scoring new data: the id column is optional (it only labels outputs), any index is kept as is."""
    _, run, df = trained
    model = mmbert.load(run.model_dir)
    rows = df.iloc[10:20]
    ref = model.predict_proba(rows)
    named = rows.drop(columns=["review_id"]).set_axis([f"r{i}" for i in range(10)])
    got = model.predict_proba(named)
    assert list(got.index) == list(named.index)
    np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), atol=1e-6)
    assert model.predict(named.set_axis(np.linspace(0.5, 9.5, 10))).index.tolist() == list(np.linspace(0.5, 9.5, 10))
    rows.drop(columns=["review_id"]).to_csv(tmp_path / "noid.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "mmbert", "predict", run.model_dir, "--data", str(tmp_path / "noid.csv"),
                        "--output", str(tmp_path / "p.tsv")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert list(pd.read_csv(tmp_path / "p.tsv", sep="\t").columns) == ["row", "prob_no", "prob_yes", "pred"]
    r = subprocess.run([sys.executable, "-m", "mmbert", "predict", run.model_dir, "--data", str(tmp_path / "noid.csv"),
                        "--output", str(tmp_path / "nodir" / "p.tsv")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist or is not writable" in r.stderr


@pytest.mark.slow
def test_api_options_are_checked_as_the_command_line_checks_them(trained, tmp_path):
    work, run, _ = trained
    with pytest.raises(ConfigError, match="--max-eval-rows must be >= 1, got 0"):
        mmbert.evaluate(run.model_dir, output_dir=str(tmp_path / "e"), split="val", max_eval_rows=0)
    with pytest.raises(ConfigError, match="unknown option 'splt': did you mean split"):
        mmbert.evaluate(run.model_dir, output_dir=str(tmp_path / "e"), splt="val")
    with pytest.raises(ConfigError, match="device 'bogus' cannot be used"):
        mmbert.load(run.model_dir, device="bogus")
    with pytest.raises(DataError, match="pass \\[row\\]"):
        mmbert.load(run.model_dir).predict({"Title": "x", "Review Text": "y"})


@pytest.mark.slow
def test_console_script_and_module_share_the_commands():
    exe = os.path.join(os.path.dirname(sys.executable), "mmbert")
    assert os.path.isfile(exe), "the `mmbert` console script is not installed (pip install -e .)"
    for cmd in ([exe, "--help"], [sys.executable, "-m", "mmbert", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and all(c in r.stdout for c in ("train", "evaluate", "export", "predict"))
    r = subprocess.run([exe, "train", "--max-steps", "zero"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: mmbert train: argument --max-steps: invalid int value: 'zero'"
    r = subprocess.run([exe, "fit"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown command 'fit'" in r.stderr


@pytest.mark.slow
def test_load_errors(trained, tmp_path, monkeypatch):
    work, run, df = trained
    with pytest.raises(ArtifactError, match="no model at"):
        mmbert.load(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="neither a model directory"):
        mmbert.load(tmp_path)
    model = mmbert.load(run.model_dir)
    with pytest.raises(DataError, match="'Review Text' is missing"):
        model.predict(df.drop(columns=["Review Text"]).iloc[:3])
    with pytest.raises(DataError, match="must be a pandas DataFrame"):
        model.predict("a review")
    with pytest.raises(ConfigError, match="unknown option 'max_step'"):
        mmbert.train("womens_clothing", max_step=3)

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called")

    import torch

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert mmbert.load(run.model_dir).predict(df.iloc[:2]).shape == (2,)


def test_import_mmbert_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, mmbert; mmbert.load; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False"


def test_packaged_config_resolves_its_data_from_any_directory(tmp_path, monkeypatch):
    from mmbert.config import load_config, packaged_configs

    monkeypatch.chdir(tmp_path)
    assert "womens_clothing" in packaged_configs()
    cfg = load_config("womens_clothing")
    assert os.path.isabs(cfg.data.path) and os.path.isfile(cfg.data.path)
    assert all(os.path.isfile(p) for p in (cfg.data.split.train_indices, cfg.data.split.test_indices))
    assert cfg.train.output_dir == "runs/womens_clothing"  # outputs stay relative to where you run
    monkeypatch.chdir(ROOT)  # from a clone, the clone's data/ (resolved to an absolute path)
    assert load_config("configs/womens_clothing.yaml").data.path == os.path.join(ROOT, "data/womens_clothing_reviews.parquet")
    with pytest.raises(ConfigError, match="packaged configs: womens_clothing"):
        load_config("womens_clothes")
    # a directory holding only some of the paths (here the table, not the index files) never mixes the two
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    pd.DataFrame({"x": [1]}).to_parquet("data/womens_clothing_reviews.parquet")
    cfg = load_config("womens_clothing")
    assert cfg.data.path != "data/womens_clothing_reviews.parquet" and os.path.isabs(cfg.data.path)
    assert os.path.dirname(os.path.dirname(cfg.data.split.val_indices)) == os.path.dirname(cfg.data.path)


@pytest.mark.slow
def test_wheel_ships_the_config_and_its_data(tmp_path):
    """A built wheel (not the editable install) holds the packaged config and real data files."""
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), ROOT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = set(z.namelist())
        assert {"mmbert/examples/womens_clothing.yaml", "mmbert/examples/data/splits/test_idx.txt"} <= names
        assert z.getinfo("mmbert/examples/data/womens_clothing_reviews.parquet").file_size > 1_000_000
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "mmbert = mmbert.cli:main" in z.read(entry).decode()


def test_dataframes_are_stored_once_by_content(tmp_path, monkeypatch):
    """data=DataFrame (or datasets.Dataset) becomes one Parquet file named by its bytes: the same rows on every
    rank of a launch, or in a later call, name the same file; written atomically, no temporary file left."""
    import datasets

    from mmbert.api import _data_path

    monkeypatch.setenv("MMBERT_DATASETS_CACHE", str(tmp_path / "cache" / "datasets"))
    from mmbert.data.io import _first_writable

    _first_writable.cache_clear()
    df = pd.DataFrame({"text": ["a b", "c d", None], 0: [1.5, 2.5, 3.5]}, index=[7, 8, 9])
    path = _data_path(df, "mmbert.train")
    assert os.path.dirname(path) == str(tmp_path / "cache" / "frames") and path.endswith(".parquet")
    assert _data_path(df.copy(), "mmbert.train") == path and os.listdir(tmp_path / "cache" / "frames") == [
        os.path.basename(path)]
    back = pd.read_parquet(path)
    assert list(back.columns) == ["text", "0"] and back["0"].tolist() == [1.5, 2.5, 3.5]  # no index, str names
    assert _data_path(df.iloc[:2], "x") != path
    assert pd.read_parquet(_data_path(datasets.Dataset.from_pandas(df.rename(columns=str), preserve_index=False), "x")).equals(back)
    assert _data_path("some/file.csv", "x") == "some/file.csv" and _data_path(None, "x") is None
    with pytest.raises(ConfigError, match="DatasetDict: save_to_disk it and give the folder"):
        _data_path(datasets.DatasetDict({"train": datasets.Dataset.from_pandas(df.rename(columns=str))}), "mmbert.train")
    with pytest.raises(DataError, match="mmbert.evaluate: the DataFrame cannot be stored as Parquet: .*column mixed"):
        _data_path(pd.DataFrame({"mixed": [1, "x"]}), "mmbert.evaluate")
    with pytest.raises(DataError, match="column 'a' appears more than once"):
        _data_path(pd.DataFrame([[1, 2]], columns=["a", "a"]), "x")
    with pytest.raises(DataError, match="the DataFrame has no rows"):
        _data_path(df.iloc[:0], "x")
    _first_writable.cache_clear()


def test_predictor_scores_a_data_file(model_dir, work):
    """predict / predict_proba / scores take the path of a data file as they take its rows."""
    import inspect

    from mmbert.data.io import load_table

    model = mmbert.load(model_dir, num_threads=1)
    path = str(work / "good.csv")
    rows = load_table(path)
    np.testing.assert_allclose(model.predict_proba(path), model.predict_proba(rows), atol=1e-6)
    assert model.predict(work / "good.csv").tolist() == model.predict(rows).tolist()
    assert model.scores(path).shape == (len(rows), 2)
    with pytest.raises(DataError, match="must be a pandas DataFrame .* or the path of a data file"):
        model.predict(str(work / "missing.csv"))
    assert "num_threads" in inspect.signature(mmbert.load).parameters
    assert "threads" not in inspect.signature(mmbert.load).parameters
