#!/usr/bin/env python
"""Inference throughput, measured in one run: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8,
at batch 1 and 32, on test-split rows of the shipped data.

    python benchmarks/inference.py --model-dir runs/womens_clothing/final
    python benchmarks/inference.py --model-dir runs/womens_clothing/final --onnx-dir exported --rows 512

Without --onnx-dir (or when it lacks model.onnx / model.int8.onnx) the model is exported first, with
export.py's verification, into a temporary folder. Rows are tokenized and collated before timing (the
same host batches for all engines), so the numbers are model time only. Each engine runs a block of
batches at a time (no thread-pool interference between runtimes), in two rounds: A B C on the first half
of the batches, C B A on the second, so a drift in machine load hits all three alike. PyTorch runs as evaluate.py runs it (eval mode,
inference_mode, empty chunks skipped); both runtimes use --threads intra-op threads.
Prints a table and writes JSON (default benchmarks/results/inference.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def metrics(probs, labels):
    import numpy as np

    out = {"accuracy": float((probs.argmax(1) == labels).mean())}
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        from sklearn.metrics import roc_auc_score

        out["roc_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="consolidated model directory (RUN/final)")
    ap.add_argument("--onnx-dir", help="an export folder holding model.onnx and model.int8.onnx (default: export now)")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "womens_clothing_reviews.parquet"))
    ap.add_argument("--indices", default=os.path.join(ROOT, "data", "splits", "test_idx.txt"),
                    help="row numbers of the test split (default: the shipped split)")
    ap.add_argument("--rows", type=int, default=256, help="first N test rows (default 256)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for both runtimes")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "inference.json"))
    a = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from mmbert.artifact import open_model_dir
    from mmbert.data.dataset import collate
    from mmbert.data.io import load_table, read_indices
    from mmbert.data.pipeline import build_dataset
    from mmbert.export.onnx import export_onnx
    from mmbert.scoring import batch_scores
    from mmbert.serving import OnnxScorer

    torch.set_num_threads(a.threads)
    md = open_model_dir(a.model_dir)
    model, pre, tok = md.model.float().eval(), md.pre, md.tokenizer
    onnx_dir, tmp = a.onnx_dir, None
    if not onnx_dir or not all(os.path.isfile(os.path.join(onnx_dir, f)) for f in ("model.onnx", "model.int8.onnx")):
        tmp = tempfile.TemporaryDirectory(prefix="mmbert-onnx-")
        onnx_dir = tmp.name
        print(f"exporting {a.model_dir} to a temporary folder (fp32 + int8) ...", flush=True)
        export_onnx(a.model_dir, os.path.join(onnx_dir, "model.onnx"), quantize="int8",
                    say=lambda m: print("  " + m, flush=True))
    engines = {"onnxruntime fp32": OnnxScorer(os.path.join(onnx_dir, "model.onnx"), threads=a.threads),
               "onnxruntime int8": OnnxScorer(os.path.join(onnx_dir, "model.int8.onnx"), threads=a.threads)}

    table = load_table(a.data)
    df = table.iloc[read_indices(a.indices, len(table), a.data)[:a.rows]]
    ds = build_dataset(pre, tok, df, a.data, name="bench")
    pad = md.pad_id
    labels = ds.enc.labels

    @torch.inference_mode()
    def torch_proba(b):
        return batch_scores(model, b)

    run = {"pytorch eager": torch_proba, **{k: v.predict_proba for k, v in engines.items()}}
    results = []
    for bs in a.batch_sizes:
        batches = [collate(ds, np.arange(s, min(s + bs, len(ds))), pad) for s in range(0, len(ds), bs)]
        for fn in run.values():  # warm-up (first-call allocations, ORT kernel selection)
            fn(batches[0])
        seconds = dict.fromkeys(run, 0.0)
        probs = {k: [None] * len(batches) for k in run}
        half = (len(batches) + 1) // 2
        # two rounds, engines in turn then in reverse, each over its own half of the batches
        for part, order in ((range(half), list(run)), (range(half, len(batches)), list(run)[::-1])):
            for name in order:
                fn = run[name]
                t0 = time.perf_counter()
                for i in part:
                    probs[name][i] = fn(batches[i])
                seconds[name] += time.perf_counter() - t0
        ref = np.concatenate(probs["pytorch eager"])
        for name in run:
            p = np.concatenate(probs[name])
            row = {"engine": name, "batch_size": bs, "rows": len(ds), "seconds": round(seconds[name], 3),
                   "rows_per_s": round(len(ds) / seconds[name], 2),
                   "speedup_vs_pytorch": round(seconds["pytorch eager"] / seconds[name], 2),
                   "max_abs_diff_vs_pytorch": float(np.abs(p - ref).max())}
            if labels is not None:
                row.update(metrics(p, labels))
            results.append(row)

    lengths = ds.lengths
    info = {"model_dir": a.model_dir, "fusion": model.spec.fusion, "data": a.data, "indices": a.indices,
            "rows": len(ds), "tokens_per_row_mean": float(lengths.mean()), "max_tokens": pre.max_tokens,
            "max_chunks": pre.max_chunks, "threads": a.threads, "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\n{len(ds)} test rows of {os.path.basename(a.data)} ({info['tokens_per_row_mean']:.0f} tokens/row on "
          f"average, max_tokens {pre.max_tokens}, max_chunks {pre.max_chunks}); {a.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}\n")
    has_auc = any("roc_auc" in r for r in results)
    head = "| engine | batch | rows/s | vs PyTorch | max abs dp vs PyTorch | accuracy |" + (" ROC AUC |" if has_auc else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        line = (f"| {r['engine']} | {r['batch_size']} | {r['rows_per_s']:.1f} | {r['speedup_vs_pytorch']:.2f}x | "
                f"{r['max_abs_diff_vs_pytorch']:.1e} | {r.get('accuracy', float('nan')):.4f} |")
        if has_auc:
            line += f" {r.get('roc_auc', float('nan')):.4f} |"
        print(line)
    if a.json:
        common.write_result("inference", {"info": info, "results": results}, a, a.json)
        print(f"\nwrote {a.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
