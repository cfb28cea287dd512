#!/usr/bin/env python
"""The seed design's training step as a plain torch DDP script: the baseline of throughput.py's `seed` mode.

The project began as a Lightning script: the same encoder and head, every text padded to max_tokens in one
chunk, random batches, DDP with its defaults (gradients copied into buckets), plain AdamW (torch's default
per-parameter loop on CPU, one learning rate). This is that step without Lightning, whose loop only adds
host work, on the rows of train.py's fixed128 mode (the same global order), so mmbert's modes are compared
with it in one run on any machine. It writes OUTPUT/metrics.jsonl in train.py's format (step,
samples_per_s, tokens_per_s, padded_tokens_per_s, step_time_s, cpu_s) for throughput.py to read.

    torchrun --nproc_per_node 2 benchmarks/seed_ddp.py --config womens_clothing --output-dir OUT \\
        --max-steps 12 --batch-size 16 --max-tokens 128 --seed 42 [--max-train-rows N] [--set K=V ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="womens_clothing")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-train-rows", type=int)
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="config overrides (YAML values)")
    return p.parse_args()


def build(a, env):
    """The shipped model and train rows, through mmbert's own run assembly (so the same weights and tokens)."""
    import yaml

    from mmbert.assembly import build_run_data, build_run_model, model_spec
    from mmbert.config import load_config

    over = [("data.max_tokens", a.max_tokens), ("data.max_chunks", 1), ("train.seed", a.seed),
            ("train.batch_size", a.batch_size)] + [(k, yaml.safe_load(v)) for k, v in (s.split("=", 1) for s in a.set)]
    if a.max_train_rows:
        over.append(("data.max_train_rows", a.max_train_rows))
    cfg = load_config(a.config, over)
    data = build_run_data(cfg, with_val=False, env=env)
    return cfg, data, build_run_model(cfg, model_spec(cfg, data.pre))


def seed_parallel(model, cfg):
    """The seed's step around `model`: DDP with its defaults, in training mode, and torch's AdamW with one
    learning rate (its default per-parameter loop on CPU). benchmarks/profile_dist.py's `seed` uses it too (with
    seed_forward_backward / seed_optimizer_step): a deliberately different baseline, not mmbert's step."""
    ddp = DDP(model)
    ddp.train()  # from_pretrained leaves the encoder in eval mode (no dropout); Lightning's fit loop trains
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    return ddp, opt


def seed_forward_backward(ddp, batch) -> torch.Tensor:
    """The seed's forward and backward: mean cross-entropy of the rank's batch (DDP averages the gradients)."""
    from mmbert.scoring import run_model

    loss = F.cross_entropy(run_model(ddp, batch).float(), batch["labels"])
    loss.backward()
    return loss.detach()


def seed_optimizer_step(opt):
    """The seed's update: no clipping, no schedule."""
    opt.step()
    opt.zero_grad(set_to_none=True)


def main():
    from mmbert.data.dataset import batch_token_counts, collate
    from mmbert.data.samplers import epoch_order, micro_batch
    from mmbert.distributed.env import cleanup, init_distributed

    a = parse_args()
    env = init_distributed(1800)
    cfg, data, model = build(a, env)
    torch.manual_seed(a.seed + 1000 * env.rank)
    ddp, opt = seed_parallel(model, cfg)
    ds, W, B = data.train, env.world_size, a.batch_size
    order = epoch_order(len(ds), 0, a.seed)  # random batches: train.py's order without bucketing
    os.makedirs(a.output_dir, exist_ok=True)
    log = open(os.path.join(a.output_dir, "metrics.jsonl"), "w") if env.is_main else None
    for step in range(a.max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collate(ds, micro_batch(order, step * B * W, 0, env.rank, W, B), data.pad_id, (1, a.max_tokens))
        real, padded = batch_token_counts(batch)
        loss = seed_forward_backward(ddp, batch)
        seed_optimizer_step(opt)
        stats = torch.tensor([float(loss), real, padded, time.process_time() - c0])
        dist.all_reduce(stats)
        dt = time.perf_counter() - t0
        if log:
            log.write(json.dumps({"step": step + 1, "loss": float(stats[0]) / W, "samples_per_s": B * W / dt,
                                  "tokens_per_s": float(stats[1]) / dt, "padded_tokens_per_s": float(stats[2]) / dt,
                                  "step_time_s": dt, "cpu_s": float(stats[3])}) + "\n")
            log.flush()
    if log:
        log.close()
    cleanup()


if __name__ == "__main__":
    main()
