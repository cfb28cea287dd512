#!/usr/bin/env python
"""Does length bucketing cost quality? Validation loss after a fixed budget, random vs bucketed batches
(and bucketed with attention dropout 0), several seeds, on the shipped data.

    python benchmarks/bucketing_quality.py                 # 3 arms x 3 seeds x 40 steps, ~16 min on 2 cores
    python benchmarks/bucketing_quality.py --steps 20 --seeds 2

Each run: `torchrun train.py` (DDP, 2 ranks x batch 16, max_tokens 128, 1 chunk, the config's optimiser and
linear schedule over --steps), evaluated once at the end on the first --val-rows rows of the val split.
Verdict: an arm's mean val loss is "within noise" of random batches when the difference is below twice
the standard error of the difference (seed-to-seed spread).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ARMS = {
    "random": ["train.bucket_by_length=false"],
    "bucketed": ["train.bucket_by_length=true"],
    "bucketed_attn0": ["train.bucket_by_length=true", "model.attention_dropout=0.0"],
}


def run(arm: str, seed: int, a, out: str) -> dict:
    args = ["train.py", "--config", a.config, "--strategy", "ddp", "--output-dir", out, "--overwrite",
            "--max-steps", str(a.steps), "--batch-size", "16", "--max-tokens", "128", "--max-chunks", "1",
            "--max-eval-rows", str(a.val_rows), "--seed", str(seed)]
    for kv in ["train.log_every=10", "train.eval_each_epoch=false", "train.eval_every=null",
               "train.select_best=false", "train.progress=false", "train.checkpoint_every=null", *ARMS[arm]]:
        args += ["--set", kv]
    common.run_checked(common.torchrun_cmd(a.nproc, args[0], args[1:]), f"{arm} seed {seed}: train.py")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    val = [x for x in recs if x.get("split") == "val"][-1]
    return {"arm": arm, "seed": seed, "val_log_loss": val["log_loss"], "val_roc_auc": val.get("roc_auc"),
            "val_accuracy": val.get("accuracy"), "val_rows": val.get("n"),
            "last_train_loss": [x["loss"] for x in recs if "loss" in x][-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/womens_clothing.yaml")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of 32 samples (2 ranks x 16)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val-rows", type=int, default=500)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "bucketing_quality.json"))
    a = ap.parse_args()
    arms = a.arms.split(",")
    tmp = tempfile.mkdtemp(prefix="mmbert_q_")
    rows = []
    try:
        for seed in range(1, a.seeds + 1):
            for arm in arms:  # interleaved
                res = run(arm, seed, a, os.path.join(tmp, arm))
                rows.append(res)
                print(f"[{common.now()}] seed {seed} {arm:<15} val log_loss {res['val_log_loss']:.4f} "
                      f"roc_auc {res['val_roc_auc']:.4f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    ref = {r["seed"]: r["val_log_loss"] for r in rows if r["arm"] == "random"}
    for arm in arms:
        v = [r["val_log_loss"] for r in rows if r["arm"] == arm]
        auc = [r["val_roc_auc"] for r in rows if r["arm"] == arm]
        s = {"mean_val_log_loss": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
             "mean_val_roc_auc": statistics.mean(auc)}
        if arm != "random" and len(v) > 1:
            sd_r = statistics.stdev(ref.values())
            se = math.sqrt((s["sd"] ** 2 + sd_r ** 2) / len(v))
            diff = s["mean_val_log_loss"] - statistics.mean(ref.values())
            s.update(diff_vs_random=diff, se_diff=se, within_noise=abs(diff) < 2 * se)
        summary[arm] = s
    print(f"\nbudget: {a.steps} steps x {16 * a.nproc} samples = {a.steps * 16 * a.nproc} training rows; "
          f"val: first {a.val_rows} rows; {a.seeds} seeds")
    print(f"{'arm':<16}{'val loss':>10}{'sd':>8}{'AUC':>8}{'diff':>9}{'2 se':>8}")
    for arm, s in summary.items():
        print(f"{arm:<16}{s['mean_val_log_loss']:>10.4f}{(s['sd'] or 0):>8.4f}{s['mean_val_roc_auc']:>8.4f}"
              f"{s.get('diff_vs_random', 0):>+9.4f}{2 * s.get('se_diff', 0):>8.4f}")
    common.write_result("bucketing_quality", {"summary": summary, "runs": rows}, a, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
