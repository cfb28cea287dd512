"""What differs between the two tasks, classification and regression, in one place: which task a data config
means, the loss and validation metric a training config resolves to, and the loss function itself. Everything
else (scoring, gathering, files) handles a B x K score array, with K = 1 for a regression's prediction."""
from __future__ import annotations

from typing import Callable

from .errors import ConfigError
from .metrics import CLASSIFICATION, DEFAULT_METRIC, REGRESSION, metric_names, metric_row

LOSSES = {CLASSIFICATION: ("cross_entropy",), REGRESSION: ("mse", "huber")}


def task_of(data_cfg) -> str:
    """data.task, with auto meaning regression exactly when data.label_type is float."""
    if data_cfg.task == "auto":
        return REGRESSION if data_cfg.label_type == "float" else CLASSIFICATION
    return data_cfg.task


def validate_task(cfg) -> None:
    """The task's cross-key rules (never changes the config: metric_of / metric_mode_of resolve the defaults)."""
    d, t = cfg.data, cfg.train
    task = task_of(d)
    if task == CLASSIFICATION and d.label_type == "float":
        raise ConfigError("config key 'data.label_type': float labels mean regression, but data.task is "
                          "classification")
    if task == REGRESSION:
        if d.label_type not in ("auto", "float"):
            raise ConfigError(f"config key 'data.label_type': '{d.label_type}' is a classification label type; a "
                              f"regression target is read as float (use auto or float)")
        if d.labels is not None:
            raise ConfigError("config key 'data.labels' pins a class list, which a regression target has none of")
        if t.class_weights is not None:
            raise ConfigError("config key 'train.class_weights' does not apply to a regression task")
    if t.loss != "auto" and t.loss not in LOSSES[task]:
        raise ConfigError(f"config key 'train.loss': '{t.loss}' is not a {task} loss (valid: auto, "
                          f"{', '.join(LOSSES[task])})")
    if t.metric is not None and t.metric not in metric_names(task):
        raise ConfigError(f"config key 'train.metric': '{t.metric}' is not a {task} metric (valid: "
                          f"{', '.join(metric_names(task))})")
    natural = metric_row(metric_of(cfg), task).mode
    if t.metric_mode is not None and t.metric_mode != natural:
        raise ConfigError(f"config key 'train.metric_mode': '{t.metric_mode}' would keep the worst checkpoint: "
                          f"{metric_of(cfg)} is better when {'higher' if natural == 'max' else 'lower'} "
                          f"(leave metric_mode out, or set it to '{natural}')")


def loss_of(cfg) -> str:
    return cfg.train.loss if cfg.train.loss != "auto" else LOSSES[task_of(cfg.data)][0]


def metric_of(cfg) -> str:
    return cfg.train.metric or DEFAULT_METRIC[task_of(cfg.data)]


def metric_mode_of(cfg) -> str:
    """The selection metric's direction, from the metric table (train.metric_mode may only repeat it)."""
    return metric_row(metric_of(cfg), task_of(cfg.data)).mode


def with_resolved_metric(cfg):
    """A copy of cfg with train.metric and train.metric_mode filled in (the run records what it selects by)."""
    import dataclasses

    train = dataclasses.replace(cfg.train, metric=metric_of(cfg), metric_mode=metric_mode_of(cfg))
    return dataclasses.replace(cfg, train=train)


def loss_function(cfg, pre, class_weights=None) -> Callable:
    """(model outputs, batch labels) -> the summed loss of the batch: cross-entropy on the logits, or MSE /
    Huber between the single output and the target standardised with the train split's mean and std."""
    import torch.nn.functional as F

    name = loss_of(cfg)
    if name == "cross_entropy":
        return lambda out, y: F.cross_entropy(out.float(), y, weight=class_weights, reduction="sum")
    mean, std = pre.target_mean, pre.target_std

    def regression_loss(out, y):
        z = ((y.double() - mean) / std).float()
        if name == "huber":
            return F.huber_loss(out.float().squeeze(-1), z, delta=cfg.train.huber_delta, reduction="sum")
        return F.mse_loss(out.float().squeeze(-1), z, reduction="sum")

    return regression_loss

