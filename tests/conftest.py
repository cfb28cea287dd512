"""Shared fixtures: a tiny randomly initialised BERT (real tokenizer), small real-data tables, a folder of
good and broken data files with a config and an untrained model dir for it, and the helpers that run
train.py / evaluate.py and check their one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The datasets and token caches of this test session (inherited by the processes the tests start): never the
# user's ~/.cache, and never a cache an earlier session filled, which would hide a build path.
os.environ["MMBERT_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmbert-tests-")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "womens_clothing_reviews.parquet")
LABEL = "Recommended IND"


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
def no_dropout_bert(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT with dropout off, so runs on different world sizes must agree."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    path = str(tmp_path_factory.mktemp("tiny_bert_nodrop"))
    cfg = BertConfig.from_pretrained(tiny_bert)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    for f in os.listdir(tiny_bert):
        if "token" in f or f.startswith("vocab") or f.startswith("special"):
            shutil.copy(os.path.join(tiny_bert, f), path)
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
        "train": {"batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "warmup_ratio": 0.0},
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
    from mmbert.assembly import model_spec
    from mmbert.config import load_config
    from mmbert.data.preprocess import Preprocessor
    from mmbert.data.tokenize import load_tokenizer

    cfg = load_config(write_config(work / "m.yaml", tiny_bert, str(work / "train.csv"), data=data,
                                   model={"cat_embedding_dim": 8}))
    pre = Preprocessor.fit(pd.read_csv(work / "train.csv"), cfg.data, tiny_bert, str(work / "train.csv"))
    spec = model_spec(cfg, pre)
    torch.manual_seed(0)
    model = build_model(spec, tiny_bert, pretrained=True)
    out = str(work / "run" / "final")
    save_artifact(out, model.state_dict(), spec, model, pre, load_tokenizer(tiny_bert), cfg.to_dict())
    return out


# ----------------------------------------------------------------------------- one-line errors

def assert_one_line_error(r, *fragments: str):
    """exit 2, one stderr line `error: ...` naming every fragment, no traceback anywhere."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- good and broken data files

@pytest.fixture(scope="module")
def work(tmp_path_factory, reviews):
    """A folder with a good 160-row file and one broken file per bad-input case."""
    d = tmp_path_factory.mktemp("data_files")
    df = reviews.iloc[:160].copy()
    df.to_csv(d / "good.csv", index=False)
    (d / "empty.csv").write_bytes(b"")
    df.iloc[:0].to_csv(d / "header_only.csv", index=False)
    df.drop(columns=["Age"]).to_csv(d / "no_age.csv", index=False)
    text = df.astype({"Age": object})
    text.loc[123, "Age"] = "forty-two"
    text.to_csv(d / "age_text.csv", index=False)
    seven = df.copy()
    seven.loc[131, LABEL] = 7
    seven.to_csv(d / "label7.csv", index=False)
    seven.iloc[120:].to_csv(d / "val_label7.csv", index=False)  # row 11 of this file holds the 7
    df.iloc[:120].to_csv(d / "train.csv", index=False)
    latin = df.copy()
    latin.loc[57, "Title"] = "MARKER"
    latin.to_csv(d / "latin1.csv", index=False)
    raw = (d / "latin1.csv").read_bytes()
    (d / "latin1.csv").write_bytes(raw.replace(b"MARKER", b"caf\xe9 latin-1"))  # 0xE9 alone is not UTF-8
    return d


@pytest.fixture(scope="module")
def train_cfg(work, tiny_bert):
    return write_config(work / "c.yaml", tiny_bert, str(work / "good.csv"), dist={"strategy": "none"})


def train_cli(cfg: str, out, *args: str, **kw):
    return run_cli(["train.py", "--config", cfg, "--output-dir", str(out), "--max-steps", "1", *args],
                   check=False, **kw)


@pytest.fixture(scope="module")
def model_dir(work, tiny_bert):
    """A consolidated model dir (random tiny model, preprocessing fitted on the first 120 rows), no training."""
    return make_model_dir(work, tiny_bert)


def eval_cli(model: str, data: str, out, *args: str):
    return run_cli(["evaluate.py", "--model-dir", model, "--data", data, "--output-dir", str(out),
                    "--no-progress", "--no-plots", *args], check=False)
