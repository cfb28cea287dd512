"""Gather per-rank evaluation outputs on every rank and keep each dataset row exactly once."""
from __future__ import annotations

import numpy as np
import torch.distributed as dist


def gather_rows(index: np.ndarray, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """all_gather_object of (index, arrays) from every rank; returns rows sorted by index with the
    padding duplicates of the distributed sampler removed (first occurrence wins)."""
    payload = (index, arrays)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, payload)
    else:
        parts = [payload]
    all_index = np.concatenate([p[0] for p in parts])
    merged = {k: np.concatenate([p[1][k] for p in parts]) for k in arrays}
    uniq, first = np.unique(all_index, return_index=True)
    return uniq, {k: v[first] for k, v in merged.items()}
