"""ONNX export of a consolidated model directory, verified with onnxruntime, and an onnxruntime scorer.

The exported graph maps the collated tensors straight to class probabilities (softmax included):

    input_ids       int64   batch x chunks x tokens     (absent for tab_only)
    attention_mask  int64   batch x chunks x tokens     (absent for tab_only)
    numeric         float32 batch x N                   (absent without numeric columns or for text_only)
    missing         float32 batch x N                   (idem; 1.0 where the value was missing)
    categorical     int64   batch x K                   (absent without categorical columns or for text_only)
    -> probabilities float32 batch x num_classes

Batch, chunk and token axes are dynamic. The folder holding the ONNX file is self-contained for serving:
preprocessing.json, model_spec.json, tokenizer/ and onnx_manifest.json (checksums, inputs, verification).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ArtifactError, MMBertError

log = logging.getLogger("mmbert.export")

INPUTS = ("input_ids", "attention_mask", "numeric", "missing", "categorical")
OUTPUT = "probabilities"
MANIFEST = "onnx_manifest.json"
EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17
_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(int32)": np.int32,
           "tensor(double)": np.float64}


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


def int8_path(output: str) -> str:
    stem = output[:-5] if output.endswith(".onnx") else output
    return stem + ".int8.onnx"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------------------------- export
def _wrapper(model, names: list[str]):
    import torch

    class ProbabilityModel(torch.nn.Module):
        """Keyword inputs named as in the ONNX graph -> softmax probabilities.

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
            logits = self.inner(input_ids, attention_mask, numeric, missing, categorical, chunk_index)
            return torch.softmax(logits.float(), dim=-1)

    return ProbabilityModel(model).eval()


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
            prog = torch.onnx.export(wrapped, (), kwargs=example, input_names=names, output_names=[OUTPUT],
                                     dynamic_shapes=shapes, opset_version=opset, dynamo=True, external_data=external,
                                     verbose=False)
            prog.save(path, external_data=external)
        else:
            axes = {k: ({0: "batch", 1: "chunks", 2: "tokens"} if k in ("input_ids", "attention_mask") else {0: "batch"})
                    for k in names}
            axes[OUTPUT] = {0: "batch"}
            # the legacy exporter takes positional args: the wrapper's keyword order is INPUTS
            args = tuple(example.get(k) for k in INPUTS)
            while args and args[-1] is None:
                args = args[:-1]
            torch.onnx.export(wrapped, args, path, input_names=names, output_names=[OUTPUT], dynamic_axes=axes,
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


def _session(path: str, threads: Optional[int] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph ...)
        raise ArtifactError(f"{path} is not a loadable ONNX model (truncated or corrupted?): {_first_line(e)}") \
            from None


def _feeds(session, batch: dict) -> dict:
    feeds = {}
    for i in session.get_inputs():
        if i.name not in batch:
            raise ArtifactError(f"the ONNX model needs input '{i.name}', which the batch does not have")
        v = batch[i.name]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        feeds[i.name] = np.ascontiguousarray(v, dtype=_DTYPES.get(i.type, v.dtype))
    return feeds


def _torch_probs(model, batch: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.softmax(model.forward_batch(batch).float(), dim=-1).numpy()


# ------------------------------------------------------------------------------- verification rows
def _rows_from_run(model_dir: str, data: Optional[str], n: int):
    """(DataFrame, file, description) of held-out rows to verify on, or None when no data can be found:
    --data if given, else the val/test split recorded in the model directory's config.yaml."""
    from ..data.io import load_table, read_indices

    if data:
        df = load_table(data)
        return df.iloc[:n], data, f"first rows of {data}"
    cfg_path = os.path.join(model_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        return None
    try:
        import yaml

        with open(cfg_path) as f:
            d = (yaml.safe_load(f) or {}).get("data") or {}
        split = d.get("split") or {}
        for key in ("val_file", "test_file"):
            if split.get(key) and os.path.exists(split[key]):
                df = load_table(split[key])
                return df.iloc[:n], split[key], f"{key.split('_')[0]} split ({split[key]})"
        path = d.get("path")
        if not path or not os.path.exists(path):
            return None
        df = load_table(path)
        for key in ("val_indices", "test_indices"):
            if split.get(key) and os.path.exists(split[key]):
                idx = read_indices(split[key], len(df), path)[:n]
                return df.iloc[idx], path, f"{key.split('_')[0]} split of {path}"
        if split.get("fractions") or not split.get("train_indices"):
            fr = split.get("fractions") or [0.8, 0.1, 0.1]
            perm = np.random.default_rng(split.get("seed", 0)).permutation(len(df))
            start = int(round(fr[0] * len(df)))
            idx = np.sort(perm[start:])[:n] if start < len(df) else np.arange(min(n, len(df)))
            return df.iloc[idx], path, f"held-out rows of {path}"
        return df.iloc[:n], path, f"first rows of {path}"
    except MMBertError as e:
        log.warning("cannot read the run's data for verification (%s): using synthetic rows", e)
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

    from ..data.dataset import TableDataset, collate
    from ..data.pipeline import build_dataset
    from ..data.tokenize import chunk_tokenize

    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
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
    """Per batch: its shape and the max |p_onnx - p_torch| (inf when either side is not finite)."""
    out = []
    for b in batches:
        ref = _torch_probs(model, b)
        try:
            got = session.run([OUTPUT], _feeds(session, b))[0]
        except Exception as e:  # e.g. a shape the trace baked in as a constant
            raise ArtifactError(f"onnxruntime fails on inputs of shape {list(b['input_ids'].shape) if 'input_ids' in b else ''}: "
                                f"{_first_line(e)}") from None
        ok = np.isfinite(got).all() and np.isfinite(ref).all() and got.shape == ref.shape
        diff = float(np.abs(got - ref).max()) if ok else float("inf")
        out.append({"shape": list(b["input_ids"].shape) if "input_ids" in b else [len(b["numeric"])],
                    "max_abs_diff": diff})
    return out


def _rows_per_second(session, batch: dict, seconds: float = 1.5) -> float:
    feeds = _feeds(session, batch)
    session.run([OUTPUT], feeds)
    n, t0 = 0, time.perf_counter()
    while True:
        session.run([OUTPUT], feeds)
        n += 1
        el = time.perf_counter() - t0
        if el > seconds and n >= 3:
            return n * len(batch["numeric"]) / el


def quantize_int8(src: str, dst: str):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers(True):
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)


# ------------------------------------------------------------------------------------- main entry
def export_onnx(model_dir: str, output: str, quantize: Optional[str] = None, opset: Optional[int] = None,
                exporter: str = "auto", data: Optional[str] = None, atol: float = 1e-4, rows: int = 48,
                debug: bool = False, say: Optional[Callable[[str], None]] = None) -> dict:
    """Export `model_dir` (a consolidated RUN/final) to `output`, verify it with onnxruntime against
    PyTorch on real rows of several shapes, optionally add an int8 copy, and make the folder self-contained.
    Raises ArtifactError (nothing is left at `output`) when export or verification fails."""
    import onnx
    import torch

    from ..artifact import PREPROCESSING, SPEC, load_artifact

    if say is None:
        def say(msg: str):
            print(msg, flush=True)
    if exporter not in EXPORTERS:
        raise ArtifactError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if quantize not in (None, "int8"):
        raise ArtifactError(f"unknown quantization '{quantize}' (only int8 is supported)")
    if os.path.isdir(output) or output.endswith(os.sep) or not os.path.splitext(output)[1]:
        output = os.path.join(output, "model.onnx")
    if not output.endswith(".onnx"):
        raise ArtifactError(f"--output {output}: the file name must end with .onnx")
    out_dir = os.path.dirname(os.path.abspath(output))
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ArtifactError("--output must not be inside the model directory: export to a new folder")

    model, pre, tokenizer = load_artifact(model_dir)
    model = model.float().eval()
    spec = model.spec
    names = input_names_for(spec)
    batches, rows_desc = verification_batches(model_dir, spec, pre, tokenizer, data, rows)
    example = _example_inputs(spec, batches[3], names)
    say(f"exporting {model_dir} (fusion {spec.fusion}, inputs {', '.join(names)}); verifying on {rows_desc}")

    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        tmp_path = os.path.join(tmp, os.path.basename(output))
        tries = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
        failures = []
        report: Optional[dict] = None
        for how in tries:
            t0 = time.perf_counter()
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
            try:
                _export_once(_wrapper(model, names), example, names, tmp_path, how, opset, debug)
            except Exception as e:  # exporter internals raise anything; report it in one line
                if debug:
                    log.exception("%s export failed", how)
                failures.append(f"{how} export failed: {_first_line(e)}")
                continue
            seconds = time.perf_counter() - t0
            try:
                onnx.checker.check_model(tmp_path, full_check=True)
            except Exception as e:
                failures.append(f"{how}: onnx.checker rejected the model: {_first_line(e)}")
                continue
            session = _session(tmp_path)
            got_names = [i.name for i in session.get_inputs()]
            if got_names != names:
                failures.append(f"{how}: graph inputs {got_names}, expected {names}")
                continue
            try:
                checks = compare(session, model, batches)
            except ArtifactError as e:
                failures.append(f"{how}: {e}")
                continue
            worst = max(c["max_abs_diff"] for c in checks)
            if not worst <= atol:
                failures.append(f"{how}: onnxruntime probabilities differ from PyTorch by {worst:.3g} > {atol:g} "
                                f"(shapes {[c['shape'] for c in checks]})")
                continue
            opset_used = next((o.version for o in onnx.load(tmp_path, load_external_data=False).opset_import
                               if o.domain in ("", "ai.onnx")), None)
            report = {"exporter": how, "opset": opset_used, "export_seconds": round(seconds, 1), "inputs": names,
                      "output": OUTPUT, "fusion": spec.fusion, "classes": [str(c) for c in pre.class_names],
                      "verified_on": rows_desc, "tolerance": atol, "max_abs_diff": worst, "checks": checks,
                      "torch": torch.__version__}
            break
        if report is None:
            raise ArtifactError("ONNX export failed verification: " + "; ".join(failures))
        for f in failures:
            say(f"note: {f}")
        say(f"{report['exporter']} exporter, opset {report['opset']}: onnx.checker ok; onnxruntime vs PyTorch max |dp| "
            f"= {worst:.2e} over {len(checks)} shapes {[tuple(c['shape']) for c in checks]} (tolerance {atol:g})")

        files = {}
        if quantize == "int8":
            q_tmp = int8_path(tmp_path)
            quantize_int8(tmp_path, q_tmp)
            try:
                onnx.checker.check_model(q_tmp)
            except Exception as e:
                raise ArtifactError(f"the int8 model does not pass onnx.checker: {_first_line(e)}") from None
            fp32, q = _session(tmp_path), _session(q_tmp)
            drifts, agree, total = [], 0, 0
            for b in batches:
                p32 = fp32.run([OUTPUT], _feeds(fp32, b))[0]
                p8 = q.run([OUTPUT], _feeds(q, b))[0]
                if not np.isfinite(p8).all():
                    raise ArtifactError("the int8 model gives non-finite probabilities")
                drifts.append(np.abs(p8 - p32).max(axis=1))
                agree += int((p8.argmax(1) == p32.argmax(1)).sum())
                total += len(p8)
            drift = np.concatenate(drifts)
            speed_batch = batches[3]
            rps32, rps8 = _rows_per_second(fp32, speed_batch), _rows_per_second(q, speed_batch)
            report["int8"] = {"file": os.path.basename(int8_path(output)), "max_abs_drift_vs_fp32": float(drift.max()),
                              "mean_abs_drift_vs_fp32": float(drift.mean()), "argmax_agreement": agree / total,
                              "predictions": total, "speed_batch": int(len(speed_batch["numeric"])),
                              "rows_per_s_fp32": round(rps32, 1), "rows_per_s_int8": round(rps8, 1),
                              "size_mb_fp32": round(os.path.getsize(tmp_path) / 2**20, 1),
                              "size_mb_int8": round(os.path.getsize(q_tmp) / 2**20, 1)}
            i8 = report["int8"]
            say(f"int8: max |dp| vs fp32 {i8['max_abs_drift_vs_fp32']:.2e} (mean {i8['mean_abs_drift_vs_fp32']:.2e}), "
                f"same class on {agree}/{total} predictions; {rps32:.0f} -> {rps8:.0f} rows/s at batch "
                f"{i8['speed_batch']}; {i8['size_mb_fp32']} -> {i8['size_mb_int8']} MB")

        # move into place: the ONNX file(s) only after verification passed
        for f in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
            if f.endswith(".onnx"):
                files[f] = {"sha256": _sha256(os.path.join(out_dir, f)), "precision": "int8" if f.endswith(".int8.onnx")
                            else "fp32"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # self-contained folder: preprocessing, spec, tokenizer, manifest
    shutil.copyfile(os.path.join(model_dir, PREPROCESSING), os.path.join(out_dir, PREPROCESSING))
    shutil.copyfile(os.path.join(model_dir, SPEC), os.path.join(out_dir, SPEC))
    if os.path.isfile(os.path.join(model_dir, "config.yaml")):  # the training config: data columns and splits
        shutil.copyfile(os.path.join(model_dir, "config.yaml"), os.path.join(out_dir, "config.yaml"))
    if tokenizer is not None:
        tok_out = os.path.join(out_dir, "tokenizer")
        shutil.rmtree(tok_out, ignore_errors=True)
        if os.path.isdir(os.path.join(model_dir, "tokenizer")):
            shutil.copytree(os.path.join(model_dir, "tokenizer"), tok_out)
        else:
            tokenizer.save_pretrained(tok_out)
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest: dict[str, Any] = {}
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            manifest = {}
    stale = int8_path(output)
    if quantize is None and os.path.isfile(stale):  # an int8 copy of an earlier export no longer matches
        os.remove(stale)
        say(f"removed {stale}: it was quantized from an earlier export")
    manifest.setdefault("files", {}).pop(os.path.basename(stale), None)
    manifest["files"].update(files)
    manifest["exports"] = {**manifest.get("exports", {}), os.path.basename(output): report}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)
    report["files"] = sorted(files)
    report["folder"] = out_dir
    return report


# --------------------------------------------------------------------------------------------- serving
class OnnxScorer:
    """onnxruntime scorer for an exported model; no PyTorch model is built.

    OnnxScorer(path, threads=None, check_integrity=True)
        path: an exported .onnx file (fp32 `model.onnx` or `model.int8.onnx`), or the export folder
        (then `model.onnx` in it). The folder's onnx_manifest.json checksum is checked when it lists the
        file (check_integrity=False skips it); a missing, truncated, tampered or non-ONNX file raises
        ArtifactError with one clear line.

    predict_proba(batch) -> np.ndarray float32, shape (B, num_classes), rows in batch order
        batch: a dict as returned by mmbert.data.dataset.collate (torch tensors or numpy arrays). Only
        the keys the graph declares (`input_names`) are read; `chunk_index`, `labels`, `index` ... are
        ignored. Same probabilities as softmax(model(...)) in PyTorch to ~1e-6 (verified at export).

    input_names: list[str]   graph inputs, a subset of input_ids, attention_mask, numeric, missing, categorical
    num_classes: int
    folder: str              the export folder
    preprocessor, tokenizer  loaded lazily from the folder (preprocessing.json, tokenizer/): the same
                             preprocessing as training, for serving raw rows
    pad_id: int              the tokenizer's pad id, for collate(ds, idx, scorer.pad_id)
    dataset(df, file="<rows>", with_labels=None) -> TableDataset   preprocess + tokenize raw rows
    predict_dataset(ds, batch_size=32) -> np.ndarray   all rows of a TableDataset, in dataset order
    predict_frame(df, batch_size=32) -> np.ndarray     raw rows (pandas DataFrame with the training columns)

    Example (evaluate.py --onnx):
        scorer = OnnxScorer(args.onnx)
        ds = build_dataset(scorer.preprocessor, scorer.tokenizer, df, file)
        probs = np.concatenate([scorer.predict_proba(collate(ds, idx, scorer.pad_id)) for idx in batches])
    """

    def __init__(self, path: str, threads: Optional[int] = None, check_integrity: bool = True):
        if os.path.isdir(path):
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise ArtifactError(f"ONNX model not found: {path}")
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.manifest: dict = {}
        mpath = os.path.join(self.folder, MANIFEST)
        if os.path.isfile(mpath):
            try:
                with open(mpath) as f:
                    self.manifest = json.load(f)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ArtifactError(f"{mpath} is corrupted: {e}") from None
        entry = self.manifest.get("files", {}).get(os.path.basename(path))
        if check_integrity and entry and entry.get("sha256") and _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path} does not match the checksum in {MANIFEST}: the file was modified, truncated "
                                f"or corrupted after export; re-export it")
        self.session = _session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in INPUTS]
        outs = [o.name for o in self.session.get_outputs()]
        if unknown or outs != [OUTPUT]:
            raise ArtifactError(f"{path} is not an mmbert export: inputs {self.input_names}, outputs {outs}")
        shape = self.session.get_outputs()[0].shape
        self.num_classes = int(shape[-1]) if isinstance(shape[-1], int) else None
        self._pre = self._tok = None

    # ------------------------------------------------------------------ scoring
    def predict_proba(self, batch: dict) -> np.ndarray:
        return self.session.run([OUTPUT], _feeds(self.session, batch))[0]

    # ------------------------------------------------------------------ the self-contained folder
    @property
    def preprocessor(self):
        if self._pre is None:
            from ..data.preprocess import Preprocessor

            self._pre = Preprocessor.load(os.path.join(self.folder, "preprocessing.json"))
        return self._pre

    @property
    def tokenizer(self):
        if self._tok is None:
            from ..data.tokenize import load_tokenizer

            tok_dir = os.path.join(self.folder, "tokenizer")
            self._tok = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else self.preprocessor.tokenizer)
        return self._tok

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return 0 if pid is None else int(pid)

    def dataset(self, df, file: str = "<rows>", with_labels: Optional[bool] = None):
        from ..data.pipeline import build_dataset

        return build_dataset(self.preprocessor, self.tokenizer, df, file, with_labels=with_labels, name="serve")

    def predict_dataset(self, ds, batch_size: int = 32) -> np.ndarray:
        from ..data.dataset import collate

        order = np.argsort(ds.lengths, kind="stable")  # similar lengths together: less padding
        out = np.zeros((len(ds), self.num_classes or len(self.preprocessor.classes)), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = self.predict_proba(collate(ds, idx, self.pad_id))
        return out

    def predict_frame(self, df, batch_size: int = 32) -> np.ndarray:
        return self.predict_dataset(self.dataset(df, with_labels=False), batch_size)
