#!/usr/bin/env python
"""Per-rank training-state memory and peak RSS for strategy none (1 rank), ddp (2), fsdp (2; full shard
and shard-grad-op), with the real encoder after one real optimizer step on the shipped data (peak RSS after --steps steps).

    python benchmarks/memory.py                      # all four, table + benchmarks/results/memory.json
    python benchmarks/memory.py --configs fsdp_full  # one

Each configuration runs in its own torchrun job (this script in --worker mode). The worker follows
train.py: init_distributed, then a Trainer over build_run's parts (data, pretrained model, parallelize, AdamW),
and the Trainer's own forward_backward + optimizer_step on a real batch, and reads
  * parameter / gradient / optimizer-state bytes of the tensors this rank holds (DTensor.to_local()
    for FSDP, so shards count only their local part), taken after optimizer.step() before zero_grad;
  * peak RSS (ru_maxrss) and RSS at each phase, to see what dominates it.

With glibc's default (dynamic) mmap threshold, freed activation buffers stay in the heap, and FSDP's
long-lived shards (optimizer state, < 32 MiB each) land between them: peak RSS then measures heap
fragmentation as much as live memory. --mmap-threshold 4194304 shows the live-memory picture.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIGS = {  # name -> (world size, strategy, sharding)
    "none": (1, "none", None),
    "ddp": (2, "ddp", None),
    "fsdp_full": (2, "fsdp", "full"),
    "fsdp_shard_grad_op": (2, "fsdp", "shard_grad_op"),
}


def worker(a):
    phases = {}

    def mark(name):
        phases[name] = {"rss_mb": common.rss_bytes() / 2**20, "peak_rss_mb": common.peak_rss_bytes() / 2**20}

    import torch
    import torch.distributed as dist

    from mmbert.config import load_config
    from mmbert.data.dataset import collate
    from mmbert.data.samplers import micro_batch
    from mmbert.distributed.env import cleanup, init_distributed
    from mmbert.distributed.parallel import unwrap
    mark("imports")

    over = [("dist.strategy", a.strategy), ("data.max_eval_rows", 1), ("train.overwrite", True),
            ("train.output_dir", a.part + ".run")]
    if a.sharding:
        over.append(("dist.sharding", a.sharding))
    if a.rows:
        over.append(("data.max_train_rows", a.rows))
    for kv in a.set:
        k, v = kv.split("=", 1)
        over.append((k, __import__("yaml").safe_load(v)))
    cfg = load_config(a.config, over)
    env = init_distributed(cfg.dist.timeout_s, cfg.train.num_threads)
    t = common.trainer(cfg, env)  # data, pretrained model, parallelize, AdamW: as train.py builds them
    plan, model, ds = t.plan, t.model, t.train_ds
    mark("build_run")
    # global shapes (a DTensor's numel is the full tensor's)
    full_param_bytes = sum(p.numel() * p.element_size() for p in unwrap(model).parameters())
    B, W = cfg.train.batch_size, env.world_size
    # the longest micro-batch of the first 20 steps: peak activations, as in a real epoch
    cands = [micro_batch(t.order_of(0), s * B * W, 0, env.rank, W, B) for s in range(min(20, t.steps_per_epoch))]
    idx = max(cands, key=lambda i: int(ds.lengths[i].max()) * len(i))
    batch = collate(ds, idx, t.pad_id)
    sizes = None
    for _ in range(a.steps):
        t.forward_backward([batch])  # the Trainer's own step on that batch
        gb = sum(common.local_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        t.optimizer_step()
        if sizes is None:  # after the first real optimizer step (gradients: as they were before it cleared them)
            pb = sum(common.local_nbytes(p) for p in model.parameters())
            ob = sum(common.local_nbytes(v) for st in t.optimizer.state.values() for v in st.values()
                     if torch.is_tensor(v))
            sizes = (pb, gb, ob)
            mark("after_step1")
    mark(f"after_step{a.steps}")
    pb, gb, ob = sizes
    row = {"rank": env.rank, "world_size": W, "strategy": plan.strategy,
           "sharding": plan.sharding if plan.strategy == "fsdp" else None,
           "threads": torch.get_num_threads(), "param_bytes": pb, "grad_bytes": gb, "optim_bytes": ob,
           "state_bytes": pb + gb + ob, "full_model_param_bytes": full_param_bytes,
           "batch_shape": list(batch["input_ids"].shape), "steps": a.steps, "phases": phases,
           "peak_rss_mb": common.peak_rss_bytes() / 2**20}
    rows = [None] * W
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        with open(a.part, "w") as f:
            json.dump(rows, f)
    common.close_trainer(t)
    cleanup()


def run_config(name: str, a) -> list[dict]:
    world, strategy, sharding = CONFIGS[name]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        part = tf.name
    args = ["--worker", "--config", a.config, "--strategy", strategy, "--part", part]
    if sharding:
        args += ["--sharding", sharding]
    if a.rows:
        args += ["--rows", str(a.rows)]
    args += ["--steps", str(a.steps)]
    for kv in a.set:
        args += ["--set", kv]
    cmd = common.torchrun_cmd(world, os.path.abspath(__file__), args)
    env = dict(os.environ)
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    t0 = time.time()
    common.run_checked(cmd, f"{name}: worker", env=env)
    with open(part) as f:
        rows = json.load(f)
    os.remove(part)
    shutil.rmtree(part + ".run", ignore_errors=True)
    for row in rows:
        row["config"] = name
        row["seconds"] = time.time() - t0
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/womens_clothing.yaml")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--rows", type=int, default=None, help="train rows to tokenize (default: the whole split)")
    ap.add_argument("--steps", type=int, default=3,
                    help="optimizer steps; peak RSS is read after the last (Adam state exists from step 2 on)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the workers with glibc MALLOC_MMAP_THRESHOLD_=BYTES: tensors above it are mmapped "
                         "and returned to the OS when freed, so peak RSS shows live memory rather than heap "
                         "fragmentation (costs step time: page faults)")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "memory.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", help=argparse.SUPPRESS)
    ap.add_argument("--sharding", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    rows = []
    for name in a.configs.split(","):
        print(f"[{common.now()}] {name} ...", flush=True)
        rows += run_config(name.strip(), a)
    one = [r for r in rows if r["config"] == "none"]
    ref = one[0]["state_bytes"] if one else None
    mib = 2**20
    print(f"\n{'config':<20}{'rank':>5}{'params MiB':>11}{'grads MiB':>10}{'optim MiB':>10}{'total MiB':>10}"
          f"{'vs 1-rank':>10}{'peak RSS MiB':>13}{'RSS@build MiB':>14}")
    for r in rows:
        rel = f"{r['state_bytes'] / ref:.3f}" if ref else "-"
        print(f"{r['config']:<20}{r['rank']:>5}{r['param_bytes'] / mib:>11.1f}{r['grad_bytes'] / mib:>10.1f}"
              f"{r['optim_bytes'] / mib:>10.1f}{r['state_bytes'] / mib:>10.1f}{rel:>10}{r['peak_rss_mb']:>13.0f}"
              f"{r['phases']['build_run']['peak_rss_mb']:>14.0f}")
    checks = {}
    full = [r for r in rows if r["config"] == "fsdp_full"]
    ddp = [r for r in rows if r["config"] == "ddp"]
    if ref and full:
        worst = max(abs(r["state_bytes"] / (ref / 2) - 1) for r in full)
        checks["fsdp_full_state_within_5pct_of_half"] = {"worst_rel_dev": worst, "ok": worst <= 0.05}
    if full and ddp:
        checks["fsdp_full_peak_rss_below_ddp"] = {
            "fsdp_max_mb": max(r["peak_rss_mb"] for r in full), "ddp_min_mb": min(r["peak_rss_mb"] for r in ddp),
            "ok": max(r["peak_rss_mb"] for r in full) < min(r["peak_rss_mb"] for r in ddp)}
    print("\nchecks:", json.dumps(checks, indent=1))
    common.write_result("memory", {"rows": rows, "checks": checks}, a, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
