"""Experiment tracking (train.report_to): TensorBoard scalars equal to metrics.jsonl, missing optional
trackers are one warning line, config validation, rank 0 only."""
from __future__ import annotations

import builtins
import json
import logging
import os
import re

import pytest
from conftest import write_config

from mmbert.config import config_from_dict, load_config
from mmbert.errors import ConfigError
from mmbert.training.tracking import MetricsLog, build_trackers, scalars

TRAIN_TAGS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory, reviews):
    d = tmp_path_factory.mktemp("tracking")
    reviews.iloc[:64].to_csv(d / "d.csv", index=False)
    return d


def tiny_run(data, tiny_bert, out, **train):
    """A 6-step run (48 train rows, batch 8, eval every 3 steps) in this process."""
    from mmbert.training.loop import train as run_training

    cfg = load_config(write_config(data / f"{os.path.basename(out)}.yaml", tiny_bert, str(data / "d.csv"),
                                   dist={"strategy": "none"},
                                   train={"output_dir": str(out), "max_steps": 6, "eval_every": 3, **train}))
    final = run_training(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return final, [json.loads(ln) for ln in f if ln.strip()]


def test_tensorboard_scalars_equal_the_metrics_log(data, tiny_bert, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    final, records = tiny_run(data, tiny_bert, out, report_to="tensorboard")  # a scalar becomes [tensorboard]
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    for key in TRAIN_TAGS:
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in steps], key
        tol = 1e-6 if key == "loss" else 1e-6 * max(abs(r[key]) for r in steps) + 1e-12  # float32 in the events
        assert [e.value for e in events] == pytest.approx([r[key] for r in steps], abs=tol), key
    for key in ("roc_auc", "log_loss", "accuracy", "f1"):
        events = acc.Scalars(f"val/{key}")
        assert [e.step for e in events] == [3, 6], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in evals], abs=1e-6), key
    assert not [t for t in tags if "confusion" in t or "classes" in t or t.endswith(("/step", "/split"))]
    (text,) = acc.Tensors("config/text_summary")  # the resolved config, as a YAML text
    assert re.search(rb"\n +report_to:\n +- tensorboard\n", text.tensor_proto.string_val[0])


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_optional_tracker_is_one_warning_and_training_finishes(data, tiny_bert, tmp_path, monkeypatch,
                                                                      capsys, name):
    real_import = builtins.__import__

    def no_tracker(mod, *a, **kw):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named '{name}'")
        return real_import(mod, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tracker)
    out = tmp_path / name
    final, records = tiny_run(data, tiny_bert, out, report_to=[name], max_steps=3, eval_every=None)
    out_err = capsys.readouterr()
    lines = [ln for ln in (out_err.out + out_err.err).splitlines() if "report_to" in ln]
    assert len(lines) == 1 and lines[0].endswith(
        f" WARNING train.report_to: {name} is not installed (pip install {name}): not reporting to it"), lines
    assert os.path.isfile(os.path.join(final, "model.safetensors")) and [r["step"] for r in records if "loss" in r]
    assert not os.path.exists(out / "tensorboard")


def _raw(report_to) -> dict:
    return {"data": {"path": "x.csv", "text_columns": ["t"], "label_column": "y"}, "train": {"report_to": report_to}}


@pytest.mark.parametrize("value", ["tensorbord", ["tensorboard", "comet"], ["none", "wandb"]])
def test_unknown_report_to_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"train\.report_to") as e:
        config_from_dict(_raw(value))
    assert "\n" not in str(e.value)
    if value != ["none", "wandb"]:
        assert "tensorboard, wandb, mlflow, none" in str(e.value)


def test_report_to_values_and_defaults():
    assert config_from_dict(_raw([])).train.report_to == []
    assert config_from_dict(_raw("none")).train.report_to == ["none"]
    assert config_from_dict(_raw(["tensorboard", "wandb"])).train.report_to == ["tensorboard", "wandb"]
    assert load_config(overrides=[("data.path", "x"), ("data.text_columns", ["t"]),
                                  ("data.label_column", "y")]).train.report_to == []


def test_only_rank_0_gets_trackers(tmp_path):
    cfg = config_from_dict({**_raw(["tensorboard"]), "train": {"report_to": ["tensorboard"],
                                                                "output_dir": str(tmp_path)}})
    assert build_trackers(cfg, is_main=False) == []
    assert build_trackers(config_from_dict({**_raw("none"), "train": {"report_to": "none",
                                                                      "output_dir": str(tmp_path)}}), True) == []
    assert not os.path.exists(tmp_path / "tensorboard")
    trackers = build_trackers(cfg, is_main=True)
    try:
        assert [t.name for t in trackers] == ["tensorboard"]
    finally:
        for t in trackers:
            t.close()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_scalars_keep_finite_numbers_only():
    step, vals = scalars({"step": 4, "epoch": 0, "split": "val", "roc_auc": 0.5, "pr_auc": None, "mcc": float("nan"),
                          "confusion_matrix": [[1, 0], [0, 1]], "per_class": {"a": 1}, "flag": True})
    assert step == 4 and vals == {"val/epoch": 0.0, "val/roc_auc": 0.5}
    assert scalars({"step": 2, "loss": 0.25})[1] == {"train/loss": 0.25}


def test_a_failing_tracker_is_dropped_with_one_warning(tmp_path):
    class Broken:
        name = "broken"
        closed = False

        def log(self, record):
            raise RuntimeError("network down")

        def close(self):
            Broken.closed = True

    class Lines(logging.Handler):
        messages: list = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    mlog = MetricsLog(str(tmp_path / "m.jsonl"), True, None, [Broken()])
    handler = Lines(logging.WARNING)
    logging.getLogger("mmbert").addHandler(handler)  # the run's logger does not propagate (setup_logging)
    try:
        mlog.write({"step": 1, "loss": 1.0})
        mlog.write({"step": 2, "loss": 0.5})
    finally:
        logging.getLogger("mmbert").removeHandler(handler)
    assert [m for m in handler.messages if "broken failed" in m] == [
        "train.report_to: broken failed (RuntimeError: network down): not reporting to it any more"]
    assert Broken.closed and mlog.trackers == []
    assert len(open(tmp_path / "m.jsonl").read().splitlines()) == 2


def test_trackers_are_closed_and_flushed_when_training_raises(data, tiny_bert, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmbert.training.loop import Trainer
    from mmbert.training.tracking import TensorBoardTracker

    def failing_eval(self):
        raise RuntimeError("eval blew up")

    closed, close = [], TensorBoardTracker.close
    monkeypatch.setattr(Trainer, "evaluate", failing_eval)
    monkeypatch.setattr(TensorBoardTracker, "close", lambda self: (closed.append(self), close(self)))
    out = tmp_path / "raises"
    with pytest.raises(RuntimeError, match="eval blew up"):
        tiny_run(data, tiny_bert, out, report_to=["tensorboard"])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert len(closed) == 1 and [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_resume_replaces_the_events_after_the_resumed_step(data, tiny_bert, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "resumed"
    tiny_run(data, tiny_bert, out, report_to=["tensorboard"], max_steps=4, eval_every=None, checkpoint_every=2)
    _, records = tiny_run(data, tiny_bert, out, report_to=["tensorboard"], max_steps=4, eval_every=None,
                          resume=str(out / "checkpoints" / "step_2"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in records if "loss" in r], abs=1e-6)
