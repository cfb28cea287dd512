"""Model: masked chunk mean, the cross_attn equations of SPEC 2, every fusion's output."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbert.config import DataConfig
from mmbert.data.dataset import collate
from mmbert.data.pipeline import build_dataset
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import load_tokenizer
from mmbert.models.classifier import (
    ModelSpec,
    MultimodalClassifier,
    effective_fusion,
    load_encoder,
    probabilities,
)
from mmbert.models.fusion import CrossAttnFusion
from mmbert.models.registry import fusion_names
from mmbert.models.text_encoder import TextEncoder

NUM = ["Rating", "Age", "Positive Feedback Count"]
CAT = ["Division Name", "Department Name", "Class Name"]


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return load_tokenizer(tiny_bert)


@pytest.fixture(scope="module")
def data(tok, reviews):
    """(preprocessor, a collated batch of 6 real rows with 1..3 chunks each)."""
    df = reviews.iloc[:120]
    cfg = DataConfig(text_columns=["Title", "Review Text"], numeric_columns=NUM, categorical_columns=CAT,
                     label_column="Recommended IND", max_tokens=24, max_chunks=3)
    pre = Preprocessor.fit(df, cfg, "tok", "f")
    ds = build_dataset(pre, tok, df, "f")
    n_chunks = np.array([len(c) for c in ds.chunks])
    idx = [*np.flatnonzero(n_chunks == 1)[:2], *np.flatnonzero(n_chunks == 2)[:2], *np.flatnonzero(n_chunks == 3)[:2]]
    assert len(idx) == 6
    return pre, collate(ds, idx, tok.pad_token_id)


def _encoder(tiny_bert):
    torch.manual_seed(0)
    return load_encoder(tiny_bert, pretrained=True)


def _add_empty_chunk(batch):
    ids, att = batch["input_ids"], batch["attention_mask"]
    B, _, T = ids.shape
    ids2 = torch.cat([ids, torch.zeros(B, 1, T, dtype=ids.dtype)], dim=1)
    att2 = torch.cat([att, torch.zeros(B, 1, T, dtype=att.dtype)], dim=1)
    cmask2 = att2[:, :, 0] > 0
    return ids2, att2, torch.from_numpy(np.flatnonzero(cmask2.reshape(-1).numpy()))


# ----------------------------------------------------------------------------- text encoder

@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_empty_chunk_is_masked_and_ignored_by_the_mean(tiny_bert, data, pooling):
    _, batch = data
    enc = TextEncoder(_encoder(tiny_bert), pooling, hidden_dim=24, keep_pooler=pooling == "pooler").eval()
    ids, att, cidx = batch["input_ids"], batch["attention_mask"], batch["chunk_index"]
    ids2, att2, cidx2 = _add_empty_chunk(batch)
    with torch.no_grad():
        ref, cmask = enc(ids, att)
        with_index, _ = enc(ids, att, cidx)
        padded, cmask2 = enc(ids2, att2)
        padded_index, _ = enc(ids2, att2, cidx2)
    assert ref.shape == (6, 24)
    assert cmask.tolist() == batch["chunk_mask"].tolist()
    assert cmask2[:, -1].sum() == 0 and cmask2[:, :-1].tolist() == cmask.tolist()
    for out in (with_index, padded, padded_index):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # and the text embedding is the mean over exactly the real chunks, each encoded on its own
    with torch.no_grad():
        for b in range(6):
            n = int(cmask[b].sum())
            per_chunk = []
            for c in range(n):
                L = int(att[b, c].sum())
                v, _ = enc(ids[b:b + 1, c:c + 1, :L], att[b:b + 1, c:c + 1, :L])
                per_chunk.append(v[0])
            torch.testing.assert_close(ref[b], torch.stack(per_chunk).mean(0), atol=1e-5, rtol=1e-5)


def test_projection_only_when_widths_differ(tiny_bert):
    assert isinstance(TextEncoder(_encoder(tiny_bert), "cls", 32, False).proj, torch.nn.Identity)
    proj = TextEncoder(_encoder(tiny_bert), "cls", 24, False).proj
    assert isinstance(proj, torch.nn.Linear) and (proj.in_features, proj.out_features) == (32, 24)


def test_token_fusion_ignores_empty_chunks(tiny_bert, data):
    _, batch = data
    spec = _spec("cross_attn_tokens", 3)
    model = MultimodalClassifier(spec, _encoder(tiny_bert)).eval()
    ids2, att2, cidx2 = _add_empty_chunk(batch)
    with torch.no_grad():
        ref = model(batch["input_ids"], batch["attention_mask"], batch["numeric"], batch["missing"],
                    batch["categorical"], batch["chunk_index"])
        padded = model(ids2, att2, batch["numeric"], batch["missing"], batch["categorical"], cidx2)
        padded_no_index = model(ids2, att2, batch["numeric"], batch["missing"], batch["categorical"])
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_no_index, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- cross_attn == SPEC 2

def _mha(q_in, kv_in, m: torch.nn.MultiheadAttention):
    """Multi-head attention of one query token on one key/value token, from the raw weights."""
    H, h = m.embed_dim, m.num_heads
    d = H // h
    Wq, Wk, Wv = m.in_proj_weight.split(H)
    bq, bk, bv = m.in_proj_bias.split(H)
    B = q_in.shape[0]
    q = (q_in @ Wq.T + bq).view(B, h, 1, d)
    k = (kv_in @ Wk.T + bk).view(B, h, 1, d)
    v = (kv_in @ Wv.T + bv).view(B, h, 1, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # B x h x 1 x 1: all ones
    assert torch.allclose(weights, torch.ones_like(weights))
    o = (weights @ v).reshape(B, H)
    return o @ m.out_proj.weight.T + m.out_proj.bias


def _ln(x, m: torch.nn.LayerNorm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def test_cross_attn_matches_spec_equations():
    torch.manual_seed(0)
    H, K, B = 16, 3, 5
    f = CrossAttnFusion(H, 4, K, dropout=0.3)
    with torch.no_grad():  # no trivial parameters: every weight and bias (LayerNorm too) is random
        for p in f.parameters():
            p.normal_(0, 0.5)
    f.eval()
    X, A = torch.randn(B, H), torch.randn(B, H)
    with torch.no_grad():
        got = f(X, A)
        X2 = _ln(X + _mha(X, A, f.text2tab), f.norm_text)  # U_t = MHA_text2tab(q=X, k=A, v=A)
        A2 = _ln(A + _mha(A, X2, f.tab2text), f.norm_tab)  # U_a = MHA_tab2text(q=A, k=X', v=X')
        z = torch.cat([X2, A2], dim=-1)
        want = torch.relu(z @ f.head.fc.weight.T + f.head.fc.bias) @ f.head.out.weight.T + f.head.out.bias
        # the tab side must read the *updated* text: reading X instead gives different logits
        A2_stale = _ln(A + _mha(A, X, f.tab2text), f.norm_tab)
        z_stale = torch.cat([X2, A2_stale], dim=-1)
        stale = torch.relu(z_stale @ f.head.fc.weight.T + f.head.fc.bias) @ f.head.out.weight.T + f.head.out.bias
    assert got.shape == (B, K)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, want, atol=1e-3)
    # eval mode is deterministic despite dropout=0.3; training mode is not
    torch.testing.assert_close(f(X, A), got)
    f.train()
    assert not torch.allclose(f(X, A), got)


# ----------------------------------------------------------------------------- every fusion

def _spec(fusion, k, num_numeric=3, cardinalities=(3, 6, 20), hidden=24):
    return ModelSpec(fusion=fusion, hidden_dim=hidden, num_heads=2, dropout=0.0, pooling="cls",
                     num_numeric=num_numeric, cardinalities=list(cardinalities), cat_embedding_dim=4,
                     num_classes=k, encoder="tiny")


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("fusion", fusion_names())
def test_every_fusion_output_shape_and_inputs_used(tiny_bert, data, fusion, k):
    pre, batch = data
    spec = _spec(fusion, k, cardinalities=[len(pre.vocabularies[c]) for c in CAT])
    encoder = None if fusion == "tab_only" else _encoder(tiny_bert)
    torch.manual_seed(1)
    model = MultimodalClassifier(spec, encoder)
    assert (model.text_encoder is None) == (fusion == "tab_only")
    logits = model.forward_batch(batch)
    assert logits.shape == (6, k) and torch.isfinite(logits).all()
    p = probabilities(logits)
    torch.testing.assert_close(p.sum(-1), torch.ones(6))
    labels = torch.arange(6) % k
    F.cross_entropy(logits, labels).backward()
    head = model.fusion_head.fusion.head
    assert head.out.weight.grad is not None and head.out.weight.grad.abs().sum() > 0

    # which inputs reach the logits
    model.eval()
    with torch.no_grad():
        ref = model.forward_batch(batch)
        tab_changed = model.forward_batch({**batch, "numeric": batch["numeric"] + 3.0,
                                           "categorical": torch.zeros_like(batch["categorical"])})
        ids = batch["input_ids"].clone()
        ids[:, :, 1:] = torch.where(batch["attention_mask"][:, :, 1:] > 0, 2000, ids[:, :, 1:])  # other words
        text_changed = model.forward_batch({**batch, "input_ids": ids})
    uses_text, uses_tab = fusion != "tab_only", fusion != "text_only"
    assert (not torch.allclose(tab_changed, ref, atol=1e-6)) == uses_tab
    assert (not torch.allclose(text_changed, ref, atol=1e-6)) == uses_text


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("requested", ["cross_attn", "cross_attn_tokens", "concat", "gated", "text_only"])
def test_no_tabular_columns_gives_a_text_classifier(tiny_bert, tok, reviews, requested, k):
    df = reviews.iloc[:60].copy()
    df["y"] = np.arange(60) % k
    cfg = DataConfig(text_columns=["Review Text"], label_column="y", max_tokens=24, max_chunks=2)
    pre = Preprocessor.fit(df, cfg, "tok", "f")
    ds = build_dataset(pre, tok, df, "f")
    batch = collate(ds, np.arange(8), tok.pad_token_id)
    assert batch["numeric"].shape == (8, 0) and batch["categorical"].shape == (8, 0)
    fusion = effective_fusion(requested, has_tab=False)
    assert fusion == "text_only"
    model = MultimodalClassifier(_spec(fusion, pre.num_classes, 0, []), _encoder(tiny_bert)).eval()
    assert model.tab_encoder is None and model.tab_tokens is None
    with torch.no_grad():
        logits = model.forward_batch(batch)
    assert logits.shape == (8, k) and torch.isfinite(logits).all()


def test_tabular_only_model_has_no_text_encoder(data):
    pre, batch = data
    model = MultimodalClassifier(_spec("tab_only", 2, cardinalities=[len(pre.vocabularies[c]) for c in CAT]), None)
    assert model.text_encoder is None
    # TabAE: LayerNorm over [numerics, missing indicators, embeddings] -> Linear -> ReLU
    tab = model.tab_encoder
    assert tab.norm.normalized_shape == (2 * 3 + sum(min(4, len(pre.vocabularies[c]) + 1) for c in CAT),)
    out = tab(batch["numeric"], batch["missing"], batch["categorical"])
    assert out.shape == (6, 24) and (out >= 0).all()
