"""Fusion of text and tabular representations, each followed by the same MLP head."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Head(nn.Module):
    """logits = Linear(H, K)(ReLU(Linear(in, H)(x))) (dropout before the last layer while training)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.fc(x))))


class _BidirectionalAttention(nn.Module):
    """The two attention steps both cross-attention fusions share: text attends to tabular, then tabular to
    the updated text, each with a residual and LayerNorm; a head over both sides."""

    def __init__(self, hidden_dim, num_heads, num_classes, dropout):
        super().__init__()
        self.text2tab = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_text = nn.LayerNorm(hidden_dim)
        self.tab2text = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_tab = nn.LayerNorm(hidden_dim)
        self.head = Head(2 * hidden_dim, hidden_dim, num_classes, dropout)


class CrossAttnFusion(_BidirectionalAttention):
    """SPEC 2 reference design on length-1 sequences:
    X' = LN(X + MHA(X, A, A)); A' = LN(A + MHA(A, X', X')); head(concat(X', A'))."""

    def forward(self, text, tab, **_):
        x, a = text.unsqueeze(1), tab.unsqueeze(1)
        x2 = self.norm_text(x + self.text2tab(x, a, a, need_weights=False)[0])
        a2 = self.norm_tab(a + self.tab2text(a, x2, x2, need_weights=False)[0])
        return self.head(torch.cat([x2, a2], dim=-1).squeeze(1))


class TokenCrossAttnFusion(_BidirectionalAttention):
    """Token-level variant: text tokens (all chunks, padding masked) and one token per tabular feature
    attend to each other in the same two steps; then masked mean pooling of each side."""

    def forward(self, text, tab, text_mask: Optional[torch.Tensor] = None, **_):
        x, a = text, tab  # B x L x H, B x F x H
        x2 = self.norm_text(x + self.text2tab(x, a, a, need_weights=False)[0])
        a2 = self.norm_tab(a + self.tab2text(a, x2, x2, key_padding_mask=~text_mask, need_weights=False)[0])
        m = text_mask.unsqueeze(-1).to(x2.dtype)
        x_pool = (x2 * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(torch.cat([x_pool, a2.mean(1)], dim=-1))


class ConcatFusion(nn.Module):
    def __init__(self, hidden_dim, num_heads, num_classes, dropout):
        super().__init__()
        self.head = Head(2 * hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, text, tab, **_):
        return self.head(torch.cat([text, tab], dim=-1))


class GatedFusion(nn.Module):
    """h = g * X + (1 - g) * A with g = sigmoid(W [X; A] + b), per dimension."""

    def __init__(self, hidden_dim, num_heads, num_classes, dropout):
        super().__init__()
        self.gate = nn.Linear(2 * hidden_dim, hidden_dim)
        self.head = Head(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, text, tab, **_):
        g = torch.sigmoid(self.gate(torch.cat([text, tab], dim=-1)))
        return self.head(g * text + (1 - g) * tab)


class SingleFusion(nn.Module):
    """text_only / tab_only baselines: the head on one side (`use`: "text" or "tabular")."""

    def __init__(self, hidden_dim, num_heads, num_classes, dropout, use: str = "text"):
        super().__init__()
        self.use = use
        self.head = Head(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, text, tab, **_):
        return self.head(text if self.use == "text" else tab)


def build_fusion(name: str, hidden_dim: int, num_heads: int, num_classes: int, dropout: float) -> nn.Module:
    """The fusion block and head registered under `name` (models/registry.py)."""
    from .registry import fusion_spec

    return fusion_spec(name).build(hidden_dim, num_heads, num_classes, dropout)
