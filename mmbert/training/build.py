"""Everything a training run is made of, built in one place and in one order (build_run): the data, the
wrapped model with its optimizer, the plan of steps, the restored checkpoint and the lr schedule."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..assembly import RunData, build_run_model, model_spec
from ..config import Config
from ..data.samplers import step_start, steps_per_epoch
from ..distributed.env import DistEnv
from ..distributed.parallel import ParallelPlan, parallelize, resolve_plan
from ..distributed.precision import LossScaler
from ..errors import ConfigError
from ..models.text_encoder import position_limit
from ..task import loss_function
from .checkpointing import CheckpointManager, TrainState
from .optim import build_optimizer, build_scheduler
from .resume import LrPlan, describe_replan, plan_lr, resumed_run_data
from .rundir import check_checkpoint_room
from .tracking import MetricsLog, build_trackers

log = logging.getLogger("mmbert")


def check_encoder_fits(cfg: Config):
    """max_tokens against the encoder's position table, before any data is read (else: a shape error at step 1)."""
    from transformers import AutoConfig

    from ..models.registry import fusion_spec

    if not fusion_spec(cfg.model.fusion).text:
        return

    from ..data.tokenize import resolve_encoder_path

    try:
        enc = AutoConfig.from_pretrained(resolve_encoder_path(cfg.model.encoder),
                                         trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return  # the tokenizer/encoder loaders name a missing encoder in their own words
    limit = position_limit(enc)
    if limit is not None and cfg.data.max_tokens > limit:
        raise ConfigError(f"config key 'data.max_tokens' ({cfg.data.max_tokens}) exceeds the {limit} positions of "
                          f"encoder '{cfg.model.encoder}' (max_position_embeddings); use --max-tokens {limit} or "
                          f"less (longer texts become up to data.max_chunks chunks)")


@dataclass
class StepPlan:
    """How many optimizer steps, of how many samples each, the run takes."""
    global_batch: int  # samples per optimizer step over all ranks: batch_size x world size x grad_accum
    n_train: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        """Epochs the total touches (the last one possibly in part)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


def plan_steps(tc, world_size: int, n_train: int) -> StepPlan:
    global_batch = tc.batch_size * world_size * tc.grad_accum
    per_epoch = steps_per_epoch(n_train, global_batch)
    if per_epoch == 0:
        raise ConfigError(f"the train split has {n_train} rows, fewer than one global batch (batch_size "
                          f"{tc.batch_size} x world size {world_size} x grad_accum {tc.grad_accum} = {global_batch}); "
                          f"lower train.batch_size")
    return StepPlan(global_batch, n_train, per_epoch, tc.max_steps or tc.epochs * per_epoch)


@dataclass
class RunParts:
    """What build_run made; a Trainer steps it."""
    plan: ParallelPlan
    scaler: LossScaler
    data: RunData
    data_files: dict  # {data path: digest} this run's checkpoints record
    class_weights: Optional[torch.Tensor]
    loss: Callable  # (outputs, labels) -> summed loss
    spec: object  # ModelSpec: what save_artifact writes
    base_model: torch.nn.Module  # before wrapping: save_artifact reads the encoder config from it
    model: torch.nn.Module  # wrapped (none / DDP / FSDP)
    optimizer: torch.optim.Optimizer
    run_cfg: dict  # the config a resume is checked against
    steps: StepPlan
    checkpoints: CheckpointManager
    resume_path: Optional[str]
    state: TrainState
    lr_plan: LrPlan
    scheduler: torch.optim.lr_scheduler.LRScheduler
    metrics: MetricsLog  # metrics.jsonl and the trackers


def _class_weights(cfg: Config, pre, device) -> Optional[torch.Tensor]:
    cw = cfg.train.class_weights
    if cw is not None and len(cw) != pre.num_classes:
        raise ConfigError(f"config key 'train.class_weights' has {len(cw)} values but label column "
                          f"'{cfg.data.label_column}' has {pre.num_classes} classes {pre.classes}")
    return torch.tensor(cw, dtype=torch.float32, device=device) if cw else None


def _model_parts(cfg: Config, env: DistEnv, plan: ParallelPlan, pre):
    """(spec, base model, wrapped model, optimizer, run config): identical initialisation on every rank."""
    spec = model_spec(cfg, pre)
    base_model = build_run_model(cfg, spec)
    check_checkpoint_room(cfg.train.output_dir, base_model)
    model = parallelize(base_model, plan, env)
    torch.manual_seed(cfg.train.seed + 1000 * env.rank)  # per-rank dropout streams
    model.train()
    run_cfg = cfg.to_dict()
    run_cfg["model"]["fusion"] = spec.fusion  # what was built, the key a resume is checked against
    return spec, base_model, model, build_optimizer(model, cfg.train), run_cfg


def _restored(cfg, env, checkpoints: CheckpointManager, path: Optional[str], model, optimizer, scaler, run_cfg,
              steps: StepPlan) -> tuple[TrainState, dict]:
    """The loop state to start from: fresh, or the checkpoint's (with weights, optimizer, RNG, best/)."""
    if not path:
        return TrainState(), {}
    state, saved = checkpoints.load(path, model, optimizer, scaler, run_cfg)
    if not saved.get("rng_restored"):
        torch.manual_seed(cfg.train.seed + 1000 * env.rank + 7919 * state.step)
    # the saved epoch ended (or the new world size's batch doesn't fit)
    state.epoch, state.position = step_start(state.epoch, state.position, steps.n_train, steps.global_batch)
    log.info("resumed from %s at step %d (epoch %d, position %d; saved on %d ranks, now %d)", path, state.step,
             state.epoch, state.position, saved.get("world_size"), env.world_size)
    return state, saved


def build_run(cfg: Config, env: DistEnv) -> RunParts:
    """Collective. Preprocessing fitted on the train split only (resuming: the checkpoint's); the wrapped model
    and its optimizer; a resume's checkpoint checked and loaded; the lr plan (re-planned over a changed total)
    and metrics.jsonl cut back to the resumed step."""
    from ..task import with_resolved_metric

    cfg = with_resolved_metric(cfg)  # the checkpoints record the metric the run selects by (as train() does)
    tc, out = cfg.train, cfg.train.output_dir
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    plan = resolve_plan(cfg.dist, env.device, env.world_size, compile=tc.compile)
    scaler = LossScaler(plan.mixed_precision, plan.strategy, env.device)
    checkpoints = CheckpointManager(out, tc, env.rank)
    resume_path = checkpoints.resume_path(tc.resume)
    data, data_files = resumed_run_data(cfg, env, resume_path)
    class_weights = _class_weights(cfg, data.pre, env.device)
    spec, base_model, model, optimizer, run_cfg = _model_parts(cfg, env, plan, data.pre)
    steps = plan_steps(tc, env.world_size, len(data.train))
    state, saved = _restored(cfg, env, checkpoints, resume_path, model, optimizer, scaler, run_cfg, steps)
    lr_plan = plan_lr(tc, steps.total_steps, saved.get("lr_plan"), saved.get("config"))
    scheduler = build_scheduler(optimizer, lr_plan, state.step)
    replan = describe_replan(saved.get("lr_plan"), lr_plan, state.step, scheduler.get_last_lr()[0])
    if replan:
        log.info(replan)
    resume_step = state.step if resume_path else None
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), env.is_main, resume_step,
                         build_trackers(cfg, env.is_main, resume_step))
    return RunParts(plan, scaler, data, data_files, class_weights, loss_function(cfg, data.pre, class_weights),
                    spec, base_model, model, optimizer, run_cfg, steps, checkpoints, resume_path, state, lr_plan,
                    scheduler, metrics)
