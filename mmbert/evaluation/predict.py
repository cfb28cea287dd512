"""Score a dataset on every rank (same number of batches everywhere) and gather each row once."""
from __future__ import annotations

import numpy as np
import torch

from ..data.dataset import TableDataset, collate, move_batch
from ..data.samplers import eval_shard
from ..distributed.gather import gather_rows


def run_model(model, batch: dict) -> torch.Tensor:
    """Positional call so DDP/FSDP wrappers see it as their forward."""
    return model(batch["input_ids"], batch["attention_mask"], batch["numeric"], batch["missing"],
                 batch["categorical"], batch.get("chunk_index"))


@torch.no_grad()
def predict(model, ds: TableDataset, rank: int, world: int, device: torch.device, batch_size: int, pad_id: int,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (positions of this rank's own rows, their probabilities, all-rank merged probabilities by
    position 0..n-1). The merged array has exactly len(ds) rows: the sampler's padding repeats are dropped."""
    was_training = model.training
    model.eval()
    shard, real = eval_shard(len(ds), rank, world, ds.lengths)
    probs_parts = []
    batches = range(0, len(shard), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for s in batches:
        batch = move_batch(collate(ds, shard[s:s + batch_size], pad_id), device)
        probs_parts.append(torch.softmax(run_model(model, batch).float(), dim=-1).cpu().numpy())
    k = probs_parts[0].shape[1] if probs_parts else 0
    local = np.concatenate(probs_parts) if probs_parts else np.zeros((0, k), np.float32)
    index, merged = gather_rows(shard, {"probs": local})
    assert len(index) == len(ds) and (index == np.arange(len(ds))).all(), "evaluation lost or duplicated rows"
    if was_training:
        model.train()
    return shard[real], local[real], merged["probs"]
