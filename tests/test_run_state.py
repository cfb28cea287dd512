"""Run state around the model: output directories (finished, interrupted, locked, unwritable, full), checkpoints
(incomplete, damaged, disk full mid-write), resumes with a changed config, extended runs, undefined metrics.
Mostly real train.py processes."""
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
from conftest import ROOT, assert_one_line_error, run_cli, train_cli, write_config
from safetensors.torch import load_file

from mmbert.errors import ArtifactError, ConfigError
from mmbert.training.optim import lr_factor


@pytest.fixture(scope="module")
def data(tmp_path_factory, reviews):
    d = tmp_path_factory.mktemp("run_state")
    reviews.iloc[:120].to_csv(d / "d.csv", index=False)
    return d


@pytest.fixture(scope="module")
def cfg(data, tiny_bert):
    return write_config(data / "c.yaml", tiny_bert, str(data / "d.csv"), dist={"strategy": "none"},
                        train={"batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False,
                               "warmup_ratio": 0.0, "eval_every": 2, "checkpoint_every": 2})


def train(cfg: str, out, *args: str, check: bool = True, **kw):
    return run_cli(["train.py", "--config", cfg, "--output-dir", str(out), *args], check=check, **kw)


def records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def loss_steps(out) -> list[int]:
    return [r["step"] for r in records(out) if "loss" in r]


# ----------------------------------------------------------------------------- reused output directories

@pytest.mark.slow
def test_interrupted_run_dir_is_refused_and_overwrite_clears_all_of_it(cfg, tmp_path):
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "4")
    shutil.rmtree(out / "final")  # as if killed after its last checkpoint: state, but no final/
    before = sorted(os.listdir(out / "checkpoints")), (out / "metrics.jsonl").read_bytes()
    r = train(cfg, out, "--max-steps", "2", check=False)
    assert_one_line_error(r, f"output directory {out} holds an earlier run's state", "checkpoints/step_4",
                          "metrics.jsonl", "--resume auto", "--overwrite")
    assert (sorted(os.listdir(out / "checkpoints")), (out / "metrics.jsonl").read_bytes()) == before
    (out / "checkpoints" / ".tmp_step_6").mkdir()  # a half-written checkpoint of the old run
    train(cfg, out, "--max-steps", "2", "--overwrite")
    assert loss_steps(out) == [1, 2]  # nothing of the old run's records
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2"]
    with open(out / "final" / "train_summary.json") as f:
        assert json.load(f)["steps"] == 2


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_starts_clean(cfg, tmp_path):
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "1", "--set", "train.checkpoint_every=null")
    for name in ("final", "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)  # killed before its first checkpoint
    (out / "best").mkdir(exist_ok=True)
    (out / "best" / "model.safetensors").write_bytes(b"stale")
    r = train(cfg, out, "--max-steps", "2", "--resume", "auto")
    assert "no complete checkpoint" in r.stderr + r.stdout and "deleted the earlier attempt's" in r.stderr + r.stdout
    assert loss_steps(out) == [1, 2]
    assert (out / "best" / "model.safetensors").read_bytes() != b"stale"


@pytest.mark.slow
def test_overwrite_and_resume_auto_together_are_refused(cfg, tmp_path):
    r = train(cfg, tmp_path / "run", "--max-steps", "1", "--overwrite", "--resume", "auto", check=False)
    assert_one_line_error(r, "--overwrite deletes the checkpoints", "--resume auto")


def _wait_for(path, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline and not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert os.path.exists(path), "the first run never got going"


@pytest.mark.slow
def test_second_training_into_a_locked_dir_is_refused_and_a_dead_holder_frees_it(cfg, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "train.py", "--config", cfg, "--output-dir", str(out), "--max-steps",
                              "100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "metrics.jsonl", first)
        r = train(cfg, out, "--max-steps", "2", "--resume", "auto", check=False)
        assert_one_line_error(r, f"output directory {out} is in use by another training run", f"pid {first.pid}")
        r = train(cfg, out, "--max-steps", "2", "--overwrite", check=False)
        assert_one_line_error(r, "is in use by another training run")
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the lock file stays behind
        first.wait()
    assert (out / ".lock").exists()
    step = max(int(d.split("_")[1]) for d in os.listdir(out / "checkpoints") if d.startswith("step_"))
    r = train(cfg, out, "--max-steps", str(step + 2), "--resume", "auto")
    assert f"resumed from {out / 'checkpoints' / f'step_{step}'} at step {step}" in r.stdout + r.stderr


@pytest.mark.slow
def test_checkpoint_marked_complete_without_its_shard_is_refused(cfg, tmp_path):
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "4")
    os.remove(out / "checkpoints" / "step_4" / "__0_0.distcp")  # what a second writer left behind
    r = train(cfg, out, "--max-steps", "6", "--resume", "auto", check=False)
    assert_one_line_error(r, f"checkpoint {out / 'checkpoints' / 'step_4'} is marked COMPLETE but lacks __0_0.distcp",
                          "step_4")


@pytest.mark.slow
def test_checkpoint_damaged_at_the_same_size_is_refused(cfg, tmp_path):
    """Bytes of a weight shard overwritten in place: the size check passes, the digest recorded at save does not."""
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "4")
    shard = out / "checkpoints" / "step_4" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 64])
    shard.write_bytes(bytes(raw))
    r = train(cfg, out, "--max-steps", "6", "--resume", "auto", check=False)
    assert_one_line_error(r, f"checkpoint {out / 'checkpoints' / 'step_4'}: __0_0.distcp differ from what was saved")


# ----------------------------------------------------------------------------- resume with a changed config

@pytest.mark.slow
@pytest.mark.parametrize("args,named", [
    (["--fusion", "concat"], ["model.fusion 'cross_attn' -> 'concat'"]),
    (["--max-tokens", "16", "--seed", "3"], ["data.max_tokens 32 -> 16", "train.seed 42 -> 3"]),
], ids=["fusion", "data and seed"])
def test_resume_with_a_changed_model_or_data_key_names_each_key(cfg, tmp_path, args, named):
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "2")
    r = train(cfg, out, "--max-steps", "4", "--resume", "auto", *args, check=False)
    assert_one_line_error(r, f"cannot resume {out / 'checkpoints' / 'step_2'} with a changed config", *named)
    assert loss_steps(out) == [1, 2]


@pytest.mark.slow
def test_extending_a_finished_run_replans_the_schedule_and_applies_a_new_lr(cfg, tmp_path):
    out = tmp_path / "run"
    base = ["--set", "train.select_best=false", "--set", "train.warmup_ratio=0.25", "--set", "train.head_lr=null"]
    train(cfg, out, "--max-steps", "4", *base)  # warmup int(0.25 * 4) = 1 step
    old = load_file(out / "final" / "model.safetensors")
    r = train(cfg, out, "--max-steps", "8", "--resume", "auto", "--lr", "2e-3", *base)
    log = r.stdout + r.stderr
    assert "train.lr 0.001 -> 0.002" in log and "train.max_steps 4 -> 8" in log
    assert "lr schedule re-planned from step 4: linear over 8 steps (was linear over 4); warmup of 1 steps" in log
    lrs = {r["step"]: r["lr"] for r in records(out) if "loss" in r}
    assert sorted(lrs) == list(range(1, 9))
    for step in range(5, 9):  # head_lr unset: every group runs at lr; warmup 1 (not int(0.25 * 8) = 2)
        assert lrs[step] == pytest.approx(2e-3 * lr_factor(step, 1, 8, "linear")), step
    assert lrs[5] > 0
    new = load_file(out / "final" / "model.safetensors")
    moved = max(float((new[k] - old[k]).abs().max()) for k in old)
    assert moved > 1e-4, "the weights did not move after the old end"


@pytest.mark.slow
def test_resume_restores_best_as_it_was_at_the_checkpoint(cfg, tmp_path):
    """best/ written after the checkpoint (by the part of the run a resume repeats) never survives the
    resume: final/ is the best model of the resumed history, matching train_summary's best_step."""
    out = tmp_path / "run"
    train(cfg, out, "--max-steps", "4", "--eval-every", "1", "--set", "train.keep_checkpoints=3",
          "--set", "train.metric=log_loss", "--set", "train.metric_mode=min")
    step2 = out / "checkpoints" / "step_2"
    with open(step2 / "train_state.json") as f:
        best_at_2 = json.load(f)["best_step"]
    train(cfg, out, "--max-steps", "2", "--resume", str(step2), "--eval-every", "1", "--set",
          "train.keep_checkpoints=3", "--set", "train.metric=log_loss", "--set", "train.metric_mode=min")
    with open(out / "final" / "train_summary.json") as f:
        assert json.load(f)["best_step"] == best_at_2
    assert (out / "final" / "model.safetensors").read_bytes() == (step2 / "best" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- undefined metrics, limits, disk

@pytest.mark.slow
def test_one_class_val_split_never_selects_a_nan_best(data, tiny_bert, tmp_path, reviews):
    df = reviews.iloc[:120].copy()
    ones = [i for i in range(100, 120) if df.loc[i, "Recommended IND"] == 1]
    (tmp_path / "train.txt").write_text("\n".join(map(str, range(100))))
    (tmp_path / "val.txt").write_text("\n".join(map(str, ones)))
    c = write_config(tmp_path / "c.yaml", tiny_bert, str(data / "d.csv"), dist={"strategy": "none"},
                     data={"split": {"train_indices": str(tmp_path / "train.txt"),
                                     "val_indices": str(tmp_path / "val.txt")}},
                     train={"progress": False, "eval_every": 1, "select_best": True, "metric": "roc_auc"})
    out = tmp_path / "run"
    r = train(c, out, "--max-steps", "2")
    log = r.stdout + r.stderr
    assert "val roc_auc is undefined" in log and "final/ holds the last step's weights" in log
    assert not (out / "best").exists()
    with open(out / "final" / "train_summary.json") as f:
        summary = json.load(f)
    assert summary["best_step"] is None and summary["steps"] == 2


@pytest.mark.slow
def test_max_tokens_beyond_the_encoders_positions_stops_before_reading_data(cfg, tmp_path):
    r = train(cfg, tmp_path / "run", "--max-steps", "1", "--max-tokens", "1024", check=False)
    assert_one_line_error(r, "'data.max_tokens' (1024) exceeds the 128 positions of encoder",
                          "--max-tokens 128")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: room for the tiny model's first checkpoint (~12.4 MiB), not its second (root and mount
    needed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_partial_dir(cfg, small_disk):
    out = small_disk / "run"
    r = train(cfg, out, "--max-steps", "6", "--set", "train.keep_checkpoints=3", "--set", "train.select_best=false",
              check=False)
    assert_one_line_error(r, f"no space left on {out / 'checkpoints'} while writing checkpoint step_",
                          "partial checkpoint was removed")
    left = os.listdir(out / "checkpoints")
    assert not [d for d in left if d.startswith(".tmp")], left
    assert "step_2" in left and os.path.isfile(out / "checkpoints" / "step_2" / "COMPLETE")


# ----------------------------------------------------------------------------- checked first

@pytest.mark.slow
def test_train_refuses_an_output_dir_with_a_finished_run(train_cfg, tmp_path):
    """Never clobber work: without --resume or --overwrite the run stops before touching anything
    (the full cycle, --overwrite included, runs in tests/test_distributed.py::test_finished_run_is_not_clobbered)."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"finished work")
    r = train_cli(train_cfg, tmp_path / "run")
    assert_one_line_error(r, f"output directory {tmp_path / 'run'} holds a finished run", "--resume auto",
                          "--overwrite")
    assert (final / "model.safetensors").read_bytes() == b"finished work"
    assert sorted(os.listdir(tmp_path / "run")) == ["final"]


@pytest.mark.slow
def test_train_unwritable_output_dir_fails_before_training(work, train_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"  # cannot be created: its parent is a file (permissions do not stop root)
    r = train_cli(train_cfg, out)
    assert_one_line_error(r, f"output directory {out} is not writable")
    assert "launcher=" not in r.stdout  # stopped before loading data or a model


def test_disk_full_output_dir_fails_before_training(tmp_path, monkeypatch, train_cfg):
    from mmbert.config import load_config
    from mmbert.distributed.env import DistEnv
    from mmbert.training import rundir

    class Usage:
        total, used, free = 10 * 2**30, 10 * 2**30 - 2**20, 2**20

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: Usage)
    cfg = load_config(train_cfg)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "none")
    with pytest.raises(ConfigError, match=r"output directory .*run has only 1 MiB free"):
        rundir.prepare_output_dir(str(tmp_path / "run"), cfg, env)


# ----------------------------------------------------------------------------- checkpoints

def test_incomplete_checkpoint_is_refused_by_name(tmp_path):
    from mmbert.distributed.checkpoint import load_checkpoint

    partial = tmp_path / "checkpoints" / "step_6"
    partial.mkdir(parents=True)
    (partial / "train_state.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"step_6 is incomplete \(no COMPLETE marker\)"):
        load_checkpoint(str(partial), None, None, 0)


def test_a_checkpoint_recording_relative_data_paths_resumes_from_the_same_directory(tmp_path, monkeypatch):
    """Checkpoints written before configs held absolute paths record data.path as given (relative); resumed from
    the directory they started in, that is the same file, not a changed frozen key. Elsewhere it is a change."""
    from mmbert.training.resume import config_changes

    from mmbert.config import Config

    monkeypatch.chdir(tmp_path)
    saved, current = Config().to_dict(), Config().to_dict()
    saved["data"].update(path="data/t.csv", split={"train_indices": "splits/tr.txt"})
    del saved["data"]["ignore_columns"]  # a key added since: the run that wrote the checkpoint had its default
    current["data"].update(path=str(tmp_path / "data/t.csv"))
    current["data"]["split"]["train_indices"] = str(tmp_path / "splits/tr.txt")
    assert config_changes(saved, current) == ([], [])
    assert saved["data"]["path"] == "data/t.csv"  # the checkpoint's record is not touched
    monkeypatch.chdir(tmp_path.parent)
    frozen, _ = config_changes(saved, current)
    assert [f.split()[0] for f in frozen] == ["data.path", "data.split.train_indices"]
