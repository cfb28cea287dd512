"""What the evaluation writes, shared by run.py and importance.py (and `mmbert predict`): the prediction
files' score columns, whole-or-nothing TSV and JSON files, and the check of the merged scores. No scoring and
no process group here, so both modules import it without importing each other."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pandas as pd

from ..errors import ArtifactError, ConfigError
from ..task import REGRESSION


def prob_columns(class_names: list[str]) -> list[str]:
    """One probability column per class, binary too (prob_0, prob_1): the same layout for every label map."""
    return [f"prob_{c}" for c in class_names]


def score_columns(pre, scores: np.ndarray) -> dict:
    """The prediction files' score columns (evaluate.py and `mmbert predict`): classification: prob_<class> per
    class, then pred (class name of the most probable class); regression: prediction (original units)."""
    if pre.task == REGRESSION:
        return {"prediction": scores[:, 0]}
    names = np.asarray(pre.class_names, dtype=object)
    cols = dict(zip(prob_columns(pre.class_names), scores.T))
    cols["pred"] = names[scores.argmax(1)] if len(scores) else np.asarray([], dtype=object)
    return cols


def label_column(pre, labels: np.ndarray) -> np.ndarray:
    """Known labels as the prediction files show them: class names, or a regression's target values."""
    return labels if pre.task == REGRESSION else np.asarray(pre.class_names, dtype=object)[labels]


def stage_tsv(df: pd.DataFrame, path: str) -> str:
    """Write `path`.tmp (renamed once every rank agrees, so a crash never leaves a half file under the real
    name). Every text field is quoted (RFC 4180, `"` doubled): an id holding a tab, `\n` or `\r` stays one
    field (QUOTE_MINIMAL leaves a lone `\r` bare, which readers take for a line break)."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype.kind == "f":  # the shortest float64 that is the float32 (%.9g round-trips float32):
            df[c] = np.char.mod("%.9g", df[c].to_numpy()).astype(np.float64)  # written bare, not as text
    tmp = path + ".tmp"
    try:
        df.to_csv(tmp, sep="," if path.endswith(".csv") else "\t", index=False, quoting=csv.QUOTE_NONNUMERIC,
                  lineterminator="\n")
    except OSError as e:  # one line naming the file, on every path that writes one
        raise ConfigError(f"cannot write {e.filename or path}: {e.strerror or e}") from None
    return tmp


def write_tsv(df: pd.DataFrame, path: str):
    """Written whole or not at all; comma-separated when `path` ends with .csv."""
    os.replace(stage_tsv(df, path), path)


def check_scores(probs: np.ndarray, ds, pre, source: str):
    """The merged scores, identical on every rank: so every rank takes the same decision here, before
    anything is written."""
    if probs.shape[1] != pre.num_outputs:
        want = ("1 prediction (regression)" if pre.task == REGRESSION
                else f"{pre.num_classes} probabilities (the label map's classes {pre.classes})")
        raise ArtifactError(f"the scorer returns {probs.shape[1]} scores per row but the model needs {want}")
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        what = "predictions" if pre.task == REGRESSION else "probabilities"
        raise ArtifactError(f"{source}: the model gives NaN/inf {what} for {int(bad.sum())} of {len(probs)} "
                            f"rows (first: row {int(ds.enc.rows[first])}): check its weights for NaN/inf; no "
                            f"prediction file was written")


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, obj: dict):
    """`obj` as JSON (NaN/inf as null), written whole or not at all."""
    with open(path + ".tmp", "w") as f:
        json.dump(_json_safe(obj), f, indent=1)
    os.replace(path + ".tmp", path)
