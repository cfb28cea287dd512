"""Process setup from whatever launched us: torchrun / accelerate launch, plain srun, or nothing."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..fsutil import available_cores

log = logging.getLogger("mmbert")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launcher: str
    owns_group: bool = True  # init_distributed created the process group (cleanup destroys only such a group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    # "node[01-04],other" -> "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head or "127.0.0.1"


def read_launch_env() -> tuple[int, int, int, int, str]:
    """(rank, world, local_rank, local_world, launcher) from torchrun/accelerate or SLURM env vars.
    torchrun's variables win: under `srun torchrun`, SLURM_PROCID names the node, not the rank."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_FSDP" in env else "torchrun"
        return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", world)), launcher)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(1, world // max(1, nodes))
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world, "srun"
    return 0, 1, 0, 1, "none"


def setup_logging(rank: int, world: int):
    """Rank 0 logs INFO to stdout; other ranks log only warnings and errors, tagged with their rank."""
    root = logging.getLogger("mmbert")
    root.handlers.clear()
    root.propagate = False
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    tag = f"[rank {rank}] " if world > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # "mmbert.main": messages every rank would repeat identically (data reports); rank 0 only.
    logging.getLogger("mmbert.main").setLevel(logging.INFO if rank == 0 else logging.CRITICAL + 1)


def set_threads(local_world: int, requested: int | None):
    """torchrun sets OMP_NUM_THREADS=1; on CPU split the cores we may use between the local ranks instead."""
    n = requested or max(1, available_cores() // max(1, local_world))
    torch.set_num_threads(n)
    return n


def init_distributed(timeout_s: int = 1800, num_threads: int | None = None) -> DistEnv:
    rank, world, local_rank, local_world, launcher = read_launch_env()
    setup_logging(rank, world)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        set_threads(local_world, num_threads)
    owns = not dist.is_initialized()  # a caller's own group (mmbert.train in their job) is used, and left to them
    if owns:
        init_group(backend, rank, world, launcher, timedelta(seconds=timeout_s), device)
    return DistEnv(rank, world, local_rank, local_world, device, launcher, owns)


def init_group(backend: str, rank: int, world: int, launcher: str, timeout: timedelta, device: torch.device):
    """A process that no launcher started gets a one-process group on an in-memory store: collectives, DCP and
    FSDP work unchanged, and no port is taken (an exported MASTER_ADDR / MASTER_PORT, left from an earlier job,
    must not make two such runs fight over one port). Launched ranks meet at MASTER_ADDR:MASTER_PORT."""
    if world == 1 and launcher == "none":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise ConfigError(f"cannot start the process group at MASTER_ADDR:MASTER_PORT "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: the port is in use by another "
                          f"job; set MASTER_PORT to a free port (torchrun --master_port, or --standalone)") from None


def cleanup(env: "DistEnv | None" = None):
    """Destroy the process group, unless it was the caller's before init_distributed."""
    if dist.is_initialized() and (env is None or env.owns_group):
        try:
            dist.destroy_process_group()
        except Exception:  # shutting down after an error: nothing useful to add
            pass
