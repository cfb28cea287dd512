"""Score a dataset on every rank (same number of batches everywhere) and gather each row once.

Scoring is pluggable: a *scorer* is any callable `batch -> scores` (B x K, numpy or tensor: class
probabilities, or for a regression the B x 1 prediction in original units) that takes the host (CPU) batch of
`collate`. `torch_scorer` wraps a PyTorch model (plain, DDP or FSDP);
an ONNX Runtime session can be wrapped the same way and passed to `predict(..., scorer=...)`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import numpy as np
import torch

from .data.dataset import TableDataset, collate, move_batch
from .data.samplers import eval_shard
from .distributed.gather import gather_rows
from .distributed.parallel import unwrap
from .models.classifier import batch_inputs, scores

Scorer = Callable[[dict], "np.ndarray | torch.Tensor"]


def run_model(model, batch: dict) -> torch.Tensor:
    """Logits of a plain, DDP or FSDP model on a batch already on its device."""
    return model(*batch_inputs(batch))


def batch_scores(model, batch: dict, device: Optional[torch.device] = None,
                 precision: Callable = contextlib.nullcontext) -> np.ndarray:
    """The one "model on a batch -> scores" (models.classifier.scores: softmax probabilities, or a regression's
    prediction in original units) in float32, as numpy; the batch moved to `device` first when given, the model
    run in the `precision` context (the run's autocast)."""
    with torch.no_grad(), precision():
        outputs = run_model(model, move_batch(batch, device) if device is not None else batch)
    return scores(outputs.float(), unwrap(model).spec).cpu().numpy()


def torch_scorer(model, device: torch.device, precision: Callable = contextlib.nullcontext) -> Scorer:
    """batch (on the host) -> scores as float32 numpy, computed on `device` in the `precision` context."""
    return lambda batch: batch_scores(model, batch, device, precision)


def predict(model, ds: TableDataset, rank: int, world: int, device: torch.device, batch_size: int, pad_id: int,
            progress: bool = False, scorer: Optional[Scorer] = None,
            num_classes: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (positions of this rank's own rows, their scores, all-rank merged scores by position 0..n-1). The merged array has exactly len(ds) rows: the sampler's padding repeats are dropped.
    With `scorer` given, `model` may be None (e.g. ONNX Runtime scoring)."""
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    if scorer is None:
        scorer = torch_scorer(model, device)
    shard, real = eval_shard(len(ds), rank, world, ds.lengths)
    probs_parts = []
    batches = range(0, len(shard), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="predict", unit="batch", dynamic_ncols=True)
    for s in batches:
        out = scorer(collate(ds, shard[s:s + batch_size], pad_id))
        if isinstance(out, torch.Tensor):
            out = out.detach().float().cpu().numpy()
        probs_parts.append(np.asarray(out, dtype=np.float32))
    if probs_parts:
        local = np.concatenate(probs_parts)
    else:  # an empty shard: only an empty dataset (eval_shard gives every rank >= 1 position otherwise)
        k = num_classes if num_classes is not None else 0
        local = np.zeros((0, k), np.float32)
    index, merged = gather_rows(shard, {"probs": local})
    assert len(index) == len(ds) and (index == np.arange(len(ds))).all(), "evaluation lost or duplicated rows"
    if was_training:
        model.train()
    return shard[real], local[real], merged["probs"]
