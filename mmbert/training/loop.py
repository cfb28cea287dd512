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

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from ..artifact import PREPROCESSING, WEIGHTS, build_model, save_artifact
from ..config import Config
from ..data.dataset import batch_token_counts, collate, move_batch
from ..data.pipeline import build_dataset, load_splits, log_label_map
from ..data.preprocess import Preprocessor
from ..data.samplers import epoch_order, micro_batch, steps_per_epoch
from ..data.tokenize import load_tokenizer
from ..distributed import checkpoint as ckpt
from ..distributed.env import DistEnv, cleanup, init_distributed
from ..distributed.parallel import (
    all_reduce_max_flag,
    clip_grad_norm,
    grad_sync,
    parallelize,
    resolve_plan,
)
from ..errors import ConfigError
from ..evaluation.metrics import compute_metrics
from ..evaluation.predict import predict, run_model
from ..models.classifier import ModelSpec, effective_fusion, freeze_word_embeddings
from ..models.text_encoder import position_limit
from .optim import build_optimizer, build_scheduler
from .resume import check_resumable, describe_replan, plan_lr
from .rundir import OutputLock, claim_output_dir, probe_writable

log = logging.getLogger("mmbert")
MIN_FREE = 8 * 2**20  # below this not even the config and logs fit; check_checkpoint_room sizes the real need


# ----------------------------------------------------------------------------- preemption

class Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it (all-reduce MAX) at each step boundary."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

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


class MetricsLog:
    """metrics.jsonl on rank 0; on resume the records after the resumed step are dropped so the step
    count stays continuous."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _metric_key(cfg: Config, metrics: dict) -> float:
    key = cfg.train.metric
    if key not in metrics and key == "val_loss":
        key = "log_loss"
    if key not in metrics:
        options = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ConfigError(f"config key 'train.metric': '{cfg.train.metric}' is not a validation metric ({', '.join(options)})")
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
    check_encoder_fits(cfg)
    env = init_distributed(cfg.dist.timeout_s, cfg.train.num_threads)
    lock = None
    try:
        lock = prepare_output_dir(cfg.train.output_dir, cfg, env)
        return _train(cfg, env)
    finally:
        if lock is not None:
            lock.release()
        cleanup()


def _train(cfg: Config, env: DistEnv) -> Optional[str]:
    t0 = time.time()
    tc, dc = cfg.train, cfg.data
    out = tc.output_dir
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    plan = resolve_plan(cfg.dist, env.device)

    # ---- data: preprocessing fitted on the train split only
    splits = load_splits(dc)
    tokenizer = load_tokenizer(cfg.model.encoder, cfg.model.trust_remote_code)
    train_split = splits["train"]
    pre = Preprocessor.fit(train_split.df, dc, cfg.model.encoder, train_split.file)
    train_ds = build_dataset(pre, tokenizer, train_split.df, train_split.file, with_labels=True, name="train")
    log_label_map(pre, train_ds, train_split.file)
    val_ds = None
    if "val" in splits and len(splits["val"].df):
        val_ds = build_dataset(pre, tokenizer, splits["val"].df, splits["val"].file, with_labels=True, name="val")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if tc.class_weights is not None and len(tc.class_weights) != pre.num_classes:
        raise ConfigError(f"config key 'train.class_weights' has {len(tc.class_weights)} values but label column "
                          f"'{dc.label_column}' has {pre.num_classes} classes {pre.classes}")

    # ---- model: identical initialisation on every rank, then wrapped
    has_tab = bool(dc.numeric_columns or dc.categorical_columns)
    spec = ModelSpec(fusion=effective_fusion(cfg.model.fusion, has_tab), hidden_dim=cfg.model.hidden_dim,
                     num_heads=cfg.model.num_heads, dropout=cfg.model.dropout, pooling=cfg.model.pooling,
                     num_numeric=len(pre.numeric_columns),
                     cardinalities=[len(pre.vocabularies[c]) for c in pre.categorical_columns],
                     cat_embedding_dim=cfg.model.cat_embedding_dim, num_classes=pre.num_classes,
                     encoder=cfg.model.encoder)
    torch.manual_seed(tc.seed)
    model = build_model(spec, cfg.model.encoder, pretrained=True, trust_remote_code=cfg.model.trust_remote_code,
                        attention_dropout=cfg.model.attention_dropout)
    if cfg.model.freeze_word_embeddings:
        frozen = freeze_word_embeddings(model)
        log.info(f"froze the encoder's word embeddings: {frozen:,} parameters")
    base_model = model
    n_params = sum(p.numel() for p in model.parameters())
    check_checkpoint_room(out, model)
    model = parallelize(model, plan, env)
    torch.manual_seed(tc.seed + 1000 * env.rank)  # per-rank dropout streams
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    W, B, A = env.world_size, tc.batch_size, tc.grad_accum
    G = B * W * A
    n = len(train_ds)
    spe = steps_per_epoch(n, G)
    if spe == 0:
        raise ConfigError(f"the train split has {n} rows, fewer than one global batch "
                          f"(batch_size {B} x world size {W} x grad_accum {A} = {G}); lower train.batch_size")
    total_steps = tc.max_steps or tc.epochs * spe
    optimizer = build_optimizer(model, tc)
    run_cfg = cfg.to_dict()
    run_cfg["model"]["fusion"] = spec.fusion  # what was built, the key a resume is checked against

    # ---- resume: the checkpoint's config checked first, then weights, optimizer, loop state, best/
    state, saved = TrainState(), {}
    ckpt_root = os.path.join(out, "checkpoints")
    resume_path = resume_path_for(tc, ckpt_root)
    if resume_path:
        state, saved = restore(resume_path, model, optimizer, run_cfg, env, os.path.join(out, "best"))
        if not saved.get("rng_restored"):
            torch.manual_seed(tc.seed + 1000 * env.rank + 7919 * state.step)
        if state.position + G > n:  # the saved epoch ended (or the new world size's batch doesn't fit)
            state.epoch, state.position = state.epoch + 1, 0
        log.info("resumed from %s at step %d (epoch %d, position %d; saved on %d ranks, now %d)",
                 resume_path, state.step, state.epoch, state.position, saved.get("world_size"), W)
    lr_plan = plan_lr(tc, total_steps, saved.get("lr_plan"), saved.get("config"))
    scheduler = build_scheduler(optimizer, lr_plan, state.step)
    replan = describe_replan(saved.get("lr_plan"), lr_plan, state.step, scheduler.get_last_lr()[0])
    if replan:
        log.info(replan)
    mlog = MetricsLog(os.path.join(out, "metrics.jsonl"), env.is_main, state.step if resume_path else None)
    if env.is_main:
        resolved = cfg.to_dict()
        resolved["dist"].update(plan.__dict__)
        resolved["model"]["fusion"] = spec.fusion
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(resolved, f, sort_keys=False)
        pre.save(os.path.join(out, PREPROCESSING))
        log.info("launcher=%s world=%d device=%s strategy=%s threads=%d | %d params | train %d rows, val %d rows | "
                 "%d steps/epoch of %d samples, %d steps total", env.launcher, W, env.device, plan.strategy,
                 torch.get_num_threads(), n_params, n, len(val_ds) if val_ds else 0, spe, G, total_steps)

    weights = torch.tensor(tc.class_weights, dtype=torch.float32, device=env.device) if tc.class_weights else None
    preempt = Preemption()
    lengths = train_ds.lengths if tc.bucket_by_length else None
    order_epoch, order = -1, None
    bar = None
    if env.is_main and tc.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    stop_reason = None

    def evaluate_now():
        nonlocal stop_reason
        if val_ds is None:
            return
        _, _, probs = predict(model, val_ds, env.rank, W, env.device, tc.eval_batch_size or 2 * B, pad_id,
                              progress=False)
        metrics = compute_metrics(val_ds.enc.labels, probs, pre.class_names)
        state.last_eval_step = state.step
        record = {"step": state.step, "epoch": state.epoch, "split": "val",
                  **{k: v for k, v in metrics.items() if k != "classes"}}
        mlog.write(record)
        value = _metric_key(cfg, metrics)
        better = improves(value, state.best_metric, tc.metric_mode)
        if not math.isfinite(value):
            log.warning("eval step %d: val %s is undefined (%s; e.g. one class in the val split): not used for "
                        "best-model selection or early stopping", state.step, tc.metric, value)
        log.info("eval step %d: %s", state.step, " ".join(
            f"{k}={metrics[k]:.4f}" for k in ("log_loss", "accuracy", "f1", "f1_macro", "roc_auc", "pr_auc")
            if isinstance(metrics.get(k), float)))
        if better:
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
            if tc.select_best:
                sd = ckpt.full_state_dict(model)
                if env.is_main:
                    save_artifact(os.path.join(out, "best"), sd, spec, base_model, pre, tokenizer, cfg.to_dict())
                dist.barrier()
        elif math.isfinite(value):
            state.evals_since_best += 1
            if tc.early_stopping_patience and state.evals_since_best >= tc.early_stopping_patience:
                stop_reason = f"early stopping: no {tc.metric} improvement in {state.evals_since_best} evaluations"

    def save(step_state: TrainState):
        ckpt.save_checkpoint(ckpt_root, step_state.step, model, optimizer,
                             {**step_state.to_dict(), "lr_plan": lr_plan.to_dict(), "config": run_cfg,
                              "snapshots": ["best"]},
                             tc.keep_checkpoints, env.rank, with_dirs={"best": os.path.join(out, "best")})

    is_cuda = env.device.type == "cuda"
    pad_to = (dc.max_chunks, dc.max_tokens) if dc.pad_to_max else None
    while state.step < total_steps and stop_reason is None:
        if state.position + G > n:
            state.epoch, state.position = state.epoch + 1, 0
        if order_epoch != state.epoch:
            order = epoch_order(n, state.epoch, tc.seed, lengths, tc.bucket_block)
            order_epoch = state.epoch
        log_step = (state.step + 1) % tc.log_every == 0 or state.step + 1 == total_steps
        if is_cuda and log_step:
            torch.cuda.synchronize()
        t_step, c_step = time.perf_counter(), time.process_time()
        host = [collate(train_ds, micro_batch(order, state.position, m, env.rank, W, B), pad_id, pad_to)
                for m in range(A)]
        real_tok = sum(batch_token_counts(b)[0] for b in host)
        pad_tok = sum(batch_token_counts(b)[1] for b in host)
        if weights is None:
            denom = torch.tensor(float(G), device=env.device)
        else:  # weighted mean over the whole global batch, not per rank
            denom = sum(weights[b["labels"].to(env.device)].sum() for b in host)
            dist.all_reduce(denom)
        loss_sum = torch.zeros((), device=env.device)
        for m, hb in enumerate(host):
            batch = move_batch(hb, env.device)
            with grad_sync(model, plan, sync=(m == A - 1)):
                logits = run_model(model, batch)
                ls = F.cross_entropy(logits.float(), batch["labels"], weight=weights, reduction="sum")
                (ls * W / denom).backward()  # DDP/FSDP average gradients over W ranks
            loss_sum += ls.detach()
        grad_norm = clip_grad_norm(params, tc.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.position += G
        if bar is not None:
            bar.update(1)
        if log_step:
            # CPU seconds this step took in this process (all its threads), summed over ranks: throughput
            # per CPU-second is what a shared machine's wall clock cannot show
            cpu = time.process_time() - c_step
            stats = torch.tensor([float(real_tok), float(pad_tok), cpu], device=env.device)
            stats = torch.cat([loss_sum.reshape(1), stats])
            dist.all_reduce(stats)
            if is_cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_step
            loss = float(stats[0] / denom)
            record = {"step": state.step, "epoch": state.epoch, "loss": loss,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "samples_per_s": G / dt, "tokens_per_s": float(stats[1]) / dt,
                      "padded_tokens_per_s": float(stats[2]) / dt, "step_time_s": dt, "cpu_s": float(stats[3]),
                      "elapsed_s": time.time() - t0}
            mlog.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", sps=f"{G / dt:.1f}")
        epoch_done = state.position + G > n
        last = state.step == total_steps
        if val_ds is not None and ((tc.eval_every and state.step % tc.eval_every == 0)
                                   or (epoch_done and tc.eval_each_epoch) or last):
            evaluate_now()
        if all_reduce_max_flag(preempt.requested, env.device):
            save(state)
            if env.is_main:
                requeue_under_slurm()
            log.warning("preempted (%s): saved step %d, exiting", preempt.signal_name or "peer signal", state.step)
            if bar is not None:
                bar.close()
            return None
        if last or stop_reason or (tc.checkpoint_every and state.step % tc.checkpoint_every == 0):
            save(state)
    if bar is not None:
        bar.close()
    if stop_reason:
        log.info(stop_reason)

    # ---- the consolidated artifact (collective gather, rank 0 writes)
    final = os.path.join(out, "final")
    best = os.path.join(out, "best")
    use_best = tc.select_best and state.best_step is not None and os.path.isfile(os.path.join(best, WEIGHTS))
    if tc.select_best and val_ds is not None and state.best_step is None:
        log.warning("no evaluation gave a defined val %s: final/ holds the last step's weights", tc.metric)
    sd = None if use_best else ckpt.full_state_dict(model)
    if env.is_main:
        if use_best:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(best, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        else:
            save_artifact(final, sd, spec, base_model, pre, tokenizer, cfg.to_dict())
        with open(os.path.join(final, "train_summary.json"), "w") as f:
            json.dump({"steps": state.step, "epochs": state.epoch, "best_step": state.best_step,
                       "best_metric": state.best_metric, "metric": tc.metric, "world_size": W,
                       "strategy": plan.strategy, "seconds": time.time() - t0}, f, indent=1)
        which = f"best step {state.best_step}, {tc.metric}={state.best_metric:.4f}" if use_best else f"step {state.step}"
        log.info("done in %.0fs: model (%s) saved to %s", time.time() - t0, which, final)
    dist.barrier()
    return final
