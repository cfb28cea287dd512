#!/usr/bin/env python
"""Training throughput on the shipped data: fixed padding to 128 vs dynamic padding (random batches) vs
length-bucketed batches, each with the recipe as pretrained and (fixed128_lean, bucketed_lean) with the
opt-in lean step (attention dropout 0, frozen word embeddings); same model, 2 ranks.

    python benchmarks/throughput.py                       # ~12 min on 2 CPU cores
    python benchmarks/throughput.py --repeats 1 --steps 4 # quick look, ~2.5 min
    # against the seed design's plain DDP step, per strategy and FSDP wrap policy (ratios to `seed`)
    python benchmarks/throughput.py --modes strategies     # the same, every wrap policy, as before, lean; ~17 min
    python benchmarks/throughput.py --modes seed,bucketed@ddp,bucketed@fsdp/class,bucketed@fsdp/none
    # FSDP as it was before issue 18 (resharding after forward, gloo's own all-gather / reduce-scatter)
    python benchmarks/throughput.py --modes seed,bucketed@fsdp/class:full+native,bucketed@fsdp

Each (repeat, mode) is one `torchrun train.py` job (DDP by default, batch 16/rank, max_tokens 128,
max_chunks 1); modes are interleaved (A B C A B C ...) so slow phases of a shared machine hit all of
them. The first --warmup steps of each job are skipped; the rest are read from metrics.jsonl. Each
job's seed is chosen so that its measured steps have the epoch's mean real / padded tokens per sample.

Reported per mode (medians over repeats):
  samples/s, real tokens/s          wall clock, from metrics.jsonl
  padding                           1 - real / padded tokens (measured steps; and over a whole epoch)
  util_wall                         real-token training FLOP/s / this machine's fp32 matmul FLOP/s, the
                                    latter measured by --nproc concurrent processes x the ranks' thread
                                    count running sgemm of the model's shapes right before and after the job
  util_cpu                          the same per CPU-second (metrics.jsonl `cpu_s`, and sgemm FLOPs per
                                    CPU-second): insensitive to other jobs sharing the machine
Training FLOPs count real tokens only: 6 x non-embedding encoder params per token + 12 x layers x T x
hidden per token of a length-T text (attention), T from the exact rows each step used.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# The training recipe as pretrained (attention dropout from the encoder's config, every parameter trained;
# the shipped config) vs the opt-in lean step (attention dropout 0: SDPA's fused CPU kernel; frozen word table).
PRETRAINED = ["model.attention_dropout=null", "model.freeze_word_embeddings=false"]
LEAN = ["model.attention_dropout=0.0", "model.freeze_word_embeddings=true"]
MODES = {  # name -> extra train.py --set overrides
    "fixed128": ["data.pad_to_max=true", "train.bucket_by_length=false", *PRETRAINED],  # a fixed B x C x T script
    "dynamic": ["data.pad_to_max=false", "train.bucket_by_length=false", *PRETRAINED],
    "bucketed": ["data.pad_to_max=false", "train.bucket_by_length=true", *PRETRAINED],  # the shipped config
    "fixed128_lean": ["data.pad_to_max=true", "train.bucket_by_length=false", *LEAN],
    "bucketed_lean": ["data.pad_to_max=false", "train.bucket_by_length=true", *LEAN],
    # the seed design's step as a plain torch DDP script (benchmarks/seed_ddp.py): padded to max_tokens,
    # random batches, DDP and AdamW with their defaults; the reference of the ratios when listed
    "seed": [*PRETRAINED],
}
FIXED = ("fixed128", "seed")  # modes whose texts are padded to max_tokens
PRESETS = {  # --modes NAME
    "padding": ",".join(m for m in MODES if m != "seed"),  # issue 7: what padding and the lean step cost
    # issue 18: the seed's DDP step against mmbert's DDP and FSDP (each wrap policy; FSDP as it was before)
    "strategies": "seed,bucketed@ddp,bucketed@fsdp/class,bucketed@fsdp/size,bucketed@fsdp/none,"
                  "bucketed@fsdp/class:full+native,bucketed_lean@ddp,bucketed_lean@fsdp",
}


def mode_parts(mode: str) -> tuple[str, Optional[str], list[str]]:
    """MODE[@STRATEGY[/WRAP][:SHARDING][+COLLECTIVES]] -> (MODE, strategy or None for --strategy, dist.*
    overrides): e.g. bucketed@ddp, bucketed@fsdp/size, bucketed@fsdp/class:full+native (FSDP as it was before
    issue 18), so one run compares strategies, wrap policies, sharding and collectives."""
    base, _, where = mode.partition("@")
    where, _, collectives = where.partition("+")
    where, _, sharding = where.partition(":")
    strategy, _, wrap = where.partition("/")
    sets = [f"dist.{k}={v}" for k, v in (("wrap_policy", wrap), ("sharding", sharding), ("collectives", collectives))
            if v]
    return base, strategy or None, sets


def epoch_lengths(a):
    """Real token count of every train row as train.py tokenizes it (max_chunks 1: one chunk per row)."""
    from mmbert.assembly import build_run_data
    from mmbert.config import load_config

    over = [("data.max_tokens", a.max_tokens), ("data.max_chunks", 1)]
    if a.rows:
        over.append(("data.max_train_rows", a.rows))
    cfg = load_config(a.config, over)
    return build_run_data(cfg, with_val=False).train.lengths, cfg


def step_rows(lengths, mode: str, seed: int, step: int, a):
    """Per rank, the rows (as lengths) train.py's step `step` (0-based) uses."""
    from mmbert.data.samplers import epoch_order, micro_batch

    bucket = mode_parts(mode)[0].startswith("bucketed")
    order = epoch_order(len(lengths), 0, seed, lengths if bucket else None, a.bucket_block)
    G = a.batch_size * a.nproc
    return [lengths[micro_batch(order, step * G, 0, r, a.nproc, a.batch_size)] for r in range(a.nproc)]


def window_stats(lengths, mode: str, seed: int, steps: range, a) -> tuple[float, float, float]:
    """(real tokens, padded tokens, attention T^2 sum) per sample over `steps`."""
    real = padded = sq = n = 0
    for s in steps:
        for rows in step_rows(lengths, mode, seed, s, a):
            real += int(rows.sum())
            sq += int((rows.astype(float) ** 2).sum())
            padded += len(rows) * (a.max_tokens if mode_parts(mode)[0].startswith(FIXED) else int(rows.max()))
            n += len(rows)
    return real / n, padded / n, sq / n


def pick_seeds(lengths, mode: str, a, base: int, count: int, candidates: int = 400) -> list[int]:
    """Seeds whose measured steps are representative of a whole epoch: their real and padded tokens per
    sample (and mean T^2) within the smallest relative distance of the epoch's. A few steps of a
    length-bucketed order are otherwise a lottery (one block of the longest texts, or the shortest)."""
    epoch = window_stats(lengths, mode, base, range(len(lengths) // (a.batch_size * a.nproc)), a)
    window = range(a.warmup, a.warmup + a.steps)
    scored = []
    for seed in range(base, base + candidates):
        w = window_stats(lengths, mode, seed, window, a)
        scored.append((max(abs(x / y - 1) for x, y in zip(w, epoch)), seed))
    return [seed for _, seed in sorted(scored)[:count]]


def run_job(mode: str, seed: int, a, shapes, lengths, out_dir: str) -> dict:
    before = common.measure_matmul(a.nproc, a.threads, a.matmul_seconds)
    base, strategy, dist_sets = mode_parts(mode)
    sets = [*MODES[base], *a.set, *dist_sets]
    if base == "seed":
        args = [os.path.join("benchmarks", "seed_ddp.py"), "--config", a.config, "--output-dir", out_dir,
                "--max-steps", str(a.warmup + a.steps), "--batch-size", str(a.batch_size), "--max-tokens",
                str(a.max_tokens), "--seed", str(seed)]
    else:
        args = ["train.py", "--config", a.config, "--strategy", strategy or a.strategy, "--output-dir", out_dir,
                "--overwrite", "--max-steps", str(a.warmup + a.steps), "--batch-size", str(a.batch_size),
                "--max-tokens", str(a.max_tokens), "--max-chunks", "1", "--max-eval-rows", "1", "--seed", str(seed)]
        sets = ["train.log_every=1", "train.eval_each_epoch=false", "train.select_best=false",
                "train.progress=false", "train.eval_every=null", "train.checkpoint_every=null", *sets]
    if a.rows:
        args += ["--max-train-rows", str(a.rows)]
    for kv in sets:
        args += ["--set", kv]
    t0 = time.time()
    r = common.run_checked(common.torchrun_cmd(a.nproc, args[0], args[1:]), f"{mode}: {args[0]}")
    job_s = time.time() - t0
    after = common.measure_matmul(a.nproc, a.threads, a.matmul_seconds)
    m = re.search(r"threads=(\d+)", r.stdout + r.stderr)
    rank_threads = int(m.group(1)) if m else None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    recs = [x for x in recs if "samples_per_s" in x and x["step"] > a.warmup]
    wall = sum(x["step_time_s"] for x in recs)
    cpu = sum(x["cpu_s"] for x in recs)
    samples = sum(x["samples_per_s"] * x["step_time_s"] for x in recs)
    real = sum(x["tokens_per_s"] * x["step_time_s"] for x in recs)
    padded = sum(x["padded_tokens_per_s"] * x["step_time_s"] for x in recs)
    flops = 0.0
    real_check = 0
    for x in recs:
        for rows in step_rows(lengths, mode, seed, x["step"] - 1, a):
            flops += common.train_flops(rows, shapes)
            real_check += int(rows.sum())
    peak_wall = (before["flops_per_s"] + after["flops_per_s"]) / 2
    peak_cpu = (before["flops_per_cpu_s"] + after["flops_per_cpu_s"]) / 2
    return {"mode": mode, "seed": seed, "steps": len(recs), "job_s": job_s, "rank_threads": rank_threads,
            "samples_per_s": samples / wall, "tokens_per_s": real / wall, "padded_tokens_per_s": padded / wall,
            "padding_fraction": 1 - real / padded, "step_time_s": statistics.median(x["step_time_s"] for x in recs),
            "samples_per_cpu_s": samples / cpu, "cpu_s": cpu, "wall_s": wall,
            "real_tokens": real, "real_tokens_from_sampler": real_check, "train_flops": flops,
            "flops_per_s": flops / wall, "matmul_flops_per_s": peak_wall, "matmul_flops_per_cpu_s": peak_cpu,
            "util_wall": flops / wall / peak_wall, "util_cpu": flops / cpu / peak_cpu,
            "matmul_before": before, "matmul_after": after}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/womens_clothing.yaml")
    ap.add_argument("--modes", default="padding",
                    help=f"a preset ({', '.join(PRESETS)}) or a comma list of {', '.join(MODES)}, each optionally "
                         "@STRATEGY[/WRAP][:SHARDING][+COLLECTIVES] (bucketed@fsdp/size, bucketed@fsdp/class:full+native)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="measured steps per job")
    ap.add_argument("--warmup", type=int, default=2, help="skipped steps per job")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "none"])
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--bucket-block", type=int, default=64, help="must match train.bucket_block")
    ap.add_argument("--rows", type=int, default=None, help="tokenize only the first N train rows (faster start)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per sgemm process (default: what each rank uses, cores // nproc)")
    ap.add_argument("--matmul-seconds", type=float, default=3.0)
    ap.add_argument("--no-representative", dest="representative", action="store_false",
                    help="seeds 42, 43, ... instead of seeds whose measured steps match the epoch's lengths")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra train.py override")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "throughput.json"))
    a = ap.parse_args()
    modes = [m.strip() for m in PRESETS.get(a.modes, a.modes).split(",")]
    cores = len(os.sched_getaffinity(0))
    a.threads = a.threads or max(1, cores // a.nproc)

    lengths, cfg = epoch_lengths(a)
    shapes = common.encoder_shapes(cfg.model.encoder)
    print(f"[{common.now()}] {len(lengths)} train rows, mean {lengths.mean():.1f} tokens, median "
          f"{statistics.median(lengths.tolist()):.0f}; encoder {shapes}", flush=True)
    n_steps = len(lengths) // (a.batch_size * a.nproc)
    epoch_pad = {}
    seeds = {}
    for m in modes:
        real, padded, _ = window_stats(lengths, m, cfg.train.seed, range(n_steps), a)
        epoch_pad[m] = 1 - real / padded
        seeds[m] = pick_seeds(lengths, m, a, cfg.train.seed, a.repeats) if a.representative else \
            [cfg.train.seed + r for r in range(a.repeats)]
    print("seeds per mode:", seeds, flush=True)
    tmp = tempfile.mkdtemp(prefix="mmbert_tp_")
    runs = []
    try:
        for rep in range(a.repeats):
            # interleaved, and rotated each repeat so no mode always runs first
            for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                res = run_job(mode, seeds[mode][rep], a, shapes, lengths, os.path.join(tmp, mode))
                res["repeat"] = rep
                runs.append(res)
                print(f"[{common.now()}] rep {rep} {mode:<15} {res['samples_per_s']:6.2f} samples/s "
                      f"{res['tokens_per_s']:7.0f} tok/s pad {res['padding_fraction']:.3f} "
                      f"util wall {res['util_wall']:.2f} cpu {res['util_cpu']:.2f} ({res['job_s']:.0f}s job)",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(mode, key):
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    summary = {}
    for m in modes:
        summary[m] = {k: med(m, k) for k in ("samples_per_s", "tokens_per_s", "padded_tokens_per_s",
                                             "padding_fraction", "util_wall", "util_cpu", "samples_per_cpu_s",
                                             "step_time_s", "matmul_flops_per_s", "matmul_flops_per_cpu_s")}
        summary[m]["padding_fraction_epoch"] = epoch_pad[m]
    ref = next((m for m in ("seed", "fixed128") if m in modes), None)
    if ref:  # paired ratios (same repeat: adjacent in time), then the median
        for m in modes:
            for key, name in (("samples_per_s", "speedup_wall"), ("samples_per_cpu_s", "speedup_cpu")):
                pairs = [r[key] / f[key] for r in runs if r["mode"] == m
                         for f in runs if f["mode"] == ref and f["repeat"] == r["repeat"]]
                summary[m][name] = statistics.median(pairs)
    print(f"\n{a.nproc} ranks x {a.threads} thread(s), {a.strategy}, batch {a.batch_size}/rank, <= {a.max_tokens} "
          f"tokens, 1 chunk; medians of {a.repeats} x {a.steps} steps")
    print(f"matmul peak (sgemm, {a.nproc} procs x {a.threads} thr): {med(modes[0], 'matmul_flops_per_s') / 1e9:.0f} "
          f"GFLOP/s wall, {med(modes[0], 'matmul_flops_per_cpu_s') / 1e9:.0f} GFLOP/s per CPU-second")
    hdr = (f"{'mode':<22}{'samples/s':>10}{'real tok/s':>11}{'pad tok/s':>10}{'padding':>9}{'pad/epoch':>10}"
           f"{'util wall':>10}{'util cpu':>9}{'x ' + (ref or '-'):>10}{'x cpu':>7}")
    print(hdr)
    for m in modes:
        s = summary[m]
        print(f"{m:<22}{s['samples_per_s']:>10.2f}{s['tokens_per_s']:>11.0f}{s['padded_tokens_per_s']:>10.0f}"
              f"{s['padding_fraction']:>9.3f}{s['padding_fraction_epoch']:>10.3f}{s['util_wall']:>10.2f}"
              f"{s['util_cpu']:>9.2f}{s.get('speedup_wall', float('nan')):>10.2f}{s.get('speedup_cpu', float('nan')):>7.2f}")
    common.write_result("throughput", {"cores": cores, "encoder": shapes, "seeds": seeds,
                                       "train_rows": int(len(lengths)), "mean_tokens": float(lengths.mean()),
                                       "summary": summary, "runs": runs}, a, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
