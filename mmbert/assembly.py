"""One place that builds a run from a config: tokenizer, splits, fitted preprocessing, datasets, model spec
and model. Training, the benchmarks and the tests build through it; a finished run is re-opened through
`artifact.open_model_dir` (and its splits re-selected by the same `select_splits`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .artifact import build_model
from .config import Config
from .data.dataset import TableDataset
from .data.pipeline import build_dataset, load_splits, log_label_map
from .data.preprocess import Preprocessor
from .data.tokenize import load_tokenizer, pad_id
from .models.classifier import (
    ModelSpec,
    MultimodalClassifier,
    effective_fusion,
    freeze_word_embeddings,
)

log = logging.getLogger("mmbert")


@dataclass
class RunData:
    tokenizer: object
    pre: Preprocessor  # fitted on the train split only
    train: TableDataset
    val: Optional[TableDataset]

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


def _tokenized_splits(cfg: Config, tokenizer, with_val: bool,
                      fitted: Optional[Preprocessor] = None) -> tuple[Preprocessor, dict, dict[str, TableDataset]]:
    """Read the table, fit preprocessing on train (or apply `fitted`: a resumed run's own), tokenize train (and
    val)."""
    splits = load_splits(cfg.data)
    tr = splits["train"]
    pre = fitted or Preprocessor.fit(tr.df, cfg.data, cfg.model.encoder, tr.file)
    out = {"train": build_dataset(pre, tokenizer, tr.df, tr.file, with_labels=True, name="train", keep_texts=False)}
    if with_val and "val" in splits and len(splits["val"].df):
        out["val"] = build_dataset(pre, tokenizer, splits["val"].df, splits["val"].file, with_labels=True, name="val",
                                   keep_texts=False)
    return pre, splits, out


def build_run_data(cfg: Config, with_val: bool = True, env=None, fitted: Optional[Preprocessor] = None) -> RunData:
    """Splits as configured, preprocessing fitted on train (`fitted`: applied instead), tokenized train (and
    val) datasets; the label map logged with its train counts. With a process environment and data.cache on,
    they come from the token cache (built once per node, memory-mapped by every rank; mmbert/data/cache.py)."""
    tokenizer = load_tokenizer(cfg.model.encoder, cfg.model.trust_remote_code)
    if env is not None and cfg.data.cache:
        from .data.cache import cached_run_data

        pre, datasets, meta = cached_run_data(cfg, env, tokenizer,
                                              lambda: _tokenized_splits(cfg, tokenizer, True, fitted), fitted)
        train_file = meta["splits"]["train"]["file"]
    else:
        pre, splits, datasets = _tokenized_splits(cfg, tokenizer, with_val, fitted)
        train_file = splits["train"].file
    log_label_map(pre, datasets["train"], train_file)
    return RunData(tokenizer, pre, datasets["train"], datasets.get("val") if with_val else None)


def model_spec(cfg: Config, pre: Preprocessor) -> ModelSpec:
    """The architecture: the model config, with the input sizes the fitted preprocessing implies."""
    mc, dc = cfg.model, cfg.data
    has_tab = bool(dc.numeric_columns or dc.categorical_columns)
    return ModelSpec(fusion=effective_fusion(mc.fusion, has_tab), hidden_dim=mc.hidden_dim, num_heads=mc.num_heads,
                     dropout=mc.dropout, pooling=mc.pooling, num_numeric=len(pre.numeric_columns),
                     cardinalities=[len(pre.vocabularies[c]) for c in pre.categorical_columns],
                     cat_embedding_dim=mc.cat_embedding_dim, num_classes=pre.num_outputs, encoder=mc.encoder,
                     task=pre.task, target_mean=pre.target_mean, target_std=pre.target_std)


def build_run_model(cfg: Config, spec: ModelSpec, pretrained: bool = True) -> MultimodalClassifier:
    """The plain model, initialised from train.seed (identical on every rank), encoder weights pretrained."""
    mc = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec, mc.encoder, pretrained=pretrained, trust_remote_code=mc.trust_remote_code,
                        attention_dropout=mc.attention_dropout)
    if mc.freeze_word_embeddings:
        log.info(f"froze the encoder's word embeddings: {freeze_word_embeddings(model):,} parameters")
    return model
