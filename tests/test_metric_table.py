"""The metric table (mmbert/metrics.py TABLE) is the one source of every metric fact: the names train.metric
accepts, the direction best-model selection and early stopping use, what compute_metrics reports, the summary
and log rows, and the metric permutation importance ranks by."""
from __future__ import annotations

import numpy as np
import pytest

from mmbert.config import config_from_dict
from mmbert.errors import ConfigError
from mmbert.evaluation.importance import primary_metric
from mmbert.metrics import (CLASSIFICATION, LOGGED_KEYS, REGRESSION, SUMMARY_KEYS, TABLE, VAL_LOSS, compute_metrics,
                            compute_regression_metrics, metric_names, metric_row, summary_table)
from mmbert.task import metric_mode_of, metric_of

RNG = np.random.default_rng(0)


def _cfg(task: str, **train):
    data = {"label_column": "y", "text_columns": ["t"]}
    if task == REGRESSION:
        data["label_type"] = "float"
    return config_from_dict({"data": data, "train": train})


def _classification_scores(k: int, n: int = 400):
    labels = np.arange(n) % k
    good = np.full((n, k), 0.1 / (k - 1))
    good[np.arange(n), labels] = 0.9
    noisy = RNG.dirichlet(np.ones(k), size=n)
    return labels, good, noisy


@pytest.mark.parametrize("k", [2, 3])
def test_every_classification_metric_is_computed_and_its_direction_ranks_a_good_model_first(k):
    labels, good, noisy = _classification_scores(k)
    a, b = compute_metrics(labels, good, [str(j) for j in range(k)]), compute_metrics(labels, noisy, list("abc")[:k])
    rows = [m for m in TABLE if m.applies(CLASSIFICATION, k)]
    assert {m.name for m in rows} <= a.keys()
    for m in rows:
        better = a[m.name] > b[m.name] if m.higher_is_better else a[m.name] < b[m.name]
        assert better, (m.name, a[m.name], b[m.name])


def test_every_regression_metric_is_computed_and_its_direction_ranks_a_good_model_first():
    y = RNG.normal(size=300)
    a = compute_regression_metrics(y, y + RNG.normal(scale=0.1, size=300))
    b = compute_regression_metrics(y, RNG.normal(size=300))
    for m in (m for m in TABLE if m.task == REGRESSION):
        assert (a[m.name] > b[m.name]) if m.higher_is_better else (a[m.name] < b[m.name]), m.name


@pytest.mark.parametrize("task", [CLASSIFICATION, REGRESSION])
def test_selection_uses_the_table_direction_for_every_metric(task):
    for name in metric_names(task):
        cfg = _cfg(task, metric=name)
        want = metric_row(name, task).mode
        assert (metric_of(cfg), metric_mode_of(cfg)) == (name, want)
        assert cfg.train.metric_mode is None  # validation resolves nothing into the config
        assert metric_mode_of(_cfg(task, metric=name, metric_mode=want)) == want
        wrong = "min" if want == "max" else "max"
        with pytest.raises(ConfigError, match=f"'train.metric_mode': '{wrong}' would keep the worst checkpoint"):
            _cfg(task, metric=name, metric_mode=wrong)


def test_val_loss_is_the_task_loss_and_lower_is_better():
    for task in (CLASSIFICATION, REGRESSION):
        assert metric_row("val_loss", task).name == VAL_LOSS[task]
        assert metric_row("val_loss", task).mode == "min"
    assert metric_mode_of(_cfg(CLASSIFICATION, metric="log_loss")) == "min"
    assert metric_mode_of(_cfg(CLASSIFICATION)) == "max"  # roc_auc by default
    with pytest.raises(ConfigError, match="'roc_auc' is not a regression metric"):
        _cfg(REGRESSION, metric="roc_auc")


def test_summary_and_log_rows_come_from_the_table():
    labels, good, _ = _classification_scores(2)
    m = compute_metrics(labels, good, ["no", "yes"])
    table = summary_table(m)
    assert [ln.split()[0] for ln in table.splitlines()[2:]] == [k for k in SUMMARY_KEYS if k in m]
    assert set(LOGGED_KEYS) <= {m.name for m in TABLE}
    assert "mse" not in SUMMARY_KEYS and "mse" in metric_names(REGRESSION)


def test_importance_ranks_by_the_table_direction():
    labels, good, noisy = _classification_scores(2)
    assert primary_metric(labels, good)[0::2] == ("roc_auc", True)
    one_class = np.zeros(10, dtype=int)
    name, _, higher = primary_metric(one_class, good[:10])
    assert (name, higher) == ("log_loss", False)
    y = RNG.normal(size=50)
    assert primary_metric(y, y[:, None], REGRESSION)[0::2] == ("rmse", False)
