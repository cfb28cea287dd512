"""Shared fixtures: a tiny randomly initialised BERT (real tokenizer) and small real-data tables."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "womens_clothing_reviews.parquet")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BertModel with random weights and the real all-MiniLM-L6-v2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmbert.data.tokenize import resolve_encoder_path

    path = str(tmp_path_factory.mktemp("tiny_bert"))
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2"))
    tok.save_pretrained(path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reviews() -> pd.DataFrame:
    """The first 400 rows of the shipped dataset (real text, real missing values)."""
    return pd.read_parquet(DATA).iloc[:400].reset_index(drop=True)


def write_config(path, tiny_bert: str, data: str, /, **sections) -> str:
    """A YAML config for `data` with the shipped column roles and the tiny encoder; `sections` override
    (positional-only arguments, so `data={...}` overrides the data section)."""
    import yaml

    cfg = {
        "data": {"path": data, "text_columns": ["Title", "Review Text"],
                 "numeric_columns": ["Rating", "Age", "Positive Feedback Count"],
                 "categorical_columns": ["Division Name", "Department Name", "Class Name"],
                 "label_column": "Recommended IND", "max_tokens": 32, "max_chunks": 2,
                 "split": {"fractions": [0.75, 0.25], "seed": 0}},
        "model": {"encoder": tiny_bert, "hidden_dim": 32, "num_heads": 2, "dropout": 0.0, "pooling": "cls"},
        "train": {"batch_size": 8, "lr": 1e-3, "log_every": 1, "progress_bar": False, "warmup_ratio": 0.0},
        "dist": {},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run an entry script in real processes (torchrun with gloo when nproc > 1)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    if env:
        e.update(env)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--max-restarts", "0"] + args
    else:
        cmd = [sys.executable] + args
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def make_model_dir(work, tiny_bert: str, **data) -> str:
    """A consolidated model dir under `work`: the random tiny model, preprocessing fitted on work/train.csv
    (`data` overrides the config's data section), no training."""
    import torch

    from mmbert.artifact import build_model, save_artifact
    from mmbert.config import load_config
    from mmbert.data.preprocess import Preprocessor
    from mmbert.data.tokenize import load_tokenizer
    from mmbert.models.classifier import ModelSpec

    cfg = load_config(write_config(work / "m.yaml", tiny_bert, str(work / "train.csv"), data=data))
    pre = Preprocessor.fit(pd.read_csv(work / "train.csv"), cfg.data, tiny_bert, str(work / "train.csv"))
    spec = ModelSpec(fusion="cross_attn", hidden_dim=32, num_heads=2, dropout=0.0, pooling="cls",
                     num_numeric=len(pre.numeric_columns),
                     cardinalities=[len(pre.vocabularies[c]) for c in pre.categorical_columns],
                     cat_embedding_dim=8, num_classes=pre.num_classes, encoder=tiny_bert)
    torch.manual_seed(0)
    model = build_model(spec, tiny_bert, pretrained=True)
    out = str(work / "run" / "final")
    save_artifact(out, model.state_dict(), spec, model, pre, load_tokenizer(tiny_bert), cfg.to_dict())
    return out
