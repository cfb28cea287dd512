"""Gather per-rank values on every rank: any object, or evaluation outputs with each dataset row kept once."""
from __future__ import annotations

import numpy as np
import torch.distributed as dist


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
