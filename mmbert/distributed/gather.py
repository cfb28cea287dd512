"""Gather per-rank values on every rank: any object, or evaluation outputs with each dataset row kept once; and
rank 0's result given to every rank."""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from ..errors import DataError, MMBertError


def gather_objects(obj, group=None) -> list:
    """Every rank's `obj` (of `group`, default the world), in rank order; [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def gather_rows(index: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """all_gather_object of (index, arrays) from every rank; returns rows sorted by index with the
    padding duplicates of the distributed sampler removed (first occurrence wins)."""
    parts = gather_objects((index, arrays))
    all_index = np.concatenate([p[0] for p in parts])
    merged = {k: np.concatenate([p[1][k] for p in parts]) for k in arrays}
    uniq, first = np.unique(all_index, return_index=True)
    return uniq, {k: v[first] for k, v in merged.items()}


def on_rank0(fn):
    """Collective: fn() on rank 0, its result on every rank, or its error (the others raise it as one line), so
    every rank takes rank 0's decision."""
    result, error, failure = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # any failure must reach the waiting ranks, which would otherwise hang
            failure = e
            error = (type(e), str(e)) if isinstance(e, MMBertError) else (DataError, f"rank 0 failed: {e!r}")
    if dist.get_world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise error[0](error[1])
    return result
