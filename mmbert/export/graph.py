"""The ONNX graph: the scoring wrapper around the model, the export example, one torch export, and the
exporter fallback (dynamo, then TorchScript for "auto") that keeps the first graph onnxruntime verifies."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from typing import Callable, Optional

from .. import serving
from ..errors import ArtifactError
from ..models.registry import TEXT_INPUTS, fusion_spec
from ..serving import INPUTS, first_line, output_name
from . import verify

log = logging.getLogger("mmbert.export")

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17


def input_names_for(spec) -> list[str]:
    """The graph inputs of a model with this ModelSpec, in order: only what its fusion reads."""
    return fusion_spec(spec.fusion).input_names(spec.num_numeric, len(spec.cardinalities))


def model_input_names(model) -> list[str]:
    """The graph inputs of a model, or of an ensemble the union of its members' (in INPUTS order)."""
    specs = getattr(model, "member_specs", None) or [model.spec]
    wanted = {n for spec in specs for n in input_names_for(spec)}
    return [n for n in INPUTS if n in wanted]


def score_wrapper(model, names: list[str]):
    import torch

    from ..models.classifier import scores

    class ScoreModel(torch.nn.Module):
        """Keyword inputs named as in the ONNX graph -> scores (softmax probabilities, or a regression's
        prediction in original units: models.classifier.scores).

        Empty chunks (padding rows of B x C) are skipped as in PyTorch evaluation: the flat indices of the
        real chunks (NonZero in the graph) select what the encoder runs on, so a batch mixing 1- and 2-chunk
        rows costs what its real chunks cost. One empty chunk is appended to every row first; that keeps
        `real chunks < B x C` true for every input, which torch.export needs to know (torch._check) to take
        the encoder's select-and-scatter path. The appended chunk is masked out everywhere."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, numeric=None, missing=None, categorical=None):
            chunk_index = None
            if input_ids is not None:
                B, C, T = input_ids.shape
                input_ids = torch.cat([input_ids, input_ids.new_zeros((B, 1, T))], dim=1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_zeros((B, 1, T))], dim=1)
                chunk_index = torch.nonzero(attention_mask[:, :, 0].reshape(-1) > 0).squeeze(1)
                torch._check(chunk_index.numel() < B * (C + 1))
            return scores(self.inner(input_ids, attention_mask, numeric, missing, categorical, chunk_index),
                          self.inner.spec)

    return ScoreModel(model).eval()


def example_inputs(batch: dict, names: list[str]) -> dict:
    """Export example: a real batch with batch, chunk and token sizes all >= 2 (torch.export specialises
    sizes 0 and 1), so no dynamic axis is traced as a constant."""
    import torch

    ids, att = batch["input_ids"], batch["attention_mask"]
    B = max(2, ids.shape[0])
    rows = torch.arange(B) % ids.shape[0]
    out = {k: batch[k][rows] for k in names}
    if "input_ids" in names:
        C, T = max(2, ids.shape[1]), max(3, ids.shape[2])
        pad = torch.zeros((B, C, T), dtype=ids.dtype)
        pad_att = torch.zeros((B, C, T), dtype=att.dtype)
        pad[:, :ids.shape[1], :ids.shape[2]] = ids[rows]
        pad_att[:, :ids.shape[1], :ids.shape[2]] = att[rows]
        out["input_ids"], out["attention_mask"] = pad, pad_att
    return out


def export_once(wrapped, example: dict, names: list[str], path: str, exporter: str, opset: Optional[int],
                 debug: bool):
    import torch

    output = output_name(wrapped.inner.spec.task)
    external = sum(p.numel() * p.element_size() for p in wrapped.parameters()) > 1.8e9  # protobuf 2 GB limit
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if debug else contextlib.redirect_stdout(sink)
    with warnings.catch_warnings(), quiet, quiet_loggers(not debug), torch.no_grad():
        if not debug:
            warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            b, c, t = Dim("batch"), Dim("chunks"), Dim("tokens")
            shapes = {k: ({0: b, 1: c, 2: t} if k in TEXT_INPUTS else {0: b}) for k in names}
            prog = torch.onnx.export(wrapped, (), kwargs=example, input_names=names, output_names=[output],
                                     dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=external,
                                     verbose=False)
            prog.save(path, external_data=external)
        else:
            axes = {k: ({0: "batch", 1: "chunks", 2: "tokens"} if k in TEXT_INPUTS else {0: "batch"}) for k in names}
            axes[output] = {0: "batch"}
            # the legacy exporter takes positional args: the wrapper's keyword order is INPUTS
            args = tuple(example.get(k) for k in INPUTS)
            while args and args[-1] is None:
                args = args[:-1]
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=[output], dynamic_axes=axes,
                              opset_version=opset or TORCHSCRIPT_OPSET, dynamo=False, do_constant_folding=True)


@contextlib.contextmanager
def quiet_loggers(on: bool):
    """The exporters log progress and harmless notes (torchvision ops, constant folding) at WARNING."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir", "root")
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    old = [lg.level for lg in loggers]
    if on:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def _try_export(model, names: list[str], example: dict, batches: list[dict], path: str, how: str,
                opset: Optional[int], atol: float, debug: bool) -> tuple[Optional[dict], str]:
    """Export with one exporter and verify: (report, "") or (None, why it failed)."""
    import onnx

    t0 = time.perf_counter()
    for f in os.listdir(os.path.dirname(path)):  # what an earlier exporter left
        os.remove(os.path.join(os.path.dirname(path), f))
    try:
        export_once(score_wrapper(model, names), example, names, path, how, opset, debug)
    except Exception as e:  # exporter internals raise anything; report it in one line
        if debug:
            log.exception("%s export failed", how)
        return None, f"{how} export failed: {first_line(e)}"
    seconds = time.perf_counter() - t0
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        return None, f"{how}: onnx.checker rejected the model: {first_line(e)}"
    session = serving.session(path)
    got_names = [i.name for i in session.get_inputs()]
    if got_names != names:
        return None, f"{how}: graph inputs {got_names}, expected {names}"
    try:
        checks = verify.compare(session, model, batches)
    except ArtifactError as e:
        return None, f"{how}: {e}"
    worst = max(c["max_abs_diff"] for c in checks)
    if not worst <= atol:
        return None, (f"{how}: onnxruntime scores differ from PyTorch by {worst:.3g} > {atol:g} "
                      f"(shapes {[c['shape'] for c in checks]})")
    opset_used = next((o.version for o in onnx.load(path, load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None)
    return {"exporter": how, "opset": opset_used, "export_seconds": round(seconds, 1), "inputs": names,
            "output": output_name(model.spec.task), "tolerance": atol, "max_abs_diff": worst, "checks": checks}, ""


def export_verified(model, names: list[str], batches: list[dict], path: str, exporter: str, opset: Optional[int],
                     atol: float, debug: bool, say: Callable[[str], None]) -> dict:
    """The first exporter (dynamo, then TorchScript for auto) whose model verifies; ArtifactError if none does."""
    example = example_inputs(batches[3], names)
    failures = []
    for how in (["dynamo", "torchscript"] if exporter == "auto" else [exporter]):
        report, failure = _try_export(model, names, example, batches, path, how, opset, atol, debug)
        if report is not None:
            break
        failures.append(failure)
    else:
        raise ArtifactError("ONNX export failed verification: " + "; ".join(failures))
    for f in failures:
        say(f"note: {f}")
    checks = report["checks"]
    say(f"{how} exporter, opset {report['opset']}: onnx.checker ok; onnxruntime vs PyTorch max |dp| "
        f"= {report['max_abs_diff']:.2e} over {len(checks)} shapes {[tuple(c['shape']) for c in checks]} "
        f"(tolerance {atol:g})")
    return report
