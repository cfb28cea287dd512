"""export.py hardening: an int8 copy that is right on every x86 CPU (and refused when it drifts from fp32), and an
output folder that is never a user's folder clobbered. Nothing here depends on the CPU running it: the
saturating u8 x s8 arithmetic of CPUs without VNNI is emulated in numpy."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import test_export
from conftest import run_cli
from test_hardening import assert_one_line_error

pytest.importorskip("onnxruntime")
# test_export.py's module fixtures: a tiny consolidated run per fusion (built again, once, for this module)
make_run, workdir = test_export.make_run, test_export.workdir


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
    from mmbert.artifact import load_artifact

    run = make_run("cross_attn")
    out = tmp_path / "int8" / "model.onnx"
    report = ox.export_onnx(run, str(out), quantize="int8", say=lambda _: None)
    q_path = str(out.parent / "model.int8.onnx")
    model, pre, tok = load_artifact(run)
    batches, _ = ox.verification_batches(run, model.spec, pre, tok)
    native, avx2 = ox._session(q_path), _avx2_evaluator(q_path)
    for b in batches:
        feeds = ox._feeds(native, b)
        got, emulated = native.run([ox.OUTPUT], feeds)[0], avx2.run([ox.OUTPUT], feeds)[0]
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
    r = run_cli(["export.py", "--model-dir", make_run("cross_attn"), "--output", str(out), "--quantize", "int8",
                 "--int8-tolerance", "1e-9"], check=False)
    line = assert_one_line_error(r, "nothing written")
    m = re.search(r"drift from fp32 by max \|dp\| (\S+) > int8 tolerance 1e-09 ", line)
    assert m and float(m.group(1)) > 1e-9, line
    assert os.listdir(out) == []  # neither the int8 copy nor the fp32 model it came with


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
    r = run_cli(["export.py", "--model-dir", make_run("tab_only"), "--output", str(folder)], check=False)
    assert_one_line_error(r, str(folder), "not an earlier export", "config.yaml, model_spec.json, tokenizer/")
    assert _snapshot(folder) == before and sorted(os.listdir(folder)) == ["config.yaml", "model_spec.json",
                                                                           "tokenizer"]


def test_reexport_replaces_an_earlier_export_without_stale_files(make_run, tmp_path):
    """An earlier export (its manifest says so) is replaced whole: nothing of it (another model name, its int8
    copy, a config.yaml the new run lacks, old tokenizer files) is left mixed with the new one; files the
    export never wrote stay; a failed export leaves the folder as it was."""
    from mmbert.errors import ArtifactError
    from mmbert.export.onnx import OnnxScorer, export_onnx

    folder = tmp_path / "served"
    export_onnx(make_run("tab_only"), str(folder / "old.onnx"), quantize="int8", exporter="torchscript",
                say=lambda _: None)
    (folder / "tokenizer" / "stale.txt").write_text("from the old export\n")
    (folder / "NOTES.txt").write_text("the user's own notes\n")
    run = tmp_path / "text_only_final"  # a run without config.yaml: the old export's must go
    shutil.copytree(make_run("text_only"), run)
    os.remove(run / "config.yaml")
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
    model = tmp_path / "model"
    shutil.copytree(make_run("tab_only"), model)
    (model / "config.yaml").write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    r = run_cli(["export.py", "--model-dir", str(model), "--output", str(tmp_path / "out")], check=False)
    assert_one_line_error(r, f"{model / 'config.yaml'} is not valid YAML")
    assert "pwned" not in r.stdout + r.stderr
