"""Tokenized rows and the collate function that pads C and T dynamically per batch."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .preprocess import Encoded
from .tokenize import Chunks


class TableDataset:
    """An encoded split plus its chunked tokens. Item i is row i of the split (position, not file row)."""

    def __init__(self, enc: Encoded, chunks: Chunks, truncated: int = 0):
        assert len(chunks) == len(enc)
        self.enc = enc
        self.chunks = chunks
        self.truncated_texts = truncated
        # real tokens per row, used by the length-grouped sampler and throughput accounting
        self.lengths = chunks.row_lengths()

    def __len__(self):
        return len(self.enc)

    @property
    def has_labels(self) -> bool:
        return self.enc.labels is not None


def collate(ds: TableDataset, idx: np.ndarray | list[int], pad_id: int,
            pad_to: Optional[tuple[int, int]] = None) -> dict[str, torch.Tensor]:
    """B x C x T input_ids/attention_mask padded to this batch's longest chunk count and chunk length;
    `chunk_mask` (B x C) marks real chunks; `index` is each row's position in the split.
    `pad_to=(C, T)` pads to fixed sizes instead (benchmarks of fixed-length pipelines)."""
    idx = np.asarray(idx, dtype=np.int64)
    rows = [ds.chunks[i] for i in idx]
    B = len(rows)
    C = max(len(r) for r in rows)
    T = max(len(c) for r in rows for c in r)
    if pad_to is not None:
        C, T = max(C, pad_to[0]), max(T, pad_to[1])
    ids = np.full((B, C, T), pad_id, dtype=np.int64)
    att = np.zeros((B, C, T), dtype=np.int64)
    cmask = np.zeros((B, C), dtype=bool)
    for b, r in enumerate(rows):
        for c, tok in enumerate(r):
            ids[b, c, :len(tok)] = tok
            att[b, c, :len(tok)] = 1
            cmask[b, c] = True
    e = ds.enc
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(att),
        "chunk_mask": torch.from_numpy(cmask),
        "numeric": torch.from_numpy(np.ascontiguousarray(e.numeric[idx])),
        "missing": torch.from_numpy(np.ascontiguousarray(e.missing[idx])),
        "categorical": torch.from_numpy(np.ascontiguousarray(e.categorical[idx])),
        "index": torch.from_numpy(idx.copy()),
        # flat positions of the real chunks: the encoder skips the empty ones (no host sync on GPU)
        "chunk_index": torch.from_numpy(np.flatnonzero(cmask.reshape(-1))),
    }
    if e.labels is not None:
        batch["labels"] = torch.from_numpy(e.labels[idx])
    return batch


def batch_token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batch — computed on the host tensors before any device copy."""
    att = batch["attention_mask"]
    return int(att.sum()), att.numel()


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def subset_rows(n: int, limit: Optional[int]) -> int:
    return n if limit is None else min(n, limit)
