"""Tabular encoders: TabAE (one vector per row) and per-feature tokens for token-level fusion."""
from __future__ import annotations

import torch
from torch import nn


class TabAE(nn.Module):
    """concat(standardised numerics, missing indicators, categorical embeddings) -> LayerNorm -> Linear -> ReLU."""

    def __init__(self, num_numeric: int, cardinalities: list[int], emb_dim: int, hidden_dim: int):
        super().__init__()
        self.num_numeric = num_numeric
        self.embeddings = nn.ModuleList(nn.Embedding(n + 1, min(emb_dim, n + 1)) for n in cardinalities)
        in_dim = 2 * num_numeric + sum(e.embedding_dim for e in self.embeddings)
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, hidden_dim)

    def forward(self, numeric, missing, categorical):
        parts = []
        if self.num_numeric:
            parts += [numeric, missing]
        parts += [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        return torch.relu(self.linear(self.norm(torch.cat(parts, dim=-1))))


class TabTokens(nn.Module):
    """One H-dim token per feature: numeric j -> x_j * w_j + b_j (+ a learned 'missing' vector);
    categorical -> embedding (index 0 = unknown)."""

    def __init__(self, num_numeric: int, cardinalities: list[int], hidden_dim: int):
        super().__init__()
        self.num_numeric = num_numeric
        if num_numeric:
            self.weight = nn.Parameter(torch.randn(num_numeric, hidden_dim) * 0.02)
            self.bias = nn.Parameter(torch.zeros(num_numeric, hidden_dim))
            self.missing_emb = nn.Parameter(torch.zeros(num_numeric, hidden_dim))
        self.embeddings = nn.ModuleList(nn.Embedding(n + 1, hidden_dim) for n in cardinalities)

    def forward(self, numeric, missing, categorical):
        toks = []
        if self.num_numeric:
            toks.append(numeric.unsqueeze(-1) * self.weight + self.bias + missing.unsqueeze(-1) * self.missing_emb)
        if len(self.embeddings):
            toks.append(torch.stack([emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)], dim=1))
        return torch.cat(toks, dim=1)
