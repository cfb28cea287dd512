"""ONNX export of a consolidated model directory, verified with onnxruntime against PyTorch.

The exported graph maps the collated tensors straight to the scores: class probabilities (softmax included),
or for a regression the prediction in the target's original units (output `prediction`); its inputs and
outputs are listed in mmbert/serving.py, which serves the export. Batch, chunk and token axes are dynamic. The folder holding the ONNX file is self-contained for serving:
preprocessing.json, model_spec.json, tokenizer/ and onnx_manifest.json (checksums, inputs, verification, int8
settings and drift; one digest over the graph files and everything serving reads beside them, checked by
serving before it scores; and the digest of each model folder it was built from). Companions are copied
without following links, and a model folder with a link out of itself is refused. It holds one export:
export.py writes into a new or empty folder, or replaces an earlier export (recognised by its manifest)
whole; any other non-empty folder is refused.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from typing import Callable, Optional

import numpy as np

from .. import fsutil, serving
from ..errors import ArtifactError, MMBertError
from ..serving import INPUTS, MANIFEST, first_line, output_name, sha256

log = logging.getLogger("mmbert.export")

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17


def input_names_for(spec) -> list[str]:
    """The graph inputs of a model with this ModelSpec, in order: only what its forward reads."""
    names = []
    if spec.fusion != "tab_only":
        names += ["input_ids", "attention_mask"]
    if spec.fusion != "text_only":
        if spec.num_numeric > 0:
            names += ["numeric", "missing"]
        if len(spec.cardinalities) > 0:
            names += ["categorical"]
    return names


def model_input_names(model) -> list[str]:
    """The graph inputs of a model, or of an ensemble the union of its members' (in INPUTS order)."""
    specs = getattr(model, "member_specs", None) or [model.spec]
    wanted = {n for spec in specs for n in input_names_for(spec)}
    return [n for n in INPUTS if n in wanted]


def int8_path(output: str) -> str:
    stem = output[:-5] if output.endswith(".onnx") else output
    return stem + ".int8.onnx"


# --------------------------------------------------------------------------------------------- export
def _wrapper(model, names: list[str]):
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


def _example_inputs(spec, batch: dict, names: list[str]) -> dict:
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


def _export_once(wrapped, example: dict, names: list[str], path: str, exporter: str, opset: Optional[int],
                 debug: bool):
    import torch

    output = output_name(wrapped.inner.spec.task)
    external = sum(p.numel() * p.element_size() for p in wrapped.parameters()) > 1.8e9  # protobuf 2 GB limit
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if debug else contextlib.redirect_stdout(sink)
    with warnings.catch_warnings(), quiet, _quiet_loggers(not debug), torch.no_grad():
        if not debug:
            warnings.simplefilter("ignore")
        if exporter == "dynamo":
            from torch.export import Dim

            b, c, t = Dim("batch"), Dim("chunks"), Dim("tokens")
            shapes = {k: ({0: b, 1: c, 2: t} if k in ("input_ids", "attention_mask") else {0: b}) for k in names}
            prog = torch.onnx.export(wrapped, (), kwargs=example, input_names=names, output_names=[output],
                                     dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=external,
                                     verbose=False)
            prog.save(path, external_data=external)
        else:
            axes = {k: ({0: "batch", 1: "chunks", 2: "tokens"} if k in ("input_ids", "attention_mask") else {0: "batch"})
                    for k in names}
            axes[output] = {0: "batch"}
            # the legacy exporter takes positional args: the wrapper's keyword order is INPUTS
            args = tuple(example.get(k) for k in INPUTS)
            while args and args[-1] is None:
                args = args[:-1]
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=[output], dynamic_axes=axes,
                              opset_version=opset or TORCHSCRIPT_OPSET, dynamo=False, do_constant_folding=True)


@contextlib.contextmanager
def _quiet_loggers(on: bool):
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


# ------------------------------------------------------------------------------- verification rows
def _rows_from_run(model_dir: str, data: Optional[str], n: int):
    """(DataFrame, file, description) of held-out rows to verify on, or None when no data can be found:
    --data if given, else the run's val (or test) split, selected from its typed config.yaml by the same
    function training used."""
    from ..artifact import read_run_config  # lazy, as every model import here
    from ..data.io import load_table
    from ..data.pipeline import select_splits

    if data:
        return load_table(data).iloc[:n], data, f"first rows of {data}"
    if not os.path.isfile(os.path.join(model_dir, "config.yaml")):
        return None
    cfg_file = os.path.join(model_dir, "config.yaml")
    data_cfg = read_run_config(model_dir).data  # a tampered config.yaml is an error, not a reason to guess
    problems = []
    for name in ("val", "test"):
        try:
            sp = select_splits(data_cfg, (name,), source=cfg_file).get(name)
        except MMBertError as e:
            problems.append(str(e))
            continue
        if sp is not None and len(sp.df):
            return sp.df.iloc[:n], sp.file, sp.description
    if problems:
        log.warning("cannot read the run's held-out data for verification (%s): using synthetic rows", problems[0])
    return None


def _synthetic_batches(spec, tokenizer, pad_id: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = getattr(tokenizer, "vocab_size", None) or 1000
    out = []
    for B, C, T in ((1, 1, 5), (1, 3, 17), (4, 2, 9), (16, 2, 40)):
        ids = torch.randint(5, min(vocab, 30000), (B, C, T), generator=g)
        att = torch.ones((B, C, T), dtype=torch.int64)
        lengths = torch.randint(2, T + 1, (B, C), generator=g)
        att &= (torch.arange(T) < lengths.unsqueeze(-1)).long()
        if C > 1:
            att[0, 1:] = 0  # row 0 has a single real chunk
        ids = torch.where(att > 0, ids, torch.full_like(ids, pad_id))
        K = len(spec.cardinalities)
        cat = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in spec.cardinalities], 1) if K \
            else torch.zeros((B, 0), dtype=torch.int64)
        cmask = att[:, :, 0] > 0
        out.append({"input_ids": ids, "attention_mask": att, "chunk_mask": cmask,
                    "numeric": torch.randn((B, spec.num_numeric), generator=g),
                    "missing": (torch.rand((B, spec.num_numeric), generator=g) > 0.8).float(),
                    "categorical": cat, "chunk_index": torch.nonzero(cmask.reshape(-1)).reshape(-1)})
    return out


def verification_batches(model_dir: str, spec, pre, tokenizer, data: Optional[str] = None, rows: int = 48):
    """Collated batches of several shapes (batch 1 and many; one and several chunks; short and long token
    lengths; extra padding) built from real rows; synthetic rows when the run's data cannot be found.
    Returns (batches, description of the rows)."""
    import torch

    from ..data import tokenize as tokenization
    from ..data.dataset import TableDataset, collate
    from ..data.pipeline import build_dataset
    from ..data.tokenize import chunk_tokenize

    pad_id = tokenization.pad_id(tokenizer)
    got = _rows_from_run(model_dir, data, rows)
    if got is None:
        return _synthetic_batches(spec, tokenizer, pad_id), "synthetic rows (the run's data was not found)"
    df, file, desc = got
    logging.getLogger("mmbert.main").disabled = True  # data-fix reports are noise here
    try:
        ds = build_dataset(pre, tokenizer, df, file, with_labels=False, name="verify")
    finally:
        logging.getLogger("mmbert.main").disabled = False
    n = len(ds)
    order = np.argsort(ds.lengths, kind="stable")
    idx_sets = [[int(order[0])], [int(order[-1])], list(range(min(n, 7))), list(range(min(n, 16)))]
    batches = [collate(ds, ix, pad_id) for ix in idx_sets]
    # several (up to 3) short chunks per row, whatever max_chunks/max_tokens the run used
    chunks, _ = chunk_tokenize(tokenizer, ds.enc.texts, min(pre.max_tokens, 12), 3)
    batches.append(collate(TableDataset(ds.enc, chunks), list(range(min(n, 6))), pad_id))
    # extra padding: one empty chunk and 5 pad tokens more than needed
    b = dict(batches[2])
    B, C, T = b["input_ids"].shape
    ids = torch.full((B, C + 1, T + 5), pad_id, dtype=b["input_ids"].dtype)
    att = torch.zeros((B, C + 1, T + 5), dtype=b["attention_mask"].dtype)
    ids[:, :C, :T], att[:, :C, :T] = b["input_ids"], b["attention_mask"]
    cmask = att[:, :, 0] > 0
    b.update(input_ids=ids, attention_mask=att, chunk_mask=cmask,
             chunk_index=torch.nonzero(cmask.reshape(-1)).reshape(-1))
    batches.append(b)
    return batches, f"{n} rows: {desc}"


def compare(session, model, batches: list[dict]) -> list[dict]:
    """Per batch: its shape and the max |s_onnx - s_torch| of the scores (inf when either side is not finite)."""
    from ..scoring import batch_scores

    out = []
    for b in batches:
        ref = batch_scores(model, b)
        try:
            got = session.run(None, serving.feeds(session, b))[0]
        except Exception as e:  # e.g. a shape the trace baked in as a constant
            raise ArtifactError(f"onnxruntime fails on inputs of shape {list(b['input_ids'].shape) if 'input_ids' in b else ''}: "
                                f"{first_line(e)}") from None
        ok = np.isfinite(got).all() and np.isfinite(ref).all() and got.shape == ref.shape
        diff = float(np.abs(got - ref).max()) if ok else float("inf")
        out.append({"shape": list(b["input_ids"].shape) if "input_ids" in b else [len(b["numeric"])],
                    "max_abs_diff": diff})
    return out


def _rows_per_second(session, batch: dict, seconds: float = 1.5) -> float:
    fd = serving.feeds(session, batch)
    session.run(None, fd)
    n, t0 = 0, time.perf_counter()
    while True:
        session.run(None, fd)
        n += 1
        el = time.perf_counter() - t0
        if el > seconds and n >= 3:
            return n * len(batch["numeric"]) / el


# ------------------------------------------------------------------------------------------------ int8
# Dynamic int8: activations are quantized to uint8 at run time (DynamicQuantizeLinear), weights ahead of time to
# int8 per output channel with 7 bits (reduce_range). The 7 bits make the int8 model right on every x86 CPU:
# without VNNI (AVX2, AVX-512 before VNNI) onnxruntime's u8 x s8 kernel multiplies with vpmaddubsw, which adds two
# adjacent u8*s8 products into a saturating int16. With |w| <= 64 a pair stays within 2*255*64 = 32640 <= 32767,
# so every kernel (VNNI's int32 dot products too) computes the same exact integer sums; with 8-bit weights a pair
# reaches 2*255*127 = 64770 and clips on those CPUs only (probabilities off by up to 0.9 there, fine elsewhere).
INT8_SETTINGS = {"method": "onnxruntime.quantization.quantize_dynamic", "activations": "uint8, dynamic per tensor",
                 "weight_type": "QInt8", "per_channel": True, "reduce_range": True}
# max |p_int8 - p_fp32| over the verification rows: int8 costs ~0.03 on the shipped and tiny test models, a
# saturating kernel 0.5-0.9; a model beyond this is refused rather than shipped with silently different scores
INT8_TOLERANCE = 0.1


def quantize_int8(src: str, dst: str):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers(True):
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, weight_type=getattr(QuantType, INT8_SETTINGS["weight_type"]),
                         per_channel=INT8_SETTINGS["per_channel"], reduce_range=INT8_SETTINGS["reduce_range"])


def _int8_copy(fp32_path: str, batches: list[dict], tolerance: float, say: Callable[[str], None],
               scale: float = 1.0) -> dict:
    """Quantize fp32_path to int8_path(fp32_path) and measure it against onnxruntime fp32 on the verification
    batches. Raises ArtifactError when the drift exceeds `tolerance` (the caller's staging folder goes with it).
    Scores are divided by `scale` first: a regression's drift is measured in train-target standard deviations,
    so one tolerance means the same for any target's units."""
    import onnx

    q_path = int8_path(fp32_path)
    quantize_int8(fp32_path, q_path)
    try:
        onnx.checker.check_model(q_path)
    except Exception as e:
        raise ArtifactError(f"the int8 model does not pass onnx.checker: {first_line(e)}") from None
    fp32, q = serving.session(fp32_path), serving.session(q_path)
    drifts, agree = [], 0
    for b in batches:
        p32 = fp32.run(None, serving.feeds(fp32, b))[0] / scale
        p8 = q.run(None, serving.feeds(q, b))[0] / scale
        if not np.isfinite(p8).all():
            raise ArtifactError("the int8 model gives non-finite probabilities")
        drifts.append(np.abs(p8 - p32).max(axis=1))
        agree += int((p8.argmax(1) == p32.argmax(1)).sum())
    drift = np.concatenate(drifts)
    if not drift.max() <= tolerance:
        raise ArtifactError(f"the int8 model's probabilities drift from fp32 by max |dp| {drift.max():.3g} > int8 "
                            f"tolerance {tolerance:g} over {len(drift)} predictions on the verification rows: "
                            f"nothing written (export without --quantize, or raise --int8-tolerance to accept it)")
    speed_batch = batches[3]
    rps32, rps8 = _rows_per_second(fp32, speed_batch), _rows_per_second(q, speed_batch)
    i8 = {"file": os.path.basename(q_path), "quantization": dict(INT8_SETTINGS), "tolerance": tolerance,
          "max_abs_drift_vs_fp32": float(drift.max()), "mean_abs_drift_vs_fp32": float(drift.mean()),
          "argmax_agreement": agree / len(drift) if p32.shape[1] > 1 else None, "predictions": len(drift),
          "speed_batch": len(speed_batch["numeric"]), "rows_per_s_fp32": round(rps32, 1),
          "rows_per_s_int8": round(rps8, 1), "size_mb_fp32": round(os.path.getsize(fp32_path) / 2**20, 1),
          "size_mb_int8": round(os.path.getsize(q_path) / 2**20, 1)}
    classes = f"same class on {agree}/{len(drift)}" if p32.shape[1] > 1 else f"{len(drift)}"  # regression: 1 column
    say(f"int8: max |dp| vs fp32 {i8['max_abs_drift_vs_fp32']:.2e} (mean {i8['mean_abs_drift_vs_fp32']:.2e}, "
        f"tolerance {tolerance:g}), {classes} predictions; {rps32:.0f} -> {rps8:.0f} rows/s "
        f"at batch {i8['speed_batch']}; {i8['size_mb_fp32']} -> {i8['size_mb_int8']} MB")
    return i8


# ------------------------------------------------------------------------------------- the output folder
# what an export writes beside its ONNX file(s); the manifest's "files" lists those
COMPANIONS = ("preprocessing.json", "model_spec.json", "config.yaml", "tokenizer", MANIFEST)
STAGING_PREFIX = ".export-"


def _resolve_output(model_dir: str, output: str) -> tuple[str, str]:
    """(the .onnx path, its folder) for --output, a file or a folder."""
    if os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]:
        output = os.path.join(output, "model.onnx")
    if not output.endswith(".onnx"):
        raise ArtifactError(f"--output {output}: the file name must end with .onnx")
    out_dir = os.path.dirname(os.path.abspath(output))
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ArtifactError("--output must not be inside the model directory: export to a new folder")
    return output, out_dir


def _previous_export(out_dir: str) -> set[str]:
    """The names in out_dir that an earlier export wrote (this export replaces them); empty for a new or empty
    folder. Any other non-empty folder is refused: exporting into it would overwrite files of the same names
    (a user's config.yaml, model_spec.json, tokenizer/) with nothing to tell them apart from ours."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ArtifactError(f"--output folder {out_dir} is a file")
    held = sorted(n for n in os.listdir(out_dir) if not n.startswith(STAGING_PREFIX)) \
        if os.path.isdir(out_dir) else []  # staging folders of an interrupted export are ours
    if not held:
        return set()
    manifest = None
    with contextlib.suppress(OSError, ValueError), open(os.path.join(out_dir, MANIFEST)) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("exports"), dict):
        shown = [n + "/" if os.path.isdir(os.path.join(out_dir, n)) else n for n in held]
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        raise ArtifactError(f"--output folder {out_dir} is not empty and is not an earlier export (no readable "
                            f"{MANIFEST}): it holds {', '.join(shown[:8])}{more}; export to a new or empty folder")
    ours = [*COMPANIONS, *(f for f in manifest.get("files", {}) if f == os.path.basename(f))]
    return {n for n in ours if n in held}


def _stage_companions(model_dir: str, tokenizer, staged: str):
    """What serving needs beside the ONNX file: preprocessing, spec, the training config (data columns and
    splits, read by evaluate.py --onnx) when the run has one, and the tokenizer. Copies never follow a link
    (fsutil.copy_part; the model folder was checked to have none leading out of it)."""
    from ..artifact import PREPROCESSING, SPEC

    for name in (PREPROCESSING, SPEC, "config.yaml"):
        if name != "config.yaml" or os.path.lexists(os.path.join(model_dir, name)):
            fsutil.copy_part(model_dir, name, staged)
    if tokenizer is not None:
        if os.path.isdir(os.path.join(model_dir, "tokenizer")):
            fsutil.copy_part(model_dir, "tokenizer", staged)
        else:
            tokenizer.save_pretrained(os.path.join(staged, "tokenizer"))


def _write_manifest(staged: str, files: dict, output: str, report: dict):
    """onnx_manifest.json: the graph files' checksums, the export report, and one digest over every part
    serving reads (serving.export_parts), so a graph or label map from another export is refused there."""
    parts = serving.export_parts(staged, files)
    with open(os.path.join(staged, MANIFEST), "w") as f:
        json.dump({"files": files, "digest": fsutil.combine(parts), "parts": parts,
                   "exports": {os.path.basename(output): report}}, f, indent=1)


def _install(staged: str, out_dir: str, previous: set[str], say: Callable[[str], None]):
    """Move the staged export into out_dir. What the earlier export wrote and this one does not (its int8 copy,
    config.yaml, a model of another name) is removed so that nothing stale is mixed with the new export; the
    manifest moves last, so an interrupted install still leaves a folder recognised as an export."""
    new = sorted(os.listdir(staged), key=lambda n: n == MANIFEST)
    stale = sorted(previous - set(new))
    for name in stale + [n for n in new if os.path.isdir(os.path.join(out_dir, n))]:  # os.replace can't overwrite a dir
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for name in new:
        os.replace(os.path.join(staged, name), os.path.join(out_dir, name))
    if previous:
        say(f"replaced the earlier export in {out_dir}" + (f" (removed {', '.join(stale)})" if stale else ""))


# ------------------------------------------------------------------------------------- main entry
def _try_export(model, names: list[str], example: dict, batches: list[dict], path: str, how: str,
                opset: Optional[int], atol: float, debug: bool) -> tuple[Optional[dict], str]:
    """Export with one exporter and verify: (report, "") or (None, why it failed)."""
    import onnx

    t0 = time.perf_counter()
    for f in os.listdir(os.path.dirname(path)):  # what an earlier exporter left
        os.remove(os.path.join(os.path.dirname(path), f))
    try:
        _export_once(_wrapper(model, names), example, names, path, how, opset, debug)
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
        checks = compare(session, model, batches)
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


def _export_verified(model, names: list[str], batches: list[dict], path: str, exporter: str, opset: Optional[int],
                     atol: float, debug: bool, say: Callable[[str], None]) -> dict:
    """The first exporter (dynamo, then TorchScript for auto) whose model verifies; ArtifactError if none does."""
    example = _example_inputs(model.spec, batches[3], names)
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


def export_onnx(model_dir, output: str, quantize: Optional[str] = None, opset: Optional[int] = None,
                exporter: str = "auto", data: Optional[str] = None, atol: float = 1e-4, rows: int = 48,
                debug: bool = False, say: Optional[Callable[[str], None]] = None,
                int8_tolerance: float = INT8_TOLERANCE) -> dict:
    """Export `model_dir` (a consolidated RUN/final; several, or an ensemble folder, as one graph averaging
    their probabilities: mmbert/ensemble.py) to `output`, verify it with onnxruntime against
    PyTorch on real rows of several shapes, optionally add an int8 copy (refused when its probabilities drift
    from fp32 by more than int8_tolerance), and make the folder self-contained. The folder must be new, empty or
    an earlier export, which is replaced whole. Raises ArtifactError (nothing written) when export or
    verification fails."""
    import torch

    from ..artifact import model_dir_digest
    from ..ensemble import open_models, resolve_model_dirs

    say = say or (lambda msg: print(msg, flush=True))
    if exporter not in EXPORTERS:
        raise ArtifactError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if quantize not in (None, "int8"):
        raise ArtifactError(f"unknown quantization '{quantize}' (only int8 is supported)")
    dirs = resolve_model_dirs(model_dir)
    for d in dirs:
        output, out_dir = _resolve_output(d, output)
    previous = _previous_export(out_dir)  # before the slow part: a wrong folder fails at once

    md = open_models(dirs)
    model_dir = md.path  # the first member: its config.yaml finds verification rows, its companions are shipped
    model, pre, tokenizer = md.model.float().eval(), md.pre, md.tokenizer
    names = model_input_names(model)
    batches, rows_desc = verification_batches(model_dir, model.spec, pre, tokenizer, data, rows)
    what = f"ensemble of {len(dirs)} ({', '.join(dirs)})" if md.members else model_dir
    fusions = sorted({s.fusion for s in getattr(model, "member_specs", [model.spec])})
    say(f"exporting {what} (fusion {', '.join(fusions)}, inputs {', '.join(names)}); verifying on {rows_desc}")

    os.makedirs(out_dir, exist_ok=True)
    staged = fsutil.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)
    try:
        # the whole export is built in `staged` and only moved into place once everything passed
        fp32_path = os.path.join(staged, os.path.basename(output))
        report = _export_verified(model, names, batches, fp32_path, exporter, opset, atol, debug, say)
        report.update(fusion=model.spec.fusion, task=pre.task, classes=[str(c) for c in pre.class_names],
                      verified_on=rows_desc, torch=torch.__version__,
                      built_from=[{"dir": os.path.abspath(d), "digest": model_dir_digest(d)} for d in dirs])
        if md.members:
            report["ensemble"] = ensemble_report(dirs, model)
        if quantize == "int8":
            report["int8"] = _int8_copy(fp32_path, batches, int8_tolerance, say, pre.target_std or 1.0)
        # the ONNX files and any external-data files beside them: a later export must know to remove them all
        files = {f: {"sha256": sha256(os.path.join(staged, f))} for f in sorted(os.listdir(staged))}
        for f, entry in files.items():
            if f.endswith(".onnx"):
                entry["precision"] = "int8" if f.endswith(".int8.onnx") else "fp32"
        _stage_companions(model_dir, tokenizer, staged)
        _write_manifest(staged, files, output, report)
        _install(staged, out_dir, previous, say)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    report["files"] = sorted(files)
    report["folder"] = out_dir
    return report
