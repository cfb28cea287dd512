"""One precision policy on every strategy, with real processes on CPU (the code paths a GPU runs): bf16
autocasts none / ddp and casts through FSDP2's policy, with fp32 master weights and optimizer state; fp16
scales the loss, skips a step whose gradients hold inf on any rank, halves the scale and resumes it."""
from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, run_cli, write_config
from mmbert.config import DistConfig
from mmbert.distributed.parallel import resolve_plan
from mmbert.errors import ConfigError

WORKER = os.path.join(ROOT, "tests", "workers", "precision_step.py")
STRATEGIES = {"none": 1, "ddp": 2, "fsdp": 2}


@pytest.fixture(scope="module")
def cfg_for(tiny_bert, no_dropout_bert, reviews, tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    reviews.iloc[:96].to_parquet(d / "d.parquet")

    def make(strategy: str, precision: str, data: dict | None = None, train: dict | None = None,
             dropout: bool = True, **dist) -> str:
        path = d / f"{strategy}_{precision}_{len(os.listdir(d))}.yaml"
        encoder = tiny_bert if dropout else no_dropout_bert
        return write_config(path, encoder, str(d / "d.parquet"), data={**(data or {})},
                            train={"batch_size": 4, "max_steps": 8, "lr": 1e-3, "progress": False, "seed": 0,
                                   **(train or {})},
                            dist={"strategy": strategy, "mixed_precision": precision, **dist})
    return make


def run_worker(cfg: str, out, nproc: int, **opts) -> dict:
    """Rank 0's report; with several ranks the others' are in report["ranks"]."""
    os.makedirs(out, exist_ok=True)
    run_cli([WORKER, cfg, str(out), json.dumps({"steps": 2, **opts})], nproc=nproc, timeout=400)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {**reports[0], "ranks": reports}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_bf16_computes_in_bf16_with_fp32_master_weights(cfg_for, tmp_path, strategy):
    nproc = STRATEGIES[strategy]
    fp32 = run_worker(cfg_for(strategy, "fp32"), tmp_path / "fp32", nproc)
    bf16 = run_worker(cfg_for(strategy, "bf16"), tmp_path / "bf16", nproc)
    assert fp32["matmul_dtypes"] == ["torch.float32"]
    assert bf16["matmul_dtypes"] == ["torch.bfloat16"]  # autocast (none / ddp) or FSDP's cast
    for r in (fp32, bf16):
        assert r["param_dtypes"] == r["optimizer_state_dtypes"] == ["torch.float32"]
        assert all(r["changed"])
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"])]
    assert 0 < max(diffs) < 0.05, (fp32["losses"], bf16["losses"])  # changed a little, not a different model
    assert f"strategy={strategy} precision=bf16" in bf16["runs"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_fp16_skips_a_step_with_inf_gradients_halves_the_scale_and_resumes_it(cfg_for, tmp_path, strategy):
    r = run_worker(cfg_for(strategy, "fp16"), tmp_path, STRATEGIES[strategy], steps=6, inf_after_first_trained=True,
                   resume_from_step=6)
    i = r["inf_step"] - 1  # the last rank's own gradients held an inf (the steps before: fp16 finding its scale)
    for rank in r["ranks"]:  # every rank skipped that step, though only one saw the inf, then trains again
        assert rank["changed"][i - 1:] == [True, False] + [True] * (5 - i), r
        assert rank["skipped"][i] == rank["skipped"][i - 1] + 1 and rank["skipped"][-1] == rank["skipped"][i]
        assert rank["scales"][i] == rank["scales"][i - 1] / 2 and rank["scales"] == r["scales"]
    assert r["param_dtypes"] == r["optimizer_state_dtypes"] == ["torch.float32"]
    assert (r["resumed_step"], r["resumed_scale"], r["resumed_skipped"]) == (6, r["scales"][-1], r["skipped"][-1])


def test_settings_that_cannot_apply_are_refused():
    cpu = __import__("torch").device("cpu")
    for key, value in (("sharding", "full"), ("collectives", "native"), ("cpu_offload", True)):
        with pytest.raises(ConfigError, match=f"'dist.{key}' needs strategy fsdp"):
            resolve_plan(DistConfig(strategy="ddp", **{key: value}), cpu, 2)
    with pytest.raises(ConfigError, match="'dist.wrap_policy' picks FSDP units"):
        resolve_plan(DistConfig(strategy="none", wrap_policy="size"), cpu, 1)
    plan = resolve_plan(DistConfig(strategy="none", wrap_policy="size", activation_checkpointing=True), cpu, 1)
    assert (plan.strategy, plan.activation_checkpointing, plan.mixed_precision) == ("none", True, "fp32")
    assert resolve_plan(DistConfig(), __import__("torch").device("cuda"), 1).mixed_precision == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_activation_checkpointing_is_exact_and_keeps_less_for_backward(cfg_for, tmp_path, strategy):
    long = {"max_tokens": 128, "max_chunks": 2}  # long batches: where the activations dominate
    plain = run_worker(cfg_for(strategy, "fp32", data=long), tmp_path / "plain", STRATEGIES[strategy])
    ac = run_worker(cfg_for(strategy, "fp32", data=long, activation_checkpointing=True), tmp_path / "ac",
                    STRATEGIES[strategy])
    assert ac["losses"] == plain["losses"]  # recomputation is exact: bit-identical losses
    assert "activation_checkpointing=True" in ac["runs"]
    assert ac["saved_bytes"] < 0.6 * plain["saved_bytes"], (ac["saved_bytes"], plain["saved_bytes"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_compiled_encoder_layers_train_like_eager(cfg_for, tmp_path, strategy):
    # without dropout: compiled kernels draw their dropout masks from another generator than eager ones
    eager = run_worker(cfg_for(strategy, "fp32", dropout=False), tmp_path / "eager", STRATEGIES[strategy], steps=3)
    compiled = run_worker(cfg_for(strategy, "fp32", train={"compile": True}, dropout=False), tmp_path / "compiled",
                          STRATEGIES[strategy], steps=3)
    assert "compile=True" in compiled["runs"]
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-4)


@pytest.mark.slow
def test_evaluate_scores_in_the_precision_asked(model_dir, work, tmp_path):
    """evaluate.py's PyTorch scoring autocasts like training (auto: fp32 on CPU, bf16 on CUDA)."""
    import pandas as pd

    from conftest import eval_cli

    probs = {}
    for precision in ("auto", "bf16"):
        r = eval_cli(model_dir, str(work / "good.csv"), tmp_path / precision, "--precision", precision)
        assert r.returncode == 0, r.stderr[-2000:]
        pred = pd.read_csv(tmp_path / precision / "predictions.tsv", sep="\t")
        probs[precision] = pred.filter(like="prob").to_numpy()
    diff = abs(probs["auto"] - probs["bf16"]).max()
    assert 0 < diff < 0.02, diff  # bf16 matmuls: a little different, the same model
    r = eval_cli(model_dir, str(work / "good.csv"), tmp_path / "x", "--onnx", str(tmp_path / "m.onnx"),
                 "--precision", "bf16")
    assert r.returncode == 2 and "--precision applies to PyTorch scoring" in r.stderr
