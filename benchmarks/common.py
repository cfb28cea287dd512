"""Helpers shared by the benchmarks: building the run's data and model exactly as train.py does,
model FLOP counting, memory readings, and the machine's measured fp32 matmul rate."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- data + model as train.py

def build_data_and_model(cfg, pretrained: bool = True):
    """(train dataset, model, spec, pad_id) built by the run assembly training uses."""
    from mmbert.assembly import build_run_data, build_run_model, model_spec

    data = build_run_data(cfg, with_val=False)
    spec = model_spec(cfg, data.pre)
    return data.train, build_run_model(cfg, spec, pretrained), spec, data.pad_id


# ----------------------------------------------------------------------------- FLOPs

def encoder_shapes(encoder_name: str) -> dict:
    """Layers, width, FFN width and non-embedding parameter count of the text encoder (from its config,
    no weights loaded)."""
    from transformers import AutoConfig

    from mmbert.data.tokenize import resolve_encoder_path

    c = AutoConfig.from_pretrained(resolve_encoder_path(encoder_name))
    L, H, I = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    # per layer: Q, K, V, O (H x H + H) + FFN (H x I + I, I x H + H) + 2 LayerNorms (2H each)
    per_layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 4 * H
    return {"layers": L, "hidden": H, "intermediate": I, "heads": c.num_attention_heads,
            "non_embedding_params": L * per_layer}


def train_flops(real_lengths, shapes: dict) -> float:
    """Training FLOPs (forward + backward) spent on real tokens: 6 x non-embedding params per token plus
    attention 12 x layers x T x hidden per token (QK^T and AV, forward+backward), T = each sequence's
    own real length."""
    n, L, H = shapes["non_embedding_params"], shapes["layers"], shapes["hidden"]
    total = 0.0
    for t in real_lengths:
        total += 6.0 * n * t + 12.0 * L * t * t * H
    return total


# ----------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def local_nbytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- matmul peak

MATMUL_WORKER = r"""
import sys, time, json, torch
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(threads)
M = 2048  # tokens of a 16 x 128 micro-batch
# forward (x W), grad-input (g W^T) and grad-weight (x^T g) shapes of BERT-base-like/MiniLM layers
shapes = [(M, 384, 384), (M, 384, 1536), (M, 1536, 384), (384, M, 384), (384, M, 1536), (1536, M, 384)]
mats = [(torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)) for m, k, n in shapes]
for a, b, c in mats:
    torch.mm(a, b, out=c)
flops = 0.0
t0, c0 = time.perf_counter(), time.process_time()
while time.perf_counter() - t0 < seconds:
    for (a, b, c), (m, k, n) in zip(mats, shapes):
        torch.mm(a, b, out=c)
        flops += 2.0 * m * k * n
print(json.dumps({"flops": flops, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def measure_matmul(procs: int, threads: int, seconds: float = 3.0) -> dict:
    """`procs` concurrent processes x `threads` threads each running fp32 sgemm of the model's shapes;
    returns the summed FLOP/s (wall clock) and the FLOP/s per CPU-second (robust to a shared machine)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    ps = [subprocess.Popen([sys.executable, "-c", MATMUL_WORKER, str(threads), str(seconds)],
                           stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    return {"flops_per_s": sum(o["flops"] / o["wall_s"] for o in outs),
            "flops_per_cpu_s": sum(o["flops"] for o in outs) / sum(o["cpu_s"] for o in outs),
            "procs": procs, "threads": threads, "seconds": seconds}


def torchrun_cmd(nproc: int, script: str, args: list[str], port: Optional[int] = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if port is None:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    else:
        cmd += ["--master_port", str(port)]
    return cmd + [script, *args]


def script_cmd(nproc: int, script: str, args: list[str]) -> list[str]:
    """torchrun with nproc processes, or the plain interpreter for one."""
    return torchrun_cmd(nproc, script, args) if nproc > 1 else [sys.executable, script, *args]


def run_checked(cmd: list[str], what: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run cmd in the repository root; on failure print the tail of its output and stop with `what failed`."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-6000:])
        raise SystemExit(f"{what} failed ({r.returncode})")
    return r


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ----------------------------------------------------------------------------- results

def write_result(name: str, record: dict, args=None, path: Optional[str] = None) -> str:
    """Every benchmark's JSON in one layout: {"benchmark": name, "date", "args": the command's options, then the
    benchmark's own fields}; default path benchmarks/results/NAME.json. Returns the path."""
    path = path or os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = {"benchmark": name, "date": now(), "args": vars(args) if args is not None else {}, **record}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return path


# ----------------------------------------------------------------------------- the Trainer's own step

def trainer(cfg, env):
    """A Trainer over build_run's parts, as train.py builds it (its output_dir created; nothing trained yet)."""
    from mmbert.training.build import build_run
    from mmbert.training.loop import Trainer

    os.makedirs(cfg.train.output_dir, exist_ok=True)
    return Trainer(cfg, env, build_run(cfg, env))


def close_trainer(t):
    t.batches = None  # stops the step loader's workers
    t.metrics.close()


STEP_PHASES = ("batch", "forward_backward", "optimizer_step", "step")


class PhaseTimer:
    """Times the phases of the Trainer's own train_step (its batch, forward_backward and optimizer_step) by
    wrapping those methods on this one instance: the step timed is the step train.py runs."""

    def __init__(self, t):
        import torch

        self.t, self.times = t, {}
        cuda = t.env.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(t.env.device)) if cuda else (lambda: None)
        for phase, method in zip(STEP_PHASES, ("train_batches", "forward_backward", "optimizer_step")):
            setattr(t, method, self._timed(phase, getattr(t, method), sync))

    def _timed(self, phase: str, fn, sync):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.times[phase] = time.perf_counter() - start
            return out
        return run

    def step(self) -> tuple[dict, tuple[int, int]]:
        """One train_step: ({phase: seconds, "step": the whole step}, (real tokens, padded tokens))."""
        start = time.perf_counter()
        st = self.t.train_step()
        return {**self.times, "step": time.perf_counter() - start}, (st.real_tokens, st.padded_tokens)
