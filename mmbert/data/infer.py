"""Column roles guessed from the train split when the config names none: text, numeric, categorical, an id,
or left out, each with the reason, printed as a table so the guess is never silent. A config (or flags)
naming any role column is used exactly as given."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError, missing_columns_error

ROLES = ("text", "numeric", "categorical")
ROLE_KEYS = {role: f"data.{role}_columns" for role in ROLES}

# Strings are text when they are long and mostly distinct: titles and reviews (19 and 309 characters on average
# in the shipped reviews, 71% and 99.9% distinct) are, names of departments or codes (6-10 characters, or a few
# dozen values repeated over thousands of rows) are categories, whose embedding learns from the repeats.
TEXT_MIN_MEAN_CHARS = 15
TEXT_MIN_DISTINCT_RATIO = 0.3
# Numbers with this few distinct values, each seen at least twice on average, are levels (a 1-5 rating, a 0/1
# flag, a count of children): an embedding per level fits them without assuming they are evenly spaced.
NUMERIC_MAX_LEVELS = 10
# Rows read for the statistics: the first rows of the train split, enough for distinct counts and lengths to
# settle, so that a guess on a huge table costs seconds.
INFER_MAX_ROWS = 100_000
# Column names that say "row id" (with values unique per row, such a column is an id, not a feature).
ID_NAME = re.compile(r"^(id|idx|index|row|row_?id|unnamed: ?\d+)$|[ _-]id$|^id[ _-]", re.IGNORECASE)
NA_SPELLINGS = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})


@dataclass
class Column:
    name: str
    dtype: str
    distinct: int
    mean_length: Optional[float]  # strings only
    role: str  # text / numeric / categorical / id / label / left out
    why: str


@dataclass
class Roles:
    text_columns: list[str] = field(default_factory=list)
    numeric_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)
    id_column: Optional[str] = None  # the first id-like column: proposed as data.id_column
    columns: list[Column] = field(default_factory=list)

    def features(self) -> list[str]:
        return [*self.text_columns, *self.numeric_columns, *self.categorical_columns]

    def table(self) -> str:
        head = ("column", "dtype", "distinct", "mean length", "role", "why")
        rows = [head] + [(_cut(c.name), c.dtype, str(c.distinct), "-" if c.mean_length is None else f"{c.mean_length:.1f}",
                          c.role, c.why) for c in self.columns]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        right = (False, False, True, True, False)  # counts and lengths aligned on their last digit
        return "\n".join("  ".join(v.rjust(w) if r is not rows[0] and k else v.ljust(w)
                                   for v, w, k in zip(r, widths, right)) + "  " + r[-1] for r in rows)


def _cut(name: str, n: int = 32) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."


def _distinct(s: pd.Series) -> int:
    try:
        return int(s.nunique())
    except TypeError:  # lists, dicts: unhashable
        return 0


def _kind(s: pd.Series) -> tuple[str, pd.Series]:
    """(number / bool / string / date / other, the non-missing values; numbers for a column of numbers written
    as text, as a CSV with 'NA' cells is read)."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return "bool", s.dropna()
    if pd.api.types.is_numeric_dtype(s.dtype):
        return "number", s.dropna()
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return "date", s.dropna()
    values = s.dropna()
    if values.map(lambda v: isinstance(v, (bool, np.bool_))).all():  # True/False/None: object dtype
        return "bool", values
    if values.map(lambda v: isinstance(v, (int, float, np.number))).all():
        return "number", pd.to_numeric(values)
    if not values.map(lambda v: isinstance(v, str)).all():
        return "other", values
    values = values[~values.str.strip().str.lower().isin(NA_SPELLINGS)]
    numbers = pd.to_numeric(values, errors="coerce")
    if len(values) and numbers.notna().all():
        return "number", numbers
    return "string", values


def _is_id(name: str, kind: str, values: pd.Series, n: int) -> bool:
    """Unique per row and not a measurement: named like an id, a row counter (integers increasing in file
    order) or single-word strings (codes, keys, hashes; a phrase with spaces may be text)."""
    if n < 2 or len(values) != n or not values.is_unique or kind not in ("number", "string"):
        return False
    if ID_NAME.search(name.strip()):
        return True
    if kind == "number":
        return pd.api.types.is_integer_dtype(values.dtype) and values.is_monotonic_increasing
    return not values.str.contains(r"\s").any()


def _guess(name: str, s: pd.Series) -> tuple[str, str, int, Optional[float]]:
    """(role, why, distinct, mean length) of one feature candidate; role "left out", "id" or one of ROLES."""
    kind, values = _kind(s)
    distinct = _distinct(values)
    length = float(values.str.len().mean()) if kind == "string" and len(values) else None
    if len(values) == 0:
        return "left out", "every value is missing", 0, None
    if kind in ("date", "other"):
        return "left out", ("dates are not used: give them as numbers" if kind == "date"
                            else "values are not text, numbers or true/false"), distinct, None
    if distinct == 1:
        return "left out", f"one value in every row ({values.iloc[0]!r})"[:80], 1, length
    if _is_id(name, kind, values, len(s)):
        return "id", "unique per row (an id)", distinct, length
    if kind == "bool":
        return "categorical", "true/false", distinct, None
    if kind == "number":
        if ID_NAME.search(name.strip()):
            return "categorical", "numbers named like an id: codes, not quantities", distinct, None
        if distinct <= NUMERIC_MAX_LEVELS and 2 * distinct <= len(values):
            return "categorical", f"numbers with {distinct} distinct values (<= {NUMERIC_MAX_LEVELS})", distinct, None
        return "numeric", "numbers with many distinct values", distinct, None
    if length >= TEXT_MIN_MEAN_CHARS and distinct >= TEXT_MIN_DISTINCT_RATIO * len(values):
        return "text", f"long strings (mean >= {TEXT_MIN_MEAN_CHARS} characters), mostly distinct", distinct, length
    few = distinct < TEXT_MIN_DISTINCT_RATIO * len(values)
    why = f"few distinct strings (< {TEXT_MIN_DISTINCT_RATIO:.0%} of rows)" if few else f"short strings (mean < {TEXT_MIN_MEAN_CHARS})"
    return "categorical", why, distinct, length


def infer_roles(df: pd.DataFrame, label: str, id_column: Optional[str] = None, ignore: Iterable[str] = (),
                fixed: Optional[dict[str, list[str]]] = None) -> Roles:
    """The role of every column of `df` (the train split's rows), in column order. `fixed` ({role: columns})
    holds role lists given explicitly: their columns keep that role and no other column gets it."""
    fixed = {role: list(cols) for role, cols in (fixed or {}).items()}
    unknown = [r for r in fixed if r not in ROLES]
    if unknown:
        raise ValueError(f"infer_roles: unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    given = {c: role for role, cols in fixed.items() for c in cols}
    ignore, out = set(ignore), Roles()
    for c in df.columns:
        name, s = str(c), df[c].iloc[:INFER_MAX_ROWS]
        if name == label:
            role, why, distinct, length = "label", "data.label_column", _distinct(s), None
        elif name == id_column:
            role, why, distinct, length = "id", "data.id_column", _distinct(s), None
        elif name in given:
            role, why, distinct, length = given[name], f"{ROLE_KEYS[given[name]]} (given)", _distinct(s), None
        elif name in ignore:
            role, why, distinct, length = "left out", "data.ignore_columns", _distinct(s), None
        else:
            role, why, distinct, length = _guess(name, s)
            if role in fixed:
                role, why = "left out", f"{why}, but {ROLE_KEYS[role]} is given explicitly"
        if role == "id" and id_column is None and out.id_column is None:
            out.id_column, why = name, why + ": proposed as data.id_column"
        elif role == "id" and name != id_column:
            role = "left out"
        if role in ROLES:
            getattr(out, f"{role}_columns").append(name)
        out.columns.append(Column(name, str(s.dtype), distinct, length, role, why))
    for role, cols in fixed.items():  # as given, in the given order
        setattr(out, f"{role}_columns", cols)
    return out


# ----------------------------------------------------------------------------- the config hook

def _train_rows(d) -> tuple[pd.DataFrame, str]:
    """The train split's rows as training selects them (select_splits: files, index files, fractions or a
    DatasetDict's own split)."""
    from .pipeline import select_splits

    split = select_splits(d, names=("train",)).get("train")
    if split is None or len(split.df) == 0:
        raise DataError(f"{d.path}: the train split is empty: no rows to guess the column roles from")
    return split.df, split.file


def _on_rank0() -> bool:
    """Before the process group exists: the launcher's rank (torchrun's RANK, else srun's SLURM_PROCID)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("", "0")


def complete_config(cfg, explicit: set[str], command_line: frozenset = frozenset()):
    """`cfg` with its column roles inferred from the train split, unless its config file (or dict) names a role
    column: then the file is the whole truth and `cfg` comes back as it is. Role lists given explicitly (flags
    and keywords, listed in `command_line`, or empty lists) stay as given and the other columns are inferred.
    Prints the guess on rank 0. With no text column found, model.fusion becomes tab_only unless it was given."""
    d = cfg.data
    if any(getattr(d, f"{role}_columns") and key not in command_line for role, key in ROLE_KEYS.items()):
        return cfg
    if not d.path and not d.split.train_file:
        raise ConfigError("no data to train on: give the table with --data FILE (data= in Python: a path or a "
                          "DataFrame) and the column to predict with --label COLUMN")
    df, file = _train_rows(d)
    if not d.label_column:
        raise ConfigError(f"config key 'data.label_column' is not set: name the column to predict (--label COLUMN, "
                          f"or label= in Python); {file} has columns {', '.join(map(str, df.columns[:20]))}")
    if d.label_column not in df.columns:
        raise missing_columns_error(file, [d.label_column], df.columns, what="label column")
    fixed = {role: list(getattr(d, f"{role}_columns")) for role, key in ROLE_KEYS.items() if key in explicit}
    roles = infer_roles(df, d.label_column, d.id_column, getattr(d, "ignore_columns", ()), fixed)
    if _on_rank0():
        print(f"column roles inferred from {file} (train split, {min(len(df), INFER_MAX_ROWS)} rows); name them "
              f"with --text-columns / --numeric-columns / --categorical-columns to choose:\n{roles.table()}", flush=True)
    if not roles.features():
        raise DataError(f"{file}: no column can be a feature (text, numeric or categorical): "
                        + "; ".join(f"'{_cut(c.name)}': {c.why}" for c in roles.columns if c.role != "label"))
    keep_id = d.id_column is not None or "data.id_column" in explicit
    data = dataclasses.replace(d, text_columns=roles.text_columns, numeric_columns=roles.numeric_columns,
                               categorical_columns=roles.categorical_columns,
                               id_column=d.id_column if keep_id else roles.id_column)
    model = cfg.model
    if not roles.text_columns and "model.fusion" not in explicit:
        model = dataclasses.replace(model, fusion="tab_only")
    return dataclasses.replace(cfg, data=data, model=model)
