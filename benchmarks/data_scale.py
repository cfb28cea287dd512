#!/usr/bin/env python
"""Data at scale: start-up time, wall time and per-rank peak RSS of a 2-rank FSDP training job as the table
grows, without the token cache (every rank reads and tokenizes the table) and with it (local rank 0 builds
it once, every rank memory-maps it; then a cache hit, as a requeue or the next experiment gets).

    python benchmarks/data_scale.py                            # sizes 1, 10, 40 (the 40x jobs take minutes each)
    python benchmarks/data_scale.py --sizes 1,10 --steps 2     # quick look, ~5 min on 2 CPU cores
    python benchmarks/data_scale.py --sizes '' --workers 0,1   # steady-state samples/s by train.num_workers

Size k is the shipped table (mmbert/examples/data) concatenated k times, written once into --workdir (a
temp dir, removed at the end, unless given; a parquet already there with the right row count is reused).
Its train split is the shipped train rows of every copy (shipped index + j x rows, j < k); val and test are
the shipped ones (copy 0 only), so evaluation cost does not grow. Per size, three `torchrun train.py` jobs
(--strategy fsdp, 2 ranks, --max-steps --steps, log every step, 64 val rows, no periodic eval/checkpoint;
the last step's eval and checkpoint cannot be turned off), in --order:
  nocache   --no-cache: every rank reads and tokenizes the table itself
  build     data.cache_dir = a fresh empty folder: local rank 0 builds the token cache, the other rank waits
  warm      the same cache_dir again: a cache hit
Every text of these jobs is one chunk padded to max_tokens (data.max_chunks=1, data.pad_to_max=true;
--no-fixed-shape: the config as shipped): the length-bucketed order differs with the table's size, so
otherwise the first steps' rows differ between sizes, and with them their chunk count and length, step time
and activation memory, most of a rank's peak RSS (the encoder skips empty chunks even with pad_to_max; as
shipped, 2 steps: ~10 s/step at 1x, ~4 s/step at 10x, 1x's peak RSS ~600-900 MiB above 10x's). Every job gets
its own empty datasets cache (MMBERT_DATASETS_CACHE; --shared-datasets-cache: the user's), so no job rides on
the parquet -> Arrow conversion an earlier one paid for.

Reported per job:
  wall s          the whole torchrun job, launch to exit
  first step s    launch until the first training-step record (a "loss" key) is in OUTPUT/metrics.jsonl
                  (polled every 0.1 s): reading + tokenizing / mapping the data, model build, first step
  peak RSS        per rank: VmHWM of each rank process (a child of torchrun; rank from its RANK env var),
                  polled every 0.2 s until it exits; it counts mapped token-cache pages the rank touched
                  (shared page cache). The JSON and the growth lines also have the largest RssAnon (the
                  rank's own memory) and RssFile (mapped files) seen by the same polls
  cache MB        build/warm: bytes of the cache_dir folder
  tokenize rows/s rows of all cached splits / meta.json's build_seconds; without that field, / (build first
                  step s - warm first step s)
Then the issue's targets at the largest size: warm wall / build wall < 0.25, build wall / nocache wall <= 1.0,
and peak RSS growth from the smallest to the largest size per job kind and rank (< 250 MiB with the cache).

--workers N,M,...: a steady-state check at size 1 on a warm cache (built first by an untimed job): one job
per N with train.num_workers=N and --worker-steps steps (the config's padding), interleaved over --repeats;
reported: the median over repeats of each job's median samples/s of the steps after the first --worker-skip,
and its ratio to N=0 (or to the first N listed).

Raw numbers of every job go to benchmarks/results/data_scale.json (--out).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

EXAMPLES = os.path.join(common.ROOT, "mmbert", "examples", "data")
TABLE = os.path.join(EXAMPLES, "womens_clothing_reviews.parquet")
SPLIT_FILES = {s: os.path.join(EXAMPLES, "splits", f"{s}_idx.txt") for s in ("train", "val", "test")}
KINDS = ("nocache", "build", "warm")
NPROC = 2
TAIL = 4000  # characters of a failed job's log shown
# /proc/PID/status: the kernel's peak RSS, and the (sampled) anonymous / file-backed parts of RSS; mapped
# token-cache pages count as RssFile (page cache, shared by the node's ranks), a rank's own data as RssAnon
MEMORY_FIELDS = ("VmHWM", "RssAnon", "RssFile")
FIXED_SHAPE = ["data.max_chunks=1", "data.pad_to_max=true"]  # the same step cost at every size


# ----------------------------------------------------------------------------- the scaled tables

def read_index(path: str) -> list[int]:
    with open(path) as f:
        return [int(s) for s in f.read().split()]


def scaled_table(k: int, workdir: str) -> dict:
    """The shipped table x k (a reused parquet when its row count matches) and its index files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = pq.ParquetFile(TABLE).metadata.num_rows
    path = os.path.join(workdir, f"womens_clothing_x{k}.parquet")
    if not (os.path.isfile(path) and pq.ParquetFile(path).metadata.num_rows == k * n):
        table = pq.read_table(TABLE)
        pq.write_table(pa.concat_tables([table] * k), path + ".tmp")
        os.replace(path + ".tmp", path)
    train = read_index(SPLIT_FILES["train"])
    train_path = os.path.join(workdir, f"train_idx_x{k}.txt")
    with open(train_path, "w") as f:
        f.write("".join(f"{i + j * n}\n" for j in range(k) for i in train))
    return {"path": path, "rows": k * n, "train_rows": k * len(train), "train_indices": train_path,
            "val_indices": SPLIT_FILES["val"], "test_indices": SPLIT_FILES["test"]}


def data_sets(data: dict) -> list[str]:
    return [f"data.path={data['path']}", *(f"data.split.{s}_indices={data[f'{s}_indices']}"
                                           for s in ("train", "val", "test"))]


# ----------------------------------------------------------------------------- watching a job

def child_pids(pid: int) -> list[int]:
    """pid's direct children (psutil, else /proc/PID/task/*/children); [] once it is gone."""
    try:
        import psutil
    except ImportError:
        out = []
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                with open(path) as f:
                    out += [int(s) for s in f.read().split()]
            except OSError:
                pass
        return out
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def proc_fields(pid: int, name: str, fields) -> dict[str, str]:
    """Fields of /proc/PID/status (name "status") or environment variables (name "environ"); {} once gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    sep, lines = (":", text.splitlines()) if name == "status" else ("=", text.split("\0"))
    return {k: v.strip() for k, _, v in (ln.partition(sep) for ln in lines) if k in fields}


class Watch:
    """Polls one torchrun job: its first training-step record in metrics.jsonl, and each rank's VmHWM."""

    def __init__(self, proc: subprocess.Popen, metrics: str, t0: float):
        self.proc, self.metrics, self.t0 = proc, metrics, t0
        self.first_step_s: Optional[float] = None
        self.offset, self.partial = 0, ""
        self.ranks: dict[int, str] = {}  # pid -> rank (its RANK variable, else the order it was seen in)
        self.peak_kib: dict[int, dict[str, int]] = {}  # pid -> VmHWM and the largest RssAnon / RssFile seen

    def poll_metrics(self):
        if self.first_step_s is not None or not os.path.isfile(self.metrics):
            return
        with open(self.metrics) as f:
            f.seek(self.offset)
            text = self.partial + f.read()
            self.offset = f.tell()
        *lines, self.partial = text.split("\n")
        if any('"loss"' in ln and "loss" in json.loads(ln) for ln in lines if ln.strip()):
            self.first_step_s = time.perf_counter() - self.t0

    def poll_rss(self):
        for pid in child_pids(self.proc.pid):
            if pid not in self.ranks:
                self.ranks[pid] = proc_fields(pid, "environ", ["RANK"]).get("RANK", f"#{len(self.ranks)}")
            peak = self.peak_kib.setdefault(pid, {})
            for k, v in proc_fields(pid, "status", MEMORY_FIELDS).items():
                peak[k] = max(peak.get(k, 0), int(v.split()[0]))

    def run(self) -> dict:
        tick = 0
        while self.proc.poll() is None:
            self.poll_metrics()
            if tick % 2 == 0:
                self.poll_rss()
            tick += 1
            time.sleep(0.1)
        self.poll_metrics()
        peaks = {self.ranks[p]: {k: kib / 1024 for k, kib in m.items()} for p, m in sorted(self.peak_kib.items())}
        return {"first_step_s": self.first_step_s,
                "peak_rss_mib": {r: m["VmHWM"] for r, m in peaks.items() if "VmHWM" in m},
                "sampled_peak_mib": {r: {k: v for k, v in m.items() if k != "VmHWM"} for r, m in peaks.items()}}


# ----------------------------------------------------------------------------- one job

def train_args(a, out_dir: str, steps: int, sets: list[str], no_cache: bool) -> list[str]:
    args = ["--config", a.config, "--strategy", "fsdp", "--max-steps", str(steps), "--log-every", "1",
            "--max-eval-rows", "64", "--output-dir", out_dir, "--overwrite"]
    # --eval-every 0 / --checkpoint-every 0 are refused (">= 1 when set"): null turns them off
    for kv in ["train.eval_every=null", "train.checkpoint_every=null", "train.progress=false", *sets, *a.set]:
        args += ["--set", kv]
    return args + (["--no-cache"] if no_cache else [])


def run_job(a, name: str, steps: int, sets: list[str], no_cache: bool = False) -> dict:
    """One torchrun train.py job, watched; stops the benchmark with its log's tail when it fails."""
    out_dir = os.path.join(a.workdir, "runs", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    env = dict(os.environ)
    if not a.shared_datasets_cache:
        env["MMBERT_DATASETS_CACHE"] = os.path.join(a.workdir, "datasets_cache", name)
        shutil.rmtree(env["MMBERT_DATASETS_CACHE"], ignore_errors=True)
    cmd = common.torchrun_cmd(NPROC, "train.py", train_args(a, out_dir, steps, sets, no_cache))
    log_path = out_dir + ".log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        res = Watch(proc, os.path.join(out_dir, "metrics.jsonl"), t0).run()
        res["wall_s"] = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-TAIL:])
        raise SystemExit(f"{name}: train.py failed ({proc.returncode}): {' '.join(cmd)}")
    res["steps"] = step_records(out_dir)
    if not a.shared_datasets_cache:
        shutil.rmtree(env["MMBERT_DATASETS_CACHE"], ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints and models: not needed
    return res


def step_records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    return [{k: r[k] for k in ("step", "samples_per_s", "tokens_per_s", "padded_tokens_per_s", "step_time_s", "cpu_s",
                                "elapsed_s") if k in r}
            for r in recs if "loss" in r]


def rank_peak(job: dict, rank: str, field: str = "VmHWM") -> Optional[float]:
    """A rank's peak RSS (VmHWM), or the largest sampled RssAnon / RssFile, in MiB."""
    return job["peak_rss_mib"].get(rank) if field == "VmHWM" else job["sampled_peak_mib"].get(rank, {}).get(field)


# ----------------------------------------------------------------------------- the token cache

def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def cache_meta(cache_dir: str) -> Optional[dict]:
    """meta.json of the complete key folder under cache_dir."""
    for path in sorted(glob.glob(os.path.join(cache_dir, "*", "meta.json"))):
        if os.path.isfile(os.path.join(os.path.dirname(path), "COMPLETE")):
            with open(path) as f:
                return json.load(f)
    return None


def cache_stats(cache_dir: str, jobs: dict) -> dict:
    """Size on disk, and the build's seconds and rows/s (meta.json's build_seconds, else the first-step gap
    between the build and the warm job)."""
    meta = cache_meta(cache_dir) or {}
    splits = meta.get("splits", {})
    rows = sum(m.get("rows", 0) for m in splits.values()) or None
    seconds, source = meta.get("build_seconds"), "meta.json"
    if seconds is None and splits and all("build_seconds" in m for m in splits.values()):
        seconds = sum(m["build_seconds"] for m in splits.values())
    if seconds is None and "build" in jobs and "warm" in jobs and jobs["warm"]["first_step_s"] is not None:
        seconds, source = jobs["build"]["first_step_s"] - jobs["warm"]["first_step_s"], "first_step_difference"
    return {"cache_bytes": folder_bytes(cache_dir), "rows": rows, "build_seconds": seconds,
            "build_seconds_source": source if seconds is not None else None,
            "tokenize_rows_per_s": rows / seconds if rows and seconds and seconds > 0 else None,
            "meta_splits_rows": {n: m.get("rows") for n, m in splits.items()}}


# ----------------------------------------------------------------------------- the size sweep

def run_size(a, k: int) -> dict:
    data = scaled_table(k, a.workdir)
    cache_dir = os.path.join(a.workdir, f"cache_x{k}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(cache_dir)
    jobs = {}
    for kind in a.order:
        sets = data_sets(data) + (FIXED_SHAPE if a.fixed_shape else [])
        sets += [] if kind == "nocache" else [f"data.cache_dir={cache_dir}"]
        jobs[kind] = run_job(a, f"x{k}_{kind}", a.steps, sets, no_cache=kind == "nocache")
        j = jobs[kind]
        print(f"[{common.now()}] x{k} {kind:<8} wall {j['wall_s']:6.1f}s first step {fmt(j['first_step_s'], 1)}s "
              f"peak RSS {', '.join(f'rank {r} {v:.0f}' for r, v in j['peak_rss_mib'].items())} MiB", flush=True)
    res = {"size": k, "rows": data["rows"], "train_rows": data["train_rows"], "jobs": jobs}
    if "build" in jobs:
        res["cache"] = cache_stats(cache_dir, jobs)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return res


def fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def triple(res: dict, key) -> str:
    jobs = res["jobs"]
    return " / ".join(fmt(key(jobs[k]) if k in jobs else None, 1) for k in KINDS)


def print_table(sizes: list[dict]):
    print(f"\n{NPROC} ranks, fsdp; per job kind: {' / '.join(KINDS)}")
    print("| size | train rows | first step s | wall s | " + " | ".join(f"RSS {k} r0 / r1 MiB" for k in KINDS)
          + " | cache MB | tokenize rows/s |")
    print("|---" * (6 + len(KINDS)) + "|")
    for r in sizes:
        rss = [" / ".join(fmt(rank_peak(r["jobs"][k], rank)) for rank in ("0", "1")) if k in r["jobs"] else "-"
               for k in KINDS]
        c = r.get("cache", {})
        mb = c["cache_bytes"] / 1e6 if c else None
        print(f"| {r['size']}x | {r['train_rows']} | {triple(r, lambda j: j['first_step_s'])} | "
              f"{triple(r, lambda j: j['wall_s'])} | {' | '.join(rss)} | {fmt(mb, 1)} | "
              f"{fmt(c.get('tokenize_rows_per_s'))} |")


def ratio(num, den) -> Optional[float]:
    return num / den if num is not None and den else None


def targets(sizes: list[dict]) -> dict:
    """The issue's ratios: warm/build and build/nocache wall at the largest size, RSS growth small -> large."""
    sizes = sorted(sizes, key=lambda r: r["size"])
    small, large = sizes[0]["jobs"], sizes[-1]["jobs"]
    wall = {k: large[k]["wall_s"] if k in large else None for k in KINDS}
    out = {"largest_size": sizes[-1]["size"], "smallest_size": sizes[0]["size"],
           "warm_over_build_wall": ratio(wall["warm"], wall["build"]),
           "build_over_nocache_wall": ratio(wall["build"], wall["nocache"])}
    for field, name in zip(MEMORY_FIELDS, ("rss_growth_mib", "rss_anon_growth_mib", "rss_file_growth_mib")):
        out[name] = {}
        for k in KINDS:
            for rank in ("0", "1"):
                lo, hi = (rank_peak(j[k], rank, field) if k in j else None for j in (small, large))
                out[name][f"{k}_rank{rank}"] = hi - lo if lo is not None and hi is not None else None
    return out


def print_targets(t: dict):
    print(f"\ntargets at {t['largest_size']}x:")
    print(f"  warm wall / build wall      {fmt(t['warm_over_build_wall'], 3)}  (target < 0.25)")
    print(f"  build wall / nocache wall   {fmt(t['build_over_nocache_wall'], 3)}  (target <= 1.0)")
    print(f"  peak RSS growth {t['smallest_size']}x -> {t['largest_size']}x, MiB (target < 250 for build, warm);"
          f" in brackets: growth of the largest sampled RssAnon / RssFile")
    for name, v in t["rss_growth_mib"].items():
        print(f"    {name:<15} {fmt(v, 1):>7}  ({fmt(t['rss_anon_growth_mib'][name], 1)} / "
              f"{fmt(t['rss_file_growth_mib'][name], 1)})")


# ----------------------------------------------------------------------------- num_workers

def run_workers(a) -> dict:
    """Steady-state samples/s at size 1 on a warm cache, one job per train.num_workers, interleaved."""
    sets = data_sets(scaled_table(1, a.workdir))
    sets.append(f"data.cache_dir={os.path.join(a.workdir, 'cache_workers')}")
    run_job(a, "workers_prepare", 1, sets)  # builds the cache: every measured job is a cache hit
    runs = []
    for rep in range(a.repeats):
        for n in a.workers[rep % len(a.workers):] + a.workers[:rep % len(a.workers)]:
            job = run_job(a, f"workers{n}", a.worker_steps, [*sets, f"train.num_workers={n}"])
            sps = [s["samples_per_s"] for s in job["steps"] if s["step"] > a.worker_skip]
            job.update(repeat=rep, num_workers=n, samples_per_s=statistics.median(sps) if sps else None)
            runs.append(job)
            print(f"[{common.now()}] rep {rep} num_workers={n}: {fmt(job['samples_per_s'], 2)} samples/s "
                  f"(median of {len(sps)} steps), wall {job['wall_s']:.1f}s", flush=True)
    summary = {}
    for n in a.workers:
        vals = [r["samples_per_s"] for r in runs if r["num_workers"] == n and r["samples_per_s"] is not None]
        summary[n] = {"samples_per_s": statistics.median(vals) if vals else None, "repeats": vals}
    ref = summary[0 if 0 in summary else a.workers[0]]["samples_per_s"]
    print(f"\nnum_workers at 1x, warm cache: median over {a.repeats} repeats of each job's median samples/s "
          f"(steps > {a.worker_skip} of {a.worker_steps})")
    print("| num_workers | samples/s | x ref |\n|---|---|---|")
    for n, s in summary.items():
        s["ratio"] = ratio(s["samples_per_s"], ref)
        print(f"| {n} | {fmt(s['samples_per_s'], 2)} | {fmt(s['ratio'], 3)} |")
    return {"summary": summary, "runs": runs}


# ----------------------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="womens_clothing")
    ap.add_argument("--sizes", default="1,10,40", help="copies of the shipped table, comma list ('' for none)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per job")
    ap.add_argument("--order", default=",".join(KINDS), help="job kinds per size, in this order (warm after build)")
    ap.add_argument("--workers", default="", help="train.num_workers values of the steady-state check, e.g. 0,1")
    ap.add_argument("--repeats", type=int, default=3, help="--workers: interleaved repeats")
    ap.add_argument("--worker-steps", type=int, default=24, help="--workers: steps per job")
    ap.add_argument("--worker-skip", type=int, default=4, help="--workers: first steps not measured")
    ap.add_argument("--workdir", default=None, help="scaled tables, caches, runs (default: a temp dir, removed)")
    ap.add_argument("--no-fixed-shape", dest="fixed_shape", action="store_false",
                    help="size sweep: the config as shipped, not " + " ".join(FIXED_SHAPE))
    ap.add_argument("--shared-datasets-cache", action="store_true",
                    help="let jobs share the user's datasets cache instead of a fresh one each")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra train.py override")
    ap.add_argument("--out", default=os.path.join(common.ROOT, "benchmarks", "results", "data_scale.json"))
    a = ap.parse_args()
    a.sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    a.order = [s.strip() for s in a.order.split(",") if s.strip()]
    a.workers = [int(s) for s in a.workers.split(",") if s.strip()]
    bad = [k for k in a.order if k not in KINDS]
    warm_first = "warm" in a.order and "build" not in a.order[:a.order.index("warm")]
    if bad or len(set(a.order)) != len(a.order) or warm_first:
        ap.error(f"--order: distinct kinds of {', '.join(KINDS)}, warm after build; got {a.order}")
    if not a.sizes and not a.workers:
        ap.error("nothing to do: give --sizes and/or --workers")
    return a


def main():
    a = parse_args()
    temp = a.workdir is None
    a.workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="mmbert_data_scale_"))
    os.makedirs(a.workdir, exist_ok=True)
    result = {"date": common.now(), "args": dict(vars(a)), "cores": len(os.sched_getaffinity(0)), "nproc": NPROC}
    try:
        sizes = [run_size(a, k) for k in a.sizes]
        if sizes:
            print_table(sizes)
            result["targets"] = targets(sizes)
            print_targets(result["targets"])
        result["sizes"] = sizes
        if a.workers:
            result["workers"] = run_workers(a)
    finally:
        if temp:
            shutil.rmtree(a.workdir, ignore_errors=True)
    common.write_result("data_scale", result, a, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
