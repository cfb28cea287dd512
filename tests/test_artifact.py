"""Model directories as untrusted input: a missing directory or a truncated file is one line naming it; pickles
(and custom code offered through auto_map) in a model dir are never loaded; the package has no pickle loader.
Model directories that lie about their sizes: tests/test_evaluate.py (evaluate.py under a memory limit)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, assert_one_line_error, eval_cli


@pytest.mark.slow
def test_evaluate_model_dir_not_found(work, tmp_path):
    r = eval_cli(str(tmp_path / "no_model"), str(work / "good.csv"), tmp_path / "out")
    assert_one_line_error(r, f"model directory not found: {tmp_path / 'no_model'}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "preprocessing.json"])
def test_truncated_artifact_file_is_one_line(work, model_dir, tmp_path, name):
    broken = tmp_path / "final"
    shutil.copytree(model_dir, broken)
    f = broken / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = eval_cli(str(broken), str(work / "good.csv"), tmp_path / "out")
    assert_one_line_error(r, str(f), "truncated or corrupted")


# ----------------------------------------------------------------------------- pickles and remote code

class _Payload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_in_a_model_dir_are_never_loaded(model_dir, work, tmp_path, monkeypatch):
    """Pickles where PyTorch/HF would look for weights (and a custom-code config) are ignored: the model
    dir loads from safetensors + JSON only, with trust_remote_code off, and scores normally."""
    import pickle

    from mmbert.artifact import open_model_dir, seal_model_dir

    d = tmp_path / "final"
    shutil.copytree(model_dir, d)
    marker = tmp_path / "PWNED"
    for rel in ("pytorch_model.bin", "model.pt", "model.pkl", "encoder/pytorch_model.bin",
                "tokenizer/pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        with open(d / rel, "wb") as f:
            pickle.dump(_Payload(str(marker)), f)
    # custom code offered through auto_map: never imported unless trust_remote_code is asked for
    (d / "encoder" / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    cfg = json.loads((d / "encoder" / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (d / "encoder" / "config.json").write_text(json.dumps(cfg))
    seal_model_dir(str(d))  # a hostile folder can carry a matching digest: the loaders themselves must hold

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = open_model_dir(str(d)).model
    ref = open_model_dir(model_dir).model
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert not marker.exists()


def test_package_has_no_pickle_loaders_or_remote_code():
    """No torch.load / pickle in the package: the only loaders are safetensors, JSON and YAML safe_load."""
    import re

    hits = []
    for base, _, files in os.walk(os.path.join(ROOT, "mmbert")):
        for name in files:
            if name.endswith(".py"):
                src = open(os.path.join(base, name), encoding="utf-8").read()
                for m in re.finditer(r"torch\.load\((?![^)]*weights_only=True)|"
                                     r"^\s*(import|from) (pickle|dill|joblib)\b|pickle\.loads?\(|allow_pickle=True|"
                                     r"yaml\.(unsafe_)?load\(|trust_remote_code=True", src, re.M):
                    hits.append(f"{name}: {m.group(0)}")
    assert hits == []


def test_a_link_inside_a_part_is_hashed_with_the_bytes_it_names(tmp_path):
    """tokenizer/vocab.txt -> ../real.txt: rewriting real.txt changes the tokenizer part's digest."""
    from mmbert import fsutil

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "real.txt").write_text("a")
    os.symlink("../real.txt", tmp_path / "tokenizer" / "vocab.txt")
    before = fsutil.part_digest(str(tmp_path), "tokenizer")
    (tmp_path / "real.txt").write_text("b")
    assert fsutil.part_digest(str(tmp_path), "tokenizer") != before
