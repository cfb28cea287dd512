"""Stopping a run at a step boundary on every rank at once: a signal (SIGTERM / SIGUSR1 from SLURM or a
scheduler) or the run's own time limit (`train.max_time`), and the SLURM requeue after a signal."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("mmbert")

# flag values exchanged between ranks; the all-reduce keeps the largest, so a signal outranks the time limit
TIME_LIMIT, SIGNAL = 1.0, 2.0
REASONS = {TIME_LIMIT: "max_time", SIGNAL: "signal"}


class Preemption:
    """SIGTERM / SIGUSR1 (or request_stop()) set a flag; ranks agree on it (all-reduce MAX) one step boundary
    later."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.flag = 0.0
        self.signal_name: Optional[str] = None
        self.previous = {}
        self.exchange = None  # the flag all-reduce started at the last step boundary, and its tensor

    @property
    def requested(self) -> bool:
        return self.flag > 0

    def __enter__(self) -> "Preemption":
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, exc_type, *exc):
        # the caller's handlers back: after mmbert.train() in a notebook or service, SIGTERM ends it again
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.exchange is not None and exc_type is None:
            self.exchange[0].wait()  # every rank started it: finish it before the group is used otherwise

    def request_stop(self):
        """This rank's time limit is near: stop at the step every rank agrees on (a signal still wins)."""
        self.flag = max(self.flag, TIME_LIMIT)

    def agreed(self) -> Optional[str]:
        """Collective, at every step boundary on every rank: why any rank wanted to stop by the previous
        boundary ("signal" or "max_time"), else None. The flags travel asynchronously (a CPU tensor over gloo):
        the exchange started at step k is waited for at step k+1, so no rank waits on the slowest each step,
        and every rank acts at one step."""
        previous = self.exchange
        flag = torch.tensor([self.flag])
        self.exchange = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        if previous is None:
            return None
        work, seen = previous
        work.wait()
        return REASONS.get(seen.item())

    def _handler(self, signum, frame):
        self.flag = SIGNAL
        self.signal_name = signal.Signals(signum).name


def requeue_under_slurm():
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:  # a cancelled / timed-out job is already ending on purpose (state no longer RUNNING): don't requeue it
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
        state = r.stdout.split("JobState=", 1)[1].split()[0] if r.returncode == 0 and "JobState=" in r.stdout else ""
        if state and state != "RUNNING":
            log.warning("SLURM job %s is %s, not requeueing it (resubmit with --resume auto to continue)", job, state)
            return False
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if r.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, r.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


def max_time_seconds(tc) -> Optional[float]:
    from ..config import parse_duration

    return None if tc.max_time is None else parse_duration(tc.max_time)


class TimeLimit:
    """`train.max_time`: whether the run must stop at this step to stop before the limit, leaving room for
    the step every rank agrees to stop at and for the checkpoint then saved."""

    def __init__(self, seconds: Optional[float], started: float):
        self.seconds, self.started = seconds, started
        self.loop_t, self.loop_step, self.save_s = started, 0, 0.0

    def begin(self, step: int):
        self.loop_t, self.loop_step = time.time(), step

    def saved(self, seconds: float):
        self.save_s = max(self.save_s, seconds)

    def near(self, step: int) -> bool:
        if self.seconds is None or step <= self.loop_step:
            return False
        now = time.time()
        step_s = (now - self.loop_t) / (step - self.loop_step)  # evaluations included: they come again
        return now - self.started + 2 * step_s + self.save_s >= self.seconds
