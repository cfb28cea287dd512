"""Preprocessing fitted on the train split only and saved as JSON (no pickle): numeric statistics,
categorical vocabularies, the label map (classification) or the target's mean and std (regression) and the
text recipe."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from ..errors import ArtifactError, ConfigError, DataError, missing_columns_error, read_json_object
from ..task import CLASSIFICATION, REGRESSION, task_of

FORMAT_VERSION = 1
# Numeric values beyond float32's range are infinite for the model: they count as infinite (-> missing).
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Standardised values are clipped to +-Z_MAX (and counted), so the model's inputs stay finite in fp32/bf16/fp16.
Z_MAX = 1e4
# Text that means "missing" in a numeric column (CSV is read with keep_default_na=False, so text stays text).
NA_SPELLINGS = frozenset({"nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})


def _is_missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return v is pd.NA or v is pd.NaT


def _as_list(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v if isinstance(v, (list, tuple)) else None


@dataclass
class Encoded:
    """One split, encoded: arrays aligned by position; `rows` are 0-based row numbers in the source file."""
    rows: np.ndarray
    texts: list[str]
    numeric: np.ndarray  # n x N standardised (missing -> 0 after imputation)
    missing: np.ndarray  # n x N 1.0 where the value was missing
    categorical: np.ndarray  # n x K int64, 0 = unknown/missing
    labels: Optional[np.ndarray]  # n int64 class index, float64 target in original units, or None (prediction run)
    ids: Optional[list]
    report: dict = field(default_factory=dict)  # counted, documented data fixes (unseen categories ...)

    def __len__(self):
        return len(self.rows)

    @classmethod
    def concat(cls, parts: list["Encoded"]) -> "Encoded":
        """One split from its blocks, in order: the data-fix counts summed, duplicate ids counted across blocks."""
        if len(parts) == 1:
            return parts[0]
        report: dict[str, Any] = {}
        for p in parts:
            for k, v in p.report.items():
                if isinstance(v, dict):
                    into = report.setdefault(k, {})
                    for c, n in v.items():
                        into[c] = into.get(c, 0) + n
                else:
                    report[k] = report.get(k, 0) + v
        ids = None if parts[0].ids is None else [v for p in parts for v in p.ids]
        report.pop("duplicate_ids", None)
        if ids is not None and duplicate_count(ids):
            report["duplicate_ids"] = duplicate_count(ids)
        labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
        return cls(rows=np.concatenate([p.rows for p in parts]), texts=[t for p in parts for t in p.texts],
                   numeric=np.concatenate([p.numeric for p in parts]), missing=np.concatenate([p.missing for p in parts]),
                   categorical=np.concatenate([p.categorical for p in parts]), labels=labels, ids=ids, report=report)


def duplicate_count(ids: list) -> int:
    """Ids seen before in the list (a value that appears k times counts k - 1)."""
    seen: set = set()
    return sum(1 for v in ids if v in seen or seen.add(v))  # type: ignore[func-returns-value]


@dataclass
class Preprocessor:
    tokenizer: str
    text_columns: list[str]
    text_separator: str
    numeric_columns: list[str]
    categorical_columns: list[str]
    label_column: Optional[str]
    id_column: Optional[str]
    serialize_columns: list[str]
    max_tokens: int
    max_chunks: int
    numeric_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    label_type: str = "int"
    classes: list[Any] = field(default_factory=list)
    labels_pinned: bool = False  # classes came from data.labels, not from the train split
    format_version: int = FORMAT_VERSION
    # a file without these fields (written before regression existed) is a classification
    task: str = CLASSIFICATION
    target_mean: Optional[float] = None  # regression: the train target's mean and std (the model predicts
    target_std: Optional[float] = None  # (y - mean) / std; scores are in the target's original units)

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, df: pd.DataFrame, data_cfg, tokenizer: str, file: str) -> "Preprocessor":
        p = cls(tokenizer=tokenizer, text_columns=list(data_cfg.text_columns), text_separator=data_cfg.text_separator,
                numeric_columns=list(data_cfg.numeric_columns), categorical_columns=list(data_cfg.categorical_columns),
                label_column=data_cfg.label_column, id_column=data_cfg.id_column,
                serialize_columns=list(data_cfg.serialize_columns), max_tokens=data_cfg.max_tokens,
                max_chunks=data_cfg.max_chunks)
        p.check_columns(df, file, require_label=True)
        for c in p.numeric_columns:
            vals, _ = p._numeric_values(df, c, file)
            finite = vals[np.isfinite(vals)]
            if len(finite) == 0:
                raise DataError(f"{file}: numeric column '{c}' has no values in the train split")
            median = float(np.median(finite))
            filled = np.where(np.isfinite(vals), vals, median)
            std = float(filled.std())  # a tiny spread is standardised like any other (float64); only none is not
            p.numeric_stats[c] = {"median": median, "mean": float(filled.mean()),
                                  "std": std if np.ptp(filled) > 0 and std > 0 else 1.0}
        for c in p.categorical_columns:
            values = {_fmt(v) for v in df[c].tolist() if not _is_missing(v)}  # 3.0 -> "3": int columns read as float
            p.vocabularies[c] = sorted(values)
        p.task = task_of(data_cfg)
        if p.task == REGRESSION:
            p._fit_target(df, file)
        else:
            p._fit_labels(df, data_cfg.label_type, file, data_cfg.labels)
        return p

    def _fit_target(self, df: pd.DataFrame, file: str):
        y = self.target_values(df, file)
        mean, std = float(y.mean()), float(y.std())
        if np.ptp(y) == 0:  # only truly equal values: a tiny spread is standardised in float64 like any other
            raise DataError(f"{file}: regression target '{self.label_column}' is constant ({float(y[0])!r}) in the "
                            f"train split: its std is 0, there is nothing to learn")
        # scores are float32 (z * std + mean): a spread below float32's resolution at the mean cannot be predicted
        resolution = max(float(np.finfo(np.float32).eps) * abs(mean), float(np.finfo(np.float32).tiny))
        if not std > resolution:
            raise DataError(f"{file}: regression target '{self.label_column}' varies too little to be predicted: std "
                            f"{std:.3g} around mean {mean!r} is below float32's resolution there ({resolution:.3g}); "
                            f"subtract a constant from the target (or rescale it) in the data")
        self.label_type, self.classes, self.target_mean, self.target_std = "float", [], mean, std

    def target_values(self, df: pd.DataFrame, file: str) -> np.ndarray:
        """The regression target as float64 in its own units; a missing, non-numeric or infinite value (or one
        beyond float32's range) stops with its file, column and row."""
        s = df[self.label_column]
        try:
            vals = pd.to_numeric(s.astype(float) if s.dtype == bool else s, errors="coerce")
            vals = vals.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            vals = np.full(len(s), np.nan)  # e.g. lists in the column: every row is named as not a number
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(vals) | (np.abs(vals) > FLOAT32_MAX)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            v = s.iloc[r]
            blank = isinstance(v, str) and v.strip().lower() in NA_SPELLINGS | {""}
            why = ("the label is missing" if _is_missing(v) or blank
                   else f"regression target {str(v)[:60]!r} is not a finite number")
            raise DataError(f"{file}: column '{self.label_column}', row {df.index[r]}: {why}")
        return vals

    def _fit_labels(self, df: pd.DataFrame, label_type: str, file: str, pinned: Optional[list] = None):
        col = df[self.label_column].tolist()
        for i, v in zip(df.index, col):
            if _is_missing(v):
                raise DataError(f"{file}: column '{self.label_column}', row {i}: the label is missing")
        first = _as_list(col[0])
        if pinned:
            if first is not None:
                raise ConfigError(f"config key 'data.labels': {file}: column '{self.label_column}' holds one-hot "
                                  f"vectors, which carry no class names to pin")
            ints = all(isinstance(v, int) for v in pinned)
            if label_type == "int" and not ints:
                raise ConfigError(f"config key 'data.labels': {pinned} are not all integers (data.label_type: int)")
            # train labels are checked against this map by encode_labels, which names any stray row
            self.label_type = "int" if ints and label_type != "string" else "string"
            self.classes = list(pinned) if self.label_type == "int" else [str(v) for v in pinned]
            self.labels_pinned = True
            return
        if label_type == "onehot" or (label_type == "auto" and first is not None):
            self.label_type = "onehot"
            self.classes = list(range(len(first or [])))
            if len(self.classes) < 2:
                raise DataError(f"{file}: one-hot column '{self.label_column}' needs at least 2 classes")
            return
        ints = all(isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
                   for v in col if not isinstance(v, (bool, np.bool_)))
        if label_type == "int" or (label_type == "auto" and ints and not isinstance(col[0], str)):
            if not ints:
                bad = next(i for i, v in zip(df.index, col) if not isinstance(v, (int, float, np.integer, np.floating)))
                raise DataError(f"{file}: column '{self.label_column}', row {bad}: label is not an integer")
            self.label_type = "int"
            self.classes = sorted({int(v) for v in col})
        else:
            if label_type == "auto":
                self._refuse_fractional_labels(col, file)
            self.label_type = "string"
            self.classes = sorted({str(v) for v in col})
        if len(self.classes) < 2:
            raise DataError(f"{file}: label column '{self.label_column}' has a single class {self.classes} in the train split")

    def _refuse_fractional_labels(self, col, file: str):
        """Numbers like 3.5 as a label with label_type auto: one class per value is rarely what was meant (and a
        regression trained as a classifier exits 0 with a useless model): the user says which."""
        example = next((v for v in col if isinstance(v, (float, np.floating)) and np.isfinite(v)
                        and not float(v).is_integer()), None)
        if example is not None:
            raise DataError(f"{file}: label column '{self.label_column}' holds non-integer numbers (e.g. {float(example):g}): "
                            f"to predict the number, give --task regression (data.task); to make each value a class, "
                            f"give --label-type string (data.label_type)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        """Scores per row: one probability per class, or the one regression prediction."""
        return 1 if self.task == REGRESSION else len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.classes]

    # ------------------------------------------------------------------ transform
    def check_columns(self, df: pd.DataFrame, file: str, require_label: bool):
        needed = [*self.text_columns, *self.numeric_columns, *self.categorical_columns]
        if self.id_column:
            needed.append(self.id_column)
        if require_label and self.label_column:
            needed.append(self.label_column)
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise missing_columns_error(file, missing, df.columns)

    def _numeric_values(self, df: pd.DataFrame, c: str, file: str) -> tuple[np.ndarray, int]:
        """float64 values with NaN where missing; +-inf (and values beyond float32's range) counted and treated
        as missing."""
        s = df[c]
        if s.dtype == bool:
            s = s.astype(float)
        conv = pd.to_numeric(s, errors="coerce")
        bad = conv.isna() & ~s.isna()
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            text = s.astype(str).str.strip().str.lower()
            bad &= ~((text == "") | text.isin(NA_SPELLINGS))  # blank cells and NA spellings are missing
        if bad.any():
            i = bad.idxmax()
            raise DataError(f"{file}: numeric column '{c}', row {i}: {str(s[i])[:60]!r} is not a number")
        vals = conv.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # a view is read-only under CoW
        with np.errstate(invalid="ignore"):
            infinite = np.abs(vals) > FLOAT32_MAX
        vals[infinite] = np.nan
        return vals, int(infinite.sum())

    def texts(self, df: pd.DataFrame) -> tuple[list[str], int]:
        parts_by_col = [[("" if _is_missing(v) else str(v)) for v in df[c].tolist()] for c in self.text_columns]
        prefix_cols = [(c, df[c].tolist()) for c in self.serialize_columns]
        out = []
        empty = 0
        for r in range(len(df)):
            parts = [p[r].strip() for p in parts_by_col]
            text = self.text_separator.join(p for p in parts if p)
            if prefix_cols:
                serial = " ".join(f"{c}: {'unknown' if _is_missing(v[r]) else _fmt(v[r])}." for c, v in prefix_cols)
                text = f"{serial} {text}".strip()
            if not text:
                empty += 1
            out.append(text)
        return out, empty

    def transform(self, df: pd.DataFrame, file: str, with_labels: Optional[bool] = None) -> Encoded:
        """Encode rows; `with_labels=None` uses labels when the label column is present."""
        if with_labels is None:
            with_labels = bool(self.label_column) and self.label_column in df.columns
        self.check_columns(df, file, require_label=with_labels)
        report: dict[str, Any] = {}
        n = len(df)
        numeric = np.zeros((n, len(self.numeric_columns)), dtype=np.float32)
        missing = np.zeros_like(numeric)
        for j, c in enumerate(self.numeric_columns):
            vals, n_inf = self._numeric_values(df, c, file)
            st = self.numeric_stats[c]
            miss = ~np.isfinite(vals)
            missing[:, j] = miss
            z = (np.where(miss, st["median"], vals) - st["mean"]) / st["std"]
            clipped = int((np.abs(z) > Z_MAX).sum())
            numeric[:, j] = np.clip(z, -Z_MAX, Z_MAX)
            if n_inf:
                report.setdefault("infinite_numeric_as_missing", {})[c] = n_inf
            if clipped:
                report.setdefault("numeric_clipped", {})[c] = clipped
        categorical = np.zeros((n, len(self.categorical_columns)), dtype=np.int64)
        for j, c in enumerate(self.categorical_columns):
            index = {v: i + 1 for i, v in enumerate(self.vocabularies[c])}
            unseen = 0
            for r, v in enumerate(df[c].tolist()):
                if _is_missing(v):
                    continue
                k = index.get(_fmt(v), 0)
                unseen += k == 0
                categorical[r, j] = k
            if unseen:
                report.setdefault("unseen_categories", {})[c] = unseen
        texts, empty = self.texts(df) if self.text_columns else ([""] * n, 0)
        if empty and self.text_columns:
            report["empty_texts"] = empty
        labels = self.encode_labels(df, file) if with_labels else None
        ids = None
        if self.id_column:
            ids = [None if _is_missing(v) else (v.item() if isinstance(v, np.generic) else v)
                   for v in df[self.id_column].tolist()]
            if duplicate_count(ids):
                report["duplicate_ids"] = duplicate_count(ids)
        return Encoded(rows=np.asarray(df.index, dtype=np.int64), texts=texts, numeric=numeric, missing=missing,
                       categorical=categorical, labels=labels, ids=ids, report=report)

    def encode_labels(self, df: pd.DataFrame, file: str) -> np.ndarray:
        if self.task == REGRESSION:
            return self.target_values(df, file)
        col = df[self.label_column].tolist()
        out = np.empty(len(col), dtype=np.int64)
        if self.label_type == "onehot":
            k = len(self.classes)
            for r, (i, v) in enumerate(zip(df.index, col)):
                vec = _as_list(v)
                if vec is None or len(vec) != k or sorted(vec) != [0] * (k - 1) + [1]:
                    raise DataError(f"{file}: column '{self.label_column}', row {i}: {v!r} is not a one-hot vector of length {k}")
                out[r] = list(vec).index(1)
            return out
        index = {c: j for j, c in enumerate(self.classes)}
        for r, (i, v) in enumerate(zip(df.index, col)):
            if _is_missing(v):
                raise DataError(f"{file}: column '{self.label_column}', row {i}: the label is missing")
            key: Any
            if self.label_type == "int":
                try:
                    f = float(v)
                    key = int(f) if f.is_integer() else None
                except (TypeError, ValueError):
                    key = None
            else:
                key = str(v)
            if key not in index:
                source = "pinned by data.labels" if self.labels_pinned else "fitted on the train split"
                raise DataError(f"{file}: column '{self.label_column}', row {i}: label {v!r} is not in the label map "
                                f"{self.classes} {source}")
            out[r] = index[key]
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Preprocessor":
        return cls.from_dict(read_json_object(path, f"preprocessing file not found: {path}"), path)

    @classmethod
    def from_dict(cls, raw: dict, path: str) -> "Preprocessor":
        """A saved fit (a file's, or the one a checkpoint records), checked field by field; `path` names it."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{path}: the preprocessing is not a JSON object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArtifactError(f"{path}: unknown preprocessing keys {sorted(unknown)}")
        try:
            pre = cls(**raw)
        except TypeError as e:
            raise ArtifactError(f"{path}: incomplete preprocessing file: {e}") from None
        pre.validate(path)
        return pre

    def validate(self, path: str):
        """Every field of a loaded file (a model directory may come from anyone): a wrong type or range is
        one error naming the file and field, instead of a traceback or silently different probabilities."""
        for name, (ok, want) in _FIELDS.items():
            if not ok(getattr(self, name)):
                raise ArtifactError(f"{path}: field '{name}' must be {want}, got {getattr(self, name)!r:.80}")
        for name, columns, ok, want in (
                ("numeric_stats", self.numeric_columns, _is_stats, "{median, mean, std} of finite numbers, std > 0"),
                ("vocabularies", self.categorical_columns, _is_str_list, "a list of category names")):
            table = getattr(self, name)
            if sorted(table) != sorted(columns):
                raise ArtifactError(f"{path}: field '{name}' must have one entry per column of {columns}, "
                                    f"got {sorted(table)!r:.80}")
            bad = next((c for c in columns if not ok(table[c])), None)
            if bad is not None:
                raise ArtifactError(f"{path}: field '{name}.{bad}' must be {want}, got {table[bad]!r:.80}")
        if self.task == REGRESSION or self.target_mean is not None or self.target_std is not None:
            self._validate_target(path)
            return
        want_class = {"int": is_int, "string": lambda v: isinstance(v, str), "onehot": is_int}.get(self.label_type)
        if (want_class is None or len(self.classes) < 2 or not all(want_class(c) for c in self.classes)
                or len(set(self.classes)) != len(self.classes)
                or (self.label_type == "onehot" and self.classes != list(range(len(self.classes))))):
            raise ArtifactError(f"{path}: field 'classes' must be >= 2 distinct {self.label_type} class names "
                                f"(label_type '{self.label_type}'), got {self.classes!r:.80}")

    def _validate_target(self, path: str):
        """A regression file: float labels, no classes, the target's finite mean and std > 0."""
        if self.task != REGRESSION or self.label_type != "float" or self.classes != []:
            raise ArtifactError(f"{path}: fields 'task', 'label_type', 'classes' must be regression, float, [] when "
                                f"'target_mean'/'target_std' are set, got {self.task!r}, {self.label_type!r}, "
                                f"{self.classes!r:.40}")
        for name in ("target_mean", "target_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (name == "target_mean" or v > 0)):
                raise ArtifactError(f"{path}: field '{name}' must be a finite number{' > 0' if name == 'target_std' else ''}"
                                    f" for a regression, got {v!r:.80}")


def is_int(v, low: Optional[int] = None) -> bool:
    """An int (not a bool), at least `low`: for fields read from files anyone may have written."""
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_stats(v) -> bool:
    if not isinstance(v, dict) or sorted(v) != ["mean", "median", "std"]:
        return False
    nums = [x for x in v.values() if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    return len(nums) == 3 and v["std"] > 0


def _optional_str(v) -> bool:
    return v is None or (isinstance(v, str) and v != "")


# field -> (check, what it must be); max_tokens: the bound data.max_tokens has in a training config
_FIELDS = {
    "tokenizer": (lambda v: isinstance(v, str), "a string"),
    "text_columns": (_is_str_list, "a list of column names"),
    "text_separator": (lambda v: isinstance(v, str), "a string"),
    "numeric_columns": (_is_str_list, "a list of column names"),
    "categorical_columns": (_is_str_list, "a list of column names"),
    "label_column": (_optional_str, "a column name or null"),
    "id_column": (_optional_str, "a column name or null"),
    "serialize_columns": (_is_str_list, "a list of column names"),
    "max_tokens": (lambda v: is_int(v, 8), "an integer >= 8"),
    "max_chunks": (lambda v: is_int(v, 1), "an integer >= 1"),
    "numeric_stats": (lambda v: isinstance(v, dict), "an object"),
    "vocabularies": (lambda v: isinstance(v, dict), "an object"),
    "label_type": (lambda v: v in ("int", "string", "onehot", "float"), "one of 'int', 'string', 'onehot', 'float'"),
    "classes": (lambda v: isinstance(v, list), "a list"),
    "labels_pinned": (lambda v: isinstance(v, bool), "true or false"),
    "format_version": (lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION}"),
    "task": (lambda v: v in (CLASSIFICATION, REGRESSION), f"'{CLASSIFICATION}' or '{REGRESSION}'"),
}


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)
