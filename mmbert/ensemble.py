"""Ensembles: several trained model directories that share one preprocessing contract, scored as one model
whose probabilities are the mean of the members' probabilities.

For a regression the members' predictions are averaged. An ensemble is named by a list of model directories, or by a folder holding `ensemble.json` (written by
`train.py --seeds`, members relative to that folder):

    {"format": 1, "combine": "mean_probability",
     "members": [{"dir": "seed_42/final", "seed": 42, "digest": "<its integrity.json digest>"}, ...]}

Each member's digest is recorded when ensemble.json is written and compared when it is read: a member
retrained, replaced or edited since is refused (an ensemble.json without digests loads with one warning).

Members must read the same rows the same way: identical preprocessing.json (column roles, fitted
statistics, vocabularies, label map, max_tokens / max_chunks) and identical tokenizer files. Their
architectures may differ (fusion, encoder size): each member reads the inputs it needs. The combined model
is a plain nn.Module returning log mean probabilities, so everything that takes a model's logits
(softmax scoring, distributed exactly-once evaluation, ONNX export and its verification) takes an
ensemble unchanged: softmax(log mean p) = mean p.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Optional

import torch
from torch import nn

from .errors import ArtifactError, read_json_object
from .task import REGRESSION

ENSEMBLE_FILE = "ensemble.json"
COMBINE = "mean_probability"


class EnsembleModel(nn.Module):
    """Members' logits -> log of the mean of their softmax probabilities (B x K); for a regression the mean
    of the members' standardised outputs (the members share the target's statistics, so the scores, undone
    as output * std + mean, are the mean of the members' predictions)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.spec = members[0].spec  # the shared output contract; fusions may differ (see member_specs)

    @property
    def member_specs(self) -> list:
        return [m.spec for m in self.members]

    def forward(self, input_ids=None, attention_mask=None, numeric=None, missing=None, categorical=None,
                chunk_index=None) -> torch.Tensor:
        logp = []
        for m in self.members:
            if chunk_index is not None and torch.compiler.is_exporting():
                # the export wrapper's fact (fewer real chunks than slots) restated for each member's encoder:
                # torch.export does not carry it past the first member's data-dependent branch
                torch._check(chunk_index.numel() < input_ids.shape[0] * input_ids.shape[1])
            logits = m(input_ids, attention_mask, numeric, missing, categorical, chunk_index).float()
            logp.append(logits if self.spec.task == REGRESSION else torch.log_softmax(logits, dim=-1))
        if self.spec.task == REGRESSION:
            return torch.stack(logp).mean(dim=0)
        return torch.logsumexp(torch.stack(logp), dim=0) - math.log(len(self.members))


# ----------------------------------------------------------------------------- naming the members

def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_spec.json"))


def read_ensemble(folder: str) -> list[str]:
    """The member directories listed in folder/ensemble.json (absolute), each checked to exist."""
    path = os.path.join(folder, ENSEMBLE_FILE)
    raw = read_json_object(path, f"{path} not found")
    members = raw.get("members")
    if raw.get("format") != 1 or not isinstance(members, list) or not members:
        raise ArtifactError(f"{path} is not an mmbert ensemble file (format 1 with a non-empty 'members' list)")
    dirs = []
    for i, m in enumerate(members):
        d = m.get("dir") if isinstance(m, dict) else None
        if not isinstance(d, str) or not d:
            raise ArtifactError(f"{path}: member {i} has no 'dir'")
        full = os.path.normpath(os.path.join(folder, d))
        if not is_model_dir(full):
            raise ArtifactError(f"{path}: member {i} ({d}) is not a model directory (no {full}/model_spec.json): "
                                f"was its training interrupted? finish it with train.py --seeds ... --resume auto")
        _check_member_digest(path, i, d, full, m.get("digest"))
        dirs.append(full)
    return dirs


def _check_member_digest(path: str, i: int, d: str, full: str, recorded):
    """The member is the model ensemble.json was written with (the member's own integrity.json then ties
    its files to that digest when it is opened)."""
    from .artifact import model_dir_digest
    from .fsutil import warn_unverified

    if recorded is None:
        warn_unverified(os.path.dirname(path), f"lists members without digests in {ENSEMBLE_FILE} (written by an "
                                               f"older mmbert)")
    elif recorded != model_dir_digest(full):
        raise ArtifactError(f"{path}: member {i} ({d}) is not the model this ensemble was written with (its digest "
                            f"differs: retrained, replaced or edited since); rerun train.py --seeds to rewrite it")


def resolve_model_dirs(paths) -> list[str]:
    """Model directories named by `paths` (one path or several): a model directory is itself, a folder
    with ensemble.json its members, a finished run its final/. The same directory twice is refused (it
    would silently weigh one member double)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isfile(os.path.join(p, ENSEMBLE_FILE)) and not is_model_dir(p):
            out += read_ensemble(p)
        elif not is_model_dir(p) and is_model_dir(os.path.join(p, "final")):
            out.append(os.path.join(p, "final"))
        else:
            out.append(p)  # a model directory, or a path open_model_dir names in its own error
    seen: dict[str, str] = {}
    for d in out:
        key = os.path.realpath(d)
        if key in seen:
            raise ArtifactError(f"model directory {d} is named twice (as {seen[key]} too): an ensemble averages "
                                f"distinct members")
        seen[key] = d
    return out


def write_ensemble(folder: str, members: list[dict]):
    """folder/ensemble.json, written whole (members: {"dir": relative path, ...extra}); each existing member's
    digest is recorded with it."""
    from .artifact import model_dir_digest

    path = os.path.join(folder, ENSEMBLE_FILE)
    members = [dict(m, digest=model_dir_digest(os.path.join(folder, m["dir"])))
               if is_model_dir(os.path.join(folder, m["dir"])) else m for m in members]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"format": 1, "combine": COMBINE, "members": members}, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the contract

# tokenizer.json also saves the fast tokenizer's runtime state (truncation/padding set by the last call), which
# does not change a single token id
RUNTIME_STATE = ("truncation", "padding")


def _tokenizer_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if os.path.basename(path) == "tokenizer.json":
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(obj, dict):
            return json.dumps({k: v for k, v in obj.items() if k not in RUNTIME_STATE}, sort_keys=True).encode()
    return raw


def tokenizer_folder_digest(model_dir: str) -> Optional[str]:
    """sha256 over the tokenizer folder's files (names and bytes, tokenizer.json without its runtime state);
    None when the folder has none."""
    folder = os.path.join(model_dir, "tokenizer")
    if not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0" + _tokenizer_bytes(path))
    return h.hexdigest()


def contract_difference(first, other) -> Optional[str]:
    """Why ModelDir `other` cannot be averaged with `first` (None when it can)."""
    a, b = first.pre.to_dict(), other.pre.to_dict()
    keys = [k for k in a if a[k] != b.get(k)]
    if keys:
        return f"its preprocessing.json differs in {', '.join(keys[:4])}"
    if tokenizer_folder_digest(first.path) != tokenizer_folder_digest(other.path):
        return "its tokenizer/ files differ"
    for key in ("task", "num_classes", "target_mean", "target_std"):
        if getattr(first.spec, key) != getattr(other.spec, key):
            return f"its model_spec.json has {key} {getattr(other.spec, key)!r}, not {getattr(first.spec, key)!r}"
    return None


def check_contract(members: list) -> None:
    for md in members[1:]:
        why = contract_difference(members[0], md)
        if why:
            raise ArtifactError(f"ensemble member {md.path} does not share the preprocessing contract of "
                                f"{members[0].path}: {why}; members must be trained on the same data config "
                                f"(e.g. one train.py --seeds run)")


def open_models(paths, trust_remote_code: bool = False):
    """One ModelDir for one member, or for several an ensemble ModelDir: the first member's preprocessing,
    tokenizer and path (its config.yaml selects --split rows), and an EnsembleModel."""
    from dataclasses import replace

    from .artifact import open_model_dir

    dirs = resolve_model_dirs(paths)
    members = [open_model_dir(d, trust_remote_code) for d in dirs]
    if len(members) == 1:
        return members[0]
    check_contract(members)
    return replace(members[0], model=EnsembleModel([m.model for m in members]).eval(), members=dirs)
