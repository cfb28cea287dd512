#!/usr/bin/env python
"""Profile training steps of the real model in ONE process (no torchrun): where a step's time goes.

    python benchmarks/profile_step.py --config configs/womens_clothing.yaml --steps 6 --threads 1
    python benchmarks/profile_step.py ... --torch-profile   # + torch.profiler op table

Reports per phase (collate, forward, backward, grad clip, optimizer step, zero_grad) medians, the
attention implementation the HF encoder actually uses, and torch.get_num_threads().
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
import torch.nn.functional as F  # noqa: E402


def build(config: str, rows: int, max_chunks: int, max_tokens: int, attention_dropout=None, freeze=False):
    from mmbert.config import load_config

    over = [("data.max_train_rows", rows), ("data.max_eval_rows", 1), ("data.max_chunks", max_chunks),
            ("data.max_tokens", max_tokens)]
    if attention_dropout is not None:
        over.append(("model.attention_dropout", attention_dropout))
    if freeze:
        over.append(("model.freeze_word_embeddings", True))
    cfg = load_config(config, over)
    ds, model, _, pad_id = common.build_data_and_model(cfg)
    return cfg, ds, model, pad_id


def main():
    ap = argparse.ArgumentParser()
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
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    ap.add_argument("--freeze-word-embeddings", action="store_true")
    ap.add_argument("--attention-dropout", type=float, default=None, help="override the encoder's attention dropout")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from mmbert.data.dataset import batch_token_counts, collate
    from mmbert.data.samplers import epoch_order, micro_batch
    from mmbert.distributed.parallel import clip_grad_norm
    from mmbert.scoring import run_model
    from mmbert.training.optim import build_optimizer

    cfg, ds, model, pad_id = build(a.config, a.rows, a.max_chunks, a.max_tokens,
                                 attention_dropout=a.attention_dropout,
                                 freeze=a.freeze_word_embeddings)
    enc = model.text_encoder.encoder
    print(f"threads={torch.get_num_threads()} interop={torch.get_num_interop_threads()} "
          f"attn_implementation={enc.config._attn_implementation}")
    if a.compile:
        model.text_encoder.encoder = torch.compile(enc, dynamic=True)
    model.train()
    opt = build_optimizer(model, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    order = epoch_order(len(ds), 0, 42, None if a.no_bucket else ds.lengths, cfg.train.bucket_block)
    pad_to = (a.max_chunks, a.max_tokens) if a.pad_to_max else None
    phases = {k: [] for k in ("collate", "forward", "backward", "clip", "optim", "zero_grad", "total", "cpu")}
    toks = []

    def step(i):
        c0 = time.process_time()
        t0 = time.perf_counter()
        b = collate(ds, micro_batch(order, i * a.batch_size, 0, 0, 1, a.batch_size), pad_id, pad_to)
        real, padded = batch_token_counts(b)
        t1 = time.perf_counter()
        logits = run_model(model, b)
        loss = F.cross_entropy(logits.float(), b["labels"])
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        clip_grad_norm(params, 1.0)
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        cpu = time.process_time() - c0
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0, cpu], (real, padded)

    for i in range(a.warmup):
        step(i)
    for i in range(a.warmup, a.warmup + a.steps):
        ts, tk = step(i)
        toks.append(tk)
        for k, t in zip(phases, ts):
            phases[k].append(t)
    med = {k: statistics.median(v) for k, v in phases.items()}
    print("median seconds per phase:", " ".join(f"{k}={v * 1000:.1f}ms" for k, v in med.items()))
    print("tokens real/padded per step (median):", statistics.median(t[0] for t in toks),
          statistics.median(t[1] for t in toks))
    if a.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for i in range(a.warmup + a.steps, a.warmup + a.steps + 2):
                step(i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
