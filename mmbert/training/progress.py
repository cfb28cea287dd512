"""What rank 0 shows of a running training: a tqdm bar on a terminal, a plain line every log step elsewhere
(SLURM .out files, CI logs), nothing with `train.progress: false`."""
from __future__ import annotations

import sys
import time
from typing import Optional


def format_duration(seconds: float) -> str:
    """5m12s, 1h03m, 42s."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(step: int, total: int, epoch: int, epochs: int, loss: float, lrs: dict, samples_per_s: float,
                  eta_s: Optional[float]) -> str:
    """`step 40/600 | epoch 1/1 | loss 0.4123 | lr enc 4.1e-05 head 8.2e-04 | 18.3 samples/s | ETA 5m12s`."""
    names = {"encoder": "enc", "head": "head"}  # in this order
    lr = " ".join(f"{names[k]} {lrs[k]:.1e}" for k in names if k in lrs)
    eta = "" if eta_s is None else f" | ETA {format_duration(eta_s)}"
    return (f"step {step}/{total} | epoch {epoch}/{epochs} | loss {loss:.4f} | lr {lr} | "
            f"{samples_per_s:.1f} samples/s{eta}")


class RunProgress:
    """Rank 0's progress display: `start()` when the loop starts, `advance()` each step, `report(...)` each log
    step, `close()` at the end. Disabled (other ranks, `train.progress: false`) it does nothing."""

    def __init__(self, enabled: bool, total: int, epochs: int, stream=None):
        self.enabled, self.total, self.epochs = enabled, total, epochs
        self.stream = stream or sys.stdout
        self.initial, self.started = 0, time.perf_counter()
        self.bar = None
        self.lines = False

    def start(self, initial: int):
        self.initial, self.started = initial, time.perf_counter()
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        else:
            self.lines = self.enabled

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def eta(self, step: int) -> Optional[float]:
        done = step - self.initial  # steps of this process: a resumed run's earlier steps took no time here
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else None

    def report(self, step: int, epoch: int, loss: float, lrs: dict, samples_per_s: float):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{samples_per_s:.1f}")
        elif self.lines:
            line = progress_line(step, self.total, epoch + 1, self.epochs, loss, lrs, samples_per_s, self.eta(step))
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.lines = False
