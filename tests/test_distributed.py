"""The distributed engine with real processes (torchrun, gloo on CPU)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, write_config


@pytest.fixture(scope="module")
def small_data(reviews, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "small.parquet")
    reviews.iloc[:240].to_parquet(path)
    return path


@pytest.fixture(scope="module")
def config(no_dropout_bert, small_data, tmp_path_factory) -> str:
    return write_config(tmp_path_factory.mktemp("cfg") / "c.yaml", no_dropout_bert, small_data,
                        train={"select_best": False, "eval_each_epoch": False})


def losses(run_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


@pytest.mark.slow
def test_none_ddp_fsdp_agree(config, tmp_path):
    """Same global batch (16): 1 process x 16 vs 2 processes x 8, DDP, FSDP and no --strategy at all (auto: one
    model trained with FSDP, never a replica per rank)."""
    runs = {"none": (1, 16), "ddp": (2, 8), "fsdp": (2, 8), "auto": (2, 8)}
    for strategy, (nproc, bs) in runs.items():
        flag = [] if strategy == "auto" else ["--strategy", strategy]
        r = run_cli(["train.py", "--config", config, *flag, "--max-steps", "4",
                     "--batch-size", str(bs), "--output-dir", str(tmp_path / strategy)], nproc=nproc)
        if strategy in ("fsdp", "auto"):
            assert "FSDP2: 4 units + root" in r.stdout + r.stderr  # embeddings, 2 layers, fusion+head
        if strategy == "auto":
            assert "strategy=fsdp (auto: 2 processes)" in r.stdout + r.stderr
    ref = losses(tmp_path / "none")
    assert sorted(ref) == [1, 2, 3, 4]
    ref_w = load_file(tmp_path / "none" / "final" / "model.safetensors")
    for strategy in ("ddp", "fsdp", "auto"):
        got = losses(tmp_path / strategy)
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-5), (strategy, step)
        w = load_file(tmp_path / strategy / "final" / "model.safetensors")
        assert set(w) == set(ref_w)
        diff = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        assert diff < 1e-4, (strategy, diff)
    assert losses(tmp_path / "none")[4] < losses(tmp_path / "none")[1]


@pytest.mark.slow
def test_fsdp_checkpoint_resume_across_world_sizes(config, tmp_path):
    out = str(tmp_path / "run")
    run_cli(["train.py", "--config", config, "--strategy", "fsdp", "--max-steps", "4", "--checkpoint-every", "2",
             "--output-dir", out], nproc=2)
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_2", "step_4"]
    assert any(f.endswith(".distcp") for f in os.listdir(os.path.join(out, "checkpoints", "step_4")))
    # the sharded checkpoint consolidates, on one process with no model code, to the final weights
    single = str(tmp_path / "single.safetensors")
    r = run_cli(["-m", "mmbert.tools.consolidate", os.path.join(out, "checkpoints", "step_4"), single])
    a, b = load_file(single), load_file(os.path.join(out, "final", "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = run_cli(["train.py", "--config", config, "--strategy", "fsdp", "--max-steps", "6", "--resume", "auto",
                 "--output-dir", out], nproc=2)
    assert "at step 4" in r.stdout + r.stderr
    r = run_cli(["train.py", "--config", config, "--strategy", "none", "--max-steps", "8", "--resume", "auto",
                 "--output-dir", out])
    assert "at step 6" in r.stdout + r.stderr and "saved on 2 ranks, now 1" in r.stdout + r.stderr
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert steps == list(range(1, 9))  # one continuous step count
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))


@pytest.mark.slow
def test_fsdp_sharding_and_collectives_change_speed_not_results(config, tmp_path):
    """The defaults (sharding auto, which keeps this small model unsharded from forward to backward; point-to-
    point collectives on gloo) against resharding after forward and gloo's own all-gather / reduce-scatter:
    on 2 ranks every variant moves the same bytes and sums 2 terms, so the weights are equal bit for bit."""
    runs = {"default": [], "full_native": ["--set", "dist.sharding=full", "--set", "dist.collectives=native"],
            "full_p2p": ["--set", "dist.sharding=full"]}
    logs = {}
    for name, extra in runs.items():
        r = run_cli(["train.py", "--config", config, "--strategy", "fsdp", "--max-steps", "3", "--batch-size", "8",
                     "--output-dir", str(tmp_path / name), *extra], nproc=2)
        logs[name] = r.stdout + r.stderr
    assert "sharding=shard_grad_op" in logs["default"] and "collectives=p2p" in logs["default"]
    assert "sharding=full" in logs["full_native"] and "collectives=native" in logs["full_native"]
    ref = load_file(tmp_path / "default" / "final" / "model.safetensors")
    for name in ("full_native", "full_p2p"):
        w = load_file(tmp_path / name / "final" / "model.safetensors")
        assert set(w) == set(ref)
        assert all(torch.equal(w[k], ref[k]) for k in ref), name
        assert losses(tmp_path / name) == losses(tmp_path / "default"), name


@pytest.mark.slow
def test_frozen_word_embeddings_stay_fixed_and_fsdp_still_matches_none(config, no_dropout_bert, tmp_path):
    """model.freeze_word_embeddings under FSDP2 (frozen and trained parameters in one shard group), with a
    checkpoint and resume in between: the table ends bit-identical to the pretrained one, everything else
    trains, and 2 FSDP ranks x 8 still agree with 1 process x 16."""
    # constant lr: the first FSDP run stops at step 2, and a linear decay would end there
    args = ["train.py", "--config", config, "--set", "model.freeze_word_embeddings=true",
            "--set", "train.schedule=constant"]
    r = run_cli(args + ["--strategy", "none", "--max-steps", "3", "--batch-size", "16",
                        "--output-dir", str(tmp_path / "none")])
    assert "froze the encoder's word embeddings" in r.stdout + r.stderr
    fsdp = str(tmp_path / "fsdp")
    run_cli(args + ["--strategy", "fsdp", "--max-steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
                    "--output-dir", fsdp], nproc=2)
    run_cli(args + ["--strategy", "fsdp", "--max-steps", "3", "--batch-size", "8", "--resume", "auto",
                    "--output-dir", fsdp], nproc=2)
    pre = load_file(os.path.join(no_dropout_bert, "model.safetensors"))
    key = "text_encoder.encoder.embeddings.word_embeddings.weight"
    for run in ("none", "fsdp"):
        w = load_file(tmp_path / run / "final" / "model.safetensors")
        assert torch.equal(w[key], pre["embeddings.word_embeddings.weight"]), run
        moved = w["text_encoder.encoder.embeddings.position_embeddings.weight"] - pre["embeddings.position_embeddings.weight"]
        assert moved.abs().max() > 1e-4, run  # the rest of the embeddings still train
    ref, got = losses(tmp_path / "none"), losses(fsdp)
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step


@pytest.mark.slow
def test_finished_run_is_not_clobbered(config, tmp_path):
    out = str(tmp_path / "run")
    run_cli(["train.py", "--config", config, "--max-steps", "1", "--output-dir", out])
    r = run_cli(["train.py", "--config", config, "--max-steps", "1", "--output-dir", out], check=False)
    assert r.returncode != 0 and "finished run" in r.stderr and "Traceback" not in r.stderr
    run_cli(["train.py", "--config", config, "--max-steps", "1", "--output-dir", out, "--overwrite"])


def _wait_for_step(path: str, step: int, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if os.path.isfile(path) and any('"loss"' in ln and json.loads(ln)["step"] >= step for ln in open(path)):
            return
        time.sleep(0.1)
    raise AssertionError("run did not reach the step in time")


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_and_resume_matches_uninterrupted(config, tmp_path):
    args = ["train.py", "--config", config, "--strategy", "fsdp", "--max-steps", "14", "--set", "train.log_every=1"]
    # the uninterrupted reference
    run_cli(args + ["--output-dir", str(tmp_path / "ref")], nproc=2)
    ref = losses(tmp_path / "ref")

    out = str(tmp_path / "pre")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"] + args + ["--output-dir", out],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(os.path.join(out, "metrics.jsonl"), 3, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGTERM)  # one rank only
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert "preempted (SIGTERM)" in log or "preempted (peer signal)" in log
    done = [d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")]
    assert len(done) == 1 and os.path.isfile(os.path.join(out, "checkpoints", done[0], "COMPLETE"))
    saved_step = int(done[0].split("_")[1])
    assert 3 <= saved_step < 14 and not os.path.exists(os.path.join(out, "final"))
    assert max(losses(out)) == saved_step  # saved exactly at the last finished step boundary

    run_cli(args + ["--output-dir", out, "--resume", "auto"], nproc=2)
    got = losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:  # the same bits as the run that was never interrupted
        assert got[step] == ref[step], (step, got[step], ref[step])


def test_partial_checkpoints_are_skipped(tmp_path):
    from mmbert.distributed.checkpoint import COMPLETE, find_latest

    root = tmp_path / "checkpoints"
    for name, complete in (("step_2", True), ("step_4", True), ("step_6", False), (".tmp_step_8", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE).write_text("ok")
    assert find_latest(str(root)) == str(root / "step_4")
    assert find_latest(str(tmp_path / "nothing")) is None


# ----------------------------------------------------------------------------- SIGKILL, resume

def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"])


@pytest.mark.slow
def test_sigkill_of_one_rank_stops_the_job_and_resume_auto_finishes(tiny_bert, work, tmp_path):
    """2 ranks (torchrun, gloo, FSDP, no restarts), a checkpoint every step; rank 0 is SIGKILLed once a
    checkpoint exists. The job must end non-zero on its own (no hang), no final/ model is written, and
    `--resume auto` continues from the newest complete checkpoint (skipping a step dir without COMPLETE
    and a .tmp_step_N, even one holding a COMPLETE file) to the end, with one continuous step count."""
    from mmbert.distributed.checkpoint import COMPLETE, list_complete

    steps = 30
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(work / "good.csv"),
                       train={"select_best": False, "eval_each_epoch": False, "checkpoint_every": 1})
    out = tmp_path / "run"
    root = str(out / "checkpoints")
    args = ["train.py", "--config", cfg, "--strategy", "fsdp", "--max-steps", str(steps), "--batch-size", "4",
            "--output-dir", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--max-restarts", "0"] + args,
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list_complete(root) or list_complete(root)[-1][0] < 2:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert len(workers) == 2
        victim = next(p for p in workers if _rank_of(p) == 0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        rc = proc.wait(timeout=150)  # no hang: torchrun stops the surviving rank, collectives time out anyway
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "killed.log").read_text()
    assert rc != 0, text[-3000:]
    assert time.time() - killed_at < 150
    assert not (out / "final").exists()
    done = list_complete(root)
    assert done and done[-1][0] < steps, text[-3000:]
    last, last_dir = done[-1]

    # leftovers a kill can leave: a renamed-looking step dir without COMPLETE, a .tmp_step_N (even complete)
    for name in (f"step_{last + 5}", f".tmp_step_{last + 6}"):
        shutil.copytree(last_dir, os.path.join(root, name))
    os.remove(os.path.join(root, f"step_{last + 5}", COMPLETE))

    r = run_cli(args + ["--resume", "auto"], nproc=2, timeout=400)
    assert f"resumed from {last_dir} at step {last}" in r.stdout + r.stderr
    records = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))  # continuous, nothing twice
    with open(out / "final" / "train_summary.json") as f:
        assert json.load(f)["steps"] == steps
    assert list_complete(root)[-1][0] == steps
