"""Ensembles (mmbert/ensemble.py) and train.py --seeds (mmbert/training/seeds.py): members trained for real,
averaged as one model through every path (Predictor, evaluate.py on 1 and 2 ranks, one ONNX graph), the
preprocessing contract, and the run state of a seeds command (resume keeps finished members; nothing stale)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, run_cli, write_config

import mmbert
from mmbert.errors import ArtifactError, ConfigError


# ----------------------------------------------------------------------------- unit: the combination

def _tiny_model(tiny_bert, seed: int, fusion: str = "cross_attn", regression: bool = False):
    from mmbert.artifact import build_model
    from mmbert.models.classifier import ModelSpec

    task = dict(task="regression", target_mean=3.5, target_std=1.25) if regression else {}
    spec = ModelSpec(fusion=fusion, hidden_dim=32, num_heads=2, dropout=0.0, pooling="cls", num_numeric=2,
                     cardinalities=[3], cat_embedding_dim=4, num_classes=1 if regression else 3, encoder=tiny_bert,
                     **task)
    torch.manual_seed(seed)
    return build_model(spec, tiny_bert, pretrained=True).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (5, 1, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "numeric": torch.randn(5, 2, generator=g),
            "missing": torch.zeros(5, 2), "categorical": torch.randint(0, 4, (5, 1), generator=g)}


def test_ensemble_probabilities_are_the_members_mean(tiny_bert):
    from mmbert.ensemble import EnsembleModel
    from mmbert.scoring import batch_scores

    # members of different fusions: each reads the inputs it needs
    members = [_tiny_model(tiny_bert, 1), _tiny_model(tiny_bert, 2), _tiny_model(tiny_bert, 3, "text_only")]
    b = _batch()
    each = [batch_scores(m, b) for m in members]
    assert np.abs(each[0] - each[1]).max() > 1e-3  # the members really differ
    got = batch_scores(EnsembleModel(members).eval(), b)
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-6)
    # one member: the model itself
    np.testing.assert_allclose(batch_scores(EnsembleModel(members[:1]).eval(), b), each[0], atol=1e-6)


def test_regression_ensemble_averages_the_predictions(tiny_bert):
    from mmbert.ensemble import EnsembleModel
    from mmbert.scoring import batch_scores

    members = [_tiny_model(tiny_bert, s, regression=True) for s in (1, 2, 3)]
    b = _batch()
    each = [batch_scores(m, b) for m in members]
    assert each[0].shape == (5, 1) and np.abs(each[0] - each[1]).max() > 1e-3
    np.testing.assert_allclose(batch_scores(EnsembleModel(members).eval(), b), np.mean(each, axis=0), atol=1e-5)


def test_export_inputs_are_the_members_union(tiny_bert):
    from mmbert.ensemble import EnsembleModel
    from mmbert.export.onnx import model_input_names

    text = _tiny_model(tiny_bert, 1, "text_only")
    assert model_input_names(text) == ["input_ids", "attention_mask"]
    both = EnsembleModel([text, _tiny_model(tiny_bert, 2)])
    assert model_input_names(both) == ["input_ids", "attention_mask", "numeric", "missing", "categorical"]


def test_ensemble_file_errors_name_the_file(tmp_path):
    from mmbert.ensemble import resolve_model_dirs, write_ensemble

    write_ensemble(str(tmp_path), [{"dir": "seed_1/final", "seed": 1}])
    with pytest.raises(ArtifactError, match=r"ensemble.json: member 0 \(seed_1/final\) is not a model directory"):
        resolve_model_dirs(str(tmp_path))
    (tmp_path / "ensemble.json").write_text('{"format": 1, "members": []}')
    with pytest.raises(ArtifactError, match="not an mmbert ensemble file"):
        resolve_model_dirs(str(tmp_path))
    (tmp_path / "ensemble.json").write_text("[1, 2")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        resolve_model_dirs(str(tmp_path))


def test_seeds_option_is_checked(tmp_path):
    from mmbert.cli import parse_train_args

    cfg, _ = parse_train_args(["--config", "womens_clothing", "--seeds", "42,43,44", "--output-dir", str(tmp_path)])
    assert cfg.train.seeds == [42, 43, 44]
    for bad, msg in ((["--seeds", "1,x"], "comma-separated integers"), (["--seeds", "1,1"], "distinct integers"),
                     (["--seeds", "1,2", "--resume", str(tmp_path)], "only 'auto' applies")):
        with pytest.raises(ConfigError, match=msg):
            parse_train_args(["--config", "womens_clothing", *bad])


# ----------------------------------------------------------------------------- trained members

@pytest.fixture(scope="module")
def ensemble(tiny_bert, reviews, tmp_path_factory):
    """train --seeds 1,2 through mmbert.train (4 steps each, one process) on 240 rows."""
    work = tmp_path_factory.mktemp("ensemble")
    reviews.iloc[:240].to_csv(work / "data.csv", index=False)
    cfg = write_config(work / "c.yaml", tiny_bert, str(work / "data.csv"))
    run = mmbert.train(cfg, output_dir=str(work / "ens"), max_steps=4, seeds=[1, 2])
    return work, cfg, run


def _rows(work):
    return pd.read_csv(work / "data.csv").iloc[180:240].drop(columns=["Recommended IND"])


@pytest.mark.slow
def test_seeds_train_one_member_each_and_write_ensemble_json(ensemble):
    work, _, run = ensemble
    out = str(work / "ens")
    assert run.model_dir == out
    with open(os.path.join(out, "ensemble.json")) as f:
        manifest = json.load(f)
    assert [m["dir"] for m in manifest["members"]] == ["seed_1/final", "seed_2/final"]
    assert [m["seed"] for m in manifest["members"]] == [1, 2]
    assert [s["steps"] for s in run.summary["members"]] == [4, 4]
    for seed in (1, 2):
        with open(os.path.join(out, f"seed_{seed}", "final", "config.yaml")) as f:
            saved = f.read()
        assert f"seed: {seed}\n" in saved and "seeds: null" in saved


@pytest.mark.slow
def test_predictor_averages_the_members(ensemble):
    work, _, _ = ensemble
    rows = _rows(work)
    out = work / "ens"
    each = [mmbert.load(str(out / f"seed_{s}" / "final")).predict_proba(rows, as_pandas=False) for s in (1, 2)]
    assert np.abs(each[0] - each[1]).max() > 1e-4  # different seeds, different members
    ens = mmbert.load(str(out))
    np.testing.assert_allclose(ens.predict_proba(rows, as_pandas=False), np.mean(each, axis=0), atol=1e-6)
    assert [m["dir"] for m in ens.metadata["ensemble"]] == [str(out / f"seed_{s}" / "final") for s in (1, 2)]
    listed = mmbert.load([str(out / "seed_1" / "final"), str(out / "seed_2")])  # a run folder means its final/
    np.testing.assert_allclose(listed.predict_proba(rows, as_pandas=False), np.mean(each, axis=0), atol=1e-6)
    rows.to_csv(work / "rows.csv", index=False)
    subprocess.run([sys.executable, "-m", "mmbert", "predict", str(out), "--data", str(work / "rows.csv"),
                    "--output", str(work / "rows_pred.tsv")], check=True, capture_output=True, cwd=ROOT)
    got = pd.read_csv(work / "rows_pred.tsv", sep="\t").filter(regex="^prob_")  # one prob_<class> per class
    np.testing.assert_allclose(got.to_numpy(), np.mean(each, axis=0), atol=2e-6)


@pytest.mark.slow
def test_evaluate_ensemble_on_one_and_two_ranks(ensemble, tmp_path):
    work, _, _ = ensemble
    out = work / "ens"
    members = [str(out / "seed_1" / "final"), str(out / "seed_2" / "final")]
    common = ["--split", "val", "--no-plots", "--no-progress"]
    each = []
    for i, m in enumerate(members):
        run_cli(["evaluate.py", "--model-dir", m, "--output-dir", str(tmp_path / f"m{i}"), *common])
        each.append(pd.read_csv(tmp_path / f"m{i}" / "predictions.tsv", sep="\t"))
    r = run_cli(["evaluate.py", "--model-dir", str(out), "--output-dir", str(tmp_path / "e2"), *common], nproc=2)
    assert "ensemble of 2" in r.stdout + r.stderr
    run_cli(["evaluate.py", "--model-dir", *members, "--output-dir", str(tmp_path / "e1"), *common])
    one = pd.read_csv(tmp_path / "e1" / "predictions.tsv", sep="\t")
    two = pd.read_csv(tmp_path / "e2" / "predictions.tsv", sep="\t")
    assert sorted(two["row"]) == sorted(each[0]["row"]) and two["row"].is_unique  # every row once
    probs = [df.filter(regex="^prob_").to_numpy() for df in (one, two, *each)]
    assert probs[0].shape == (len(one), 2)  # binary: prob_<class> for both classes
    np.testing.assert_allclose(probs[0], (probs[2] + probs[3]) / 2, atol=2e-6)
    np.testing.assert_allclose(probs[1], probs[0], atol=2e-6)
    with open(tmp_path / "e2" / "metrics.json") as f:
        assert json.load(f)["run"]["model_dir"] == members


@pytest.mark.slow
def test_export_ensemble_is_one_verified_graph(ensemble, tmp_path):
    work, _, _ = ensemble
    out = work / "ens"
    rep = mmbert.export_onnx(str(out), str(tmp_path / "onnx"))
    assert rep["files"] == ["model.onnx"] and rep["max_abs_diff"] <= 1e-4
    assert [os.path.basename(os.path.dirname(m["dir"])) for m in rep["ensemble"]["members"]] == ["seed_1", "seed_2"]
    rows = _rows(work)
    onnx = mmbert.load(str(tmp_path / "onnx"))
    assert onnx.backend == "onnxruntime"
    np.testing.assert_allclose(onnx.predict_proba(rows, as_pandas=False),
                               mmbert.load(str(out)).predict_proba(rows, as_pandas=False), atol=1e-4)


@pytest.mark.slow
def test_members_must_share_the_preprocessing_contract(ensemble, tmp_path):
    work, cfg, _ = ensemble
    other = mmbert.train(cfg, output_dir=str(tmp_path / "other"), max_steps=1, overrides={"data.max_tokens": 24})
    member = str(work / "ens" / "seed_1" / "final")
    with pytest.raises(ArtifactError, match=r"does not share the preprocessing contract .*differs in max_tokens"):
        mmbert.load([member, other.model_dir])
    r = run_cli(["evaluate.py", "--model-dir", member, other.model_dir, "--output-dir", str(tmp_path / "e"),
                 "--split", "val"], check=False)
    assert r.returncode == 2 and "differs in max_tokens" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ArtifactError, match="is named twice"):
        mmbert.load([member, str(work / "ens" / "seed_1")])


@pytest.mark.slow
def test_seeds_run_state(ensemble, tmp_path):
    """Rerunning refuses without --resume/--overwrite (the ensemble stays usable); --resume auto keeps the
    finished members untouched; a single run may not write into an ensemble folder."""
    work, cfg, _ = ensemble
    out = str(work / "ens")
    weights = os.path.join(out, "seed_1", "final", "model.safetensors")
    mtime = os.path.getmtime(weights)
    args = ["train.py", "--config", cfg, "--output-dir", out, "--max-steps", "4", "--seeds", "1,2"]
    r = run_cli(args, check=False)
    assert r.returncode == 2 and "seed_1 holds an earlier member's run" in r.stderr
    assert os.path.isfile(os.path.join(out, "ensemble.json"))
    r = run_cli([*args, "--resume", "auto"])
    assert (r.stdout + r.stderr).count("finished with this config") == 2 and os.path.getmtime(weights) == mtime
    assert os.path.isfile(os.path.join(out, "ensemble.json"))
    r = run_cli(["train.py", "--config", cfg, "--output-dir", out, "--max-steps", "1"], check=False)
    assert r.returncode == 2 and "ensemble.json" in r.stderr


@pytest.mark.slow
def test_seeds_under_torchrun_fsdp(tiny_bert, reviews, tmp_path):
    """Two members in one 2-rank FSDP process group; each member equals its own single run."""
    reviews.iloc[:160].to_csv(tmp_path / "data.csv", index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "data.csv"))
    common = ["--config", cfg, "--max-steps", "3", "--strategy", "fsdp"]
    run_cli(["train.py", *common, "--output-dir", str(tmp_path / "ens"), "--seeds", "5,6"], nproc=2)
    run_cli(["train.py", *common, "--output-dir", str(tmp_path / "solo"), "--seed", "6"], nproc=2)

    def losses(path):
        with open(path) as f:
            return [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses(tmp_path / "ens" / "seed_6" / "metrics.jsonl") == losses(tmp_path / "solo" / "metrics.jsonl")
    rows = pd.read_csv(tmp_path / "data.csv").iloc[:20]
    np.testing.assert_allclose(mmbert.load(str(tmp_path / "ens" / "seed_6")).predict_proba(rows, as_pandas=False),
                               mmbert.load(str(tmp_path / "solo")).predict_proba(rows, as_pandas=False), atol=0)
