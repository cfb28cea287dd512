"""The multimodal model: text encoder + tabular encoder + fusion/head, built from a JSON-able spec. A classifier
outputs one logit per class, a regression model one value (the standardised target)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ArtifactError
from ..task import CLASSIFICATION, REGRESSION
from .fusion import build_fusion
from .registry import fusion_spec
from .tabular import TabAE, TabTokens

log = logging.getLogger("mmbert")


@dataclass
class ModelSpec:
    """Everything needed to rebuild the architecture (weights come from model.safetensors)."""
    fusion: str
    hidden_dim: int
    num_heads: int
    dropout: float
    pooling: str
    num_numeric: int
    cardinalities: list[int]
    cat_embedding_dim: int
    num_classes: int  # outputs of the head: the classes, or 1 for a regression
    encoder: str  # the name it was trained from (informational); the architecture is in encoder/config.json
    # a model_spec.json without these fields (written before regression existed) is a classifier
    task: str = CLASSIFICATION
    target_mean: Optional[float] = None  # regression: scores() turns the output z into z * std + mean
    target_std: Optional[float] = None

    def to_dict(self):
        return asdict(self)


class FusionHead(nn.Module):
    """Fusion block and classification head: one FSDP unit."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.fusion = fusion

    def forward(self, text, tab, text_mask=None):
        return self.fusion(text, tab, text_mask=text_mask)


class MultimodalClassifier(nn.Module):
    def __init__(self, spec: ModelSpec, encoder: Optional[nn.Module]):
        super().__init__()
        from .text_encoder import TextEncoder

        self.spec = spec
        fs = fusion_spec(spec.fusion)
        has_tab = spec.num_numeric > 0 or len(spec.cardinalities) > 0
        if fs.needs_tabular and not has_tab:
            raise ValueError(f"fusion '{spec.fusion}' needs tabular columns")
        self.text_encoder = None
        if fs.text:
            keep_pooler = spec.pooling == "pooler" and not fs.tab_tokens
            self.text_encoder = TextEncoder(encoder, spec.pooling, spec.hidden_dim, keep_pooler)
        self.tab_encoder = TabAE(spec.num_numeric, spec.cardinalities, spec.cat_embedding_dim, spec.hidden_dim) \
            if has_tab and fs.tabular and not fs.tab_tokens else None
        self.tab_tokens = TabTokens(spec.num_numeric, spec.cardinalities, spec.hidden_dim) \
            if fs.tabular and fs.tab_tokens else None
        self.fusion_head = FusionHead(build_fusion(spec.fusion, spec.hidden_dim, spec.num_heads, spec.num_classes,
                                                   spec.dropout))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, numeric: Optional[torch.Tensor] = None,
                missing: Optional[torch.Tensor] = None, categorical: Optional[torch.Tensor] = None,
                chunk_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns logits B x K."""
        text = tab = text_mask = None
        tokens = self.tab_tokens is not None
        if self.text_encoder is not None:
            text, text_mask = self.text_encoder(input_ids, attention_mask, chunk_index, tokens=tokens)
        if self.tab_encoder is not None:
            tab = self.tab_encoder(numeric, missing, categorical)
        elif tokens:
            tab = self.tab_tokens(numeric, missing, categorical)
        return self.fusion_head(text, tab, text_mask)

    def forward_batch(self, batch: dict) -> torch.Tensor:
        return self(*batch_inputs(batch))


def batch_inputs(batch: dict) -> tuple:
    """forward's positional arguments from a collated batch (positional, so DDP/FSDP wrappers see the call as
    their forward)."""
    return (batch["input_ids"], batch["attention_mask"], batch.get("numeric"), batch.get("missing"),
            batch.get("categorical"), batch.get("chunk_index"))


def freeze_word_embeddings(model: MultimodalClassifier) -> int:
    """Stops gradients into the encoder's input word embeddings; returns how many parameters that froze.

    Only the word (token) table: position and token-type embeddings and the embedding LayerNorm stay
    trainable. Fine-tuning moves only the rows of tokens it sees, so the update is small, yet a dense
    gradient of vocab x hidden is produced, reduced across ranks and stepped through AdamW every step."""
    if model.text_encoder is None:
        return 0
    table = model.text_encoder.encoder.get_input_embeddings()
    n = 0
    for p in table.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def scores(outputs: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The one "model outputs -> scores" function, float32 B x K: class probabilities (softmax), or for a
    regression the B x 1 prediction in the target's original units (the train standardisation undone)."""
    if spec.task == REGRESSION:
        return outputs.float() * spec.target_std + spec.target_mean
    return probabilities(outputs)


def effective_fusion(requested: str, has_tab: bool) -> str:
    """With no tabular columns the model is a text classifier, whatever fusion was asked for."""
    if not has_tab and fusion_spec(requested).tabular:
        log.warning("no tabular columns configured: fusion '%s' falls back to 'text_only'", requested)
        return "text_only"
    return requested


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT family, DistilBERT & co


def load_encoder(name: str, pretrained: bool, trust_remote_code: bool = False, config_dir: Optional[str] = None,
                 attention_dropout: Optional[float] = None):
    """A HF AutoModel, pretrained from a hub id/folder, or (pretrained=False) built from `config_dir`'s
    config.json with no weights, to be filled from model.safetensors. `attention_dropout` replaces the
    encoder's attention-probability dropout (0 lets PyTorch's CPU SDPA use its fused kernel in training)."""
    import os

    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from ..data.tokenize import resolve_encoder_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not pretrained:
        try:
            cfg = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read encoder config in {config_dir}: {str(e).splitlines()[0]}") from None
        try:
            return AutoModel.from_config(cfg, attn_implementation="sdpa", trust_remote_code=trust_remote_code)
        except (ValueError, ImportError):
            return AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
    path = resolve_encoder_path(name)
    kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        if attention_dropout is not None:
            enc_cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            keys = [k for k in ATTENTION_DROPOUT_KEYS if hasattr(enc_cfg, k)]
            if not keys:
                from ..errors import ConfigError

                raise ConfigError(f"config key 'model.attention_dropout': encoder '{name}' has no attention "
                                  f"dropout setting ({' / '.join(ATTENTION_DROPOUT_KEYS)})")
            for k in keys:
                setattr(enc_cfg, k, attention_dropout)
            kwargs["config"] = enc_cfg
        try:
            return AutoModel.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise
            return AutoModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = " (offline: give a local folder or a cached hub id)" if offline else ""
        raise ArtifactError(f"cannot load encoder '{name}'{hint}: {str(e).splitlines()[0]}") from None
