"""The int8 copy of an export: dynamic quantization with onnxruntime, refused when its scores drift from the
fp32 graph's beyond a tolerance on the verification rows; its rows/s beside fp32's are measured."""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from typing import Callable

import numpy as np

from .. import serving
from ..errors import ArtifactError
from ..serving import first_line
from .graph import quiet_loggers


def int8_path(output: str) -> str:
    stem = output[:-5] if output.endswith(".onnx") else output
    return stem + ".int8.onnx"


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

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers(True):
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, weight_type=getattr(QuantType, INT8_SETTINGS["weight_type"]),
                         per_channel=INT8_SETTINGS["per_channel"], reduce_range=INT8_SETTINGS["reduce_range"])


def rows_per_second(session, batch: dict, seconds: float = 1.5) -> float:
    fd = serving.feeds(session, batch)
    session.run(None, fd)
    n, t0 = 0, time.perf_counter()
    while True:
        session.run(None, fd)
        n += 1
        el = time.perf_counter() - t0
        if el > seconds and n >= 3:
            return n * len(batch["numeric"]) / el


def int8_copy(fp32_path: str, batches: list[dict], tolerance: float, say: Callable[[str], None],
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
    rps32, rps8 = rows_per_second(fp32, speed_batch), rows_per_second(q, speed_batch)
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
