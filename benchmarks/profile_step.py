#!/usr/bin/env python
"""Profile training steps of the real model in ONE process (no torchrun): where the Trainer's own step's time
goes.

    python benchmarks/profile_step.py --config configs/womens_clothing.yaml --steps 6 --threads 1
    python benchmarks/profile_step.py ... --torch-profile   # + torch.profiler op table

Reports per phase of Trainer.train_step (batch, forward_backward, optimizer_step, the whole step) medians, the
attention implementation the HF encoder actually uses, and torch.get_num_threads(); --out writes them as JSON.
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


def overrides(a) -> list:
    over = [("data.max_train_rows", a.rows), ("data.max_eval_rows", 1), ("data.max_chunks", a.max_chunks),
            ("data.max_tokens", a.max_tokens), ("data.pad_to_max", a.pad_to_max), ("train.batch_size", a.batch_size),
            ("train.bucket_by_length", not a.no_bucket), ("train.compile", a.compile), ("train.seed", 42),
            ("train.max_steps", a.warmup + a.steps + 2), ("train.num_threads", a.threads),
            ("train.output_dir", a.output_dir), ("train.overwrite", True), ("dist.strategy", "none")]
    if a.attention_dropout is not None:
        over.append(("model.attention_dropout", a.attention_dropout))
    if a.freeze_word_embeddings:
        over.append(("model.freeze_word_embeddings", True))
    return over


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/womens_clothing.yaml")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-chunks", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pad-to-max", action="store_true")
    ap.add_argument("--no-bucket", action="store_true")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train.compile: torch.compile the encoder layers")
    ap.add_argument("--freeze-word-embeddings", action="store_true")
    ap.add_argument("--attention-dropout", type=float, default=None, help="override the encoder's attention dropout")
    ap.add_argument("--output-dir", default="/tmp/mmbert_profile_step", help="the Trainer's run directory")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    a = ap.parse_args()

    from mmbert.config import load_config
    from mmbert.distributed.env import cleanup, init_distributed
    from mmbert.distributed.parallel import unwrap

    cfg = load_config(a.config, overrides(a))
    env = init_distributed(num_threads=a.threads)
    t = common.trainer(cfg, env)
    enc = unwrap(t.model).text_encoder.encoder
    print(f"threads={torch.get_num_threads()} interop={torch.get_num_interop_threads()} "
          f"attn_implementation={enc.config._attn_implementation}")
    timer = common.PhaseTimer(t)
    phases: dict[str, list[float]] = {k: [] for k in (*common.STEP_PHASES, "cpu")}
    toks = []
    for i in range(a.warmup + a.steps):
        c0 = time.process_time()
        times, tokens = timer.step()
        if i >= a.warmup:
            toks.append(tokens)
            for k, v in {**times, "cpu": time.process_time() - c0}.items():
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    print("median seconds per phase:", " ".join(f"{k}={v * 1000:.1f}ms" for k, v in med.items()))
    print("tokens real/padded per step (median):", statistics.median(t[0] for t in toks),
          statistics.median(t[1] for t in toks))
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(2):
                timer.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if a.out:
        common.write_result("profile_step", {"threads": torch.get_num_threads(), "median_s": med,
                                             "attn_implementation": enc.config._attn_implementation}, a, a.out)
    common.close_trainer(t)
    cleanup()


if __name__ == "__main__":
    main()
