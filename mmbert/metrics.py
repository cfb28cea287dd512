"""Classification and regression metrics, as one table: each metric's task, the class counts it is defined for,
its direction, how it is computed and whether the summaries show it. Validation in train.py, evaluate.py's
reports, best-model selection, early stopping and permutation importance all read their facts from TABLE."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

CLASSIFICATION = "classification"
REGRESSION = "regression"


def _safe(fn, *args, **kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = fn(*args, **kwargs)
        v = float(v)
        return v if np.isfinite(v) else None
    except ValueError:  # e.g. ROC-AUC with a single class present
        return None


def best_threshold_f1(labels: np.ndarray, p1: np.ndarray) -> tuple[float, float]:
    """Positive-class F1 maximised over thresholds (as in the published results): (f1, threshold)."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, thr = precision_recall_curve(labels, p1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)[:-1]
    if len(f1) == 0:
        return 0.0, 0.5
    i = int(np.argmax(f1))
    return float(f1[i]), float(thr[i])


class Scores:
    """What a metric is computed from: labels and scores (B x K probabilities, or a regression's predictions in
    original units), with the derived arrays computed once."""

    def __init__(self, labels, scores, task: str):
        self.scores = np.asarray(scores, dtype=np.float64)
        if task == REGRESSION:
            self.scores = self.scores.reshape(-1)
        self.k = self.scores.shape[1] if task == CLASSIFICATION else 1
        self.labels = np.asarray(labels, dtype=np.int64 if task == CLASSIFICATION else np.float64).reshape(-1)

    @functools.cached_property
    def pred(self) -> np.ndarray:
        return self.scores.argmax(1)

    @functools.cached_property
    def present(self) -> np.ndarray:
        return np.unique(self.labels)

    @property
    def both_classes(self) -> bool:
        return len(self.present) == 2

    @functools.cached_property
    def threshold(self) -> tuple[Optional[float], Optional[float]]:
        """(best-threshold F1, its threshold); None for both with one class present."""
        return best_threshold_f1(self.labels, self.scores[:, 1]) if self.both_classes else (None, None)

    @property
    def varies(self) -> bool:
        return len(self.labels) > 1 and np.ptp(self.labels) > 0


def _M():
    from sklearn import metrics

    return metrics


def _multiclass_roc_auc(s: Scores) -> Optional[float]:
    if len(s.present) < s.k:
        return None
    return _safe(_M().roc_auc_score, s.labels, s.scores, multi_class="ovr", average="macro")


def _multiclass_pr_auc(s: Scores) -> Optional[float]:
    onehot = np.eye(s.k)[s.labels]
    aps = [_safe(_M().average_precision_score, onehot[:, j], s.scores[:, j]) for j in range(s.k) if j in s.present]
    aps = [a for a in aps if a is not None]
    return float(np.mean(aps)) if aps else None


def _spearman(s: Scores) -> Optional[float]:
    from scipy.stats import spearmanr

    if not s.varies or np.ptp(s.scores) == 0:
        return None
    return _safe(lambda a, b: spearmanr(a, b).statistic, s.labels, s.scores)


def _averaged(name: str, average: str) -> Callable[[Scores], float]:
    return lambda s: float(getattr(_M(), name)(s.labels, s.pred, average=average, zero_division=0))


@dataclass(frozen=True)
class Metric:
    name: str
    task: str
    higher_is_better: bool
    compute: Callable[[Scores], Optional[float]]  # None where undefined (never NaN)
    classes: str = "any"  # classification: defined for "binary", "multiclass" or "any" class count
    summary: bool = True  # a row of the summary table (evaluate.py's stdout)
    logged: bool = False  # in training's one-line eval log

    def applies(self, task: str, k: int) -> bool:
        return self.task == task and (self.classes == "any" or self.classes == ("binary" if k == 2 else "multiclass"))

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"


_C, _R = CLASSIFICATION, REGRESSION
# In the order summaries show them. A name may have one row per class count (binary / multiclass).
TABLE: tuple[Metric, ...] = (
    Metric("rmse", _R, False, lambda s: float(np.sqrt(_M().mean_squared_error(s.labels, s.scores))), logged=True),
    Metric("mae", _R, False, lambda s: float(_M().mean_absolute_error(s.labels, s.scores)), logged=True),
    Metric("mse", _R, False, lambda s: float(_M().mean_squared_error(s.labels, s.scores)), summary=False),
    Metric("r2", _R, True, lambda s: _safe(_M().r2_score, s.labels, s.scores) if s.varies else None, logged=True),
    Metric("spearman", _R, True, _spearman, logged=True),
    Metric("accuracy", _C, True, lambda s: float(_M().accuracy_score(s.labels, s.pred)), logged=True),
    Metric("f1", _C, True, lambda s: float(_M().f1_score(s.labels, s.pred, zero_division=0)), "binary",
           logged=True),
    Metric("f1_macro", _C, True, _averaged("f1_score", "macro"), "multiclass", logged=True),
    Metric("f1_micro", _C, True, _averaged("f1_score", "micro"), "multiclass"),
    Metric("precision", _C, True, lambda s: float(_M().precision_score(s.labels, s.pred, zero_division=0)),
           "binary"),
    Metric("precision_macro", _C, True, _averaged("precision_score", "macro"), "multiclass"),
    Metric("recall", _C, True, lambda s: float(_M().recall_score(s.labels, s.pred, zero_division=0)), "binary"),
    Metric("recall_macro", _C, True, _averaged("recall_score", "macro"), "multiclass"),
    Metric("roc_auc", _C, True, lambda s: _safe(_M().roc_auc_score, s.labels, s.scores[:, 1])
           if s.both_classes else None, "binary", logged=True),
    Metric("roc_auc", _C, True, _multiclass_roc_auc, "multiclass", logged=True),
    Metric("pr_auc", _C, True, lambda s: _safe(_M().average_precision_score, s.labels, s.scores[:, 1])
           if s.both_classes else None, "binary", logged=True),
    Metric("pr_auc", _C, True, _multiclass_pr_auc, "multiclass", logged=True),
    Metric("mcc", _C, True, lambda s: _safe(_M().matthews_corrcoef, s.labels, s.pred)),
    Metric("log_loss", _C, False, lambda s: _safe(_M().log_loss, s.labels, np.clip(s.scores, 1e-7, 1.0),
                                                  labels=list(range(s.k))), logged=True),
    Metric("best_threshold_f1", _C, True, lambda s: s.threshold[0], "binary"),
)
# train.metric may also name val_loss: the task's own loss metric.
VAL_LOSS = {CLASSIFICATION: "log_loss", REGRESSION: "mse"}
DEFAULT_METRIC = {CLASSIFICATION: "roc_auc", REGRESSION: "rmse"}


def metric_names(task: str) -> tuple[str, ...]:
    """The validation metrics train.metric may name for a task (binary and multiclass names both: the class count
    is known only once the train split is read)."""
    return (*dict.fromkeys(m.name for m in TABLE if m.task == task), "val_loss")


def metric_row(name: str, task: str) -> Metric:
    """The table's row of a metric name (val_loss: the task's loss metric); KeyError for an unknown name."""
    name = VAL_LOSS[task] if name == "val_loss" else name
    for m in TABLE:
        if m.name == name and m.task == task:
            return m
    raise KeyError(name)


def _computed(s: Scores, task: str) -> dict:
    return {m.name: m.compute(s) for m in TABLE if m.applies(task, s.k)}


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Every classification metric of the table defined for the class count (None where undefined for these
    rows, e.g. ROC-AUC with one class present), the confusion matrix and the best threshold of a binary task."""
    s = Scores(labels, probs, CLASSIFICATION)
    out: dict = {"n": int(len(s.labels)), **_computed(s, CLASSIFICATION)}
    out["confusion_matrix"] = _M().confusion_matrix(s.labels, s.pred, labels=list(range(s.k))).tolist()
    if s.k == 2:
        out["best_threshold"] = s.threshold[1]
    out["classes"] = list(class_names)
    return out


def compute_regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """RMSE, MAE, MSE, R^2 and Spearman's rank correlation of predictions (original units) against targets;
    None where undefined (R^2 of a constant target, Spearman of a constant side), never NaN."""
    s = Scores(labels, predictions, REGRESSION)
    out: dict = {"n": int(len(s.labels)), **_computed(s, REGRESSION)}
    out["label_mean"], out["prediction_mean"] = float(s.labels.mean()), float(s.scores.mean())
    return out


def task_metrics(labels: np.ndarray, scores: np.ndarray, pre) -> dict:
    """The metrics of the preprocessing's task: `scores` as the scorer returns them (B x K probabilities, or the
    B x 1 regression prediction in original units)."""
    if pre.task == REGRESSION:
        return compute_regression_metrics(labels, scores[:, 0])
    return compute_metrics(labels, scores, pre.class_names)


def per_class_report(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Per class: support, precision, recall, F1 (argmax predictions). For evaluation reports."""
    k = probs.shape[1]
    pred = np.asarray(probs).argmax(1)
    p, r, f, s = _M().precision_recall_fscore_support(np.asarray(labels, dtype=np.int64), pred,
                                                      labels=list(range(k)), zero_division=0)
    return {str(c): {"support": int(s[j]), "precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j])}
            for j, c in enumerate(class_names)}


SUMMARY_KEYS = ("n", *dict.fromkeys(m.name for m in TABLE if m.summary), "best_threshold")
LOGGED_KEYS = tuple(dict.fromkeys(m.name for m in TABLE if m.logged))


def summary_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}")
    return "\n".join(lines)


def log_line(metrics: dict) -> str:
    """The metrics of training's one-line eval log, in table order."""
    return " ".join(f"{k}={metrics[k]:.4f}" for k in LOGGED_KEYS if isinstance(metrics.get(k), float))
