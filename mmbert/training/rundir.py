"""The output directory of a training run: one run at a time, and never two runs' state mixed.

A directory that holds run state is only reused on purpose: `--resume` continues the run whose
checkpoints it holds, `--overwrite` deletes all of it first. Rank 0 holds an exclusive lock on
`OUTPUT/.lock` for the whole run (an `flock`, so the kernel drops it when the process dies, however it
dies: a stale lock file left by a killed run is recognised as free).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from typing import Optional

import torch.distributed as dist

from ..config import Config
from ..distributed.checkpoint import list_complete
from ..errors import ConfigError

log = logging.getLogger("mmbert")
LOCK = ".lock"
# Everything a run writes into OUTPUT; any of these (bar config/preprocessing, which a user may keep there)
# means the directory belongs to a run.
STATE_NAMES = ("final", "final.tmp", "best", "best.tmp", "checkpoints", "metrics.jsonl", "ensemble.json")
WRITTEN_NAMES = STATE_NAMES + ("config.yaml", "preprocessing.json", "tensorboard")


def run_state(out: str) -> list[str]:
    """What in `out` belongs to an earlier run (for messages and the refusal)."""
    found = []
    for name in STATE_NAMES:
        path = os.path.join(out, name)
        if name == "checkpoints" and os.path.isdir(path):
            found += [f"checkpoints/{n}" for n in sorted(os.listdir(path))]
        elif os.path.exists(path):
            found.append(name + "/" if os.path.isdir(path) else name)
    return found


def clear_run_state(out: str) -> list[str]:
    removed = []
    for name in WRITTEN_NAMES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


class OutputLock:
    """flock on OUTPUT/.lock, held by rank 0 until release() or process exit.

    release() unlinks the file while still holding the lock, so a finished run leaves no trace; a holder
    therefore checks, once locked, that the path still names the file it locked (else it raced a release
    and retries on the new file)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK)
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """None when acquired, else who holds it (as the holder wrote it)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
                os.close(fd)
                return holder
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return None

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _resume_is_inside(cfg: Config, out: str) -> bool:
    r = cfg.train.resume
    if r is None:
        return False
    if r == "auto":
        return True
    return os.path.realpath(r).startswith(os.path.realpath(os.path.join(out, "checkpoints")) + os.sep)


def check_reuse(out: str, cfg: Config):
    """Refuse a directory holding another run's state unless the user said what to do with it."""
    tc = cfg.train
    state = run_state(out)
    if tc.overwrite and _resume_is_inside(cfg, out):
        raise ConfigError(f"--overwrite deletes the checkpoints in {out} that --resume {tc.resume} would continue "
                          f"from; pass one of the two")
    if not state or tc.overwrite or tc.resume:
        return
    if os.path.isfile(os.path.join(out, "final", "model.safetensors")):
        what = f"a finished run ({os.path.join(out, 'final')})"
    else:
        what = "an earlier run's state (" + ", ".join(state[:6]) + (", ..." if len(state) > 6 else "") + ")"
    raise ConfigError(f"output directory {out} holds {what}; pass --resume auto to continue it or --overwrite "
                      f"to delete it and start over")


def probe_writable(out: str, rank: int):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_rank{rank}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output directory {out} is not writable: {e.strerror}") from None


def claim_output_dir(out: str, cfg: Config, rank: int, device) -> OutputLock:
    """Collective, on an existing writable `out`. Lock it (rank 0), refuse or clear earlier state, and agree
    on the outcome on every rank, so no rank starts writing into a directory another job owns."""
    from ..distributed.parallel import all_reduce_max_flag

    lock = OutputLock(out)
    problem = None
    if rank == 0:
        holder = lock.acquire()
        if holder is not None:
            problem = ConfigError(f"output directory {out} is in use by another training run ({holder}); wait for "
                                  f"it to end or choose another --output-dir")
        else:
            try:
                check_reuse(out, cfg)
                if cfg.train.overwrite:
                    removed = clear_run_state(out)
                    if removed:
                        log.info("--overwrite: deleted %s from %s", ", ".join(removed), out)
                elif (cfg.train.resume == "auto" and run_state(out)
                      and not list_complete(os.path.join(out, "checkpoints"))):
                    stale = clear_run_state(out)  # an attempt that never checkpointed: nothing of it can continue
                    if stale:
                        log.warning("--resume auto: no complete checkpoint in %s; deleted the earlier attempt's %s "
                                    "and starting fresh", out, ", ".join(stale))
            except ConfigError as e:
                problem = e
    if all_reduce_max_flag(problem is not None, device):
        lock.release()
        raise problem or ConfigError(f"rank 0 refused output directory {out} (see its error)")
    dist.barrier()
    return lock


# ----------------------------------------------------------------------------- room on disk

MIN_FREE = 8 * 2**20  # below this not even the config and logs fit; check_checkpoint_room sizes the real need


def prepare_output_dir(out: str, cfg: Config, env) -> OutputLock:
    """Collective: a writable directory with room, locked for this run, holding no other run's state."""
    probe_writable(out, env.rank)
    free = shutil.disk_usage(out).free
    if free < MIN_FREE:
        raise ConfigError(f"output directory {out} has only {free / 2**20:.0f} MiB free; checkpoints need more")
    return claim_output_dir(out, cfg, env.rank, env.device)


def check_checkpoint_room(out: str, model):
    """Before step 1: room for one checkpoint (weights + two AdamW moments, fp32) and one model folder."""
    need = 4 * 4 * sum(p.numel() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(f"output directory {out} has {free / 2**20:.0f} MiB free; a checkpoint and a model of "
                          f"this size need ~{need / 2**20:.0f} MiB")
