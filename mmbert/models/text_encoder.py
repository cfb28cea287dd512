"""BERT-family encoder over B x C x T chunks -> per-chunk vectors, token states, and the masked chunk mean."""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

# Encoders whose position ids start after the padding id (RoBERTa's `create_position_ids_from_input_ids`)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")


def position_limit(config) -> Optional[int]:
    """Tokens per chunk an HF encoder config can position (`max_position_embeddings`; relative-key BERTs
    are bounded by it too), or None when the config states no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


class TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, hidden_dim: int, keep_pooler: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        if not keep_pooler and getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused weights would break DDP and waste FSDP memory
        width = encoder.config.hidden_size
        self.proj = nn.Linear(width, hidden_dim) if width != hidden_dim else nn.Identity()
        # SDPA encoders whose HF code builds masks with `create_bidirectional_mask` take a ready 4D boolean
        # mask as is; given a 2D mask they call `mask.all()` on every forward, a host-device sync on GPU.
        module = sys.modules.get(type(encoder).__module__)
        self._mask_4d = (getattr(encoder.config, "_attn_implementation", None) == "sdpa"
                         and hasattr(module, "create_bidirectional_mask"))

    def _run(self, ids: torch.Tensor, att: torch.Tensor, want_tokens: bool):
        mask = att[:, None, None, :].bool() if self._mask_4d else att  # B x 1 x 1 x T, True = attend
        out = self.encoder(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        if want_tokens:
            return hidden
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return hidden[:, 0]
        m = att.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                chunk_index: Optional[torch.Tensor] = None, tokens: bool = False):
        """Returns (text vector B x H, chunk mask B x C) or, with tokens=True, (token states B x CT x H,
        token mask B x CT). `chunk_index` lists the flat positions of non-empty chunks (computed on the
        host by collate): only those are encoded, then scattered back; without it every chunk is encoded
        (same result, as empty chunks are masked out: the ONNX path)."""
        B, C, T = input_ids.shape
        ids = input_ids.reshape(B * C, T)
        att = attention_mask.reshape(B * C, T)
        chunk_mask = attention_mask.reshape(B, C, T)[:, :, 0] > 0  # [CLS] present <=> chunk is real
        if chunk_index is not None and chunk_index.numel() < B * C:
            sel = self._run(ids.index_select(0, chunk_index), att.index_select(0, chunk_index), tokens)
            full = sel.new_zeros((B * C, *sel.shape[1:]))
            out = full.index_copy(0, chunk_index, sel)
        else:
            out = self._run(ids, att, tokens)
        out = self.proj(out)
        if tokens:
            return out.reshape(B, C * T, -1), att.reshape(B, C * T) > 0
        vec = out.reshape(B, C, -1)
        m = chunk_mask.unsqueeze(-1).to(vec.dtype)
        return (vec * m).sum(1) / m.sum(1).clamp(min=1.0), chunk_mask
