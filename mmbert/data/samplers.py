"""Distributed-correct sample orders.

Training: one global order per epoch, identical on every rank and independent of the world size.
Optimizer step k consumes order[k*G:(k+1)*G] with G = batch_size * world_size * grad_accum; rank r
takes every world-th row of each micro-batch's slice. The data position saved in checkpoints is therefore a
single global number (samples consumed this epoch), so a run resumes on any world size.

Evaluation: rows sorted by length (fast batches), padded by repetition to a multiple of the world size
and dealt round-robin, so every rank runs the same number of batches (FSDP needs that); duplicates are
removed by row index after gathering.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def epoch_order(n: int, epoch: int, seed: int, lengths: Optional[np.ndarray] = None, block: int = 64,
                window_blocks: int = 32) -> np.ndarray:
    """A permutation of range(n). With `lengths`, length-grouped: within windows of
    `block * window_blocks` shuffled rows, rows are sorted by length and cut into blocks of `block`;
    the blocks are then shuffled globally, so batches are homogeneous in length while the epoch stays
    a random permutation at block granularity."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if lengths is None:
        return perm
    window = block * window_blocks
    blocks = []
    for s in range(0, n, window):
        w = perm[s:s + window]
        w = w[np.argsort(lengths[w], kind="stable")]
        blocks.extend(w[i:i + block] for i in range(0, len(w), block))
    order = rng.permutation(len(blocks))
    return np.concatenate([blocks[i] for i in order]) if blocks else perm


def step_start(epoch: int, position: int, n: int, global_batch: int) -> tuple[int, int]:
    """(epoch, position) where the step at `position` of `epoch` really starts: the next epoch's beginning
    when a whole global batch no longer fits in this one."""
    return (epoch + 1, 0) if position + global_batch > n else (epoch, position)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch; the < global_batch leftover rows of an epoch's order are skipped
    (a different random set each epoch)."""
    return n // global_batch


def micro_batch(order: np.ndarray, position: int, micro: int, rank: int, world: int, batch_size: int) -> np.ndarray:
    """Rank r's rows of micro-step `micro`: every world-th row of the micro-step's slice, so with
    length-grouped orders all ranks get rows of similar length (nobody waits for a longer shard)."""
    start = position + micro * batch_size * world
    return order[start + rank:start + batch_size * world:world]


def eval_shard(n: int, rank: int, world: int, lengths: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions this rank scores, mask of those that are its own rows rather than padding repeats)."""
    order = np.argsort(-lengths, kind="stable") if lengths is not None else np.arange(n)
    pad = (-n) % world
    # repeat cyclically: with fewer rows than ranks (1 row, 3 ranks) order[:pad] alone is too short, and a
    # rank with no position would run fewer batches than the others (FSDP/DDP collectives hang)
    order = np.resize(order, n + pad)
    real = np.arange(n + pad) < n
    return order[rank::world], real[rank::world]
