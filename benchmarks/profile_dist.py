#!/usr/bin/env python
"""Where a distributed training step's time goes, per strategy, on the same rows: the seed design's DDP step
(fixed padding to max_tokens, DDP defaults, torch's AdamW) against mmbert's DDP and FSDP steps (each wrap
policy / resharding choice), in ONE torchrun job so every variant sees the same machine and the same batches.

    torchrun --nproc_per_node 2 benchmarks/profile_dist.py --steps 6
    torchrun --nproc_per_node 2 benchmarks/profile_dist.py --variants seed,ddp,fsdp/class:full+native --torch-profile
    torchrun --nproc_per_node 2 benchmarks/profile_dist.py --collectives --variants ddp   # + gloo vs p2p collectives

A variant is STRATEGY[/WRAP][:SHARDING][+COLLECTIVES][^fixed|^prefetch] (ddp, fsdp/class,
fsdp/none:shard_grad_op, fsdp/class:full+native; ^fixed pads to max_tokens, ^prefetch turns on FSDP's explicit
forward prefetch with asynchronous all-gathers) or `seed`.
Every mmbert variant runs the Trainer's own step (a Trainer built as train.py builds it, with the variant's dist
settings); `seed` runs benchmarks/seed_ddp.py's baseline step. Per variant: medians over --steps measured steps
(after --warmup) of each phase on rank 0, every phase ended by a barrier-free wall clock (batch: the collated
micro-batches; forward_backward, which includes the gradient collectives it waits for; optimizer_step: clip,
update, lr schedule, zero_grad) and the whole step; with --torch-profile, the
profiler's self CPU time of the main thread grouped into matmul / attention / element-wise / collectives /
FSDP copies / optimizer / other, over 2 further steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mmbert.config import load_config  # noqa: E402

LEAN = [("model.attention_dropout", 0.0), ("model.freeze_word_embeddings", True)]
GROUPS = [  # profiler op name -> category, first match wins
    ("collectives", ("gloo", "c10d", "all_gather", "reduce_scatter", "allreduce", "all_reduce", "wait", "nccl")),
    ("fsdp_copies", ("FSDP::", "split_with_sizes_copy", "chunk_cat", "_foreach_copy")),
    ("optimizer", ("Optimizer.", "_fused_adam", "adamw", "_foreach")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax", "baddbmm", "bmm")),
    ("matmul", ("mm", "linear", "addmm", "matmul")),
    ("dropout", ("bernoulli", "dropout", "native_dropout")),
]


def parse_variant(v: str) -> dict:
    if v == "seed":
        return {"name": v, "strategy": "seed", "wrap": None, "sharding": None, "collectives": None}
    prefetch, fixed = v.endswith("^prefetch"), v.endswith("^fixed")
    v_, _, collectives = v.removesuffix("^prefetch").removesuffix("^fixed").partition("+")
    head, _, sharding = v_.partition(":")
    strategy, _, wrap = head.partition("/")
    return {"name": v, "strategy": strategy, "wrap": wrap or None, "sharding": sharding or None,
            "collectives": collectives or None, "prefetch": prefetch, "fixed": fixed}


def overrides(a, lean: bool) -> list:
    over = [("data.max_tokens", a.max_tokens), ("data.max_chunks", 1), ("data.max_eval_rows", 1),
            ("train.batch_size", a.batch_size), ("train.seed", a.seed), ("train.bucket_by_length", not a.random_rows)]
    return over + ([("data.max_train_rows", a.rows)] if a.rows else []) + (LEAN if lean else [])


def build(a, env, lean: bool):
    from mmbert.assembly import build_run_data

    cfg = load_config(a.config, overrides(a, lean))
    return cfg, build_run_data(cfg, with_val=False, env=env)


def seed_step(a, env, cache: dict):
    """The seed baseline (benchmarks/seed_ddp.py): fixed padding, random or bucketed rows, DDP defaults, torch's
    AdamW. Returns (step(i) -> ({phase: s}, (real, padded) tokens), plan, things to free)."""
    from seed_ddp import seed_forward_backward, seed_optimizer_step, seed_parallel

    from mmbert.assembly import build_run_model, model_spec
    from mmbert.data.dataset import batch_token_counts, collate
    from mmbert.data.samplers import epoch_order, micro_batch

    cfg, data = cache.setdefault(a.lean, build(a, env, a.lean))
    torch.manual_seed(cfg.train.seed)
    model, opt = seed_parallel(build_run_model(cfg, model_spec(cfg, data.pre)), cfg)
    ds, W, B = data.train, env.world_size, a.batch_size
    order = epoch_order(len(ds), 0, a.seed, None if a.random_rows else ds.lengths, cfg.train.bucket_block)

    def step(i):
        t = [time.perf_counter()]
        b = collate(ds, micro_batch(order, i * B * W, 0, env.rank, W, B), data.pad_id, (1, a.max_tokens))
        t.append(time.perf_counter())
        seed_forward_backward(model, b)
        t.append(time.perf_counter())
        seed_optimizer_step(opt)
        t.append(time.perf_counter())
        return dict(zip(common.STEP_PHASES, [t[1] - t[0], t[2] - t[1], t[3] - t[2], t[3] - t[0]])), \
            batch_token_counts(b)
    return step, None, (model, opt)


def trainer_step(a, env, var: dict):
    """The variant's Trainer (the same pretrained weights, rows and seed for every variant) and its own step."""
    d = [("dist.strategy", var["strategy"]), ("dist.wrap_policy", var["wrap"]), ("dist.sharding", var["sharding"]),
         ("dist.collectives", var["collectives"])]
    run = [("data.pad_to_max", var["fixed"]), ("train.max_steps", a.warmup + a.steps + 2), ("train.overwrite", True),
           ("train.output_dir", os.path.join(a.run_dir, var["name"].replace("/", "_")))]
    cfg = load_config(a.config, overrides(a, a.lean) + [kv for kv in d if kv[1] is not None] + run)
    t = common.trainer(cfg, env)
    if var["prefetch"]:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in t.model.modules() if isinstance(m, FSDPModule) and m is not t.model]
        for a_, b_ in zip(units, units[1:]):
            a_.set_modules_to_forward_prefetch([b_])
        t.model._set_unshard_async_op(True)
    timer = common.PhaseTimer(t)
    return lambda i: timer.step(), t.plan, t


def group_profile(prof) -> dict:
    """Self CPU seconds per category (all threads of this rank)."""
    out = {name: 0.0 for name, _ in GROUPS}
    out["other"] = 0.0
    for e in prof.key_averages():
        key = e.key
        cat = next((name for name, pats in GROUPS if any(p in key for p in pats)), "other")
        out[cat] += e.self_cpu_time_total / 1e6
    return out


def run_variant(a, env, var: dict, cache: dict) -> dict:
    if var["strategy"] == "seed":
        step, plan, held = seed_step(a, env, cache)
    else:
        step, plan, held = trainer_step(a, env, var)
    torch.manual_seed(a.seed + 1000 * env.rank)
    for i in range(a.warmup):
        step(i)
    dist.barrier()
    phases: dict[str, list[float]] = {k: [] for k in common.STEP_PHASES}
    real = padded = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.warmup, a.warmup + a.steps):
        times, (r, p) = step(i)
        real, padded = real + r, padded + p
        for k, v in times.items():
            phases[k].append(v)
    dist.barrier()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tot = torch.tensor([float(real), float(padded)])
    dist.all_reduce(tot)
    res = {"variant": var["name"], "plan": plan.as_config() if plan else None, "wall_s": wall, "cpu_s": cpu,
           "samples_per_s": a.steps * a.batch_size * env.world_size / wall,
           "real_tokens_per_s": float(tot[0]) / wall, "padded_tokens_per_s": float(tot[1]) / wall,
           "phases_ms": {k: 1000 * statistics.median(v) for k, v in phases.items()}}
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(a.warmup + a.steps, a.warmup + a.steps + 2):
                step(i)
        res["profile_s"] = group_profile(prof)
        if env.is_main and a.table:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.table), flush=True)
    if hasattr(held, "metrics"):
        common.close_trainer(held)
    del held
    return res


def time_collectives(env, numel: int, repeats: int = 5) -> dict:
    """Median ms of gloo's all-reduce, all-gather and reduce-scatter of `numel` fp32 values (the model's
    parameter count) against mmbert's point-to-point all-gather / reduce-scatter, on this group."""
    from mmbert.distributed.p2p_comm import P2PAllGather, P2PReduceScatter

    W, group = env.world_size, dist.group.WORLD
    numel -= numel % W
    full, shard, out = torch.randn(numel), torch.empty(numel // W), torch.empty(numel // W)
    avg = dist.ReduceOp.AVG
    ops = {"all_reduce (gloo)": lambda: dist.all_reduce(full),
           "reduce_scatter (gloo)": lambda: dist.reduce_scatter_single(out, full, op=avg),
           "reduce_scatter (p2p)": lambda: P2PReduceScatter()(out, full, group, avg),
           "all_gather (gloo)": lambda: dist.all_gather_single(full, shard),
           "all_gather (p2p)": lambda: P2PAllGather()(full, shard, group)}
    res = {}
    for name, op in ops.items():
        op()
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        res[name] = 1000 * statistics.median(times)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="womens_clothing")
    ap.add_argument("--variants", default="seed,ddp,fsdp/class,fsdp/none")
    ap.add_argument("--lean", action="store_true", help="attention dropout 0 and a frozen word table")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--random-rows", action="store_true", help="random batches instead of length-bucketed ones")
    ap.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) on every rank")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--table", type=int, default=0, help="print the profiler's top N ops per variant")
    ap.add_argument("--collectives", action="store_true",
                    help="first time gloo's collectives against the point-to-point ones at the model's size")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--run-dir", default="/tmp/mmbert_profile_dist", help="the variants' Trainer run directories")
    a = ap.parse_args()

    from mmbert.distributed.env import cleanup, init_distributed

    env = init_distributed(1800)
    if a.flush_denormal:
        torch.set_flush_denormal(True)
    cache: dict = {}
    results = []
    collectives = None
    if a.collectives:
        cfg, data = cache.setdefault(a.lean, build(a, env, a.lean))
        from mmbert.assembly import build_run_model, model_spec

        numel = sum(p.numel() for p in build_run_model(cfg, model_spec(cfg, data.pre)).parameters())
        collectives = time_collectives(env, numel)
        if env.is_main:
            print(f"collectives of {numel * 4 / 2**20:.0f} MiB (the model's fp32 parameters) on {env.world_size} ranks:",
                  ", ".join(f"{k} {v:.1f} ms" for k, v in collectives.items()), flush=True)
    for v in a.variants.split(","):
        res = run_variant(a, env, parse_variant(v.strip()), cache)
        results.append(res)
        if env.is_main:
            ph = " ".join(f"{k}={x:.0f}" for k, x in res["phases_ms"].items())
            print(f"{res['variant']:<28} {res['samples_per_s']:6.2f} samples/s {res['padded_tokens_per_s']:6.0f} "
                  f"pad tok/s {res['real_tokens_per_s']:6.0f} real tok/s | ms: {ph}", flush=True)
            if "profile_s" in res:
                print(" " * 29 + "profile s: " + " ".join(f"{k}={x:.2f}" for k, x in res["profile_s"].items()),
                      flush=True)
    if env.is_main and a.out:
        common.write_result("profile_dist", {"world_size": env.world_size, "collectives_ms": collectives,
                                             "results": results}, a, a.out)
    cleanup()


if __name__ == "__main__":
    main()
