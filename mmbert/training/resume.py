"""What a resumed run may change, and the learning-rate plan it continues on.

A checkpoint records the config it was trained with. On resume the data and model sections and the
keys that fix the data order or the meaning of the best-model metric must be unchanged (a different
model or a different table under the same weights is a new run). Every other key may change and the
change is applied from the resumed step on: the step budget (`max_steps`, `epochs`), the lr
schedule (`lr`, `head_lr`, `schedule`, warmup), `weight_decay`, `max_grad_norm`, `class_weights`,
batch size / grad_accum / world size / strategy (the data position is counted in samples),
evaluation, checkpoint and logging cadence, early stopping, `select_best`.

A checkpoint also records the run's fitted preprocessing and a digest of every data file it read. A resume
applies that preprocessing, never a new fit (category indices and scalers are what the weights learned). Data
files whose bytes differ from the checkpoint's are refused in one line naming the file, unless
`train.resume_data_changed: accept` (--accept-changed-data): then the new rows train under the run's fit
(unseen categories are unknown, the run's scalers apply) and the later checkpoints record the new digests.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

from ..config import DATA_CACHE_KEYS, absolute_data_paths, config_from_dict, flatten
from ..distributed.gather import on_rank0
from ..errors import ConfigError, DataError

log = logging.getLogger("mmbert")

FROZEN_SECTIONS = ("data", "model")
FROZEN_TRAIN_KEYS = ("seed", "bucket_by_length", "bucket_block", "metric", "metric_mode")
# Keys that say where and how to run, not what: never compared.
RUN_CONTROL_KEYS = ("output_dir", "resume", "resume_data_changed", "overwrite", "progress_bar", "progress",
                    "max_time", "num_threads", "num_workers", "report_to")


def _frozen(key: str) -> bool:
    section, _, name = key.partition(".")
    return section in FROZEN_SECTIONS or (section == "train" and name in FROZEN_TRAIN_KEYS)


# defaults that changed to the measured recipe: a checkpoint holding the former one was most likely written
# with the key left out, so a resume that "changes" it says why
FORMER_DEFAULTS = {"model.pooling": "pooler", "data.max_chunks": 4, "train.head_lr": None}


def _complete(config: dict) -> dict:
    """A recorded config with absolute data paths and every key: keys added since it was written take their
    defaults, as the run that wrote it had them (compared as recorded when it no longer reads)."""
    config = copy.deepcopy(config)
    absolute_data_paths(config)
    try:
        return config_from_dict(config, check=False).to_dict()
    except ConfigError:
        return config


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(frozen keys that changed, other keys that changed), each as `key old -> new`. A checkpoint written before
    configs held absolute data paths records them relative to the directory it was started from, as now."""
    a, b = flatten(_complete(saved)), flatten(_complete(current))
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
    recorded = flatten(saved)
    moved = [key for key in (c.split()[0] for c in frozen + applied)
             if key in FORMER_DEFAULTS and recorded.get(key) == FORMER_DEFAULTS[key]]
    hint = (f"; the default of {', '.join(moved)} changed since the checkpoint was written: give the checkpoint's "
            f"value explicitly to continue it as it was" if moved else "")
    if frozen:
        raise ConfigError(f"cannot resume {checkpoint} with a changed config: {'; '.join(frozen)} (these define the "
                          f"model and its data; use a new --output-dir, or --overwrite to start over){hint}")
    if moved:
        log.warning("resume: %s%s", "; ".join(c for c in applied if c.split()[0] in moved), hint)
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


# ----------------------------------------------------------------------------- the data a resume trains on

def resumed_run_data(cfg, env, checkpoint: Optional[str]):
    """Collective: (RunData, {data path: digest} to record in this run's checkpoints). Resuming, the data is
    built with the checkpoint's fitted preprocessing (see the module docstring), and all ranks take rank 0's
    decision on changed data files."""
    from ..assembly import build_run_data

    saved_pre, changed, digests = on_rank0(lambda: _data_decision(cfg, checkpoint))
    fitted = _preprocessor(saved_pre, checkpoint) if saved_pre is not None else None
    data = build_run_data(cfg, env=env, fitted=fitted if changed else None)
    if fitted is not None and _as_json(data.pre.to_dict()) != _as_json(saved_pre):
        # the same bytes fitted otherwise (another mmbert version): the weights know the run's own fit
        log.warning("resume: the preprocessing fitted now differs from the one %s was trained with: applying "
                    "the run's own", checkpoint)
        data = build_run_data(cfg, env=env, fitted=fitted)
    return data, digests


def _data_decision(cfg, checkpoint: Optional[str]) -> tuple[Optional[dict], list[str], dict]:
    """Rank 0: (the checkpoint's preprocessing or None, the data paths that changed since it, this run's
    digests); stops on changed data unless accepted."""
    from ..data.cache import data_digests
    from ..distributed.checkpoint import read_train_state

    digests = data_digests(cfg.data)
    if checkpoint is None:
        return None, [], digests
    saved = read_train_state(checkpoint)
    if "preprocessing" not in saved:
        log.warning("checkpoint %s records no preprocessing (written by an older mmbert): refitting it, and cannot "
                    "check that the data is unchanged", checkpoint)
        return None, [], digests
    if config_changes({"data": saved.get("config", {}).get("data", {})}, {"data": cfg.to_dict()["data"]})[0]:
        return None, [], digests  # another data config: restore() refuses it, naming every changed key
    before = saved.get("data_files", {})
    changed = [p for p, d in digests.items() if p in before and before[p] != d]
    if changed and cfg.train.resume_data_changed != "accept":
        raise DataError(f"data file {changed[0]} changed since checkpoint {checkpoint} was trained on it (its bytes "
                        f"differ): pass --accept-changed-data to continue on the new rows under the run's fitted "
                        f"preprocessing, or start a new run (--overwrite, or another --output-dir)")
    if changed:
        log.warning("resume: data file %s changed since checkpoint %s; training on it under the run's fitted "
                    "preprocessing (unseen categories as unknown, the run's scalers), as accepted", changed[0],
                    checkpoint)
    return saved["preprocessing"], changed, digests


def _preprocessor(raw: dict, checkpoint: str):
    from ..data.preprocess import Preprocessor

    return Preprocessor.from_dict(raw, os.path.join(checkpoint, "train_state.json"))


def _as_json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
