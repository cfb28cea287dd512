"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of OUTPUT/checkpoints/step_N/:
    *.distcp, .metadata      model + optimizer shards (DCP; reshardable to any world size)
    train_state.json         step, epoch, global data position, scheduler, early-stopping state
    rng/rank_R.safetensors   torch RNG of each rank (restored when the world size is unchanged)
    COMPLETE                 written last; a directory without it is never used
A checkpoint is written to `.tmp_step_N` and renamed to `step_N` only once every rank has finished.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..errors import ArtifactError

log = logging.getLogger("mmbert")
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


def list_complete(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, COMPLETE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def find_latest(root: str) -> Optional[str]:
    done = list_complete(root)
    return done[-1][1] if done else None


def save_checkpoint(root: str, step: int, model, optimizer, train_state: dict, keep: int, rank: int):
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    from safetensors.torch import save_file

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, "rng", f"rank_{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        state = dict(train_state, world_size=dist.get_world_size())
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(state, f, indent=1, default=float)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"step {step}\n")
        if os.path.isdir(final):  # same step saved again (e.g. end of run after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    log.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str, model, optimizer, rank: int) -> dict:
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise ArtifactError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was being written when the run stopped")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "train_state.json")) as f:
        train_state = json.load(f)
    rng_file = os.path.join(path, "rng", f"rank_{rank}.safetensors")
    if train_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        from safetensors.torch import load_file

        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        train_state["rng_restored"] = True
    return train_state


def full_state_dict(model) -> dict:
    """Collective: every rank must call it; rank 0 gets the full CPU tensors, others {}."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate(checkpoint_dir: str, out_file: str) -> int:
    """Turn a DCP checkpoint into one safetensors file of model weights (one process, no model code)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(checkpoint_dir)
    meta = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(state, storage_reader=reader, no_dist=True)
    save_file({k[len("model."):]: v.contiguous() for k, v in state.items()}, out_file)
    return len(state)
