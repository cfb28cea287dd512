#!/usr/bin/env python
"""Token cache build speed by data.num_proc: the shipped table repeated --copies times (40: ~940k rows, its
train split ~750k rows; built as in benchmarks/data_scale.py), the shipped config (configs/womens_clothing.yaml,
the packaged all-MiniLM-L6-v2 tokenizer), one build per num_proc into a fresh cache folder, in this process
(a single-process run's local rank 0, as train.py builds it).

    python benchmarks/cache_build.py                      # num_proc 1, 2 and the machine's cores; ~3 min on 2 cores
    python benchmarks/cache_build.py --copies 4 --num-proc 1,2

Reported per num_proc: the build's seconds (meta.json's build_seconds: reading the table, fitting the
preprocessing, encoding, tokenizing, writing and hashing the Arrow files), rows/s (rows of the cached train
and val splits / those seconds), the ratio to the first num_proc listed, and whether the folder is
byte-identical to the first one's (meta.json's sha256 of every file; the key does not depend on num_proc),
and the CPU seconds of this process and its workers over the build with the cores they kept busy (CPU s /
wall s): where that is short of num_proc, other work on the machine had the rest. The machine's cores and
load average (before, after) go with them. Raw numbers: benchmarks/results/cache_build.json (--out).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data_scale  # noqa: E402

SPLITS = ("train", "val", "test")


def build(a, data: dict, num_proc: int) -> dict:
    from mmbert.assembly import _tokenized_splits
    from mmbert.config import load_config
    from mmbert.data.cache import cached_run_data
    from mmbert.data.tokenize import load_tokenizer
    from mmbert.distributed.env import DistEnv

    cache_dir = os.path.join(a.workdir, f"tok_np{num_proc}")
    sets = [("data.path", data["path"]), ("data.cache_dir", cache_dir), ("data.num_proc", num_proc),
            ("train.progress", False), *((f"data.split.{s}_indices", data[f"{s}_indices"]) for s in SPLITS)]
    cfg = load_config(os.path.join(common.ROOT, "configs", "womens_clothing.yaml"), sets)
    tok = load_tokenizer(cfg.model.encoder)
    t0, c0 = time.perf_counter(), cpu_seconds()
    _, _, meta = cached_run_data(cfg, DistEnv(0, 1, 0, 1, None, "none"), tok, lambda: _tokenized_splits(cfg, tok, True))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rows = sum(m["rows"] for m in meta["splits"].values())
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"num_proc": num_proc, "rows": rows, "build_s": meta["build_seconds"], "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "cores_busy": round(cpu / wall, 2),
            "rows_per_s": round(rows / meta["build_seconds"], 1), "key": meta["key"], "files": meta["files"]}


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the tokenizer workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=40, help="the shipped table repeated this many times")
    ap.add_argument("--num-proc", default="1,2,max", help="comma-separated; max: this machine's cores")
    ap.add_argument("--workdir", help="where the scaled table and caches go (default: a temp dir, removed)")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "cache_build.json"))
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    a.num_proc = list(dict.fromkeys(cores if v == "max" else int(v) for v in a.num_proc.split(",")))
    return a


def main():
    a = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mmbert.main").setLevel(logging.ERROR)  # the data reports, the same for every build
    temp = a.workdir is None
    a.workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="mmbert_cache_build_"))
    result = {"cores": len(os.sched_getaffinity(0)), "copies": a.copies, "load_before": os.getloadavg()}
    try:
        data = data_scale.scaled_table(a.copies, a.workdir)
        runs = [build(a, data, n) for n in a.num_proc]
    finally:
        if temp:
            shutil.rmtree(a.workdir, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    base = runs[0]
    print(f"\n{a.copies}x table, {base['rows']:,} rows cached (train + val), {result['cores']} cores, load average "
          f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after")
    print(f"{'num_proc':>8} {'build s':>8} {'rows/s':>9} {'ratio':>6} {'CPU s':>7} {'cores busy':>10}  identical")
    for r in runs:
        r["ratio"] = round(r["rows_per_s"] / base["rows_per_s"], 2)
        r["identical"] = r["key"] == base["key"] and r["files"] == base["files"]
        print(f"{r['num_proc']:>8} {r['build_s']:>8.1f} {r['rows_per_s']:>9,.0f} {r['ratio']:>6.2f} {r['cpu_s']:>7.1f} "
              f"{r['cores_busy']:>10.2f}  {r['identical']}")
    result["runs"] = runs
    print("wrote", common.write_result("cache_build", result, a, a.out))


if __name__ == "__main__":
    main()
