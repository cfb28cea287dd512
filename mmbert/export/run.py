"""export_onnx: open the model(s), pick the verification rows, export a verified graph (graph.py, verify.py),
optionally its int8 copy (quantize.py), and install the self-contained folder (folder.py)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import Callable, Optional

from .. import fsutil
from ..errors import ArtifactError
from ..fsutil import sha256
from . import folder
from .graph import EXPORTERS, export_verified, model_input_names
from .quantize import INT8_TOLERANCE, int8_copy
from .verify import verification_batches


def ensemble_report(dirs: list[str], model) -> dict:
    """What an ensemble export averages: each member's folder, fusion and training summary."""
    members = []
    for d, spec in zip(dirs, model.member_specs):
        summary = None
        fsutil.inside(d, os.path.join(d, "train_summary.json"))  # it goes into the manifest: never a linked file
        with contextlib.suppress(OSError, ValueError), open(os.path.join(d, "train_summary.json")) as f:
            summary = json.load(f)
        members.append({"dir": os.path.abspath(d), "fusion": spec.fusion, "train_summary": summary})
    return {"combine": "mean_probability", "members": members}


def export_onnx(model_dir, output_dir: Optional[str] = None, quantize: Optional[str] = None,
                opset: Optional[int] = None, exporter: str = "auto", data: Optional[str] = None, atol: float = 1e-4,
                rows: int = 48, debug: bool = False, say: Optional[Callable[[str], None]] = None,
                int8_tolerance: float = INT8_TOLERANCE, output: Optional[str] = None) -> dict:
    """Export `model_dir` (a consolidated RUN/final; several, or an ensemble folder, as one graph averaging
    their probabilities: mmbert/ensemble.py) into the folder `output_dir` (as model.onnx; a path ending in
    .onnx names the file), verify it with onnxruntime against PyTorch on real rows of several shapes,
    optionally add an int8 copy (refused when its probabilities drift from fp32 by more than int8_tolerance),
    and make the folder self-contained. The folder must be new, empty or an earlier export, which is replaced
    whole. Raises ArtifactError (nothing written) when export or verification fails. `output` is the former
    name of `output_dir` (deprecated)."""
    from ..ensemble import open_models, resolve_model_dirs

    output_dir = _output_dir(output_dir, output)
    say = say or (lambda msg: print(msg, flush=True))
    if exporter not in EXPORTERS:
        raise ArtifactError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if quantize not in (None, "int8"):
        raise ArtifactError(f"unknown quantization '{quantize}' (only int8 is supported)")
    dirs = resolve_model_dirs(model_dir)
    path, out_dir = folder.resolve_output(dirs, output_dir)
    previous = folder.previous_export(out_dir)  # before the slow part: a wrong folder fails at once

    md = open_models(dirs)
    model, pre = md.model.float().eval(), md.pre
    names = model_input_names(model)
    # the first member's config.yaml finds the verification rows; its companions are shipped
    batches, rows_desc = verification_batches(md.path, model.spec, pre, md.tokenizer, data, rows)
    what = f"ensemble of {len(dirs)} ({', '.join(dirs)})" if md.members else md.path
    fusions = sorted({s.fusion for s in getattr(model, "member_specs", [model.spec])})
    say(f"exporting {what} (fusion {', '.join(fusions)}, inputs {', '.join(names)}); verifying on {rows_desc}")

    os.makedirs(out_dir, exist_ok=True)
    staged = fsutil.mkdtemp(prefix=folder.STAGING_PREFIX, dir=out_dir)
    try:  # the whole export is built in `staged` and only moved into place once everything passed
        report, files = _build(md, dirs, names, batches, rows_desc, os.path.join(staged, os.path.basename(path)),
                               quantize, opset, exporter, atol, int8_tolerance, debug, say)
        folder.stage_companions(md.path, md.tokenizer, staged)
        folder.write_manifest(staged, files, path, report)
        folder.install(staged, out_dir, previous, say)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    report["files"] = sorted(files)
    report["folder"] = out_dir
    return report


def _output_dir(output_dir: Optional[str], output: Optional[str]) -> str:
    """output_dir, or the deprecated keyword `output` that it replaces."""
    if output is not None:
        if output_dir is not None:
            raise ArtifactError("export_onnx: give output_dir only (output is its former name)")
        warnings.warn("export_onnx(output=...) is deprecated: use output_dir=", DeprecationWarning, stacklevel=3)
        return output
    if output_dir is None:
        raise ArtifactError("export_onnx: output_dir is required (the folder the export goes to)")
    return output_dir


def _build(md, dirs: list[str], names: list[str], batches: list[dict], rows_desc: str, fp32_path: str,
           quantize: Optional[str], opset: Optional[int], exporter: str, atol: float, int8_tolerance: float,
           debug: bool, say: Callable[[str], None]) -> tuple[dict, dict]:
    """The verified graph (and its int8 copy) written beside fp32_path: (the export report, {file: checksums})."""
    import torch

    from ..artifact import model_dir_digest

    model, pre = md.model, md.pre
    report = export_verified(model, names, batches, fp32_path, exporter, opset, atol, debug, say)
    report.update(fusion=model.spec.fusion, task=pre.task, classes=[str(c) for c in pre.class_names],
                  verified_on=rows_desc, torch=torch.__version__,
                  built_from=[{"dir": os.path.abspath(d), "digest": model_dir_digest(d)} for d in dirs])
    if md.members:
        report["ensemble"] = ensemble_report(dirs, model)
    if quantize == "int8":
        report["int8"] = int8_copy(fp32_path, batches, int8_tolerance, say, pre.target_std or 1.0)
    # the ONNX files and any external-data files beside them: a later export must know to remove them all
    staged = os.path.dirname(fp32_path)
    files = {f: {"sha256": sha256(os.path.join(staged, f))} for f in sorted(os.listdir(staged))}
    for f, entry in files.items():
        if f.endswith(".onnx"):
            entry["precision"] = "int8" if f.endswith(".int8.onnx") else "fp32"
    return report, files
