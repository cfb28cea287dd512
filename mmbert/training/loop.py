"""The training loop: one code path for strategies none / ddp / fsdp, one process or many."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..artifact import PREPROCESSING, WEIGHTS, save_artifact
from ..assembly import build_run_model, model_spec
from ..config import Config
from ..data.dataset import batch_token_counts, move_batch
from ..data.loader import default_workers, step_keys, step_loader
from ..data.samplers import epoch_order, step_start, steps_per_epoch
from ..distributed import checkpoint as ckpt
from ..distributed.env import DistEnv, cleanup, init_distributed
from ..distributed.precision import LossScaler, autocast
from ..distributed.parallel import (
    auto_reason,
    clip_grad_norm,
    grad_sync,
    parallelize,
    resolve_plan,
)
from ..errors import ConfigError
from ..metrics import log_line, metric_row, task_metrics
from ..models.text_encoder import position_limit
from ..scoring import predict, run_model, torch_scorer
from ..task import loss_function, metric_mode_of, metric_of
from .optim import build_optimizer, build_scheduler
from .resume import check_resumable, describe_replan, plan_lr, resumed_run_data
from .rundir import OutputLock, claim_output_dir, probe_writable
from .tracking import MetricsLog, build_trackers

log = logging.getLogger("mmbert")
MIN_FREE = 8 * 2**20  # below this not even the config and logs fit; check_checkpoint_room sizes the real need


# ----------------------------------------------------------------------------- preemption

class Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it (all-reduce MAX) one step boundary later."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self.previous = {}
        self.exchange = None  # the flag all-reduce started at the last step boundary, and its tensor

    def __enter__(self) -> "Preemption":
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, exc_type, *exc):
        # the caller's handlers back: after mmbert.train() in a notebook or service, SIGTERM ends it again
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.exchange is not None and exc_type is None:
            self.exchange[0].wait()  # every rank started it: finish it before the group is used otherwise

    def agreed(self) -> bool:
        """Collective, at every step boundary on every rank: whether any rank had been signalled by the previous
        boundary. The flags travel asynchronously (a CPU tensor over gloo): the exchange started at step k is
        waited for at step k+1, so no rank waits on the slowest each step, and every rank acts at one step."""
        previous = self.exchange
        flag = torch.tensor([1.0 if self.requested else 0.0])
        self.exchange = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        if previous is None:
            return False
        work, seen = previous
        work.wait()
        return bool(seen.item() > 0)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def requeue_under_slurm():
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:  # a cancelled / timed-out job is already ending on purpose (state no longer RUNNING): don't requeue it
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
        state = r.stdout.split("JobState=", 1)[1].split()[0] if r.returncode == 0 and "JobState=" in r.stdout else ""
        if state and state != "RUNNING":
            log.warning("SLURM job %s is %s, not requeueing it (resubmit with --resume auto to continue)", job, state)
            return False
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if r.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, r.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


# ----------------------------------------------------------------------------- output dir

def prepare_output_dir(out: str, cfg: Config, env: DistEnv) -> OutputLock:
    """Collective: a writable directory with room, locked for this run, holding no other run's state."""
    probe_writable(out, env.rank)
    free = shutil.disk_usage(out).free
    if free < MIN_FREE:
        raise ConfigError(f"output directory {out} has only {free / 2**20:.0f} MiB free; checkpoints need more")
    return claim_output_dir(out, cfg, env.rank, env.device)


def check_checkpoint_room(out: str, model):
    """Before step 1: room for one checkpoint (weights + two AdamW moments, fp32) and one model folder."""
    need = 4 * 4 * sum(p.numel() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(f"output directory {out} has {free / 2**20:.0f} MiB free; a checkpoint and a model of "
                          f"this size need ~{need / 2**20:.0f} MiB")


def check_encoder_fits(cfg: Config):
    """max_tokens against the encoder's position table, before any data is read (else: a shape error at step 1)."""
    if cfg.model.fusion == "tab_only":
        return
    from transformers import AutoConfig

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


def resume_path_for(tc, ckpt_root: str) -> Optional[str]:
    if tc.resume == "auto":
        path = ckpt.find_latest(ckpt_root)
        if path is None:
            log.info("--resume auto: no complete checkpoint in %s, starting fresh", ckpt_root)
        return path
    return tc.resume or None


def restore(path: str, model, optimizer, cfg_dict: dict, env: DistEnv, best_dir: str) -> tuple[TrainState, dict]:
    """Check the checkpoint's config against this run's (before touching weights), then load it."""
    saved = ckpt.read_train_state(path)
    applied = check_resumable(saved.get("config"), cfg_dict, path)
    if applied:
        log.info("resume: applying changed %s", "; ".join(applied))
    configured = [{k: g[k] for k in ("lr", "weight_decay")} for g in optimizer.param_groups]
    ts = ckpt.load_checkpoint(path, model, optimizer, env.rank)
    for g, conf in zip(optimizer.param_groups, configured):
        g.update(conf)  # the optimizer state restores the saved lr / decay: this run's config wins
    if env.is_main and "best" in ts.get("snapshots", []):
        ckpt.restore_dir(path, "best", best_dir)
    dist.barrier()
    return TrainState.from_dict(ts), ts


# ----------------------------------------------------------------------------- the run

def train(cfg: Config) -> Optional[str]:
    """OUTPUT/final (with train.seeds: OUTPUT, holding the members and ensemble.json); None when preempted."""
    check_encoder_fits(cfg)
    env = init_distributed(cfg.dist.timeout_s, cfg.train.num_threads)
    try:
        if cfg.train.seeds:
            from .seeds import train_members

            return train_members(cfg, env)
        return train_in(cfg, env)
    finally:
        cleanup(env)


def train_in(cfg: Config, env: DistEnv) -> Optional[str]:
    """One run in its locked output directory, in an initialised process group."""
    lock = prepare_output_dir(cfg.train.output_dir, cfg, env)
    try:
        return _train(cfg, env)
    finally:
        lock.release()


def _train(cfg: Config, env: DistEnv) -> Optional[str]:
    trainer = Trainer(cfg, env)
    try:
        return trainer.run()
    finally:
        if trainer.mlog is not None:
            trainer.mlog.close()  # flush the experiment trackers, also when training raised


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
    """One training run, in named steps: build_data -> build_model -> restore -> (train_step, log_step,
    maybe_evaluate, save) per step -> finalize. Its loop state is one TrainState, saved and restored whole."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env, self.tc = cfg, env, cfg.train
        self.t0 = time.time()
        self.out = cfg.train.output_dir
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.best_dir = os.path.join(self.out, "best")
        if self.tc.deterministic:
            torch.use_deterministic_algorithms(True)
        self.plan = resolve_plan(cfg.dist, env.device, env.world_size, compile=cfg.train.compile)
        self.scaler = LossScaler(self.plan.mixed_precision, self.plan.strategy, env.device)
        self.state = TrainState()
        self.stop_reason: Optional[str] = None
        self.orders: dict[int, np.ndarray] = {}  # epoch -> global order (this one and the loader's next)
        self.batches = None  # the step loader's iterator (train_batches)
        self.bar = None  # rank 0's progress bar, during run()
        self.mlog: Optional[MetricsLog] = None  # metrics.jsonl and the trackers, from restore() on

    # ---- building the run
    def build_data(self):
        """Preprocessing fitted on the train split only (resuming: the checkpoint's); tokenized train / val datasets."""
        tc, dc = self.tc, self.cfg.data
        self.resume_path = resume_path_for(tc, self.ckpt_root)
        data, self.data_files = resumed_run_data(self.cfg, self.env, self.resume_path)
        self.tokenizer, self.pre, self.train_ds, self.val_ds = data.tokenizer, data.pre, data.train, data.val
        self.pad_id = data.pad_id
        pre = self.pre
        if tc.class_weights is not None and len(tc.class_weights) != pre.num_classes:
            raise ConfigError(f"config key 'train.class_weights' has {len(tc.class_weights)} values but label column "
                              f"'{dc.label_column}' has {pre.num_classes} classes {pre.classes}")
        self.class_weights = (torch.tensor(tc.class_weights, dtype=torch.float32, device=self.env.device)
                              if tc.class_weights else None)
        self.loss = loss_function(self.cfg, pre, self.class_weights)  # (outputs, labels) -> summed loss

    def build_model(self):
        """Identical initialisation on every rank, then wrapped; the optimizer over the wrapped parameters."""
        env = self.env
        self.spec = model_spec(self.cfg, self.pre)
        model = build_run_model(self.cfg, self.spec)
        self.base_model = model
        self.n_params = sum(p.numel() for p in model.parameters())
        check_checkpoint_room(self.out, model)
        self.model = parallelize(model, self.plan, env)
        torch.manual_seed(self.tc.seed + 1000 * env.rank)  # per-rank dropout streams
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.tc)
        self.run_cfg = self.cfg.to_dict()
        self.run_cfg["model"]["fusion"] = self.spec.fusion  # what was built, the key a resume is checked against

    def plan_steps(self):
        tc, W = self.tc, self.env.world_size
        self.G = tc.batch_size * W * tc.grad_accum
        self.n = len(self.train_ds)
        self.spe = steps_per_epoch(self.n, self.G)
        if self.spe == 0:
            raise ConfigError(f"the train split has {self.n} rows, fewer than one global batch (batch_size "
                              f"{tc.batch_size} x world size {W} x grad_accum {tc.grad_accum} = {self.G}); lower "
                              f"train.batch_size")
        self.total_steps = tc.max_steps or tc.epochs * self.spe

    def restore(self):
        """The checkpoint's config checked first, then weights, optimizer, loop state, best/; then the lr plan
        (re-planned over a changed total) and the metrics log cut back to the resumed step."""
        tc, env = self.tc, self.env
        saved: dict = {}
        resume_path = self.resume_path  # the checkpoint whose preprocessing build_data applied
        if resume_path:
            self.state, saved = restore(resume_path, self.model, self.optimizer, self.run_cfg, env, self.best_dir)
            state = self.state
            self.scaler.load_state_dict(saved.get("grad_scaler"))
            if not saved.get("rng_restored"):
                torch.manual_seed(tc.seed + 1000 * env.rank + 7919 * state.step)
            # the saved epoch ended (or the new world size's batch doesn't fit)
            state.epoch, state.position = step_start(state.epoch, state.position, self.n, self.G)
            log.info("resumed from %s at step %d (epoch %d, position %d; saved on %d ranks, now %d)",
                     resume_path, state.step, state.epoch, state.position, saved.get("world_size"), env.world_size)
        self.lr_plan = plan_lr(tc, self.total_steps, saved.get("lr_plan"), saved.get("config"))
        self.scheduler = build_scheduler(self.optimizer, self.lr_plan, self.state.step)
        replan = describe_replan(saved.get("lr_plan"), self.lr_plan, self.state.step, self.scheduler.get_last_lr()[0])
        if replan:
            log.info(replan)
        resume_step = self.state.step if resume_path else None
        self.mlog = MetricsLog(os.path.join(self.out, "metrics.jsonl"), env.is_main, resume_step,
                               build_trackers(self.cfg, env.is_main, resume_step))

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
        self.mlog.log_config(resolved)
        self.pre.save(os.path.join(self.out, PREPROCESSING))
        runs = plan.describe()
        if self.cfg.dist.strategy in (None, "auto"):
            chosen = f"strategy={plan.strategy} (auto: {auto_reason(env.world_size)})"
            runs = runs.replace(f"strategy={plan.strategy}", chosen, 1)
        log.info("launcher=%s world=%d device=%s %s threads=%d | %d params | train %d rows, val %d rows | "
                 "%d steps/epoch of %d samples, %d steps total", env.launcher, env.world_size, env.device,
                 runs, torch.get_num_threads(), self.n_params, self.n,
                 len(self.val_ds) if self.val_ds else 0, self.spe, self.G, self.total_steps)

    # ---- one step
    def order_of(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s global order (world-size independent); kept for this epoch and the next."""
        if epoch not in self.orders:
            tc = self.tc
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = epoch_order(self.n, epoch, tc.seed, self.train_ds.lengths if tc.bucket_by_length
                                             else None, tc.bucket_block)
        return self.orders[epoch]

    def epoch_order(self):
        """This epoch's global order, advancing the epoch when it is used up."""
        state = self.state
        state.epoch, state.position = step_start(state.epoch, state.position, self.n, self.G)
        return self.order_of(state.epoch)

    def train_batches(self) -> list[dict]:
        """This rank's collated micro-batches of the state's step: from the step loader (its workers collate
        ahead), restarted at the state's (epoch, position) when its next item is not that step."""
        env, tc, dc, state = self.env, self.tc, self.cfg.data, self.state
        self.epoch_order()
        if self.batches is not None:
            epoch, position, host = next(self.batches)
            if (epoch, position) == (state.epoch, state.position):
                return host
        keys = step_keys(state.epoch, state.position, self.n, self.G, self.order_of, env.rank, env.world_size,
                         tc.batch_size, tc.grad_accum)
        workers = default_workers(env.device) if tc.num_workers is None else tc.num_workers
        loader = step_loader(self.train_ds, keys, self.pad_id, (dc.max_chunks, dc.max_tokens) if dc.pad_to_max
                             else None, workers, pin_memory=env.device.type == "cuda")
        self.batches = iter(loader)
        return next(self.batches)[2]

    def train_step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches of this rank's slice of the global batch."""
        env, tc, state = self.env, self.tc, self.state
        t_start, cpu_start = time.perf_counter(), time.process_time()  # waiting for the batch is part of the step
        host = self.train_batches()
        counts = [batch_token_counts(b) for b in host]
        weights = self.class_weights
        if weights is None:
            denom = torch.tensor(float(self.G), device=env.device)
        else:  # weighted mean over the whole global batch, not per rank
            denom = sum(weights[b["labels"].to(env.device)].sum() for b in host)
            dist.all_reduce(denom)
        loss_sum = torch.zeros((), device=env.device)
        for m, hb in enumerate(host):
            batch = move_batch(hb, env.device)
            with grad_sync(self.model, self.plan, sync=(m == tc.grad_accum - 1)):
                with self.autocast():
                    ls = self.loss(run_model(self.model, batch), batch["labels"])
                self.scaler.scale(ls * env.world_size / denom).backward()  # DDP/FSDP average gradients over W
            loss_sum += ls.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, tc.max_grad_norm)
        if not self.scaler.step(self.optimizer):
            state.skipped_steps += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.position += self.G
        return StepStats(loss_sum, denom, sum(c[0] for c in counts), sum(c[1] for c in counts), grad_norm,
                         t_start, cpu_start)

    def autocast(self):
        """Forward and loss in the run's precision (none / ddp: autocast; FSDP casts through its policy)."""
        return autocast(self.plan.mixed_precision, self.plan.strategy, self.env.device)

    def log_step(self, st: StepStats):
        """Collective: the step's metrics record (loss over the global batch, throughput, CPU seconds)."""
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
        loss = float(stats[0] / st.denom)
        self.mlog.write({"step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                         "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(st.grad_norm),
                         "samples_per_s": self.G / dt, "tokens_per_s": float(stats[1]) / dt,
                         "padded_tokens_per_s": float(stats[2]) / dt, "step_time_s": dt, "cpu_s": float(stats[3]),
                         "elapsed_s": time.time() - self.t0, **self.device_stats()})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{self.G / dt:.1f}")

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
    def evaluate(self):
        """Collective: score val on every rank, log it, keep best/ and count towards early stopping."""
        tc, env, state, val_ds = self.tc, self.env, self.state, self.val_ds
        _, _, scores = predict(self.model, val_ds, env.rank, env.world_size, env.device,
                              tc.eval_batch_size or 2 * tc.batch_size, self.pad_id, progress=False,
                              scorer=torch_scorer(self.model, env.device, self.autocast))
        metrics = task_metrics(val_ds.enc.labels, scores, self.pre)
        state.last_eval_step = state.step
        self.mlog.write({"step": state.step, "epoch": state.epoch, "split": "val",
                         **{k: v for k, v in metrics.items() if k != "classes"}})
        value = _metric_key(self.cfg, metrics, self.pre.task)
        if not math.isfinite(value):
            log.warning("eval step %d: val %s is undefined (%s; e.g. one class in the val split): not used for "
                        "best-model selection or early stopping", state.step, tc.metric, value)
        log.info("eval step %d: %s", state.step, log_line(metrics))
        if improves(value, state.best_metric, metric_mode_of(self.cfg)):
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
            if tc.select_best:
                self.save_model(self.best_dir)
        elif math.isfinite(value):
            state.evals_since_best += 1
            if tc.early_stopping_patience and state.evals_since_best >= tc.early_stopping_patience:
                self.stop_reason = f"early stopping: no {tc.metric} improvement in {state.evals_since_best} evaluations"

    def save_model(self, path: str):
        """Collective: gather the full weights, rank 0 writes the consolidated model folder."""
        sd = ckpt.full_state_dict(self.model)
        if self.env.is_main:
            save_artifact(path, sd, self.spec, self.base_model, self.pre, self.tokenizer, self.cfg.to_dict())
        dist.barrier()

    def save(self):
        """Collective: a checkpoint of the whole TrainState, the lr plan, the config and best/ as it is now."""
        ckpt.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                             {**self.state.to_dict(), "lr_plan": self.lr_plan.to_dict(), "config": self.run_cfg,
                              "snapshots": ["best"], "grad_scaler": self.scaler.state_dict(),
                              "preprocessing": self.pre.to_dict(), "data_files": self.data_files},
                             self.tc.keep_checkpoints, self.env.rank, with_dirs={"best": self.best_dir})

    # ---- the run
    def run(self) -> Optional[str]:
        self.build_data()
        self.build_model()
        self.plan_steps()
        self.restore()
        self.write_run_files()
        if self.env.is_main and self.tc.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                            dynamic_ncols=True)
        try:
            with Preemption() as preempt:
                finished = self.loop(preempt)
            if not finished:
                return None
        finally:
            self.batches = None  # stops the loader's workers
            if self.bar is not None:
                self.bar.close()
        if self.stop_reason:
            log.info(self.stop_reason)
        return self.finalize()

    def loop(self, preempt: Preemption) -> bool:
        """Steps until the total or an early stop (True), or until a preemption saved the state (False)."""
        tc, state, is_cuda = self.tc, self.state, self.env.device.type == "cuda"
        while state.step < self.total_steps and self.stop_reason is None:
            log_step = (state.step + 1) % tc.log_every == 0 or state.step + 1 == self.total_steps
            if is_cuda and log_step:
                torch.cuda.synchronize()
            stats = self.train_step()
            if self.bar is not None:
                self.bar.update(1)
            if log_step:
                self.log_step(stats)
            last = state.step == self.total_steps
            if self.val_ds is not None and ((tc.eval_every and state.step % tc.eval_every == 0)
                                            or (state.position + self.G > self.n and tc.eval_each_epoch) or last):
                self.evaluate()
            if preempt.agreed():
                self.save()
                if self.env.is_main:
                    requeue_under_slurm()
                log.warning("preempted (%s): saved step %d, exiting", preempt.signal_name or "peer signal", state.step)
                return False
            if last or self.stop_reason or (tc.checkpoint_every and state.step % tc.checkpoint_every == 0):
                self.save()
        return True

    def finalize(self) -> str:
        """Collective: final/ is best/ (when selected) or the last weights, with train_summary.json."""
        tc, state = self.tc, self.state
        final = os.path.join(self.out, "final")
        use_best = (tc.select_best and state.best_step is not None
                    and os.path.isfile(os.path.join(self.best_dir, WEIGHTS)))
        if tc.select_best and self.val_ds is not None and state.best_step is None:
            log.warning("no evaluation gave a defined val %s: final/ holds the last step's weights", tc.metric)
        if not use_best:
            self.save_model(final)
        elif self.env.is_main:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.best_dir, tmp, symlinks=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        if self.env.is_main:
            with open(os.path.join(final, "train_summary.json"), "w") as f:
                json.dump({"steps": state.step, "epochs": state.epoch, "best_step": state.best_step,
                           "best_metric": state.best_metric, "metric": tc.metric, "world_size": self.env.world_size,
                           "strategy": self.plan.strategy, "seconds": time.time() - self.t0}, f, indent=1)
            which = (f"best step {state.best_step}, {tc.metric}={state.best_metric:.4f}" if use_best
                     else f"step {state.step}")
            log.info("done in %.0fs: model (%s) saved to %s", time.time() - self.t0, which, final)
        dist.barrier()
        return final
