"""ONNX export: round trip for every fusion at several input shapes (onnxruntime vs PyTorch), the
self-contained serving folder, int8, and clear errors for tampered files and incomplete model dirs."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, write_config

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # every test exports ONNX or runs export.py / train.py

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
        from mmbert.assembly import model_spec
        from mmbert.config import load_config
        from mmbert.data.pipeline import load_splits
        from mmbert.data.preprocess import Preprocessor
        from mmbert.data.tokenize import load_tokenizer

        pooling, data_over, _ = CASES[fusion]
        path = write_config(workdir / f"{fusion}.yaml", tiny_bert, str(workdir / "reviews.parquet"),
                            model={"fusion": fusion, "pooling": pooling})
        cfg = load_config(path, [(f"data.{k}", v) for k, v in data_over.items()]
                          + [("model.hidden_dim", 32), ("model.num_heads", 2), ("model.dropout", 0.0),
                             ("model.cat_embedding_dim", 8)])
        dc = cfg.data
        split = load_splits(dc)["train"]
        pre = Preprocessor.fit(split.df, dc, tiny_bert, split.file)
        spec = model_spec(cfg, pre)
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
                r = run_cli(["export.py", "--model-dir", run, "--output-dir", out, "--quantize", "int8", "--report", rep])
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

    from mmbert.artifact import open_model_dir
    from mmbert.data.dataset import TableDataset, collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.tokenize import chunk_tokenize

    md = open_model_dir(model_dir)
    model, pre, tok = md.model, md.pre, md.tokenizer
    ds = build_dataset(pre, tok, reviews.iloc[300:340], "reviews", with_labels=False)
    pad = md.pad_id
    short, _ = chunk_tokenize(tok, ds.enc.texts, 10, 3)
    batches = [collate(ds, [int(np.argmin(ds.lengths))], pad), collate(ds, [int(np.argmax(ds.lengths))], pad),
               collate(ds, list(range(5)), pad), collate(TableDataset(ds.enc, short), list(range(13)), pad),
               collate(ds, list(range(8, 40)), pad)]
    with torch.no_grad():
        refs = [torch.softmax(model.forward_batch(b), -1).numpy() for b in batches]
    return batches, refs


@pytest.mark.parametrize("fusion", list(CASES))
def test_roundtrip_every_fusion(fusion, exported, reviews):
    from mmbert.serving import OnnxScorer

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
        got = scorer.probabilities(b)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert refs[-1][:, 1].std() > 1e-3, "probabilities barely vary: the comparison would prove little"
    for f in ("preprocessing.json", "model_spec.json", "onnx_manifest.json", "tokenizer/tokenizer.json"):
        assert os.path.isfile(os.path.join(os.path.dirname(path), f)), f


def test_int8_and_self_contained_folder(exported, reviews, tmp_path):
    """The export folder alone (moved elsewhere) serves raw rows: same probabilities as PyTorch; the int8
    copy runs and stays close."""
    import torch

    from mmbert.artifact import open_model_dir
    from mmbert.data.dataset import collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.export.onnx import INT8_SETTINGS, INT8_TOLERANCE
    from mmbert.serving import OnnxScorer

    run, path, report = exported("cross_attn")
    folder = tmp_path / "served"
    shutil.copytree(os.path.dirname(path), folder)
    rows = reviews.iloc[340:380].drop(columns=["Recommended IND"])
    probs = OnnxScorer(str(folder)).predict_frame(rows, batch_size=7)

    md = open_model_dir(run)
    model, pre, tok = md.model, md.pre, md.tokenizer
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
    from mmbert.serving import OnnxScorer

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
    r = run_cli(["export.py", "--model-dir", str(broken), "--output-dir", str(out)], check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and "model.safetensors" in lines[0]
    assert not out.exists()


def test_failed_verification_leaves_nothing(make_run, tmp_path, monkeypatch):
    from mmbert.errors import ArtifactError
    from mmbert.export import verify
    from mmbert.export.onnx import export_onnx

    def bad_compare(session, model, batches):
        return [{"shape": [1], "max_abs_diff": 0.5}]

    monkeypatch.setattr(verify, "compare", bad_compare)
    out = tmp_path / "o" / "model.onnx"
    with pytest.raises(ArtifactError, match=r"differ from PyTorch by 0.5 > 0.0001"):
        export_onnx(make_run("tab_only"), output_dir=str(out), exporter="torchscript", say=lambda _: None)
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
    run_cli(["export.py", "--model-dir", str(run / "final"), "--output-dir", str(onnx_file)])
    common = ["--split", "test", "--max-eval-rows", "77", "--no-plots", "--no-progress"]
    run_cli(["evaluate.py", "--model-dir", str(run / "final"), "--output-dir", str(tmp_path / "ev_torch"), *common])
    # no --model-dir: the export folder's config.yaml, preprocessing.json and tokenizer/ serve alone
    r = run_cli(["evaluate.py", "--onnx", str(onnx_file), "--output-dir", str(tmp_path / "ev_onnx"), *common], nproc=2)
    assert "77 rows" in r.stdout
    a = pd.read_csv(tmp_path / "ev_torch" / "predictions.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "ev_onnx" / "predictions.tsv", sep="\t")
    assert len(a) == len(b) == 77 and (a["row"] == b["row"]).all() and (a["label"] == b["label"]).all()
    pa, pb = a.filter(regex="^prob_").to_numpy(), b.filter(regex="^prob_").to_numpy()
    assert pa.shape == pb.shape == (77, 2) and np.abs(pa - pb).max() <= TOL
    assert pa[:, 1].std() > 1e-4, "probabilities barely vary: the comparison would prove little"
    ma = json.loads((tmp_path / "ev_torch" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ev_onnx" / "metrics.json").read_text())
    assert mb["run"]["onnx"] == str(onnx_file) and mb["run"]["world_size"] == 2
    assert ma["accuracy"] == mb["accuracy"] and abs(ma["log_loss"] - mb["log_loss"]) < 1e-4
    ranks = [pd.read_csv(tmp_path / "ev_onnx" / f"test_result_rank{r}.tsv", sep="\t") for r in (0, 1)]
    assert sorted(pd.concat(ranks)["row"]) == sorted(b["row"])


# ----------------------------------------------------------------------------- int8 without VNNI

def _avx2_evaluator(path: str):
    """onnx's numpy reference evaluator, with MatMulInteger computed as onnxruntime's u8 x s8 kernel computes it
    on CPUs without VNNI (AVX2, AVX-512 before VNNI): vpmaddubsw adds each two adjacent-K products u8*s8 into a
    saturating int16, vpmaddwd then sums those pairs exactly in int32."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class MatMulInteger(OpRun):
        def _run(self, a, b, a_zero_point=None, b_zero_point=None):
            assert b.dtype == np.int8, "only the u8 x s8 kernel is emulated"
            k = a.shape[-1]
            a, b = a.astype(np.int64), b.astype(np.int64)
            if k % 2:  # a zero pair member adds nothing
                a, b = np.concatenate([a, 0 * a[..., :1]], -1), np.concatenate([b, 0 * b[:1]], 0)
            pairs = a[..., 0::2, None] * b[0::2] + a[..., 1::2, None] * b[1::2]  # ... x K/2 x N
            raw = np.clip(pairs, -2**15, 2**15 - 1).sum(-2)
            za = 0 if a_zero_point is None else a_zero_point.astype(np.int64)
            zb = 0 if b_zero_point is None else b_zero_point.astype(np.int64)
            return ((raw - za * b.sum(0) - zb * a.sum(-1, keepdims=True) + k * za * zb).astype(np.int32),)

    class GatherElements(OpRun):  # onnx's reference kernel fails on this graph's shapes; same semantics
        def _run(self, data, indices, axis=None):
            return (np.take_along_axis(data, indices.astype(np.int64), axis or 0),)

    return ReferenceEvaluator(path, new_ops=[MatMulInteger, GatherElements])


def _int8_weights(path: str) -> list[np.ndarray]:
    import onnx

    m = onnx.load(path)
    init = {i.name: i for i in m.graph.initializer}
    return [onnx.numpy_helper.to_array(init[n.input[1]]) for n in m.graph.node
            if n.op_type == "MatMulInteger" and n.input[1] in init]


def test_int8_is_the_same_on_cpus_without_vnni(make_run, tmp_path):
    """Case 8: on an AMD EPYC without AVX-512 VNNI the int8 copy drifted from fp32 by up to 0.89 (u8 x s8 pair
    sums clipped to int16), fine on VNNI CPUs. 7-bit weights keep every pair sum exact on every x86 kernel."""
    import mmbert.export.onnx as ox
    from mmbert import serving
    from mmbert.artifact import open_model_dir

    run = make_run("cross_attn")
    out = tmp_path / "int8" / "model.onnx"
    report = ox.export_onnx(run, str(out), quantize="int8", say=lambda _: None)
    q_path = str(out.parent / "model.int8.onnx")
    md = open_model_dir(run)
    batches, _ = ox.verification_batches(run, md.spec, md.pre, md.tokenizer)
    native, avx2 = serving.session(q_path), _avx2_evaluator(q_path)
    for b in batches:
        feeds = serving.feeds(native, b)
        got, emulated = native.run([serving.OUTPUT], feeds)[0], avx2.run([serving.OUTPUT], feeds)[0]
        np.testing.assert_allclose(emulated, got, atol=1e-5, rtol=0, err_msg="a CPU without VNNI scores differently")
    weights = _int8_weights(q_path)
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 for w in weights)

    i8 = report["int8"]
    assert i8["max_abs_drift_vs_fp32"] <= i8["tolerance"] == ox.INT8_TOLERANCE
    recorded = json.loads((out.parent / "onnx_manifest.json").read_text())["exports"]["model.onnx"]["int8"]
    assert recorded["quantization"] == ox.INT8_SETTINGS and recorded["quantization"]["reduce_range"] is True
    assert recorded["max_abs_drift_vs_fp32"] == i8["max_abs_drift_vs_fp32"]


def test_int8_beyond_the_tolerance_is_refused(make_run, tmp_path):
    """A tolerance no int8 model meets: one line with the measured drift and the tolerance, exit 2, no file."""
    out = tmp_path / "refused"
    r = run_cli(["export.py", "--model-dir", make_run("cross_attn"), "--output-dir", str(out), "--quantize", "int8",
                 "--int8-tolerance", "1e-9"], check=False)
    line = assert_one_line_error(r, "nothing written")
    m = re.search(r"drift from fp32 by max \|dp\| (\S+) > int8 tolerance 1e-09 ", line)
    assert m and float(m.group(1)) > 1e-9, line
    assert os.listdir(out) == []  # neither the int8 copy nor the fp32 model it came with


# ----------------------------------------------------------------------------- export folders

def _snapshot(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_export_refuses_a_folder_that_is_not_an_export(make_run, tmp_path):
    """Case 12: exporting into a folder holding a user's config.yaml, model_spec.json and tokenizer/ replaced
    and deleted them, exit 0. Now: one line naming the folder and what it holds, exit 2, every byte kept."""
    folder = tmp_path / "mine"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.yaml").write_text("data: {path: my.csv}\n")
    (folder / "model_spec.json").write_text('{"mine": true}\n')
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\nhello\n")
    before = _snapshot(folder)
    r = run_cli(["export.py", "--model-dir", make_run("tab_only"), "--output-dir", str(folder)], check=False)
    assert_one_line_error(r, str(folder), "not an earlier export", "config.yaml, model_spec.json, tokenizer/")
    assert _snapshot(folder) == before and sorted(os.listdir(folder)) == ["config.yaml", "model_spec.json",
                                                                           "tokenizer"]


def test_reexport_replaces_an_earlier_export_without_stale_files(make_run, tmp_path):
    """An earlier export (its manifest says so) is replaced whole: nothing of it (another model name, its int8
    copy, a config.yaml the new run lacks, old tokenizer files) is left mixed with the new one; files the
    export never wrote stay; a failed export leaves the folder as it was."""
    from mmbert.artifact import seal_model_dir
    from mmbert.errors import ArtifactError
    from mmbert.export.onnx import export_onnx
    from mmbert.serving import OnnxScorer

    folder = tmp_path / "served"
    export_onnx(make_run("tab_only"), str(folder / "old.onnx"), quantize="int8", exporter="torchscript",
                say=lambda _: None)
    (folder / "tokenizer" / "stale.txt").write_text("from the old export\n")
    (folder / "NOTES.txt").write_text("the user's own notes\n")
    run = tmp_path / "text_only_final"  # a run without config.yaml: the old export's must go
    shutil.copytree(make_run("text_only"), run)
    os.remove(run / "config.yaml")
    seal_model_dir(str(run))  # saved without it (save_artifact with no config)
    report = export_onnx(str(run), str(folder), say=lambda _: None)

    assert sorted(os.listdir(folder)) == ["NOTES.txt", "model.onnx", "model_spec.json", "onnx_manifest.json",
                                          "preprocessing.json", "tokenizer"]
    assert _snapshot(folder / "tokenizer") == _snapshot(run / "tokenizer")
    assert (folder / "model_spec.json").read_bytes() == (run / "model_spec.json").read_bytes()
    manifest = json.loads((folder / "onnx_manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx"} and set(manifest["exports"]) == {"model.onnx"}
    assert report["files"] == ["model.onnx"] and OnnxScorer(str(folder)).input_names == report["inputs"]

    before, listing = _snapshot(folder), sorted(os.listdir(folder))
    with pytest.raises(ArtifactError, match="int8 tolerance"):
        export_onnx(make_run("tab_only"), str(folder), quantize="int8", exporter="torchscript", int8_tolerance=0,
                    say=lambda _: None)
    assert _snapshot(folder) == before and sorted(os.listdir(folder)) == listing


def test_python_tag_in_the_model_dirs_config_is_one_line(make_run, tmp_path):
    """Case 10 through export.py: a YAML python tag in config.yaml is never constructed (safe_load) and stops
    with one line naming the file, not a traceback from the verification-row lookup."""
    from mmbert.artifact import seal_model_dir

    model = tmp_path / "model"
    shutil.copytree(make_run("tab_only"), model)
    (model / "config.yaml").write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    seal_model_dir(str(model))  # a hostile folder can carry a matching digest: safe_load itself must hold
    r = run_cli(["export.py", "--model-dir", str(model), "--output-dir", str(tmp_path / "out")], check=False)
    assert_one_line_error(r, f"{model / 'config.yaml'} is not valid YAML")
    assert "pwned" not in r.stdout + r.stderr


def test_output_dir_is_a_folder_unless_it_names_an_onnx_file(tmp_path):
    """export_onnx(output_dir=): a folder gets model.onnx (even a name with a dot), a path ending in .onnx names
    the file; the former keyword `output` still works (deprecated), both at once is refused."""
    from mmbert.errors import ArtifactError
    from mmbert.export.folder import resolve_output
    from mmbert.export.run import _output_dir

    model = str(tmp_path / "model")
    for given, path in [("out", "out/model.onnx"), ("out.v2", "out.v2/model.onnx"), ("out/m.onnx", "out/m.onnx")]:
        got, folder = resolve_output([model], str(tmp_path / given))
        assert got == str(tmp_path / path) and folder == os.path.dirname(got)
    with pytest.raises(ArtifactError, match="--output-dir must not be inside the model directory"):
        resolve_output([str(tmp_path / "other"), model], os.path.join(model, "m.onnx"))
    with pytest.warns(DeprecationWarning, match="output_dir"):
        assert _output_dir(None, "x") == "x"
    with pytest.raises(ArtifactError, match="give output_dir only"):
        _output_dir("x", "y")
