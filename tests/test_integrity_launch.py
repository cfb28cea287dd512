"""Every launch trains one model: dist.strategy auto follows the launcher (one process: none; several: FSDP,
or what `accelerate launch` names), `none` on several processes is refused, and a one-process run takes no
port (an exported MASTER_ADDR / MASTER_PORT cannot make two runs collide)."""
from __future__ import annotations

import socket

import pytest

from conftest import assert_one_line_error, run_cli, train_cli
from mmbert.distributed.parallel import resolve_strategy
from mmbert.errors import ConfigError

LAUNCH_VARS = ("ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED")


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("requested", [None, "auto"])
def test_auto_is_fsdp_on_several_processes_and_none_on_one(clean_env, requested):
    assert resolve_strategy(requested, 1) == "none"
    assert resolve_strategy(requested, 2) == "fsdp"
    assert resolve_strategy(requested, 512) == "fsdp"


def test_auto_follows_the_accelerate_config(clean_env):
    clean_env.setenv("ACCELERATE_MIXED_PRECISION", "no")  # every accelerate launch exports it
    assert resolve_strategy("auto", 2) == "ddp"  # distributed_type MULTI_GPU / MULTI_CPU
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_strategy("auto", 2) == "fsdp"
    assert resolve_strategy("ddp", 2) == "ddp"  # the config (or --strategy) wins
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed"):
        resolve_strategy("auto", 2)


def test_explicit_strategies_are_kept_and_none_is_refused_on_several(clean_env):
    for s in ("fsdp", "ddp", "none"):
        assert resolve_strategy(s, 1) == s
    with pytest.raises(ConfigError, match="'none' on 4 processes would train 4 separate models"):
        resolve_strategy("none", 4)


@pytest.mark.slow
def test_strategy_none_on_two_processes_stops_every_rank(train_cfg, tmp_path):
    r = run_cli(["train.py", "--config", train_cfg, "--strategy", "none", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "o")], nproc=2, check=False)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "error: config key 'dist.strategy'" in ln]
    assert len(lines) == 2 and all("would train 2 separate models" in ln for ln in lines), r.stderr[-3000:]
    assert "Traceback" not in r.stdout
    assert not (tmp_path / "o" / "final").exists()


def _listening_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.slow
def test_an_exported_master_port_in_use_does_not_stop_a_one_process_run(train_cfg, tmp_path):
    with _listening_port() as busy:
        port = str(busy.getsockname()[1])
        r = train_cli(train_cfg, tmp_path / "o", env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "o" / "final" / "model.safetensors").is_file()
        # a launcher's rank (RANK / WORLD_SIZE set) must meet the others at that port: one line naming it
        r = train_cli(train_cfg, tmp_path / "p", env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                                      "RANK": "0", "WORLD_SIZE": "1"})
    assert_one_line_error(r, f"127.0.0.1:{port}", "in use")
