"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of OUTPUT/checkpoints/step_N/:
    *.distcp, .metadata      model + optimizer shards (DCP; reshardable to any world size)
    train_state.json         step, epoch, global data position, scheduler, early-stopping state
    rng/rank_R.safetensors   torch RNG of each rank (restored when the world size is unchanged)
    best/                    the run's best/ model as it was at this step (hard links), restored on resume
    COMPLETE                 written last; a directory without it is never used
A checkpoint is written to `.tmp_step_N` and renamed to `step_N` only once every rank has finished and
every shard file its metadata names exists at its full size. A failure on any rank (a full disk) removes
the partial directory on every rank's word and stops the run with one line.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .. import fsutil
from ..errors import ArtifactError, MMBertError
from .gather import on_rank0
from .parallel import all_reduce_max

log = logging.getLogger("mmbert")
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointWriteError(MMBertError):
    """A checkpoint could not be written (disk full, another writer); the partial one has been removed."""


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


def _link_tree(src: str, dst: str):
    """Copy a directory as hard links (free on one filesystem; files are never rewritten in place)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def missing_shards(path: str) -> list[str]:
    """Files the checkpoint's DCP metadata refers to that are absent or shorter than recorded."""
    meta_file = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_file):
        return [".metadata"]
    meta = dcp.FileSystemReader(path).read_metadata()
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return sorted(f for f, size in need.items()
                  if not os.path.isfile(os.path.join(path, f)) or os.path.getsize(os.path.join(path, f)) < size)


def shard_digests(path: str) -> dict[str, str]:
    """sha256 of every file a checkpoint's weights, optimizer state and RNG live in (recorded in train_state.json
    at save, checked before a resume loads them: same-size damage is caught, not trained on)."""
    files = [f for f in os.listdir(path) if f == ".metadata" or f.endswith(".distcp")]
    files += [os.path.join("rng", f) for f in os.listdir(os.path.join(path, "rng"))]
    return {f: fsutil.sha256(os.path.join(path, f)) for f in sorted(files)}


def damaged_shards(path: str, recorded: Optional[dict]) -> list[str]:
    """Collective: the shard files whose bytes differ from the digests recorded at save, as rank 0 found them
    (every rank gets rank 0's answer, so all stop or all load). Checkpoints from before digests: none."""
    def on_rank0_now() -> list[str]:
        now = shard_digests(path) if recorded else {}
        return [f for f, digest in (recorded or {}).items() if now.get(f) != digest]
    return on_rank0(on_rank0_now)


def _is_disk_full(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
            or any(_is_disk_full(x[0] if isinstance(x, tuple) else x) for x in getattr(e, "failures", {}).values()))


def _agree_or_raise(err: Optional[BaseException], root: str, tmp: str, step: int):
    """Collective: if any rank failed, rank 0 removes the partial checkpoint and every rank stops."""
    flag = all_reduce_max(0.0 if err is None else (2.0 if _is_disk_full(err) else 1.0))
    if flag == 0:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if flag == 2:
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointWriteError(f"no space left on {root} while writing checkpoint step_{step} ({free:.0f} MiB "
                                   f"free); the partial checkpoint was removed, the newest complete one is kept")
    if err is not None:
        raise err
    raise CheckpointWriteError(f"writing checkpoint step_{step} failed on another rank (see its error); the partial "
                               f"checkpoint was removed")


def _finish_on_rank0(root: str, tmp: str, final: str, step: int, train_state: dict,
                     with_dirs: dict[str, str]):
    lost = missing_shards(tmp)
    if lost:  # a shard file vanished between writing and marking: never call such a checkpoint complete
        raise CheckpointWriteError(f"checkpoint {tmp} lacks {', '.join(lost)} after every rank wrote it "
                                   f"(is another job writing into {root}?)")
    for name, src in with_dirs.items():  # e.g. best/: restored with the checkpoint, so resume never mixes runs
        if os.path.isdir(src):
            _link_tree(src, os.path.join(tmp, name))
    state = dict(train_state, world_size=dist.get_world_size(), shards=shard_digests(tmp))
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(state, f, indent=1, default=float)
    with open(os.path.join(tmp, COMPLETE), "w") as f:
        f.write(f"step {step}\n")
    if os.path.isdir(final):  # same step saved again (e.g. end of run after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(root: str, step: int, model, optimizer, train_state: dict, keep: int, rank: int,
                    with_dirs: Optional[dict[str, str]] = None):
    """Collective. `with_dirs` ({name: path}) are hard-linked into the checkpoint by rank 0."""
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    err = None
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
    except OSError as e:
        err = e
    _agree_or_raise(err, root, tmp, step)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        from safetensors.torch import save_file

        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        rng_file = os.path.join(tmp, "rng", f"rank_{rank}.safetensors")
        save_file(rng, rng_file)
        fsutil.follow_umask(rng_file)  # safetensors writes 0600
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        err = e
    _agree_or_raise(err, root, tmp, step)
    try:
        if rank == 0:
            _finish_on_rank0(root, tmp, final, step, train_state, with_dirs or {})
            for _, old in list_complete(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, CheckpointWriteError) as e:
        err = e
    _agree_or_raise(err, root, tmp, step)
    log.info("saved checkpoint %s", final)
    return final


def read_train_state(path: str) -> dict:
    """train_state.json of a complete checkpoint (read before any weights are touched)."""
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise ArtifactError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was being written when the run stopped")
    try:
        with open(os.path.join(path, "train_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"checkpoint {path}: cannot read train_state.json: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ArtifactError(f"checkpoint {path}: train_state.json holds no step")
    return state


def load_checkpoint(path: str, model, optimizer, rank: int) -> dict:
    train_state = read_train_state(path)
    lost = missing_shards(path)
    if lost:
        raise ArtifactError(f"checkpoint {path} is marked {COMPLETE} but lacks {', '.join(lost[:3])} (written by two "
                            f"runs at once?); delete {path} to resume from the checkpoint before it")
    damaged = damaged_shards(path, train_state.get("shards"))
    if damaged:
        raise ArtifactError(f"checkpoint {path}: {', '.join(damaged[:3])} differ from what was saved (their sha256 "
                            f"in train_state.json): the checkpoint is damaged; delete {path} to resume from the "
                            f"checkpoint before it")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, "rng", f"rank_{rank}.safetensors")
    if train_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        from safetensors.torch import load_file

        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        train_state["rng_restored"] = True
    return train_state


def restore_dir(checkpoint: str, name: str, dst: str):
    """Rank 0: make `dst` what it was when `checkpoint` was saved (absent if it was absent)."""
    shutil.rmtree(dst, ignore_errors=True)
    src = os.path.join(checkpoint, name)
    if os.path.isdir(src):
        _link_tree(src, dst)


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
    fsutil.follow_umask(out_file)
    return len(state)
