"""ONNX export: round trip for every fusion at several input shapes (onnxruntime vs PyTorch), the
self-contained serving folder, int8, and clear errors for tampered files and incomplete model dirs."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli, write_config

pytest.importorskip("onnxruntime")

TEXT = ["input_ids", "attention_mask"]
NUM = ["numeric", "missing"]
CAT = ["categorical"]
# fusion -> (pooling, data overrides, expected graph inputs): the column subsets also cover models with
# only numeric, only categorical and no tabular columns at all.
CASES = {
    "cross_attn": ("pooler", {}, TEXT + NUM + CAT),
    "cross_attn_tokens": ("cls", {}, TEXT + NUM + CAT),
    "concat": ("mean", {"categorical_columns": []}, TEXT + NUM),
    "gated": ("cls", {"numeric_columns": []}, TEXT + CAT),
    "text_only": ("mean", {"numeric_columns": [], "categorical_columns": []}, TEXT),
    "tab_only": ("cls", {}, NUM + CAT),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, reviews):
    d = tmp_path_factory.mktemp("export")
    reviews.to_parquet(d / "reviews.parquet")
    return d


@pytest.fixture(scope="module")
def make_run(workdir, tiny_bert):
    """fusion -> a consolidated model dir (random tiny BERT, head scaled so probabilities spread)."""
    cache = {}

    def make(fusion: str) -> str:
        if fusion in cache:
            return cache[fusion]
        import torch

        from mmbert.artifact import build_model, save_artifact
        from mmbert.config import load_config
        from mmbert.data.pipeline import load_splits
        from mmbert.data.preprocess import Preprocessor
        from mmbert.data.tokenize import load_tokenizer
        from mmbert.models.classifier import ModelSpec, effective_fusion

        pooling, data_over, _ = CASES[fusion]
        path = write_config(workdir / f"{fusion}.yaml", tiny_bert, str(workdir / "reviews.parquet"),
                            model={"fusion": fusion, "pooling": pooling})
        cfg = load_config(path, [(f"data.{k}", v) for k, v in data_over.items()])
        dc = cfg.data
        split = load_splits(dc)["train"]
        pre = Preprocessor.fit(split.df, dc, tiny_bert, split.file)
        spec = ModelSpec(fusion=effective_fusion(fusion, bool(dc.numeric_columns or dc.categorical_columns)),
                         hidden_dim=32, num_heads=2, dropout=0.0, pooling=pooling,
                         num_numeric=len(pre.numeric_columns),
                         cardinalities=[len(pre.vocabularies[c]) for c in pre.categorical_columns],
                         cat_embedding_dim=8, num_classes=pre.num_classes, encoder=tiny_bert)
        torch.manual_seed(1)
        model = build_model(spec, tiny_bert, pretrained=True)
        with torch.no_grad():  # a random head gives p ~ 0.5 everywhere: spread it to make the check meaningful
            model.fusion_head.fusion.head.out.weight.mul_(30)
        out = str(workdir / f"run_{fusion}" / "final")
        save_artifact(out, model.state_dict(), spec, model, pre, load_tokenizer(tiny_bert), cfg.to_dict())
        cache[fusion] = out
        return out

    return make


@pytest.fixture(scope="module")
def exported(make_run, workdir):
    """fusion -> (model dir, onnx path, export report). cross_attn goes through the export.py CLI with
    --quantize int8; the others call export_onnx in process (same code, no interpreter start-up)."""
    from mmbert.export.onnx import export_onnx

    cache = {}

    def get(fusion: str):
        if fusion not in cache:
            run = make_run(fusion)
            out = str(workdir / f"onnx_{fusion}" / "model.onnx")
            if fusion == "cross_attn":
                rep = str(workdir / "report.json")
                r = run_cli(["export.py", "--model-dir", run, "--output", out, "--quantize", "int8", "--report", rep])
                assert "int8: max |dp|" in r.stdout, r.stdout
                with open(rep) as f:
                    report = json.load(f)
            else:
                report = export_onnx(run, out, say=lambda _: None)
            cache[fusion] = (run, out, report)
        return cache[fusion]

    return get


def _shape_batches(model_dir: str, reviews):
    """Batches the exporter did not verify on: other rows, batch 1 / 5 / 13, 1-3 chunks, 3-32 tokens."""
    import torch

    from mmbert.artifact import load_artifact
    from mmbert.data.dataset import TableDataset, collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.tokenize import chunk_tokenize

    model, pre, tok = load_artifact(model_dir)
    ds = build_dataset(pre, tok, reviews.iloc[300:340], "reviews", with_labels=False)
    pad = tok.pad_token_id
    short, _ = chunk_tokenize(tok, ds.enc.texts, 10, 3)
    batches = [collate(ds, [int(np.argmin(ds.lengths))], pad), collate(ds, [int(np.argmax(ds.lengths))], pad),
               collate(ds, list(range(5)), pad), collate(TableDataset(ds.enc, short), list(range(13)), pad),
               collate(ds, list(range(8, 40)), pad)]
    with torch.no_grad():
        refs = [torch.softmax(model.forward_batch(b), -1).numpy() for b in batches]
    return batches, refs


@pytest.mark.parametrize("fusion", list(CASES))
def test_roundtrip_every_fusion(fusion, exported, reviews):
    from mmbert.export.onnx import OnnxScorer

    run, path, report = exported(fusion)
    expected_inputs = CASES[fusion][2]
    assert report["exporter"] == "dynamo" and report["inputs"] == expected_inputs
    assert report["max_abs_diff"] <= TOL and len(report["checks"]) >= 5
    shapes = {tuple(c["shape"]) for c in report["checks"]}
    if "input_ids" in expected_inputs:
        assert {s[0] for s in shapes} >= {1} and max(s[0] for s in shapes) > 1
        assert {s[1] for s in shapes} >= {1, 3} and len({s[2] for s in shapes}) >= 3

    scorer = OnnxScorer(path)
    assert scorer.input_names == expected_inputs and scorer.num_classes == 2
    dims = {i.name: i.shape for i in scorer.session.get_inputs()}
    for name in expected_inputs:
        assert not isinstance(dims[name][0], int)  # dynamic batch
        if name in TEXT:
            assert not isinstance(dims[name][1], int) and not isinstance(dims[name][2], int)
    batches, refs = _shape_batches(run, reviews)
    for b, ref in zip(batches, refs):
        got = scorer.predict_proba(b)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert refs[-1][:, 1].std() > 1e-3, "probabilities barely vary: the comparison would prove little"
    for f in ("preprocessing.json", "model_spec.json", "onnx_manifest.json", "tokenizer/tokenizer.json"):
        assert os.path.isfile(os.path.join(os.path.dirname(path), f)), f


def test_int8_and_self_contained_folder(exported, reviews, tmp_path):
    """The export folder alone (moved elsewhere) serves raw rows: same probabilities as PyTorch; the int8
    copy runs and stays close."""
    import torch

    from mmbert.artifact import load_artifact
    from mmbert.data.dataset import collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.export.onnx import INT8_SETTINGS, INT8_TOLERANCE, OnnxScorer

    run, path, report = exported("cross_attn")
    folder = tmp_path / "served"
    shutil.copytree(os.path.dirname(path), folder)
    rows = reviews.iloc[340:380].drop(columns=["Recommended IND"])
    probs = OnnxScorer(str(folder)).predict_frame(rows, batch_size=7)

    model, pre, tok = load_artifact(run)
    ds = build_dataset(pre, tok, rows, "rows", with_labels=False)
    with torch.no_grad():
        ref = torch.softmax(model.forward_batch(collate(ds, np.arange(len(ds)), tok.pad_token_id)), -1).numpy()
    np.testing.assert_allclose(probs, ref, atol=TOL, rtol=0)

    i8 = report["int8"]
    assert i8["file"] == "model.int8.onnx" and i8["rows_per_s_int8"] > 0 and i8["size_mb_int8"] < i8["size_mb_fp32"]
    q = OnnxScorer(str(folder / "model.int8.onnx"))
    qp = q.predict_frame(rows)
    assert qp.shape == probs.shape and np.isfinite(qp).all()
    assert np.abs(qp - probs).max() < 0.1 and i8["max_abs_drift_vs_fp32"] <= i8["tolerance"] == INT8_TOLERANCE
    manifest = json.loads((folder / "onnx_manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.int8.onnx"}
    assert manifest["exports"]["model.onnx"]["int8"]["quantization"] == INT8_SETTINGS  # reduce_range: see onnx.py


def test_tampered_onnx_is_a_clear_error(exported, tmp_path):
    from mmbert.errors import ArtifactError
    from mmbert.export.onnx import OnnxScorer

    _, path, _ = exported("cross_attn")
    folder = tmp_path / "tampered"
    shutil.copytree(os.path.dirname(path), folder)
    f = folder / "model.onnx"
    data = bytearray(f.read_bytes())
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ArtifactError, match="checksum"):
        OnnxScorer(str(f))
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        OnnxScorer(str(f), check_integrity=False)
    mid = len(data) // 2  # flipped bytes inside the weights: loads fine, scores wrong -> the checksum catches it
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified, truncated or corrupted"):
        OnnxScorer(str(folder))
    alone = tmp_path / "alone.onnx"  # no manifest beside it: still one clear error, not a protobuf trace
    alone.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ArtifactError, match="not a loadable ONNX model"):
        OnnxScorer(str(alone))
    with pytest.raises(ArtifactError, match="not found"):
        OnnxScorer(str(tmp_path / "missing.onnx"))


def test_model_dir_without_weights_cli(make_run, tmp_path):
    run = make_run("tab_only")
    broken = tmp_path / "final"
    shutil.copytree(run, broken)
    os.remove(broken / "model.safetensors")
    out = tmp_path / "out" / "model.onnx"
    r = run_cli(["export.py", "--model-dir", str(broken), "--output", str(out)], check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and "model.safetensors" in lines[0]
    assert not out.exists()


def test_failed_verification_leaves_nothing(make_run, tmp_path, monkeypatch):
    import mmbert.export.onnx as ox
    from mmbert.errors import ArtifactError

    def bad_compare(session, model, batches):
        return [{"shape": [1], "max_abs_diff": 0.5}]

    monkeypatch.setattr(ox, "compare", bad_compare)
    out = tmp_path / "o" / "model.onnx"
    with pytest.raises(ArtifactError, match=r"differ from PyTorch by 0.5 > 0.0001"):
        ox.export_onnx(make_run("tab_only"), str(out), exporter="torchscript", say=lambda _: None)
    assert not out.exists() and os.listdir(tmp_path / "o") == []


def test_train_export_then_evaluate_onnx_matches_torch(workdir, tiny_bert, tmp_path):
    """The served model scores like the trained one through the whole evaluate.py path: train 2 steps,
    export, evaluate 77 test rows with PyTorch (1 process) and with onnxruntime (--onnx, 2 processes)."""
    import pandas as pd

    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(workdir / "reviews.parquet"),
                       data={"split": {"fractions": [0.6, 0.2, 0.2], "seed": 0}})
    run = tmp_path / "run"
    run_cli(["train.py", "--config", cfg, "--output-dir", str(run), "--max-steps", "2", "--max-eval-rows", "16"])
    onnx_file = tmp_path / "served" / "model.onnx"
    run_cli(["export.py", "--model-dir", str(run / "final"), "--output", str(onnx_file)])
    common = ["--split", "test", "--max-rows", "77", "--no-plots", "--no-progress"]
    run_cli(["evaluate.py", "--model-dir", str(run / "final"), "--output-dir", str(tmp_path / "ev_torch"), *common])
    # no --model-dir: the export folder's config.yaml, preprocessing.json and tokenizer/ serve alone
    r = run_cli(["evaluate.py", "--onnx", str(onnx_file), "--output-dir", str(tmp_path / "ev_onnx"), *common], nproc=2)
    assert "77 rows" in r.stdout
    a = pd.read_csv(tmp_path / "ev_torch" / "predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "ev_onnx" / "predictions.tsv", sep="\t")
    assert len(a) == len(b) == 77 and (a["row"] == b["row"]).all() and (a["label"] == b["label"]).all()
    assert np.abs(a["prob"] - b["prob"]).max() <= TOL
    assert a["prob"].std() > 1e-4, "probabilities barely vary: the comparison would prove little"
    ma = json.loads((tmp_path / "ev_torch" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ev_onnx" / "metrics.json").read_text())
    assert mb["run"]["onnx"] == str(onnx_file) and mb["run"]["world_size"] == 2
    assert ma["accuracy"] == mb["accuracy"] and abs(ma["log_loss"] - mb["log_loss"]) < 1e-4
    ranks = [pd.read_csv(tmp_path / "ev_onnx" / f"test_result_rank{r}.tsv", sep="\t") for r in (0, 1)]
    assert sorted(pd.concat(ranks)["row"]) == sorted(b["row"])
