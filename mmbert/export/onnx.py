"""ONNX export of a consolidated model directory, verified with onnxruntime against PyTorch.

The exported graph maps the collated tensors straight to the scores: class probabilities (softmax included),
or for a regression the prediction in the target's original units (output `prediction`); its inputs and
outputs are listed in mmbert/serving.py, which serves the export. Batch, chunk and token axes are dynamic.
The folder holding the ONNX file is self-contained for serving:
preprocessing.json, model_spec.json, tokenizer/ and onnx_manifest.json (checksums, inputs, verification, int8
settings and drift; one digest over the graph files and everything serving reads beside them, checked by
serving before it scores; and the digest of each model folder it was built from). Companions are copied
without following links, and a model folder with a link out of itself is refused. It holds one export:
export.py writes into a new or empty folder, or replaces an earlier export (recognised by its manifest)
whole; any other non-empty folder is refused.

The parts: graph.py (the scoring wrapper, the example, torch export with the exporter fallback), verify.py
(verification rows and the onnxruntime-vs-PyTorch comparison), quantize.py (the int8 copy), folder.py (the
output folder, companions, manifest and install), run.py (export_onnx, which runs them in that order). This
module keeps the names other code imports from it.
"""
from __future__ import annotations

from .folder import (COMPANIONS, STAGING_PREFIX, install, previous_export, resolve_output, stage_companions,
                     write_manifest)
from .graph import (EXPORTERS, TORCHSCRIPT_OPSET, export_once, export_verified, input_names_for, model_input_names,
                    score_wrapper)
from .quantize import INT8_SETTINGS, INT8_TOLERANCE, int8_copy, int8_path, quantize_int8
from .run import ensemble_report, export_onnx
from .verify import compare, rows_from_run, synthetic_batches, verification_batches

__all__ = ["COMPANIONS", "EXPORTERS", "INT8_SETTINGS", "INT8_TOLERANCE", "STAGING_PREFIX", "TORCHSCRIPT_OPSET",
           "compare", "ensemble_report", "export_once", "export_onnx", "export_verified", "input_names_for",
           "install", "int8_copy", "int8_path", "model_input_names", "previous_export", "quantize_int8",
           "resolve_output", "rows_from_run", "score_wrapper", "stage_companions", "synthetic_batches",
           "verification_batches", "write_manifest"]
