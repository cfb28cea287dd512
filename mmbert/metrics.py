"""Classification and regression metrics: one implementation for validation in train.py and evaluate.py, and
one dispatch point between them (task_metrics)."""
from __future__ import annotations

import warnings

import numpy as np


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


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    from sklearn import metrics as M

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    out: dict = {"n": int(len(labels)), "accuracy": float(M.accuracy_score(labels, pred))}
    out["mcc"] = _safe(M.matthews_corrcoef, labels, pred)
    out["log_loss"] = _safe(M.log_loss, labels, np.clip(probs, 1e-7, 1.0), labels=list(range(k)))
    out["confusion_matrix"] = M.confusion_matrix(labels, pred, labels=list(range(k))).tolist()
    if k == 2:
        p1 = probs[:, 1]
        out["f1"] = float(M.f1_score(labels, pred, zero_division=0))
        out["precision"] = float(M.precision_score(labels, pred, zero_division=0))
        out["recall"] = float(M.recall_score(labels, pred, zero_division=0))
        if len(np.unique(labels)) == 2:
            out["roc_auc"] = _safe(M.roc_auc_score, labels, p1)
            out["pr_auc"] = _safe(M.average_precision_score, labels, p1)
            out["best_threshold_f1"], out["best_threshold"] = best_threshold_f1(labels, p1)
        else:  # undefined with one class present (sklearn would say 0.0 for AP): None, never nan, same keys
            for key in ("roc_auc", "pr_auc", "best_threshold_f1", "best_threshold"):
                out[key] = None
    else:
        out["f1_macro"] = float(M.f1_score(labels, pred, average="macro", zero_division=0))
        out["f1_micro"] = float(M.f1_score(labels, pred, average="micro", zero_division=0))
        out["precision_macro"] = float(M.precision_score(labels, pred, average="macro", zero_division=0))
        out["recall_macro"] = float(M.recall_score(labels, pred, average="macro", zero_division=0))
        present = np.unique(labels)
        if len(present) == k:
            out["roc_auc"] = _safe(M.roc_auc_score, labels, probs, multi_class="ovr", average="macro")
        else:
            out["roc_auc"] = None
        onehot = np.eye(k)[labels]
        aps = [_safe(M.average_precision_score, onehot[:, j], probs[:, j]) for j in range(k) if j in present]
        aps = [a for a in aps if a is not None]
        out["pr_auc"] = float(np.mean(aps)) if aps else None
    out["classes"] = list(class_names)
    return out


def compute_regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """RMSE, MAE, MSE, R^2 and Spearman's rank correlation of predictions (original units) against targets;
    None where undefined (R^2 of a constant target, Spearman of a constant side), never NaN."""
    from scipy.stats import spearmanr
    from sklearn import metrics as M

    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    mse = float(M.mean_squared_error(y, p))
    out: dict = {"n": int(len(y)), "rmse": float(np.sqrt(mse)), "mae": float(M.mean_absolute_error(y, p)), "mse": mse}
    out["r2"] = _safe(M.r2_score, y, p) if len(y) > 1 and np.ptp(y) > 0 else None
    out["spearman"] = (_safe(lambda a, b: spearmanr(a, b).statistic, y, p)
                       if len(y) > 1 and np.ptp(y) > 0 and np.ptp(p) > 0 else None)
    out["label_mean"], out["prediction_mean"] = float(y.mean()), float(p.mean())
    return out


def task_metrics(labels: np.ndarray, scores: np.ndarray, pre) -> dict:
    """The metrics of the preprocessing's task: `scores` as the scorer returns them (B x K probabilities, or the
    B x 1 regression prediction in original units)."""
    if pre.task == "regression":
        return compute_regression_metrics(labels, scores[:, 0])
    return compute_metrics(labels, scores, pre.class_names)


def per_class_report(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Per class: support, precision, recall, F1 (argmax predictions). For evaluation reports."""
    from sklearn.metrics import precision_recall_fscore_support

    k = probs.shape[1]
    pred = np.asarray(probs).argmax(1)
    p, r, f, s = precision_recall_fscore_support(np.asarray(labels, dtype=np.int64), pred, labels=list(range(k)),
                                                 zero_division=0)
    return {str(c): {"support": int(s[j]), "precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j])}
            for j, c in enumerate(class_names)}


SUMMARY_KEYS = ("n", "rmse", "mae", "r2", "spearman", "accuracy", "f1", "f1_macro", "f1_micro", "precision", "precision_macro", "recall",
                "recall_macro", "roc_auc", "pr_auc", "mcc", "log_loss", "best_threshold_f1", "best_threshold")


def summary_table(metrics: dict) -> str:
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}")
    return "\n".join(lines)
