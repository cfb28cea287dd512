"""End to end on CUDA (scripts/gpu_check.sh runs these): FSDP2 in bf16 on 1 GPU and on every GPU through torchrun,
bf16 and fp16 on every strategy, activation checkpointing, CPU offload, a checkpoint + --resume auto, evaluate.py on N ranks, export.py of the
GPU-trained model, and a samples/s line. Every test skips on a machine without a CUDA GPU."""
from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch

from conftest import run_cli, write_config

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(NGPU == 0, reason="no CUDA GPU (torch.cuda.is_available() is False): "
                                         "run scripts/gpu_check.sh on a GPU machine"),
]
BF16 = ["--strategy", "fsdp", "--set", "dist.mixed_precision=bf16"]


@pytest.fixture(scope="module")
def gpu_cfg(tiny_bert, reviews, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("gpu")
    reviews.to_parquet(d / "reviews.parquet")
    return write_config(d / "c.yaml", tiny_bert, str(d / "reviews.parquet"),
                        data={"split": {"fractions": [0.6, 0.2, 0.2], "seed": 0}},
                        train={"select_best": False, "eval_each_epoch": False})


def train(cfg: str, out, *args: str, nproc: int = 1):
    return run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--max-eval-rows", "32", *args],
                   nproc=nproc, env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(nproc)))} if nproc < NGPU else None)


def records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r and "samples_per_s" in r]


def check_run(r, out, steps: int, world: int = 1, strategy: str = "fsdp", precision: str = "bf16"):
    log = r.stdout + r.stderr
    assert f"world={world} device=cuda:0 strategy={strategy} precision={precision}" in log, log[-3000:]
    recs = records(out)
    assert [x["step"] for x in recs][-1] == steps and all(math.isfinite(x["loss"]) for x in recs)
    assert all(x["peak_mem_gib"] > 0 for x in recs)
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))
    return recs


@pytest.fixture(scope="module")
def gpu_run(gpu_cfg, tmp_path_factory):
    """One GPU, FSDP2 bf16: 4 steps with a checkpoint every 2, then --resume auto to step 6."""
    out = tmp_path_factory.mktemp("gpu_run") / "run"
    check_run(train(gpu_cfg, out, *BF16, "--max-steps", "4", "--checkpoint-every", "2"), out, 4)
    assert os.path.isdir(out / "checkpoints" / "step_4")
    r = train(gpu_cfg, out, *BF16, "--max-steps", "6", "--resume", "auto")
    assert f"resumed from {out / 'checkpoints' / 'step_4'} at step 4" in r.stdout + r.stderr
    check_run(r, out, 6)
    return out


def test_fsdp_bf16_one_gpu_checkpoint_and_resume(gpu_run):
    steps = [x["step"] for x in records(gpu_run)]
    assert steps == sorted(set(steps)) and steps[-1] == 6


@pytest.mark.skipif(NGPU < 2, reason=f"needs 2+ CUDA GPUs ({NGPU} here)")
def test_fsdp_bf16_all_gpus_torchrun(gpu_cfg, tmp_path):
    n = min(NGPU, 8)
    check_run(train(gpu_cfg, tmp_path / "run", *BF16, "--max-steps", "3", nproc=n), tmp_path / "run", 3, world=n)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"])
def test_mixed_precision_on_every_strategy(gpu_cfg, tmp_path, strategy, precision):
    """bf16 and fp16 (loss scaling) on each strategy: none on one GPU, DDP / FSDP on up to two."""
    n = 1 if strategy == "none" else min(NGPU, 2)
    r = train(gpu_cfg, tmp_path / "run", "--strategy", strategy, "--set", f"dist.mixed_precision={precision}",
              "--max-steps", "6", "--set", "train.log_every=1", nproc=n)
    recs = check_run(r, tmp_path / "run", 6, world=n, strategy=strategy, precision=precision)
    if precision == "fp16":
        assert all(x["grad_scale"] > 0 and x["skipped_steps"] < 6 for x in recs)


@pytest.mark.parametrize("key", ["dist.activation_checkpointing=true", "dist.cpu_offload=true"])
def test_activation_checkpointing_and_cpu_offload(gpu_cfg, tmp_path, key):
    n = min(NGPU, 2)
    r = train(gpu_cfg, tmp_path / "run", *BF16, "--set", key, "--max-steps", "3", nproc=n)
    check_run(r, tmp_path / "run", 3, world=n)
    if "activation" in key:
        assert "activation_checkpointing=True" in r.stdout + r.stderr
    with open(tmp_path / "run" / "config.yaml") as f:
        assert key.replace("dist.", "").replace("=true", ": true") in f.read()


def test_evaluate_on_n_ranks_and_export(gpu_run, tmp_path):
    """evaluate.py on every GPU (up to 4) and export.py of the GPU-trained model (verified against PyTorch)."""
    n = min(NGPU, 4)
    r = run_cli(["evaluate.py", "--model-dir", str(gpu_run / "final"), "--split", "test", "--max-eval-rows", "40",
                 "--output-dir", str(tmp_path / "ev"), "--no-plots", "--no-progress"], nproc=n)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["run"]["world_size"] == n and "40 rows" in r.stdout
    onnx = tmp_path / "exported" / "model.onnx"
    run_cli(["export.py", "--model-dir", str(gpu_run / "final"), "--output-dir", str(onnx), "--report",
             str(tmp_path / "report.json")])
    assert onnx.exists() and (tmp_path / "report.json").exists()


def test_throughput_line(gpu_cfg, tmp_path):
    """A short bf16 FSDP run on one GPU: samples/s from metrics.jsonl (median after 3 warm-up steps)."""
    out = tmp_path / "run"
    train(gpu_cfg, out, *BF16, "--max-steps", "12", "--batch-size", "32")
    sps = statistics.median(x["samples_per_s"] for x in records(out)[3:])
    assert sps > 0
    print(f"\nthroughput: tiny BERT, FSDP2 bf16, 1 x {torch.cuda.get_device_name(0)}: {sps:.1f} samples/s")
