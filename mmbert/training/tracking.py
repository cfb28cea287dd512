"""Experiment tracking (`train.report_to`): every record of metrics.jsonl also goes to TensorBoard,
Weights & Biases and/or MLflow, on rank 0 only.

Training records become `train/<field>` scalars (train/loss, train/lr, train/lr_encoder, train/lr_head,
train/grad_norm, train/samples_per_s, train/tokens_per_s, ...; `lr` is the first parameter group's, the head's), evaluation records (`"split": "val"`) `val/<metric>` for every finite numeric metric
(None, lists and dicts such as the confusion matrix are skipped); the record's `step` is the global step.
A tracker never stops or hangs a run: one that is not installed, fails to start or fails to log is reported
in one warning line and dropped, and training goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Optional, Protocol

from ..config import Config, flatten

log = logging.getLogger("mmbert")


class Tracker(Protocol):
    name: str

    def log(self, record: dict) -> None: ...

    def log_config(self, config: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {"train/loss": ..., ...}) of one metrics record: its finite numbers, prefixed by its split."""
    prefix = f"{record['split']}/" if record.get("split") else "train/"
    out = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[prefix + key] = float(value)
    return int(record.get("step", 0)), out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import (
            SummaryWriter,  # needs the tensorboard package
        )

        # The writer's own thread opens the events file: a folder it cannot write fails there, with a thread
        # traceback on stderr. Try it here first, so the failure is build_trackers' one warning line.
        try:
            os.makedirs(log_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=log_dir):
                pass
        except OSError as e:
            raise OSError(f"cannot write in {log_dir}: {e.strerror or e}") from None
        # purge_step: on resume, TensorBoard hides the earlier run's events from this step on, as
        # metrics.jsonl drops its records after the resumed step
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=30)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_config(self, config: dict) -> None:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join("    " + ln for ln in text.splitlines(True)))  # markdown code block

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, output_dir: str):
        import wandb

        self.wandb = wandb
        # project, entity, run id, mode ... come from the WANDB_* environment variables as usual
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmbert"),
                              name=os.path.basename(os.path.abspath(output_dir)), dir=output_dir)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        self.run.log(values, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, output_dir: str):
        import mlflow

        self.mlflow = mlflow  # tracking URI and experiment from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME
        self.run = mlflow.start_run(run_name=os.path.basename(os.path.abspath(output_dir)))

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        self.mlflow.log_metrics(values, step=step)

    def log_config(self, config: dict) -> None:
        params = {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(config).items()}
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def close(self) -> None:
        self.mlflow.end_run()


def build_trackers(cfg: Config, is_main: bool, resume_step: Optional[int] = None) -> list:
    """The trackers `train.report_to` asks for (rank 0 only: other ranks get none)."""
    wanted = list(dict.fromkeys(cfg.train.report_to))
    if not is_main or "none" in wanted:
        return []
    out_dir = cfg.train.output_dir
    makers = {"tensorboard": lambda: TensorBoardTracker(os.path.join(out_dir, "tensorboard"),
                                                        None if resume_step is None else resume_step + 1),
              "wandb": lambda: WandbTracker(out_dir), "mlflow": lambda: MlflowTracker(out_dir)}
    trackers = []
    for name in wanted:
        try:
            trackers.append(makers[name]())
        except ImportError:
            log.warning("train.report_to: %s is not installed (pip install %s): not reporting to it",
                        name, name)
        except Exception as e:  # a tracker must not stop (or, on rank 0 alone, hang) the run
            log.warning("train.report_to: %s could not start (%s: %s): not reporting to it",
                        name, type(e).__name__, e)
    return trackers


class MetricsLog:
    """metrics.jsonl on rank 0, each record also sent to the trackers; on resume the records after the resumed
    step are dropped so the step count stays continuous."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int], trackers: Optional[list] = None):
        self.path, self.enabled = path, enabled
        self.trackers = list(trackers or [])
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        self._each("log", record)

    def log_config(self, config: dict):
        self._each("log_config", config)

    def _each(self, method: str, arg: dict):
        for t in list(self.trackers):
            try:
                getattr(t, method)(arg)
            except Exception as e:
                log.warning("train.report_to: %s failed (%s: %s): not reporting to it any more",
                            t.name, type(e).__name__, e)
                self._drop(t)

    def _drop(self, t):
        self.trackers.remove(t)
        try:
            t.close()
        except Exception:
            pass

    def close(self):
        """Flush and close every tracker (also when training raised)."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close()
            except Exception as e:
                log.warning("train.report_to: closing %s failed (%s: %s)", t.name, type(e).__name__, e)
