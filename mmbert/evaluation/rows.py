"""Which rows evaluate.py scores, and their tokens: read and tokenized on each node's local rank 0 into the
token cache (mmbert/data/cache.py) and memory-mapped by every rank, or (--no-cache) read and tokenized on
every rank. The cache key is the selection (--data/--split/--indices/--max-eval-rows/--id-column), the bytes of
every file it reads, the run's data config, the model's fitted preprocessing and its tokenizer."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import pandas as pd

from ..artifact import read_run_config
from ..data.dataset import TableDataset
from ..data.io import HUB_PREFIX, load_table, read_indices
from ..data.pipeline import build_dataset, recorded_path, select_splits
from ..errors import ConfigError, DataError, missing_columns_error
from .options import EvalOptions

main_log = logging.getLogger("mmbert.main")  # messages every rank would repeat: rank 0 only


@dataclass
class Selection:
    df: Optional[pd.DataFrame]  # index: 0-based row number in `file`; row order = input order (None once tokenized)
    file: str
    description: str


def id_column_hint(opts: EvalOptions) -> list[str]:
    """The id column to read as text (`00123` must not come back as `123.0`): --id-column, else the one in
    the model's preprocessing.json. Peeked at before the model is loaded; the scorer loader reads and
    checks the file fully, so a broken one is reported there."""
    if opts.id_column:
        return [opts.id_column]
    try:
        with open(os.path.join(opts.main_model_dir, "preprocessing.json"), encoding="utf-8") as f:
            name = json.load(f).get("id_column")
    except (OSError, ValueError, AttributeError):
        return []
    return [name] if isinstance(name, str) else []


def split_data_config(opts: EvalOptions):
    """The run's typed data config, with --data in place of data.path (when the run had no split files)."""
    d = read_run_config(opts.main_model_dir).data
    if opts.data and not d.split.train_file:
        d.path = opts.data
    return d


def split_rows(opts: EvalOptions) -> Selection:
    """--split NAME: the rows training put in that split, chosen by the function training used
    (select_splits) from the run's typed config.yaml; --data replaces data.path (not a separate split file)."""
    name, cfg_file = opts.split, os.path.join(opts.main_model_dir, "config.yaml")
    d = split_data_config(opts)
    d.id_column = (id_column_hint(opts) or [None])[0]
    recorded = getattr(d.split, f"{name}_file")
    if opts.data and recorded and os.path.abspath(opts.data) != os.path.abspath(recorded):
        raise ConfigError(f"--split {name}: the model was trained with a separate {name} file ({recorded}); "
                          f"drop --data, or give --data without --split")
    sp = select_splits(d, [name], source=cfg_file).get(name)
    if sp is None:
        raise ConfigError(f"--split {name}: {cfg_file} records no {name} split (or its fractions leave it empty)")
    return Selection(sp.df, sp.file, sp.description)


def select_rows(opts: EvalOptions) -> Selection:
    if opts.split:
        sel = split_rows(opts)
    else:
        data = opts.data
        if not data:
            cfg_file = os.path.join(opts.main_model_dir, "config.yaml")
            data = read_run_config(opts.main_model_dir).data.path
            if not data:
                raise ConfigError(f"{cfg_file} records no data.path (the run used split files): give --data or --split")
            recorded_path(data, "data.path", cfg_file)
        table = load_table(data, id_column_hint(opts))
        if opts.indices:
            sel = Selection(table.iloc[read_indices(opts.indices, len(table), data)], data, f"rows of {opts.indices}")
        else:
            sel = Selection(table, data, "all rows")
    if opts.max_eval_rows is not None and len(sel.df) > opts.max_eval_rows:
        sel = Selection(sel.df.iloc[:opts.max_eval_rows], sel.file, f"{sel.description}, first {opts.max_eval_rows}")
    if len(sel.df) == 0:
        raise DataError(f"{sel.file}: no rows selected ({sel.description})")
    return sel


def resolve_id_column(opts: EvalOptions, sel: Selection, pre) -> list[str]:
    """--id-column must exist; the training config's one is used when the file has it (else the warning,
    returned too, so that a cache hit repeats it)."""
    if opts.id_column:
        if opts.id_column not in sel.df.columns:
            raise missing_columns_error(sel.file, [opts.id_column], sel.df.columns, what="--id-column")
        pre.id_column = opts.id_column
    elif pre.id_column and pre.id_column not in sel.df.columns:
        warning = (f"id column '{pre.id_column}' of the training config is not in {sel.file}: prediction files "
                   f"carry row numbers only")
        main_log.warning("%s", warning)
        pre.id_column = None
        return [warning]
    return []


def check_data_exists(data: Optional[str]):
    """A missing --data is named before any second goes into loading the model."""
    if data and not data.startswith(HUB_PREFIX) and not os.path.exists(data):
        raise DataError(f"data file not found: {data}")


def read_rows(opts: EvalOptions, pre, tokenizer) -> tuple[TableDataset, Selection, bool, list[str]]:
    """(dataset, selection without its frame, whether it is labelled, warnings) of the selected rows; sets
    pre.id_column to the id column the prediction files carry."""
    sel = select_rows(opts)
    warnings = resolve_id_column(opts, sel, pre)
    labelled = bool(pre.label_column) and pre.label_column in sel.df.columns
    ds = build_dataset(pre, tokenizer, sel.df, sel.file, with_labels=labelled, name="data", keep_texts=False)
    return ds, Selection(None, sel.file, sel.description), labelled, warnings


def _rows_source(opts: EvalOptions) -> tuple[dict, list]:
    """(the data config the selection depends on, the paths it reads): with --split, the run's data config
    (--data in place of data.path) and its files; without, the file scored (--data, else data.path)."""
    from ..data.cache import data_config_source

    if opts.split:
        return data_config_source(split_data_config(opts))
    data = opts.data or read_run_config(opts.main_model_dir).data.path
    return {}, [data, opts.indices]


def eval_data_key(opts: EvalOptions, pre, tokenizer) -> str:
    """The digest of everything the scored rows' tokens are made of (see the module docstring)."""
    from ..data.cache import finish_key, new_key, tokenizer_digest

    run_data, paths = _rows_source(opts)
    selection = {"data": opts.data, "split": opts.split, "indices": opts.indices, "max_rows": opts.max_eval_rows,
                 "id_column": opts.id_column}
    return finish_key(new_key({"kind": "evaluate", "selection": selection, "run_data": run_data,
                               "preprocessing": pre.to_dict(), "tokenizer": tokenizer_digest(tokenizer)}), paths)


def scored_rows(opts: EvalOptions, env, pre, tokenizer) -> tuple[TableDataset, Selection, bool]:
    """The selected rows' dataset (from the token cache unless --no-cache), the selection, labelled or not."""
    if not opts.cache:
        ds, sel, labelled, _ = read_rows(opts, pre, tokenizer)
        return ds, sel, labelled
    from ..data.cache import default_cache_dir, node_cache

    def build():
        ds, sel, labelled, warnings = read_rows(opts, pre, tokenizer)
        return pre, {"data": (ds, {"file": sel.file, "description": sel.description})}, {
            "labelled": labelled, "id_column": pre.id_column, "warnings": warnings}

    _, parts, meta = node_cache(env, opts.cache_dir or default_cache_dir(), lambda: eval_data_key(opts, pre, tokenizer),
                                build, hint="use --cache-dir, or --no-cache", bar=opts.progress)
    pre.id_column = meta["id_column"]
    info = meta["splits"]["data"]
    return parts["data"], Selection(None, info["file"], info["description"]), meta["labelled"]
