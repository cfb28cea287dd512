"""Evaluation pictures as PNG (matplotlib, Agg canvas: no display, no global pyplot state)."""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

ROC = "roc_curve.png"
PR = "pr_curve.png"
CONFUSION = "confusion_matrix.png"
HISTOGRAM = "probability_histogram.png"
SCATTER = "predicted_vs_actual.png"  # regression
RESIDUALS = "residual_histogram.png"
PREDICTIONS = "prediction_histogram.png"
ALL = (ROC, PR, CONFUSION, HISTOGRAM, SCATTER, RESIDUALS, PREDICTIONS)


def _import_matplotlib():
    """matplotlib writes its settings and font cache under ~/.config and ~/.cache; where it cannot (a read-only
    HOME) it makes a temporary folder on every import and prints two lines about it. Give it a folder beside our
    cache for its import instead (it keeps the folder it chose there), leaving the environment as it was."""
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    from ..data.io import _cache_dir, writable_dir

    home = os.path.expanduser("~")
    defaults = (os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
                os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"))
    if all(writable_dir(os.path.join(d, "matplotlib")) for d in defaults):
        return
    os.environ["MPLCONFIGDIR"] = os.path.join(os.path.dirname(_cache_dir().rstrip(os.sep)), "matplotlib")
    try:
        import matplotlib.backends.backend_agg  # noqa: F401  (with the font manager: both folders are read now)
    finally:
        os.environ.pop("MPLCONFIGDIR", None)


def _plain_text(plot):
    """Draw with every text taken literally: a `$` in a column or class name (`Cost ($) per_$unit`) would
    otherwise start mathtext and fail the picture, and a user's text.usetex would send names to LaTeX."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        _import_matplotlib()
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return plot(*args, **kwargs)

    return wrapper


def _figure(w: float = 5.0, h: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str):
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def _one_vs_rest(labels: np.ndarray, probs: np.ndarray, class_names: list[str]):
    """(name, y_true, score) per curve: binary -> class 1 only; multiclass -> each class with both outcomes present."""
    k = probs.shape[1]
    if k == 2:
        return [(class_names[1], labels == 1, probs[:, 1])] if 0 < (labels == 1).sum() < len(labels) else []
    return [(class_names[j], labels == j, probs[:, j]) for j in range(k) if 0 < (labels == j).sum() < len(labels)]


def _curves(labels, probs, class_names, draw, title: str, xlabel: str, ylabel: str, legend: str):
    """One curve per class (one-vs-rest beyond two classes), or a note when only one class is present."""
    fig = _figure()
    ax = fig.add_subplot()
    curves = _one_vs_rest(labels, probs, class_names)
    for name, y, s in curves:
        draw(ax, name, y, s)
    if not curves:
        ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel,
           title=title + (" (one-vs-rest)" if probs.shape[1] > 2 else ""))
    if curves:
        ax.legend(loc=legend, fontsize="small")
    return fig, ax


@_plain_text
def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: str):
    from sklearn.metrics import auc, roc_curve

    def draw(ax, name, y, s):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc(fpr, tpr):.3f})")

    fig, ax = _curves(labels, probs, class_names, draw, "ROC curve", "false positive rate",
                      "true positive rate", "lower right")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey")
    _save(fig, path)


@_plain_text
def plot_pr(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: str):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    def draw(ax, name, y, s):
        prec, rec, _ = precision_recall_curve(y, s)
        line, = ax.plot(rec, prec, lw=1.5, label=f"{name} (AP {average_precision_score(y, s):.3f})")
        ax.axhline(y.mean(), ls=":", lw=1, color=line.get_color())  # a random classifier's precision

    fig, _ = _curves(labels, probs, class_names, draw, "precision-recall curve", "recall", "precision",
                     "lower left")
    _save(fig, path)


@_plain_text
def plot_confusion(cm: list[list[int]], class_names: list[str], path: str):
    m = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    size = min(12.0, 3.0 + 0.5 * k)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=class_names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(ticks, labels=class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if k <= 20:
        hi = m.max() if m.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize="small",
                        color="white" if hi and m[i, j] > hi / 2 else "black")
    _save(fig, path)


@_plain_text
def plot_histogram(probs: np.ndarray, class_names: list[str], labels, path: str):
    """Binary: P(class 1), split by true class when labels are known. Multiclass: the predicted class's
    probability (confidence), split into correct / wrong when labels are known."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 31)
    if probs.shape[1] == 2:
        p = probs[:, 1]
        xlabel = f"P({class_names[1]})"
        groups = ([(f"true {class_names[j]}", p[labels == j]) for j in (0, 1)] if labels is not None
                  else [("all rows", p)])
    else:
        p = probs.max(1)
        xlabel = "probability of the predicted class"
        if labels is not None:
            ok = probs.argmax(1) == labels
            groups = [("correct", p[ok]), ("wrong", p[~ok])]
        else:
            groups = [("all rows", p)]
    for name, values in groups:
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} (n={len(values)})")
    ax.set(xlim=(0, 1), xlabel=xlabel, ylabel="rows", title="predicted probabilities")
    ax.legend(fontsize="small")
    _save(fig, path)


@_plain_text
def plot_scatter(labels: np.ndarray, pred: np.ndarray, name: str, path: str):
    """Regression: prediction against the actual target, with the y = x line."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(labels, pred, s=6, alpha=0.35, linewidths=0)
    lo, hi = float(min(labels.min(), pred.min())), float(max(labels.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color="grey")
    ax.set(xlabel=f"actual {name}", ylabel=f"predicted {name}", title=f"predicted vs actual (n={len(labels)})")
    _save(fig, path)


@_plain_text
def plot_value_histogram(values: np.ndarray, xlabel: str, title: str, path: str):
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.hist(values, bins=40, alpha=0.8)
    ax.set(xlabel=xlabel, ylabel="rows", title=f"{title} (n={len(values)})")
    _save(fig, path)


def regression_plots(out_dir: str, pred: np.ndarray, name: str, labels=None) -> list[str]:
    """Labelled rows: predicted-vs-actual scatter and the residuals' histogram; else the predictions' histogram."""
    if labels is None:
        plot_value_histogram(pred, f"predicted {name}", "predictions", os.path.join(out_dir, PREDICTIONS))
        return [PREDICTIONS]
    labels = np.asarray(labels, dtype=np.float64)
    plot_scatter(labels, pred, name, os.path.join(out_dir, SCATTER))
    plot_value_histogram(pred - labels, f"residual: predicted - actual {name}", "residuals",
                         os.path.join(out_dir, RESIDUALS))
    return [SCATTER, RESIDUALS]


def task_plots(out_dir: str, scores: np.ndarray, pre, labels=None, confusion=None) -> list[str]:
    """The pictures of the preprocessing's task (write_plots or regression_plots); their paths."""
    if pre.task == "regression":
        return [os.path.join(out_dir, p) for p in regression_plots(out_dir, scores[:, 0], pre.label_column, labels)]
    return write_plots(out_dir, scores, pre.class_names, labels, confusion)


def write_plots(out_dir: str, probs: np.ndarray, class_names: list[str], labels=None,
                confusion=None) -> list[str]:
    """All pictures that the data allows: the histogram always; ROC, PR and confusion matrix with labels."""
    paths = []
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        plot_roc(labels, probs, class_names, os.path.join(out_dir, ROC))
        plot_pr(labels, probs, class_names, os.path.join(out_dir, PR))
        plot_confusion(confusion, class_names, os.path.join(out_dir, CONFUSION))
        paths += [ROC, PR, CONFUSION]
    plot_histogram(probs, class_names, labels, os.path.join(out_dir, HISTOGRAM))
    paths.append(HISTOGRAM)
    return [os.path.join(out_dir, p) for p in paths]
