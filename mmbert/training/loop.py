"""The training loop: one code path for strategies none / ddp / fsdp, one process or many.

train(cfg) -> train_one(cfg, env, started): the locked output directory, build_run (training/build.py) and a
Trainer that steps it. The Trainer decides what each step does (train, log, evaluate); the CheckpointManager
(training/checkpointing.py) when a checkpoint is saved and what it holds; Preemption / TimeLimit
(training/preemption.py) when every rank stops early."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..artifact import PREPROCESSING, WEIGHTS, save_artifact
from ..config import Config
from ..data.dataset import batch_token_counts, move_batch
from ..data.loader import default_workers, step_keys, step_loader
from ..data.samplers import epoch_order, step_start
from ..distributed import checkpoint as ckpt
from ..distributed.env import DistEnv, cleanup, init_distributed
from ..distributed.parallel import auto_reason, clip_grad_norm, grad_sync
from ..distributed.precision import autocast
from ..errors import ConfigError
from ..metrics import log_line, metric_row, task_metrics
from ..scoring import predict, run_model, torch_scorer
from ..task import metric_mode_of, metric_of, with_resolved_metric
from .build import RunParts, build_run, check_encoder_fits
from .checkpointing import TrainState
from .model_card import CARD, model_card
from .optim import lr_by_role
from .preemption import Preemption, TimeLimit, max_time_seconds, requeue_under_slurm
from .progress import RunProgress
from .rundir import prepare_output_dir
from .seeds import train_members

__all__ = ["Trainer", "TrainState", "StepStats", "train", "train_one", "improves", "run_model", "task_metrics"]

log = logging.getLogger("mmbert")


def train(cfg: Config) -> Optional[str]:
    """OUTPUT/final (with train.seeds: OUTPUT, holding the members and ensemble.json); None when stopped early
    (preempted, or train.max_time) with a checkpoint to resume from."""
    started = time.time()
    cfg = with_resolved_metric(cfg)  # the saved configs and checkpoints record the metric the run selects by
    check_encoder_fits(cfg)
    env = init_distributed(cfg.dist.timeout_s, cfg.train.num_threads)
    try:
        if cfg.train.seeds:
            return train_members(cfg, env, lambda member: train_one(member, env, started))
        return train_one(cfg, env, started)
    finally:
        cleanup(env)


def train_one(cfg: Config, env: DistEnv, started: Optional[float] = None) -> Optional[str]:
    """One run in its locked output directory, in an initialised process group."""
    lock = prepare_output_dir(cfg.train.output_dir, cfg, env)
    try:
        parts = build_run(cfg, env)
        try:
            return Trainer(cfg, env, parts, started).run()
        finally:
            parts.metrics.close()  # flush the experiment trackers, also when training raised
    finally:
        lock.release()


def _metric_key(cfg: Config, metrics: dict, task: str) -> float:
    key = metric_row(metric_of(cfg), task).name
    if key not in metrics:
        options = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ConfigError(f"config key 'train.metric': '{key}' is not a validation metric ({', '.join(options)})")
    v = metrics[key]
    return float("nan") if v is None else float(v)


def improves(value: float, best: Optional[float], mode: str) -> bool:
    """An undefined metric (NaN: e.g. ROC-AUC on a one-class val split) never becomes or beats the best."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


@dataclass
class StepStats:
    """What one optimizer step measured, for the metrics record (reduced over ranks only on log steps)."""
    loss_sum: torch.Tensor
    denom: torch.Tensor
    real_tokens: int
    padded_tokens: int
    grad_norm: torch.Tensor
    t_start: float
    cpu_start: float


class Trainer:
    """One training run over the parts build_run made: per step train_step (forward_backward, optimizer_step),
    log_step, evaluate, and a checkpoint when the CheckpointManager says so; finalize at the end. Its loop state
    is one TrainState, saved and restored whole."""

    def __init__(self, cfg: Config, env: DistEnv, parts: RunParts, started: Optional[float] = None):
        cfg = with_resolved_metric(cfg)
        self.cfg, self.env, self.tc, self.parts = cfg, env, cfg.train, parts
        self.t0 = time.time() if started is None else started
        self.out = cfg.train.output_dir
        self.plan, self.scaler = parts.plan, parts.scaler
        self.loss, self.class_weights = parts.loss, parts.class_weights
        self.pre, self.tokenizer, self.pad_id = parts.data.pre, parts.data.tokenizer, parts.data.pad_id
        self.train_ds, self.val_ds = parts.data.train, parts.data.val
        self.spec, self.base_model, self.model = parts.spec, parts.base_model, parts.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.state = parts.state
        steps = parts.steps
        self.global_batch, self.n_train, self.steps_per_epoch = steps.global_batch, steps.n_train, steps.steps_per_epoch
        self.total_steps = steps.total_steps
        self.checkpoints, self.best_dir, self.metrics = parts.checkpoints, parts.checkpoints.best_dir, parts.metrics
        self.stop_reason: Optional[str] = None  # early stopping's reason, once it decided to stop
        self.evaluation: Optional[dict] = None  # the last val record (the model card of the weights it scored)
        self.orders: dict[int, np.ndarray] = {}  # epoch -> global order (this one and the loader's next)
        self.batches = None  # the step loader's iterator (train_batches)
        self.progress = RunProgress(env.is_main and self.tc.progress, self.total_steps, steps.epochs)
        self.time_limit = TimeLimit(max_time_seconds(self.tc), self.t0)

    def write_run_files(self):
        """Rank 0: the resolved config and the fitted preprocessing beside the checkpoints, and the run's header."""
        if not self.env.is_main:
            return
        env, plan = self.env, self.plan
        resolved = self.cfg.to_dict()
        resolved["dist"].update(plan.as_config())  # what auto resolved to: the file trains the same run again
        resolved["model"]["fusion"] = self.spec.fusion
        with open(os.path.join(self.out, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
        self.metrics.log_config(resolved)
        self.pre.save(os.path.join(self.out, PREPROCESSING))
        runs = plan.describe()
        if self.cfg.dist.strategy in (None, "auto"):
            chosen = f"strategy={plan.strategy} (auto: {auto_reason(env.world_size)})"
            runs = runs.replace(f"strategy={plan.strategy}", chosen, 1)
        log.info("launcher=%s world=%d device=%s %s threads=%d | %d params | train %d rows, val %d rows | "
                 "%d steps/epoch of %d samples, %d steps total", env.launcher, env.world_size, env.device,
                 runs, torch.get_num_threads(), sum(p.numel() for p in self.base_model.parameters()), self.n_train,
                 len(self.val_ds) if self.val_ds else 0, self.steps_per_epoch, self.global_batch, self.total_steps)

    # ---- one step
    def order_of(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s global order (world-size independent); kept for this epoch and the next."""
        if epoch not in self.orders:
            tc = self.tc
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = epoch_order(self.n_train, epoch, tc.seed, self.train_ds.lengths
                                             if tc.bucket_by_length else None, tc.bucket_block)
        return self.orders[epoch]

    def current_order(self) -> np.ndarray:
        """This epoch's global order, advancing the epoch when it is used up."""
        state = self.state
        state.epoch, state.position = step_start(state.epoch, state.position, self.n_train, self.global_batch)
        return self.order_of(state.epoch)

    def train_batches(self) -> list[dict]:
        """This rank's collated micro-batches of the state's step: from the step loader (its workers collate
        ahead), restarted at the state's (epoch, position) when its next item is not that step."""
        env, tc, dc, state = self.env, self.tc, self.cfg.data, self.state
        self.current_order()
        if self.batches is not None:
            epoch, position, host = next(self.batches)
            if (epoch, position) == (state.epoch, state.position):
                return host
        keys = step_keys(state.epoch, state.position, self.n_train, self.global_batch, self.order_of, env.rank,
                         env.world_size, tc.batch_size, tc.grad_accum)
        workers = default_workers(env.device) if tc.num_workers is None else tc.num_workers
        loader = step_loader(self.train_ds, keys, self.pad_id, (dc.max_chunks, dc.max_tokens) if dc.pad_to_max
                             else None, workers, pin_memory=env.device.type == "cuda")
        self.batches = iter(loader)
        return next(self.batches)[2]

    def train_step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches of this rank's slice of the global batch."""
        t_start, cpu_start = time.perf_counter(), time.process_time()  # waiting for the batch is part of the step
        host = self.train_batches()
        counts = [batch_token_counts(b) for b in host]
        loss_sum, denom = self.forward_backward(host)
        grad_norm = self.optimizer_step()
        self.state.step += 1
        self.state.position += self.global_batch
        return StepStats(loss_sum, denom, sum(c[0] for c in counts), sum(c[1] for c in counts), grad_norm,
                         t_start, cpu_start)

    def forward_backward(self, host: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the global batch's mean loss from this rank's micro-batches (collated, on the host);
        the gradients are synchronised over ranks on the last one. (summed loss, the mean's denominator)."""
        env = self.env
        if self.class_weights is None:
            denom = torch.tensor(float(self.global_batch), device=env.device)
        else:  # weighted mean over the whole global batch, not per rank
            denom = sum(self.class_weights[b["labels"].to(env.device)].sum() for b in host)
            dist.all_reduce(denom)
        loss_sum = torch.zeros((), device=env.device)
        for m, hb in enumerate(host):
            batch = move_batch(hb, env.device)
            with grad_sync(self.model, self.plan, sync=(m == len(host) - 1)):
                with self.autocast():
                    ls = self.loss(run_model(self.model, batch), batch["labels"])
                self.scaler.scale(ls * env.world_size / denom).backward()  # DDP/FSDP average gradients over W
            loss_sum += ls.detach()
        return loss_sum, denom

    def optimizer_step(self) -> torch.Tensor:
        """Unscale and clip the gradients, step (fp16: skipped on inf/nan gradients), advance the lr schedule,
        clear the gradients; the gradient norm before clipping (a device tensor: read it on log steps only)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.tc.max_grad_norm)
        if not self.scaler.step(self.optimizer):
            self.state.skipped_steps += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def autocast(self):
        """Forward and loss in the run's precision (none / ddp: autocast; FSDP casts through its policy)."""
        return autocast(self.plan.mixed_precision, self.plan.strategy, self.env.device)

    def log_step(self, st: StepStats):
        """Collective: the step's metrics record (loss over the global batch, both groups' lr, throughput, CPU
        seconds) and the progress display."""
        env, is_cuda = self.env, self.env.device.type == "cuda"
        # CPU seconds this step took in this process (all its threads), summed over ranks: throughput
        # per CPU-second is what a shared machine's wall clock cannot show
        cpu = time.process_time() - st.cpu_start
        stats = torch.tensor([float(st.real_tokens), float(st.padded_tokens), cpu], device=env.device)
        stats = torch.cat([st.loss_sum.reshape(1), stats])
        dist.all_reduce(stats)
        if is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - st.t_start
        loss, lrs = float(stats[0] / st.denom), self.scheduler.get_last_lr()
        by_role = lr_by_role(self.optimizer, lrs)
        # lr: the first group's (the head's; the encoder's when only encoder parameters train)
        self.metrics.write({"step": self.state.step, "epoch": self.state.epoch, "loss": loss, "lr": lrs[0],
                            **{f"lr_{role}": v for role, v in by_role.items()}, "grad_norm": float(st.grad_norm),
                            "samples_per_s": self.global_batch / dt, "tokens_per_s": float(stats[1]) / dt,
                            "padded_tokens_per_s": float(stats[2]) / dt, "step_time_s": dt, "cpu_s": float(stats[3]),
                            "elapsed_s": time.time() - self.t0, **self.device_stats()})
        self.progress.report(self.state.step, self.state.epoch, loss, by_role, self.global_batch / dt)

    def device_stats(self) -> dict:
        """fp16's loss scale and skipped steps; on CUDA the peak memory allocated since the last log step."""
        out = {}
        if self.scaler.enabled:
            out.update(grad_scale=self.scaler.value, skipped_steps=self.state.skipped_steps)
        if self.env.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.env.device)
        return out

    # ---- evaluation and checkpoints
    def eval_due(self, last: bool) -> bool:
        """After the step just taken: every eval_every steps, at each epoch's end (eval_each_epoch), at the last."""
        tc, state = self.tc, self.state
        return self.val_ds is not None and bool((tc.eval_every and state.step % tc.eval_every == 0) or last or (
            tc.eval_each_epoch and state.position + self.global_batch > self.n_train))

    def evaluate(self):
        """Collective: score val on every rank, log it, keep best/ and count towards early stopping."""
        tc, env, state, val_ds = self.tc, self.env, self.state, self.val_ds
        _, _, scores = predict(self.model, val_ds, env.rank, env.world_size, env.device,
                               tc.eval_batch_size or 2 * tc.batch_size, self.pad_id, progress=False,
                               scorer=torch_scorer(self.model, env.device, self.autocast))
        metrics = task_metrics(val_ds.enc.labels, scores, self.pre)
        state.last_eval_step = state.step
        self.evaluation = {"step": state.step, "epoch": state.epoch, "split": "val",
                           **{k: v for k, v in metrics.items() if k != "classes"}}
        self.metrics.write(self.evaluation)
        value = _metric_key(self.cfg, metrics, self.pre.task)
        if not math.isfinite(value):
            log.warning("eval step %d: val %s is undefined (%s; e.g. one class in the val split): not used for "
                        "best-model selection or early stopping", state.step, tc.metric, value)
        log.info("eval step %d: %s", state.step, log_line(metrics))
        if improves(value, state.best_metric, metric_mode_of(self.cfg)):
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
            if tc.select_best:
                self.save_model(self.best_dir, self.evaluation)
        elif math.isfinite(value):
            state.evals_since_best += 1
            if tc.early_stopping_patience and state.evals_since_best >= tc.early_stopping_patience:
                self.stop_reason = f"early stopping: no {tc.metric} improvement in {state.evals_since_best} evaluations"

    def save_model(self, path: str, evaluation: Optional[dict] = None):
        """Collective: gather the full weights, rank 0 writes the consolidated model folder with its model card
        (`evaluation`: the val record of these weights, if they were scored)."""
        sd = ckpt.full_state_dict(self.model)
        if self.env.is_main:
            card = model_card(self.cfg, self.pre, self.spec.fusion, evaluation, self.env.world_size,
                              self.plan.strategy)
            save_artifact(path, sd, self.spec, self.base_model, self.pre, self.tokenizer, self.cfg.to_dict(),
                          extra_files={CARD: card})
        dist.barrier()

    def save(self):
        """Collective: a checkpoint now (what it holds: CheckpointManager.save)."""
        t = time.time()
        self.checkpoints.save(self.state, self.parts)
        self.time_limit.saved(time.time() - t)

    # ---- the run
    def run(self) -> Optional[str]:
        """Steps to the end and finalize (OUTPUT/final); None when stopped early with a checkpoint to resume."""
        self.write_run_files()
        self.progress.start(self.state.step)
        try:
            with Preemption() as preempt:
                finished = self.loop(preempt)
            if not finished:
                return None
        finally:
            self.batches = None  # stops the loader's workers
            self.progress.close()
        if self.stop_reason:
            log.info(self.stop_reason)
        return self.finalize()

    def loop(self, preempt: Preemption) -> bool:
        """Steps until the total or an early stop (True), or until a preemption / the time limit saved the state
        (False)."""
        tc, state, is_cuda = self.tc, self.state, self.env.device.type == "cuda"
        self.time_limit.begin(state.step)
        while state.step < self.total_steps and self.stop_reason is None:
            log_step = (state.step + 1) % tc.log_every == 0 or state.step + 1 == self.total_steps
            if is_cuda and log_step:
                torch.cuda.synchronize()
            stats = self.train_step()
            self.progress.advance()
            if log_step:
                self.log_step(stats)
            last = state.step == self.total_steps
            if self.eval_due(last):
                self.evaluate()
            if self.time_limit.near(state.step):
                preempt.request_stop()
            why = preempt.agreed()
            if why and not last:  # on the last step the run simply finishes: final/ is written
                self.save()
                self.stopped_early(why, preempt.signal_name)
                return False
            if self.checkpoints.due(state.step, last, self.stop_reason is not None):
                self.save()
        return True

    def stopped_early(self, why: str, signal_name: Optional[str]):
        """After the stop's checkpoint: a signal requeues the SLURM job; the time limit just says how to go on."""
        step = self.state.step
        if why == "signal":
            if self.env.is_main:
                requeue_under_slurm()
            log.warning("preempted (%s): saved step %d, exiting", signal_name or "peer signal", step)
        else:
            log.warning("stopped at step %d of %d: train.max_time (%s) would be reached before the next checkpoint; "
                        "saved step %d, rerun with --resume auto to continue", step, self.total_steps,
                        self.tc.max_time, step)

    def finalize(self) -> str:
        """Collective: final/ is best/ (when selected) or the last weights, with train_summary.json."""
        tc, state = self.tc, self.state
        final = os.path.join(self.out, "final")
        use_best = (tc.select_best and state.best_step is not None
                    and os.path.isfile(os.path.join(self.best_dir, WEIGHTS)))
        if tc.select_best and self.val_ds is not None and state.best_step is None:
            log.warning("no evaluation gave a defined val %s: final/ holds the last step's weights", tc.metric)
        if not use_best:
            self.save_model(final, self.evaluation if state.last_eval_step == state.step else None)
        elif self.env.is_main:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.best_dir, tmp, symlinks=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        if self.env.is_main:
            with open(os.path.join(final, "train_summary.json"), "w") as f:
                json.dump(self.summary(), f, indent=1)
            which = (f"best step {state.best_step}, {tc.metric}={state.best_metric:.4f}" if use_best
                     else f"step {state.step}")
            log.info("done in %.0fs: model (%s) saved to %s", time.time() - self.t0, which, final)
        dist.barrier()
        return final

    def summary(self) -> dict:
        """train_summary.json: `epochs` counts the epochs trained in (the last possibly in part), `epoch_progress`
        is the fraction of epochs (2.5: two and a half); `stop_reason` why it ended."""
        state, per_epoch = self.state, self.steps_per_epoch * self.global_batch
        return {"steps": state.step, "epochs": state.epoch + (1 if state.position > 0 else 0),
                "epoch_progress": round(state.epoch + state.position / per_epoch, 4),
                "stop_reason": self.stop_reason or "completed", "best_step": state.best_step,
                "best_metric": state.best_metric, "metric": self.tc.metric, "world_size": self.env.world_size,
                "strategy": self.plan.strategy, "seconds": time.time() - self.t0}
