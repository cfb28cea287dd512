"""What a resumed run may change, and the learning-rate plan it continues on.

A checkpoint records the config it was trained with. On resume the data and model sections and the
keys that fix the data order or the meaning of the best-model metric must be unchanged (a different
model or a different table under the same weights is a new run). Every other key may change and the
change is applied from the resumed step on: the step budget (`max_steps`, `epochs`), the lr
schedule (`lr`, `head_lr`, `schedule`, warmup), `weight_decay`, `max_grad_norm`, `class_weights`,
batch size / grad_accum / world size / strategy (the data position is counted in samples),
evaluation, checkpoint and logging cadence, early stopping, `select_best`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from ..config import DATA_CACHE_KEYS, flatten
from ..errors import ConfigError

log = logging.getLogger("mmbert")

FROZEN_SECTIONS = ("data", "model")
FROZEN_TRAIN_KEYS = ("seed", "bucket_by_length", "bucket_block", "metric", "metric_mode")
# Keys that say where and how to run, not what: never compared.
RUN_CONTROL_KEYS = ("output_dir", "resume", "overwrite", "progress_bar", "num_threads", "num_workers",
                    "report_to")


def _frozen(key: str) -> bool:
    section, _, name = key.partition(".")
    return section in FROZEN_SECTIONS or (section == "train" and name in FROZEN_TRAIN_KEYS)


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(frozen keys that changed, other keys that changed), each as `key old -> new`."""
    a, b = flatten(saved), flatten(current)
    frozen, applied = [], []
    for key in sorted(set(a) | set(b)):
        section, _, name = key.partition(".")
        if (section == "train" and name in RUN_CONTROL_KEYS) or (section == "data" and name in DATA_CACHE_KEYS):
            continue
        if a.get(key) != b.get(key):
            (frozen if _frozen(key) else applied).append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return frozen, applied


def check_resumable(saved: Optional[dict], current: dict, checkpoint: str) -> list[str]:
    """Stop on a changed data/model key; return the applied changes (to log)."""
    if saved is None:
        log.warning("checkpoint %s records no config (written by an older mmbert): cannot check that the data and "
                    "model are unchanged", checkpoint)
        return []
    frozen, applied = config_changes(saved, current)
    if frozen:
        raise ConfigError(f"cannot resume {checkpoint} with a changed config: {'; '.join(frozen)} (these define the "
                          f"model and its data; use a new --output-dir, or --overwrite to start over)")
    return applied


@dataclass
class LrPlan:
    """The schedule as a pure function of the step: what the scheduler is rebuilt from on resume."""
    warmup: int
    total: int
    schedule: str

    def to_dict(self) -> dict:
        return {"warmup": self.warmup, "total": self.total, "schedule": self.schedule}


def plan_lr(tc, total_steps: int, saved: Optional[dict] = None, saved_cfg: Optional[dict] = None) -> LrPlan:
    """A fresh plan, or on resume the saved one re-planned over the new total: warmup is kept as it was (a
    ratio is not re-applied to a longer run, so warmup is never repeated) unless the warmup keys changed."""
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(tc.warmup_ratio * total_steps)
    if saved is not None:
        old = (saved_cfg or {}).get("train", {})
        same_warmup = (old.get("warmup_steps") == tc.warmup_steps and old.get("warmup_ratio") == tc.warmup_ratio)
        if same_warmup or not saved_cfg:
            warmup = int(saved["warmup"])
    return LrPlan(warmup=warmup, total=total_steps, schedule=tc.schedule)


def describe_replan(saved: Optional[dict], plan: LrPlan, step: int, lr: float) -> Optional[str]:
    if saved is None or (saved["total"], saved["schedule"]) == (plan.total, plan.schedule):
        return None
    return (f"lr schedule re-planned from step {step}: {plan.schedule} over {plan.total} steps (was "
            f"{saved['schedule']} over {saved['total']}); warmup of {plan.warmup} steps not repeated; "
            f"next lr {lr:.3g}")
