"""The fusion registry: a fusion registered in one place is accepted by the config, built and run by the model,
given its ONNX inputs and its importance views and columns; the built-ins read what they always read."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mmbert.config import DataConfig
from mmbert.data.dataset import collate
from mmbert.data.pipeline import build_dataset
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import load_tokenizer
from mmbert.evaluation import importance as imp
from mmbert.export.onnx import input_names_for, model_input_names
from mmbert.models.classifier import ModelSpec, MultimodalClassifier, effective_fusion, load_encoder
from mmbert.models.fusion import Head
from mmbert.models.registry import (
    TABULAR,
    TEXT,
    fusion_names,
    fusion_spec,
    register_fusion,
    sides_read,
    unregister_fusion,
)

TEXT_IN, NUM_IN, CAT_IN = ["input_ids", "attention_mask"], ["numeric", "missing"], ["categorical"]
NUM = ["Rating", "Age", "Positive Feedback Count"]
CAT = ["Division Name", "Department Name", "Class Name"]
BUILT_INS = ("cross_attn", "cross_attn_tokens", "concat", "gated", "text_only", "tab_only")


@pytest.fixture
def mean_fusion():
    """A fusion defined and registered here only: the head on the mean of the text and tabular vectors."""
    @register_fusion("text_tab_mean", text=True, tabular=True, needs_tabular=True)
    class MeanFusion(nn.Module):
        def __init__(self, hidden_dim, num_heads, num_classes, dropout):
            super().__init__()
            self.head = Head(hidden_dim, hidden_dim, num_classes, dropout)

        def forward(self, text, tab, **_):
            return self.head((text + tab) / 2)

    yield "text_tab_mean"
    unregister_fusion("text_tab_mean")


@pytest.fixture(scope="module")
def data(tiny_bert, reviews):
    """(preprocessor, a collated batch of 6 real rows)."""
    tok = load_tokenizer(tiny_bert)
    df = reviews.iloc[:60]
    cfg = DataConfig(text_columns=["Title", "Review Text"], numeric_columns=NUM, categorical_columns=CAT,
                     label_column="Recommended IND", max_tokens=24, max_chunks=2)
    pre = Preprocessor.fit(df, cfg, "tok", "f")
    return pre, collate(build_dataset(pre, tok, df, "f"), list(range(6)), tok.pad_token_id)


def _spec(fusion: str, num_numeric: int = 3, cardinalities=(4, 5, 6)) -> ModelSpec:
    return ModelSpec(fusion=fusion, hidden_dim=24, num_heads=2, dropout=0.0, pooling="mean",
                     num_numeric=num_numeric, cardinalities=list(cardinalities), cat_embedding_dim=4,
                     num_classes=2, encoder="tiny")


def test_registry_is_torch_free_and_lists_the_built_ins_in_order():
    code = ("import sys; from mmbert.models.registry import fusion_names; print(','.join(fusion_names())); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [",".join(BUILT_INS), "False"]


def test_register_refuses_a_taken_name_and_lookup_names_the_known_ones(mean_fusion):
    assert fusion_names() == (*BUILT_INS, mean_fusion)
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("concat", nn.Identity)
    with pytest.raises(KeyError, match=r"unknown fusion 'nope' \(one of cross_attn, .*text_tab_mean\)"):
        fusion_spec("nope")
    with pytest.raises(ValueError, match="must read text, tabular columns or both"):
        register_fusion("nothing", nn.Identity, text=False, tabular=False)
    assert "nothing" not in fusion_names()


def test_a_registered_fusion_validates_in_the_config(mean_fusion, tiny_bert, tmp_path):
    from mmbert.config import config_from_dict
    from mmbert.errors import ConfigError

    def config(fusion):
        return config_from_dict({"data": {"path": str(tmp_path / "d.csv"), "text_columns": ["Title"],
                                          "numeric_columns": ["Age"], "label_column": "Recommended IND"},
                                 "model": {"encoder": tiny_bert, "fusion": fusion}})

    assert config(mean_fusion).model.fusion == mean_fusion
    with pytest.raises(ConfigError, match="model.fusion"):
        config("text_tab_median")


def test_a_registered_fusion_builds_runs_and_reads_both_sides(mean_fusion, tiny_bert, data):
    pre, batch = data
    spec = _spec(mean_fusion, cardinalities=[len(pre.vocabularies[c]) for c in CAT])
    torch.manual_seed(0)
    model = MultimodalClassifier(spec, load_encoder(tiny_bert, pretrained=True)).eval()
    assert model.text_encoder is not None and model.tab_encoder is not None and model.tab_tokens is None
    with torch.no_grad():
        ref = model.forward_batch(batch)
        tab_changed = model.forward_batch({**batch, "numeric": batch["numeric"] + 3.0})
        text_changed = model.forward_batch({**batch, "input_ids": torch.where(batch["attention_mask"] > 0, 2000,
                                                                              batch["input_ids"])})
    assert ref.shape == (6, 2) and torch.isfinite(ref).all()
    assert not torch.allclose(ref, tab_changed) and not torch.allclose(ref, text_changed)
    assert input_names_for(spec) == TEXT_IN + NUM_IN + CAT_IN and model_input_names(model) == input_names_for(spec)
    assert input_names_for(_spec(mean_fusion, cardinalities=())) == TEXT_IN + NUM_IN
    with pytest.raises(ValueError, match="needs tabular columns"):
        MultimodalClassifier(_spec(mean_fusion, 0, ()), None)
    assert effective_fusion(mean_fusion, has_tab=False) == "text_only"


def test_built_in_fusions_read_what_they_always_read():
    assert [input_names_for(_spec(f)) for f in BUILT_INS] == [TEXT_IN + NUM_IN + CAT_IN] * 4 + [TEXT_IN,
                                                                                                NUM_IN + CAT_IN]
    assert input_names_for(_spec("tab_only", cardinalities=())) == NUM_IN
    assert input_names_for(_spec("text_only", 0, ())) == TEXT_IN
    tab = MultimodalClassifier(_spec("tab_only"), None)
    assert tab.text_encoder is None and tab.tab_encoder is not None
    tokens = fusion_spec("cross_attn_tokens")
    assert tokens.tab_tokens and not tokens.needs_tabular and fusion_spec("cross_attn").needs_tabular
    assert [effective_fusion(f, has_tab=False) for f in BUILT_INS] == ["text_only"] * 6
    assert [effective_fusion(f, has_tab=True) for f in BUILT_INS] == list(BUILT_INS)


def test_importance_views_and_columns_follow_the_sides_the_fusion_reads(mean_fusion, data):
    pre, _ = data
    every = [*pre.text_columns, *NUM, *CAT]
    cases = {mean_fusion: ({"text_only", "tabular_only"}, every),
             "text_only": ({"tabular_only"}, list(pre.text_columns)),
             "tab_only": ({"text_only"}, NUM + CAT)}
    for fusion, (views, columns) in cases.items():
        sides = sides_read([fusion])
        assert set(imp.modality_masks(pre, sides)) == views, fusion
        assert [c for c, _ in imp.columns_of(pre, sides)] == columns, fusion
    assert sides_read(["text_only", "tab_only"]) == {TEXT, TABULAR}  # an ensemble reads the union
    assert [c for c, _ in imp.columns_of(pre)] == every and len(imp.modality_masks(pre)) == 2  # the default


def test_importance_reads_the_fusion_from_the_model_or_the_export(mean_fusion, tmp_path):
    def model_dir(name, fusion):
        d = tmp_path / name
        d.mkdir()
        (d / "model_spec.json").write_text(json.dumps(_spec(fusion).to_dict()))
        return str(d)

    dirs = {f: model_dir(f, f) for f in (mean_fusion, "text_only", "tab_only")}
    assert imp.model_sides(SimpleNamespace(onnx=None, model_dirs=[dirs["text_only"]])) == {TEXT}
    assert imp.model_sides(SimpleNamespace(onnx=None, model_dirs=[dirs[mean_fusion]])) == {TEXT, TABULAR}
    assert imp.model_sides(SimpleNamespace(onnx=None, model_dirs=[dirs["tab_only"]])) == {TABULAR}

    def export(name, entry):
        d = tmp_path / name
        d.mkdir()
        (d / "onnx_manifest.json").write_text(json.dumps({"exports": {"model.onnx": entry}}))
        return str(d)

    members = {"members": [{"fusion": "text_only"}, {"fusion": "tab_only"}]}
    for entry, sides in [({"fusion": "tab_only"}, {TABULAR}), ({"fusion": "text_only", "ensemble": members},
                                                                {TEXT, TABULAR}), ({}, {TEXT, TABULAR})]:
        folder = export(f"e{len(list(tmp_path.iterdir()))}", entry)
        assert imp.model_sides(SimpleNamespace(onnx=folder, model_dirs=[])) == sides, entry


def test_model_spec_accepts_a_registered_fusion_and_names_the_known_ones(mean_fusion, tmp_path):
    from mmbert.artifact import read_spec
    from mmbert.errors import ArtifactError

    (tmp_path / "model_spec.json").write_text(json.dumps(_spec(mean_fusion).to_dict()))
    assert read_spec(str(tmp_path)).fusion == mean_fusion
    (tmp_path / "model_spec.json").write_text(json.dumps({**_spec(mean_fusion).to_dict(), "fusion": "median"}))
    with pytest.raises(ArtifactError, match="field 'fusion' must be one of cross_attn, .*text_tab_mean, got 'median'"):
        read_spec(str(tmp_path))
    assert np.all([fusion_spec(f).resolve() is not None for f in BUILT_INS])  # every built-in class resolves
