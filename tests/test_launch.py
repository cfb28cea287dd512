"""The launch/ files with real processes: two-"node" torchrun, accelerate FSDP, and SLURM sbatch on the
local one-node cluster (scripts/slurm_cluster.sh), including preemption -> save -> requeue -> resume."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from conftest import ROOT, write_config

pytestmark = pytest.mark.slow

BIN = os.path.dirname(sys.executable)
TRAIN_ARGS = ["--max-train-rows", "32", "--max-eval-rows", "16"]


def _env(**extra) -> dict:
    """This venv first on PATH (torchrun, accelerate; SLURM jobs inherit it), no outer launcher's variables."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SBATCH_", "TORCHELASTIC_", "ACCELERATE_", "FSDP_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(PATH=BIN + os.pathsep + e.get("PATH", ""), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.update(extra)
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(ln)["step"] for ln in f if '"loss"' in ln]


@pytest.fixture(scope="module")
def cfg(tiny_bert, reviews, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("launch")
    reviews.iloc[:300].to_parquet(d / "data.parquet")
    return write_config(d / "c.yaml", tiny_bert, str(d / "data.parquet"))


# ----------------------------------------------------------------------------- torchrun, accelerate

def test_torchrun_two_nodes_on_one_machine(cfg, tmp_path):
    """launch/torchrun.sh twice with NNODES=2: c10d rendezvous on HEAD_ADDR:HEAD_PORT, one process per "node"."""
    out = tmp_path / "run"
    env = _env(NNODES="2", NPROC_PER_NODE="1", HEAD_ADDR="127.0.0.1", HEAD_PORT=str(_free_port()),
               RDZV_ID=f"test-{uuid.uuid4().hex[:8]}")
    cmd = ["launch/torchrun.sh", "train.py", "--config", cfg, "--max-steps", "2", *TRAIN_ARGS,
           "--output-dir", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-4000:]
    log = "\n".join(logs)
    assert "world=2" in log, log[-4000:]
    assert os.path.isfile(out / "final" / "model.safetensors")
    assert _steps(out) == [1, 2]


def test_accelerate_fsdp_config(cfg, tmp_path):
    out = tmp_path / "A"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "launch/accelerate_fsdp.yaml",
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "train.py", "--config", cfg, "--max-steps", "2", *TRAIN_ARGS, "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "launcher=accelerate world=2" in log and "strategy=fsdp" in log, log[-4000:]
    assert os.path.isfile(out / "final" / "model.safetensors")
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["dist"]["strategy"] == "fsdp"


def test_accelerate_ddp_config_without_strategy_trains_one_ddp_model(cfg, tmp_path):
    """accelerate's MULTI_GPU config with no --strategy: DDP, as the accelerate config names (it trained a replica
    per rank)."""
    out = tmp_path / "D"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file", "launch/accelerate_ddp.yaml",
           "--main_process_port", str(_free_port()),
           "train.py", "--config", cfg, "--max-steps", "2", *TRAIN_ARGS, "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "launcher=accelerate world=2" in log and "strategy=ddp (auto: accelerate launch's config)" in log, log[-4000:]
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["dist"]["strategy"] == "ddp"


# ----------------------------------------------------------------------------- SLURM

def _slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH: install and start the local cluster with scripts/slurm_cluster.sh install && start"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e}): the SLURM cluster is not up (scripts/slurm_cluster.sh start)"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip()}: the SLURM cluster is not up (scripts/slurm_cluster.sh start)"
    states = r.stdout.split()
    if not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc", "completing")) for s in states):
        return f"no usable SLURM node (states: {states}); see scripts/slurm_cluster.sh status"
    return None


_NO_SLURM = _slurm_unavailable()
slurm = pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))


@pytest.fixture
def job_name():
    """A unique job name; whatever is left of the job when the test ends is cancelled."""
    name = f"mmbert-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, check=False)


def _job(job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _log(tmp_path) -> str:
    return "\n".join(open(os.path.join(tmp_path, f)).read() for f in sorted(os.listdir(tmp_path))
                     if f.startswith("slurm-"))


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


@pytest.mark.slurm
@slurm
def test_sbatch_trains_on_two_ranks(cfg, tmp_path, job_name):
    """The README's command: `sbatch --wait launch/slurm.sbatch train.py ...` on the one-node cluster."""
    out = tmp_path / "S"
    cmd = ["sbatch", "--wait", f"--job-name={job_name}", f"--output={tmp_path}/slurm-%j.out",
           "launch/slurm.sbatch", "train.py", "--config", cfg, "--max-steps", "2", *TRAIN_ARGS,
           "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=170, check=False)
    log = _log(tmp_path)
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{log[-4000:]}"
    assert "launcher=torchrun world=2" in log, log[-4000:]  # 2 CPUs allocated -> 2 ranks
    assert "--resume auto" in log  # added by slurm.sbatch
    assert os.path.isfile(out / "final" / "model.safetensors")
    assert _steps(out) == [1, 2]


def _submit(cfg: str, tmp_path, job_name: str, train_args: list[str]) -> str:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={tmp_path}/slurm-%j.out",
           "launch/slurm.sbatch", "train.py", "--config", cfg, *train_args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=True)
    return r.stdout.strip().split(";")[0]


def _wait_for_steps(job: str, out, tmp_path, n: int, timeout: float = 100):
    deadline = time.time() + timeout
    while len(_steps(out)) < n:
        state = _job(job).get("JobState", "")
        assert not state.startswith(TERMINAL), f"job ended early ({state}):\n{_log(tmp_path)[-4000:]}"
        assert time.time() < deadline, f"no training steps in time:\n{_log(tmp_path)[-4000:]}"
        time.sleep(0.2)


def _wait_for_end(job: str, tmp_path, timeout: float) -> dict[str, str]:
    deadline, seen_terminal = time.time() + timeout, 0
    while seen_terminal < 2:  # twice in a row, so no state passed through during a requeue can fool us
        info = _job(job)
        seen_terminal = seen_terminal + 1 if info.get("JobState", "").startswith(TERMINAL) else 0
        assert time.time() < deadline, f"job did not finish: {info}\n{_log(tmp_path)[-4000:]}"
        time.sleep(1)
    return info


@pytest.mark.slurm
@slurm
def test_sbatch_preemption_saves_requeues_and_resumes(cfg, tmp_path, job_name):
    """USR1 to the batch shell mid-run (what `--signal=B:USR1@N` sends before the time limit): the ranks
    save at a step boundary, rank 0 requeues the job, the second start resumes and finishes."""
    out = tmp_path / "P"
    total = 60
    job = _submit(cfg, tmp_path, job_name, ["--max-steps", str(total), "--set", "train.log_every=1", "--output-dir", str(out)])
    _wait_for_steps(job, out, tmp_path, 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = _wait_for_end(job, tmp_path, 100)
    log = _log(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "1", info

    # run 1: signal forwarded, checkpoint at a step boundary, requeue
    assert "start 1 (SLURM_RESTART_COUNT=0)" in log and "got SIGUSR1 (preemption), forwarding" in log, log[-4000:]
    m = re.search(r"preempted \(SIGUSR1\): saved step (\d+)", log)
    assert m, log[-4000:]
    saved = int(m.group(1))
    assert 3 <= saved < total
    assert os.path.isfile(out / "checkpoints" / f"step_{saved}" / "COMPLETE")
    assert f"requeued SLURM job {job}" in log
    # run 2: the same job again, resumed from that checkpoint, finished
    assert "start 2 (SLURM_RESTART_COUNT=1)" in log, log[-4000:]
    assert re.search(rf"resumed from \S+/step_{saved} at step {saved}\b", log), log[-4000:]
    assert _steps(out) == list(range(1, total + 1))  # one continuous step count
    assert os.path.isfile(out / "final" / "model.safetensors")


@pytest.mark.slurm
@slurm
def test_plain_scancel_cancels_without_requeue(cfg, tmp_path, job_name):
    """`scancel JOB` (SIGTERM everywhere) must end the job: the ranks may save, but rank 0 does not requeue."""
    out = tmp_path / "C"
    job = _submit(cfg, tmp_path, job_name, ["--max-steps", "500", "--set", "train.log_every=1", "--output-dir", str(out)])
    _wait_for_steps(job, out, tmp_path, 2)
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = _wait_for_end(job, tmp_path, 60)
    log = _log(tmp_path)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log[-4000:]}"
    assert f"requeued SLURM job {job}" not in log, log[-4000:]
    assert not os.path.exists(out / "final")
