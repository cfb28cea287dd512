"""From a config to tokenized train/val/test datasets and a fitted Preprocessor."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from .dataset import TableDataset
from .io import load_table, read_indices
from .preprocess import Preprocessor
from .tokenize import chunk_tokenize

log = logging.getLogger("mmbert.main")  # identical on every rank: reported once, by rank 0


@dataclass
class Split:
    name: str
    df: pd.DataFrame  # index = 0-based row number in `file`
    file: str


def _required_columns(d) -> list[str]:
    cols = [*d.text_columns, *d.numeric_columns, *d.categorical_columns]
    if d.label_column:
        cols.append(d.label_column)
    if d.id_column:
        cols.append(d.id_column)
    return cols


def check_columns(df: pd.DataFrame, cols: list[str], file: str):
    for c in cols:
        if c not in df.columns:
            raise DataError(f"{file}: configured column '{c}' is missing (columns: {', '.join(map(str, df.columns))})")


def fraction_split(n: int, fractions: Optional[list[float]], seed: int) -> dict[str, np.ndarray]:
    """Sorted row numbers of the non-empty train/val/test parts of a shuffled `n`-row file (also used by
    evaluate.py --split to recover a split from a model's config.yaml)."""
    fr = fractions or [0.8, 0.1, 0.1]
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fr) * n).astype(int)
    starts = [0, *bounds[:-1]]
    return {name: np.sort(perm[a:b]) for name, a, b in zip(("train", "val", "test"), starts, bounds) if b > a}


def load_splits(d) -> dict[str, Split]:
    s = d.split
    need = _required_columns(d)
    ids = [d.id_column] if d.id_column else []  # read as text: the same ids evaluation writes back
    splits: dict[str, Split] = {}
    if s.train_file:
        for name in ("train", "val", "test"):
            f = getattr(s, f"{name}_file")
            if f:
                df = load_table(f, ids)
                check_columns(df, need, f)
                splits[name] = Split(name, df, f)
    else:
        if not d.path:
            raise ConfigError("config key 'data.path' is not set (or give data.split.train_file)")
        df = load_table(d.path, ids)
        check_columns(df, need, d.path)
        n = len(df)
        if s.train_indices:
            for name in ("train", "val", "test"):
                f = getattr(s, f"{name}_indices")
                if f:
                    splits[name] = Split(name, df.iloc[read_indices(f, n, d.path)], d.path)
        else:
            for name, rows in fraction_split(n, s.fractions, s.seed).items():
                splits[name] = Split(name, df.iloc[rows], d.path)
    if "train" not in splits or len(splits["train"].df) == 0:
        raise DataError("the train split is empty")
    for name, limit in (("train", d.max_train_rows), ("val", d.max_eval_rows), ("test", d.max_eval_rows)):
        if name in splits and limit is not None:
            splits[name].df = splits[name].df.iloc[:limit]
    return splits


def build_dataset(pre: Preprocessor, tokenizer, df: pd.DataFrame, file: str, with_labels: Optional[bool] = None,
                  name: str = "data") -> TableDataset:
    enc = pre.transform(df, file, with_labels=with_labels)
    chunks, truncated = chunk_tokenize(tokenizer, enc.texts, pre.max_tokens, pre.max_chunks)
    if truncated:
        enc.report["texts_cut_at_max_chunks"] = truncated
    for key, value in enc.report.items():
        log.warning("%s (%s): %s = %s", name, file, key, value)
    return TableDataset(enc, chunks, truncated)


def log_label_map(pre: Preprocessor, train_ds: TableDataset, file: str):
    """Training: the label map is every distinct label of the train split. Log it with its train counts, and
    warn about a class with a single train row, naming the row: a stray value (a `7` in 0/1 data) would
    otherwise silently become a class of its own."""
    counts = np.bincount(train_ds.enc.labels, minlength=pre.num_classes)
    shown = [f"{c}={n}" for c, n in zip(pre.class_names[:20], counts[:20])]
    more = f", ... ({pre.num_classes} classes)" if pre.num_classes > 20 else ""
    log.info("label map of '%s'%s (train rows): %s%s", pre.label_column,
             " (pinned by data.labels)" if pre.labels_pinned else "", ", ".join(shown), more)
    if pre.labels_pinned:  # every train label is in the map already (encode_labels checked each row)
        for k in np.flatnonzero(counts == 0):
            log.warning("%s: column '%s': class %r of data.labels has no train rows", file, pre.label_column,
                        pre.classes[k])
        return
    for k in np.flatnonzero(counts == 1):
        row = int(train_ds.enc.rows[train_ds.enc.labels == k][0])
        log.warning("%s: column '%s', row %d: label %r is the only train row of its class (every distinct train "
                    "label is a class): check for a stray value", file, pre.label_column, row, pre.classes[k])
