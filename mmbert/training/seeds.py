"""train.py --seeds: one training run per seed, in one process group, then OUTPUT/ensemble.json.

    OUTPUT/seed_42/...  a complete run each (final/, metrics.jsonl, checkpoints/), as train.py writes it
    OUTPUT/ensemble.json  the members (mmbert/ensemble.py), written once every member has finished

Members run one after the other, each with the whole world (the same ranks, strategy and data as a single
run; the token cache is built once and read by the later members). With --resume auto an interrupted
command continues where it stopped: a member that finished with this exact config is kept, the others
resume their own checkpoints. A finished member whose config differs is retrained only on --overwrite.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

import torch.distributed as dist
import yaml

from ..config import Config
from ..distributed.env import DistEnv
from ..ensemble import ENSEMBLE_FILE, write_ensemble
from ..errors import ConfigError
from .resume import config_changes
from .rundir import clear_run_state, run_state

log = logging.getLogger("mmbert")


def member_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed_{seed}")


def member_config(cfg: Config, seed: int) -> Config:
    """The member's own run: this seed, its own output directory, no seeds list."""
    train = dataclasses.replace(cfg.train, seed=seed, seeds=None, output_dir=member_dir(cfg.train.output_dir, seed))
    return dataclasses.replace(cfg, train=train)


def finished(mc: Config) -> bool:
    """With --resume auto: whether this member already finished with the same config (then it is kept).
    A finished member trained with other data or model keys stops the command (a mixed ensemble is not
    what was asked for); other differences (a longer schedule, say) resume it as a single run would."""
    tc = mc.train
    summary = os.path.join(tc.output_dir, "final", "train_summary.json")
    if tc.resume != "auto" or tc.overwrite or not os.path.isfile(summary):
        return False
    try:
        with open(os.path.join(tc.output_dir, "final", "config.yaml"), encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    frozen, applied = config_changes(saved if isinstance(saved, dict) else {}, mc.to_dict())
    if frozen:
        raise ConfigError(f"ensemble member {tc.output_dir} finished with another config ({'; '.join(frozen[:3])}); "
                          f"pass --overwrite to retrain every member, or use a new --output-dir")
    return not applied


def claim_parent(out: str, cfg: Config, env: DistEnv):
    """OUTPUT holds members and ensemble.json only: a single run's state there is refused (or, with
    --overwrite, deleted), and an earlier ensemble.json is removed first, so an interrupted command never
    leaves one naming another command's members."""
    state = [n for n in run_state(out) if n != ENSEMBLE_FILE] if os.path.isdir(out) else []
    if state and not cfg.train.overwrite:
        raise ConfigError(f"output directory {out} holds a single run's state ({', '.join(state[:4])}); train.py "
                          f"--seeds writes its members into {out}/seed_S: choose another --output-dir or pass "
                          f"--overwrite")
    taken = [d for d in map(lambda v: member_dir(out, v), cfg.train.seeds) if os.path.isdir(d) and run_state(d)]
    if taken and not (cfg.train.overwrite or cfg.train.resume):
        raise ConfigError(f"{taken[0]} holds an earlier member's run; pass --resume auto to continue the members "
                          f"(finished ones are kept) or --overwrite to retrain them all")
    dist.barrier()  # every rank has looked before rank 0 changes anything
    if env.is_main:
        os.makedirs(out, exist_ok=True)
        if state:
            clear_run_state(out)
        if os.path.exists(os.path.join(out, ENSEMBLE_FILE)):
            os.remove(os.path.join(out, ENSEMBLE_FILE))
    dist.barrier()


def train_members(cfg: Config, env: DistEnv, train_one: Callable[[Config], Optional[str]]) -> Optional[str]:
    """Train (or keep) every member with `train_one(member config)` (one run in its locked directory: the
    training loop's), then write ensemble.json; None when a member stopped early."""
    out, seeds = cfg.train.output_dir, cfg.train.seeds
    claim_parent(out, cfg, env)
    members = []
    for i, seed in enumerate(seeds, 1):
        mc = member_config(cfg, seed)
        if finished(mc):
            log.info("ensemble member %d/%d (seed %d): finished with this config in %s; kept", i, len(seeds), seed,
                     mc.train.output_dir)
        else:
            log.info("ensemble member %d/%d: seed %d -> %s", i, len(seeds), seed, mc.train.output_dir)
            if train_one(mc) is None:
                log.warning("ensemble member %s stopped early: rerun the same command with --resume auto", seed)
                return None
        members.append({"dir": os.path.join(f"seed_{seed}", "final"), "seed": seed})
    if env.is_main:
        write_ensemble(out, members)
        log.info("ensemble of %d members written to %s: evaluate.py / export.py --model-dir %s", len(members),
                 os.path.join(out, "ensemble.json"), out)
    dist.barrier()
    return out
