"""The rows an export is verified on, and the check itself: held-out rows of the run (or --data), collated
into batches of several shapes, or synthetic rows when the run's data cannot be found; `compare` measures
onnxruntime's scores against PyTorch's on each batch."""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from .. import serving
from ..errors import ArtifactError, MMBertError
from ..serving import first_line

log = logging.getLogger("mmbert.export")


def rows_from_run(model_dir: str, data: Optional[str], n: int):
    """(DataFrame, file, description) of held-out rows to verify on, or None when no data can be found:
    --data if given, else the run's val (or test) split, selected from its typed config.yaml by the same
    function training used."""
    from ..artifact import read_run_config  # lazy, as every model import here
    from ..data.io import load_table
    from ..data.pipeline import select_splits

    if data:
        return load_table(data).iloc[:n], data, f"first rows of {data}"
    if not os.path.isfile(os.path.join(model_dir, "config.yaml")):
        return None
    cfg_file = os.path.join(model_dir, "config.yaml")
    data_cfg = read_run_config(model_dir).data  # a tampered config.yaml is an error, not a reason to guess
    problems = []
    for name in ("val", "test"):
        try:
            sp = select_splits(data_cfg, (name,), source=cfg_file).get(name)
        except MMBertError as e:
            problems.append(str(e))
            continue
        if sp is not None and len(sp.df):
            return sp.df.iloc[:n], sp.file, sp.description
    if problems:
        log.warning("cannot read the run's held-out data for verification (%s): using synthetic rows", problems[0])
    return None


def synthetic_batches(spec, tokenizer, pad_id: int) -> list[dict]:
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

    from ..data import tokenize as tokenization
    from ..data.dataset import TableDataset, collate
    from ..data.pipeline import build_dataset
    from ..data.tokenize import chunk_tokenize

    pad_id = tokenization.pad_id(tokenizer)
    got = rows_from_run(model_dir, data, rows)
    if got is None:
        return synthetic_batches(spec, tokenizer, pad_id), "synthetic rows (the run's data was not found)"
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
    """Per batch: its shape and the max |s_onnx - s_torch| of the scores (inf when either side is not finite)."""
    from ..scoring import batch_scores

    out = []
    for b in batches:
        ref = batch_scores(model, b)
        shape = list(b["input_ids"].shape) if "input_ids" in b else [len(b["numeric"])]
        try:
            got = session.run(None, serving.feeds(session, b))[0]
        except Exception as e:  # e.g. a shape the trace baked in as a constant
            raise ArtifactError(f"onnxruntime fails on inputs of shape {shape}: {first_line(e)}") from None
        ok = np.isfinite(got).all() and np.isfinite(ref).all() and got.shape == ref.shape
        diff = float(np.abs(got - ref).max()) if ok else float("inf")
        out.append({"shape": shape, "max_abs_diff": diff})
    return out
