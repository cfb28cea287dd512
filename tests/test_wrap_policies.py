"""FSDP auto-wrap policies as plain functions, and what they produce on a real BERT-based model."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mmbert.artifact import build_model
from mmbert.distributed.env import DistEnv
from mmbert.distributed.parallel import ParallelPlan, encoder_units, parallelize, plan_units, units_by_size
from mmbert.errors import ConfigError
from mmbert.models.classifier import ModelSpec


@pytest.fixture
def model(tiny_bert):
    spec = ModelSpec(fusion="cross_attn", hidden_dim=32, num_heads=2, dropout=0.0, pooling="cls", num_numeric=3,
                     cardinalities=[3, 5], cat_embedding_dim=4, num_classes=2, encoder=tiny_bert)
    return build_model(spec, tiny_bert, pretrained=True)


def test_class_policy_defaults_to_no_split_modules(model):
    units = plan_units(model, "class", None, 0)
    assert set(units) == {"text_encoder.encoder.embeddings", "text_encoder.encoder.encoder.layer.0",
                          "text_encoder.encoder.encoder.layer.1", "fusion_head"}
    assert plan_units(model, "class", ["BertLayer"], 0) == [
        "text_encoder.encoder.encoder.layer.0", "text_encoder.encoder.encoder.layer.1", "fusion_head"]


def test_unknown_class_is_a_clear_error(model):
    with pytest.raises(ConfigError, match="GPT2Block"):
        plan_units(model, "class", ["GPT2Block"], 0)


def test_size_policy_wraps_bottom_up(model):
    # the word embeddings (30522 x 32 ~ 977k params) are the only module over 500k on their own
    assert units_by_size(model, 500_000) == ["text_encoder.encoder.embeddings.word_embeddings"]
    # a BertLayer holds ~8.6k params, its attention block 4.3k: at 5k each layer becomes one unit; the
    # rest of the embeddings (4.2k once word_embeddings is a unit) stays with the root
    assert units_by_size(model, 5_000) == ["text_encoder.encoder.embeddings.word_embeddings",
                                           "text_encoder.encoder.encoder.layer.0",
                                           "text_encoder.encoder.encoder.layer.1", "fusion_head.fusion"]
    assert units_by_size(model, 10**9) == []


def test_none_policy_keeps_fusion_and_head_together(model):
    assert plan_units(model, "none", None, 0) == ["fusion_head"]


def test_apply_fsdp_creates_units(model, monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "none")
        plan = ParallelPlan("fsdp", "class", ["BertLayer"], 0, "full", "fp32", True, False)
        wrapped = parallelize(model, plan, env)  # activation checkpointing, then fully_shard
        fsdp_names = [n for n, m in wrapped.named_modules() if isinstance(m, FSDPModule)]
        assert "" in fsdp_names and "fusion_head" in fsdp_names  # root always wrapped
        layers = [n for n in fsdp_names if n.startswith("text_encoder.encoder.encoder.layer.")]
        assert len(layers) == 2 and all("_checkpoint_wrapped_module" in n for n in layers)  # AC on layers
        batch = dict(input_ids=torch.randint(1000, 2000, (2, 1, 6)), attention_mask=torch.ones(2, 1, 6, dtype=torch.long),
                     numeric=torch.randn(2, 3), missing=torch.zeros(2, 3), categorical=torch.tensor([[1, 2], [0, 5]]))
        wrapped(**batch).sum().backward()
        assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_checkpointing_and_compile_take_the_outermost_encoder_units_or_refuse(model):
    layers = ["text_encoder.encoder.encoder.layer.0", "text_encoder.encoder.encoder.layer.1"]
    plan = ParallelPlan("none", "class", ["BertLayer"], 0, "full", "fp32", True, False)
    assert encoder_units(model, plan) == layers
    plan.wrap_policy, plan.min_params = "class+size", 4_000  # size units inside the layers too: only the layers
    assert encoder_units(model, plan) == layers
    plan.wrap_policy = "none"
    with pytest.raises(ConfigError, match="'dist.activation_checkpointing': the model has no encoder layer"):
        parallelize(model, plan, DistEnv(0, 1, 0, 1, torch.device("cpu"), "none"))
