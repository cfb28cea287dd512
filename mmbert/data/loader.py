"""The training batches: one item per optimizer step, this rank's micro-batches collated from the global,
world-size independent order (samplers.py), in torch DataLoader workers when train.num_workers > 0.

The keys are made in the training process, from the step the loader starts at, so what a worker collates
is exactly what the loop without workers would collate: resume at any step and world size works as before.
Each item carries its (epoch, position); the trainer checks it against its own state and restarts the
loader from its state when they differ (a resume, a test that moves the state)."""
from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .dataset import TableDataset, collate
from .samplers import micro_batch, step_start

StepKey = tuple  # (epoch, position, [this rank's row positions per micro-batch])


def step_keys(epoch: int, position: int, n: int, global_batch: int, order_of: Callable[[int], np.ndarray],
              rank: int, world: int, batch_size: int, grad_accum: int) -> Iterator[StepKey]:
    """The steps from (epoch, position) on, without end: an epoch ends when a global batch no longer fits."""
    while True:
        epoch, position = step_start(epoch, position, n, global_batch)
        order = order_of(epoch)
        yield epoch, position, [micro_batch(order, position, m, rank, world, batch_size) for m in range(grad_accum)]
        position += global_batch


class StepBatches(Dataset):
    """Item `key` = (epoch, position, [collated micro-batch, ...])."""

    def __init__(self, ds: TableDataset, pad_id: int, pad_to: Optional[tuple[int, int]]):
        self.ds, self.pad_id, self.pad_to = ds, pad_id, pad_to

    def __getitem__(self, key: StepKey):
        epoch, position, micro = key
        return epoch, position, [collate(self.ds, idx, self.pad_id, self.pad_to) for idx in micro]


def _as_is(item):
    return item


def _ignore_stop_signals(worker_id: int):
    """Preemption is the training process's: SIGUSR1 (our SLURM script's preemption signal, which srun or
    SLURM may deliver to every process of the step) and Ctrl-C must not kill a worker mid-step, which would
    fail the step ("DataLoader worker killed") before the trainer saves. SIGTERM keeps torch's handling (a
    worker exits when its parent sends it; shutdown and interpreter exit rely on that)."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def step_loader(ds: TableDataset, keys: Iterator[StepKey], pad_id: int, pad_to: Optional[tuple[int, int]],
                num_workers: int, pin_memory: bool) -> DataLoader:
    # fork: the workers share the (memory-mapped) dataset instead of unpickling a copy each
    context = mp.get_context("fork") if num_workers and "fork" in mp.get_all_start_methods() else None
    # its own generator: starting a loader draws a seed, which must not come from (and shift) the global
    # stream the dropout masks use, or a resume (a new loader) would train differently from the run it continues
    return DataLoader(StepBatches(ds, pad_id, pad_to), batch_size=None, sampler=keys, collate_fn=_as_is,
                      num_workers=num_workers, pin_memory=pin_memory, multiprocessing_context=context,
                      prefetch_factor=2 if num_workers else None, generator=torch.Generator(),
                      worker_init_fn=_ignore_stop_signals if num_workers else None)


def default_workers(device: torch.device) -> int:
    return 2 if device.type == "cuda" else 0
