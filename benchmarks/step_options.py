#!/usr/bin/env python
"""Step time of the Trainer's own train_step with and without a setting (train.compile, activation
checkpointing), one process, the real encoder of the shipped config, paired in one run.

    python benchmarks/step_options.py --option compile --steps 10
    python benchmarks/step_options.py --option activation_checkpointing --max-chunks 2

Two Trainers (the same seed, rows and batches) step in turn, so both see the same machine load; the first
`--warmup` steps (compilation) are left out. Prints the median seconds per step of each and their ratio, and the
MiB of tensors autograd keeps for backward in the first step; writes benchmarks/results/step_<option>.json
(--result). Ratios only: absolute times differ 2-3x between machines.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPTIONS = {"compile": ("train.compile", True), "activation_checkpointing": ("dist.activation_checkpointing", True)}


def trainer(config: str, out: str, overrides: list, env):
    from mmbert.config import load_config

    return common.trainer(load_config(config, [("train.output_dir", out), ("dist.strategy", "none"), *overrides]),
                          env)


def saved_for_backward(t) -> float:
    """One train_step, counting the MiB autograd keeps for backward (inside a checkpointed layer: only what the
    checkpoint keeps): the activation memory activation checkpointing trades for recomputation."""
    import torch

    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        t.train_step()
    return total[0] / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/womens_clothing.yaml")
    ap.add_argument("--option", choices=sorted(OPTIONS), default="compile")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-chunks", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--out", default="/tmp/mmbert_step_options", help="the Trainers' run directories")
    ap.add_argument("--result", default=None, help="the JSON to write (default benchmarks/results/step_OPTION.json)")
    a = ap.parse_args()

    from mmbert.distributed.env import cleanup, init_distributed

    env = init_distributed()
    common_over = [("train.batch_size", a.batch_size), ("data.max_chunks", a.max_chunks),
                   ("data.max_train_rows", a.rows), ("data.max_eval_rows", 1),
                   ("train.max_steps", a.warmup + a.steps), ("train.overwrite", True)]
    key, value = OPTIONS[a.option]
    runs = {"off": trainer(a.config, os.path.join(a.out, "off"), common_over, env),
            "on": trainer(a.config, os.path.join(a.out, "on"), [*common_over, (key, value)], env)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    saved = {name: saved_for_backward(t) for name, t in runs.items()}  # also the first warm-up step
    for i in range(1, a.warmup + a.steps):
        for name, t in runs.items():
            t0 = time.perf_counter()
            t.train_step()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {"option": key, "value": value, "threads": __import__("torch").get_num_threads(),
              "median_step_s": med, "on_over_off": med["on"] / med["off"], "saved_for_backward_mib": saved}
    print(f"{key}={value}: median step {med['on']:.3f} s vs {med['off']:.3f} s off ({result['on_over_off']:.2f}x "
          f"the time; {a.steps} paired steps after {a.warmup} warm-up); tensors kept for backward in the first "
          f"step {saved['on']:.0f} MiB vs {saved['off']:.0f} MiB")
    common.write_result(f"step_{a.option}", result, a, a.result)
    for t in runs.values():
        common.close_trainer(t)
    cleanup()


if __name__ == "__main__":
    main()
