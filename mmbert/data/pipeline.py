"""From a config to tokenized train/val/test datasets and a fitted Preprocessor."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError, missing_columns_error
from ..task import REGRESSION
from .dataset import TableDataset
from .io import dataset_dict_splits, dict_split_roles, load_table, read_indices
from .preprocess import Encoded, Preprocessor
from .tokenize import Chunks, Progress, ShardTokenizer, TextFailed, current_build_options, workers_for

log = logging.getLogger("mmbert.main")  # identical on every rank: reported once, by rank 0


SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = [0.8, 0.1, 0.1]


@dataclass
class Split:
    name: str
    df: pd.DataFrame  # index = 0-based row number in `file`; row order = the split's order
    file: str
    description: str = ""


def _required_columns(d) -> list[str]:
    cols = [*d.text_columns, *d.numeric_columns, *d.categorical_columns]
    if d.label_column:
        cols.append(d.label_column)
    if d.id_column:
        cols.append(d.id_column)
    return cols


def check_columns(df: pd.DataFrame, cols: list[str], file: str):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise missing_columns_error(file, missing, df.columns)


def fraction_split(n: int, fractions: Optional[list[float]], seed: int) -> dict[str, np.ndarray]:
    """Sorted row numbers of the non-empty train/val/test parts of a shuffled `n`-row file."""
    fr = fractions or DEFAULT_FRACTIONS
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fr) * n).astype(int)
    starts = [0, *bounds[:-1]]
    return {name: np.sort(perm[a:b]) for name, a, b in zip(SPLITS, starts, bounds) if b > a}


def recorded_path(path: str, key: str, source: Optional[str]) -> str:
    """A path the config records. Re-opened from a run's config.yaml (`source`), a missing one is named with
    the key and file it came from: relative paths resolve against the directory training ran in."""
    if source and not os.path.exists(path):
        raise DataError(f"{path} (from '{key}' in {source}) not found; relative paths are relative to the directory "
                        f"training ran in: run from there, or give the data explicitly")
    return path


def select_splits(d, names=SPLITS, source: Optional[str] = None) -> dict[str, Split]:
    """The rows of each split in `names` that the data config records: separate files, index files into
    data.path, or shuffled fractions (with a seed) of data.path. The one place a split is chosen: training,
    evaluate.py --split and export's verification rows (through the run's typed config.yaml) all call it,
    so they see the same rows. Splits the config does not record (or leaves empty) are absent."""
    s = d.split
    ids = [d.id_column] if d.id_column else []  # read as text: the same ids evaluation writes back
    dict_splits = None if s.train_file else dataset_dict_splits(d.path)
    if dict_splits is not None:
        return _dict_splits(d, dict_splits, names, ids)
    if s.train_file:
        files = {n: getattr(s, f"{n}_file") for n in names if getattr(s, f"{n}_file")}
        return {n: Split(n, load_table(recorded_path(f, f"data.split.{n}_file", source), ids), f, f"split {n} ({f})")
                for n, f in files.items()}
    if not d.path:
        raise ConfigError("config key 'data.path' is not set (or give data.split.train_file)")
    path = recorded_path(d.path, "data.path", source)
    table = load_table(path, ids)
    if s.train_indices:
        files = {n: getattr(s, f"{n}_indices") for n in names if getattr(s, f"{n}_indices")}
        return {n: Split(n, table.iloc[read_indices(recorded_path(f, f"data.split.{n}_indices", source), len(table),
                                                    path)], path, f"split {n} ({f})") for n, f in files.items()}
    fr = s.fractions or DEFAULT_FRACTIONS
    return {n: Split(n, table.iloc[rows], path, f"split {n} (fractions {fr}, seed {s.seed})")
            for n, rows in fraction_split(len(table), fr, s.seed).items() if n in names}


def _dict_splits(d, available: list[str], names, ids: list[str]) -> dict[str, Split]:
    """A DatasetDict as data.path (a save_to_disk folder or hub:NAME[:CONFIG]): its own splits are the run's."""
    s = d.split
    if s.train_indices or s.fractions:
        raise ConfigError(f"data.path {d.path} is a DatasetDict (splits {', '.join(available)}): its splits are used, "
                          f"so data.split.* must stay unset (or give one split's folder as data.path)")
    return {name: Split(name, load_table(d.path, ids, split=src), f"{d.path}[{src}]", f"split {name} ({src})")
            for name, src in dict_split_roles(d.path, available, names).items()}


def load_splits(d) -> dict[str, Split]:
    """Training's splits: every configured column present, a non-empty train split, and the
    data.max_train_rows / max_eval_rows limits applied."""
    splits = select_splits(d)
    need = _required_columns(d)
    for sp in splits.values():
        check_columns(sp.df, need, sp.file)
    if "train" not in splits or len(splits["train"].df) == 0:
        raise DataError("the train split is empty")
    for name, limit in (("train", d.max_train_rows), ("val", d.max_eval_rows), ("test", d.max_eval_rows)):
        if name in splits and limit is not None:
            splits[name].df = splits[name].df.iloc[:limit]
    return splits


BUILD_BLOCK = 1 << 16  # rows encoded and tokenized at a time: with keep_texts=False a split's texts never all exist


def build_dataset(pre: Preprocessor, tokenizer, df: pd.DataFrame, file: str, with_labels: Optional[bool] = None,
                  name: str = "data", keep_texts: bool = True) -> TableDataset:
    """Encoded and tokenized rows, block by block (row numbers, reports and errors as for the whole frame);
    keep_texts=False drops each block's texts once tokenized (what training and evaluation need). Inside
    tokenize.build_options (a token cache build): tokenized by its worker processes, with progress lines."""
    if with_labels is None:
        with_labels = bool(pre.label_column) and pre.label_column in df.columns
    opts = current_build_options()
    workers = workers_for(opts, len(df))
    encs, chunks, truncated = [], [], 0
    with Progress(name, len(df), opts.progress, opts.bar, workers) as progress, \
            ShardTokenizer(tokenizer, pre.max_tokens, pre.max_chunks, workers) as tokenize:
        for start in range(0, max(len(df), 1), BUILD_BLOCK):
            enc = pre.transform(df.iloc[start:start + BUILD_BLOCK], file, with_labels=with_labels)
            block, cut = _tokenize_block(tokenize, enc, file, progress)
            if not keep_texts:
                enc.texts = []
            encs.append(enc)
            chunks.append(block)
            truncated += cut
    enc = Encoded.concat(encs)
    if truncated:
        enc.report["texts_cut_at_max_chunks"] = truncated
    for key, value in enc.report.items():
        log.warning("%s (%s): %s = %s", name, file, key, value)
    return TableDataset(enc, Chunks.concat(chunks), truncated)


def _tokenize_block(tokenize: ShardTokenizer, enc: Encoded, file: str, progress: Progress):
    """(chunks, texts cut) of a block's texts; a text the tokenizer fails on is one DataError naming its row."""
    try:
        return tokenize(enc.texts, progress.update)
    except TextFailed as e:
        raise DataError(f"{file}, row {int(enc.rows[e.position])}: the tokenizer failed on its text "
                        f"({e.reason})") from None


def log_label_map(pre: Preprocessor, train_ds: TableDataset, file: str):
    """Training: the label map is every distinct label of the train split. Log it with its train counts, and
    warn about a class with a single train row, naming the row: a stray value (a `7` in 0/1 data) would
    otherwise silently become a class of its own. Regression: the target's train statistics instead."""
    if pre.task == REGRESSION:
        y = train_ds.enc.labels
        log.info("regression target '%s' (train rows): mean %.4g, std %.4g, min %.4g, max %.4g (standardised with "
                 "this mean and std for training)", pre.label_column, pre.target_mean, pre.target_std, y.min(), y.max())
        return
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
