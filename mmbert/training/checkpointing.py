"""When a run saves a checkpoint and what one holds (the shape of torchtitan's CheckpointManager, kept small).

WHEN: every `train.checkpoint_every` steps, at the last step, at an early stop, and when the run is stopped
(a signal or `train.max_time`); the newest `train.keep_checkpoints` are kept.
WHAT (OUTPUT/checkpoints/step_N, written by mmbert.distributed.checkpoint): the model and optimizer shards, the
RNG streams, the loop state (TrainState), the lr plan, the loss scaler, the run's config, its fitted
preprocessing, the digests of the data files it read, and best/ as it is at that step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..distributed import checkpoint as ckpt
from .resume import check_resumable

log = logging.getLogger("mmbert")


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint saves and a resume restores, as one object."""
    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of this epoch's global order consumed (world-size independent)
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    last_eval_step: int = -1
    skipped_steps: int = 0  # fp16: optimizer steps skipped for inf/nan gradients

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class CheckpointManager:
    """OUTPUT/checkpoints of one run: which checkpoint a resume starts from, when to save, save and load."""

    def __init__(self, out: str, tc, rank: int):
        self.root = os.path.join(out, "checkpoints")
        self.best_dir = os.path.join(out, "best")
        self.every, self.keep, self.rank = tc.checkpoint_every, tc.keep_checkpoints, rank

    def resume_path(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint `train.resume` names: "auto" is the newest complete one here (None: start fresh)."""
        if resume == "auto":
            path = ckpt.find_latest(self.root)
            if path is None:
                log.info("--resume auto: no complete checkpoint in %s, starting fresh", self.root)
            return path
        return resume or None

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        """Whether the step just taken ends with a checkpoint: the last one, an early stop, or the cadence."""
        return last or stopping or bool(self.every and step % self.every == 0)

    def save(self, state, parts):
        """Collective: a checkpoint of the whole TrainState, the lr plan, the config and best/ as it is now."""
        record = {**state.to_dict(), "lr_plan": parts.lr_plan.to_dict(), "config": parts.run_cfg,
                  "snapshots": ["best"], "grad_scaler": parts.scaler.state_dict(),
                  "preprocessing": parts.data.pre.to_dict(), "data_files": parts.data_files}
        ckpt.save_checkpoint(self.root, state.step, parts.model, parts.optimizer, record, self.keep, self.rank,
                             with_dirs={"best": self.best_dir})

    def load(self, path: str, model, optimizer, scaler, run_cfg: dict) -> tuple[TrainState, dict]:
        """Collective: check the checkpoint's config against this run's (before touching weights), then load
        weights, optimizer, loss scaler, RNG and best/. This run's configured lr / weight decay win over the
        saved ones (the lr plan re-plans from them)."""
        saved = ckpt.read_train_state(path)
        applied = check_resumable(saved.get("config"), run_cfg, path)
        if applied:
            log.info("resume: applying changed %s", "; ".join(applied))
        configured = [{k: g[k] for k in ("lr", "weight_decay", "role") if k in g} for g in optimizer.param_groups]
        ts = ckpt.load_checkpoint(path, model, optimizer, self.rank)
        for g, conf in zip(optimizer.param_groups, configured):
            g.update(conf)
        scaler.load_state_dict(ts.get("grad_scaler"))
        if self.rank == 0 and "best" in ts.get("snapshots", []):
            ckpt.restore_dir(path, "best", self.best_dir)
        dist.barrier()
        return TrainState.from_dict(ts), ts
