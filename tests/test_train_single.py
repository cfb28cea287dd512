"""Single-process training on real rows with the tiny BERT, the artifact, and train.py's error path."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, write_config

from mmbert.artifact import build_model, open_model_dir, save_artifact
from mmbert.config import DataConfig, load_config
from mmbert.data.dataset import collate
from mmbert.data.pipeline import build_dataset, load_splits
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import load_tokenizer
from mmbert.models.classifier import ModelSpec, probabilities


@pytest.fixture(scope="module")
def finetuned(tiny_bert, reviews, tmp_path_factory):
    """Three epochs on 180 real training rows (60 val) through mmbert.training.loop.train."""
    from mmbert.training.loop import train

    tmp = tmp_path_factory.mktemp("finetune")
    data = str(tmp / "reviews.parquet")
    reviews.iloc[:240].to_parquet(data)
    out = str(tmp / "run")
    cfg_path = write_config(tmp / "c.yaml", tiny_bert, data,
                            train={"output_dir": out, "epochs": 3, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-3,
                                   "schedule": "linear", "eval_each_epoch": True, "select_best": True,
                                   "metric": "roc_auc", "seed": 0},
                            dist={"strategy": "none"})
    cfg = load_config(cfg_path)
    final = train(cfg)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return cfg, out, final, records


@pytest.mark.slow
def test_finetune_loss_goes_down(finetuned):
    *_, records = finetuned
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 67))  # 180 // 8 = 22 steps x 3 epochs, log_every 1
    for r in steps:
        for k in ("step", "loss", "lr", "samples_per_s", "tokens_per_s"):
            assert isinstance(r[k], (int, float)) and np.isfinite(r[k]), k
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
    loss = np.array([r["loss"] for r in steps])
    first, last = loss[:5].mean(), loss[-5:].mean()
    assert last < 0.7 * first, f"loss did not go down: first-5 mean {first:.3f}, last-5 mean {last:.3f}"
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(5e-3 * 65 / 66) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # linear decay
    assert all(a >= b for a, b in itertools.pairwise(lrs))


@pytest.mark.slow
def test_finetune_writes_artifact_and_eval_records(finetuned):
    _, out, final, records = finetuned
    assert final == os.path.join(out, "final")
    for name in ("model.safetensors", "preprocessing.json", "model_spec.json", "encoder/config.json",
                 "tokenizer", "config.yaml", "train_summary.json"):
        assert os.path.exists(os.path.join(final, name)), name
    assert not [f for f in os.listdir(final) if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    evals = [r for r in records if r.get("split") == "val"]
    assert [r["step"] for r in evals] == [22, 44, 66]  # once per epoch
    assert all(r["n"] == 60 and 0 <= r["roc_auc"] <= 1 for r in evals)
    assert evals[-1]["roc_auc"] > 0.8  # Rating alone nearly decides the label: the model must have learned it
    with open(os.path.join(out, "config.yaml")) as f:
        resolved = yaml.safe_load(f)
    assert resolved["train"]["epochs"] == 3 and resolved["model"]["fusion"] == "cross_attn"
    assert resolved["dist"]["strategy"] == "none"
    from mmbert.config import config_from_dict
    from mmbert.distributed.parallel import resolve_plan

    again = config_from_dict(resolved)  # the resolved config is a config, and resolves to the same plan
    assert again.to_dict() == resolved
    plan = resolve_plan(again.dist, torch.device("cpu"), 1).as_config()
    assert plan == {k: resolved["dist"][k] for k in plan}


@pytest.mark.slow
def test_reloaded_artifact_reproduces_the_selected_evaluation(finetuned):
    """final/ holds the best-evaluated weights: reloaded, they give that evaluation's numbers again."""
    from sklearn.metrics import log_loss, roc_auc_score

    cfg, out, final, records = finetuned
    with open(os.path.join(final, "train_summary.json")) as f:
        summary = json.load(f)
    best = next(r for r in records if r.get("split") == "val" and r["step"] == summary["best_step"])
    assert best["roc_auc"] == max(r["roc_auc"] for r in records if r.get("split") == "val")

    _md = open_model_dir(final)
    model, pre, tok = _md.model, _md.pre, _md.tokenizer
    assert not model.training
    with open(os.path.join(out, "preprocessing.json")) as f:
        assert pre.to_dict() == json.load(f)
    val = load_splits(cfg.data)["val"]
    ds = build_dataset(pre, tok, val.df, val.file)
    with torch.no_grad():
        probs = probabilities(model.forward_batch(collate(ds, np.arange(len(ds)), tok.pad_token_id))).numpy()
    labels = ds.enc.labels
    assert roc_auc_score(labels, probs[:, 1]) == pytest.approx(best["roc_auc"], abs=1e-6)
    assert log_loss(labels, np.clip(probs, 1e-7, 1), labels=[0, 1]) == pytest.approx(best["log_loss"], abs=1e-4)


@pytest.mark.parametrize("fusion,pooling", [("cross_attn", "pooler"), ("cross_attn_tokens", "mean"),
                                            ("gated", "cls"), ("tab_only", "cls")])
def test_artifact_round_trip_gives_the_same_probabilities(tmp_path, tiny_bert, reviews, fusion, pooling):
    df = reviews.iloc[:64].copy()
    df["Department Name"] = df["Department Name"].astype(str)
    cfg = DataConfig(text_columns=["Title", "Review Text"], numeric_columns=["Rating", "Age"],
                     categorical_columns=["Class Name"], label_column="Department Name", max_tokens=24, max_chunks=2)
    tok = load_tokenizer(tiny_bert)
    pre = Preprocessor.fit(df, cfg, tiny_bert, "f")
    assert pre.num_classes >= 3
    spec = ModelSpec(fusion=fusion, hidden_dim=24, num_heads=2, dropout=0.1, pooling=pooling, num_numeric=2,
                     cardinalities=[len(pre.vocabularies["Class Name"])], cat_embedding_dim=4,
                     num_classes=pre.num_classes, encoder=tiny_bert)
    torch.manual_seed(0)
    model = build_model(spec, tiny_bert, pretrained=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # move away from the stored init so a silent re-init would show
            p.add_(0.01 * torch.randn_like(p))
    batch = collate(build_dataset(pre, tok, df, "f"), np.arange(len(df)), tok.pad_token_id)
    with torch.no_grad():
        before = probabilities(model.forward_batch(batch))
    out = str(tmp_path / "final")
    save_artifact(out, model.state_dict(), spec, model, pre, tok)
    _md = open_model_dir(out)
    model2, pre2, tok2 = _md.model, _md.pre, _md.tokenizer
    assert pre2 == pre and model2.spec == spec
    batch2 = collate(build_dataset(pre2, tok2, df, "f"), np.arange(len(df)), tok2.pad_token_id)
    for k in batch:
        assert torch.equal(batch[k], batch2[k]), k
    with torch.no_grad():
        after = probabilities(model2.forward_batch(batch2))
    assert before.shape == (64, pre.num_classes)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.slow
def test_cli_missing_column_is_one_clear_line(tmp_path, tiny_bert, reviews):
    csv = str(tmp_path / "no_review_text.csv")
    reviews.iloc[:50].drop(columns=["Review Text"]).to_csv(csv, index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, "data/womens_clothing_reviews.parquet")
    r = run_cli(["train.py", "--config", cfg, "--data", csv, "--output-dir", str(tmp_path / "run"),
                 "--strategy", "none", "--max-steps", "2"], check=False)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "'Review Text'" in lines[0] and csv in lines[0]
    assert not os.path.exists(os.path.join(tmp_path, "run", "final"))


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_bit_identical_losses_and_weights(tiny_bert, work, tmp_path):
    """One process, 3 steps twice with the same seed (dropout on in the encoder): the same bits."""
    from safetensors.torch import load_file

    from mmbert.config import load_config
    from mmbert.training.loop import train

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", tiny_bert, str(work / "good.csv"),
                                       train={"output_dir": str(out), "max_steps": 3, "select_best": False,
                                              "eval_each_epoch": False, "seed": 5},
                                       dist={"strategy": "none"}))
        train(cfg)
        losses = [json.loads(ln)["loss"] for ln in open(out / "metrics.jsonl") if '"loss"' in ln]
        runs.append((losses, load_file(out / "final" / "model.safetensors")))
    (la, wa), (lb, wb) = runs
    assert len(la) == 3 and la == lb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
