"""Each named step of mmbert.training.loop.Trainer on a real one-process gloo group inside pytest
(env:// rendezvous on a free port, the group destroyed after every test), with the tiny BERT on real rows."""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import write_config
from safetensors.torch import load_file

from mmbert.config import load_config
from mmbert.data.dataset import batch_token_counts, collate, move_batch
from mmbert.data.samplers import epoch_order, micro_batch
from mmbert.distributed.env import cleanup, init_distributed
from mmbert.training import loop
from mmbert.training.build import build_run
from mmbert.training.checkpointing import TrainState
from mmbert.training.loop import Trainer
from mmbert.training.optim import lr_factor
from mmbert.training.preemption import Preemption

run_model = loop.run_model  # the loop's own forward call (its home module moves between refactors)

N_ROWS, N_TRAIN, N_VAL = 120, 90, 30  # fractions 0.75 / 0.25 of the first 120 shipped rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(monkeypatch):
    """A real one-process gloo group through init_distributed (the torchrun path: env:// on MASTER_PORT)."""
    assert not dist.is_initialized(), "an earlier test leaked a process group"
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    for k in ("LOCAL_WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(k, raising=False)
    # init_distributed reconfigures the "mmbert" loggers and torch's thread count: put them back afterwards
    saved_loggers = [(lg, lg.handlers[:], lg.level, lg.propagate)
                     for lg in (logging.getLogger("mmbert"), logging.getLogger("mmbert.main"))]
    threads = torch.get_num_threads()
    try:
        e = init_distributed(timeout_s=60)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        assert (e.rank, e.world_size, e.is_main, e.launcher, e.device.type) == (0, 1, True, "torchrun", "cpu")
        yield e
    finally:
        cleanup()
        torch.set_num_threads(threads)
        for lg, handlers, level, propagate in saved_loggers:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def data(tmp_path_factory, reviews) -> str:
    path = tmp_path_factory.mktemp("trainer") / "d.csv"
    reviews.iloc[:N_ROWS].to_csv(path, index=False)
    return str(path)


@pytest.fixture
def make(tmp_path, tiny_bert, data, env):
    """make(out=..., data_section=..., model_section=..., **train) -> a Trainer over build_run's parts (resumed
    when train.resume says so)."""
    made: list[Trainer] = []

    def build(out=None, data_section: dict | None = None, model_section: dict | None = None, **train) -> Trainer:
        out = str(out or tmp_path / "run")
        os.makedirs(out, exist_ok=True)
        train = {"output_dir": out, "batch_size": 8, "lr": 1e-3, "head_lr": 5e-3, "warmup_ratio": 0.0,
                 "max_steps": 6, "seed": 0, "progress": False, "metric": "roc_auc", **train}
        cfg = load_config(write_config(os.path.join(out, "..", f"{os.path.basename(out)}.yaml"), tiny_bert, data,
                                       data=data_section or {}, model=model_section or {}, train=train,
                                       dist={"strategy": "none"}))
        t = Trainer(cfg, env, build_run(cfg, env))
        made.append(t)
        return t

    yield build
    for t in made:
        t.metrics.close()


def records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]


# ----------------------------------------------------------------------------- train_step / log_step

@pytest.mark.parametrize("class_weights", [None, [2.0, 0.5]], ids=["unweighted", "class_weights"])
def test_train_step_advances_state_updates_weights_and_reports_the_batch_loss(make, class_weights):
    t = make(batch_size=4, grad_accum=2, warmup_steps=2, class_weights=class_weights,
             model_section={"freeze_word_embeddings": True})
    assert (t.global_batch, t.n_train, t.steps_per_epoch, t.total_steps) == (8, N_TRAIN, N_TRAIN // 8, 6)
    frozen = {n for n, p in t.model.named_parameters() if not p.requires_grad}
    assert frozen == {"text_encoder.encoder.embeddings.word_embeddings.weight"}
    groups = t.optimizer.param_groups
    base = [g["initial_lr"] for g in groups]
    assert sorted(set(base)) == [1e-3, 5e-3]  # encoder groups at lr, the rest at head_lr
    lr0 = [b * lr_factor(0, 2, 6, "linear") for b in base]  # warmup 2 steps: half the base lr at step 0
    assert [g["lr"] for g in groups] == pytest.approx(lr0)
    ref = copy.deepcopy(t.model)  # the pre-step weights
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    order = t.current_order().copy()
    micro = [micro_batch(order, 0, m, 0, 1, 4) for m in range(2)]
    assert np.array_equal(np.concatenate(micro), order[:8])

    rng = torch.get_rng_state()  # the encoder's dropout is on: replay the same masks for the reference
    st = t.train_step()
    assert (t.state.step, t.state.position, t.state.epoch) == (1, 8, 0)

    torch.set_rng_state(rng)
    batches = [collate(t.train_ds, rows, t.pad_id) for rows in micro]
    with torch.no_grad():  # micro-batch by micro-batch, as the step ran them (same dropout masks)
        logits = torch.cat([run_model(ref, move_batch(b, t.env.device)).float() for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    w = torch.tensor(class_weights) if class_weights else None
    expected = float(F.cross_entropy(logits, labels, weight=w))  # (weighted) mean over the global batch of 8
    loss = float(st.loss_sum / st.denom)
    assert math.isfinite(loss) and loss == pytest.approx(expected, rel=1e-5)
    assert float(st.denom) == pytest.approx(8.0 if w is None else float(w[labels].sum()))
    assert (st.real_tokens, st.padded_tokens) == tuple(map(sum, zip(*(batch_token_counts(b) for b in batches))))
    assert 0 < st.real_tokens <= st.padded_tokens and math.isfinite(float(st.grad_norm)) and float(st.grad_norm) > 0

    after = dict(t.model.named_parameters())
    unchanged = [n for n, p in after.items() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged
    assert all(torch.equal(after[n].detach(), before[n]) for n in frozen)
    # AdamW's first update of a no-decay parameter is lr * g / (|g| + eps): its largest move is the lr the step
    # ran at (the scheduler's value before its step), not the next one
    name_of = {id(p): n for n, p in t.model.named_parameters()}
    for g, lr in zip(groups, lr0):
        if g["weight_decay"] == 0:
            moved = max(float((after[name_of[id(p)]].detach() - before[name_of[id(p)]]).abs().max())
                        for p in g["params"])
            assert moved == pytest.approx(lr, rel=1e-3)
    assert t.scheduler.get_last_lr() == pytest.approx([b * lr_factor(1, 2, 6, "linear") for b in base])
    assert [g["lr"] for g in groups] == t.scheduler.get_last_lr()

    t.log_step(st)  # the metrics record of that step
    (rec,) = records(t.out)
    assert (rec["step"], rec["epoch"]) == (1, 0)
    assert rec["loss"] == pytest.approx(loss, rel=1e-6) and rec["lr"] == pytest.approx(t.scheduler.get_last_lr()[0])


def test_steps_between_log_steps_read_nothing_back_from_the_device(make, monkeypatch):
    """A host read of a device value (.item(), float(), bool(): aten._local_scalar_dense) or one of our collectives
    makes a GPU drain its queue. Between log steps the loop does neither on device values: the loss and the
    gradient norm are read on log steps only. The reads left are of host tensors: the collated batch's token
    count (before its copy to the device), the step loader's seed and the preemption flag."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    t = make(max_steps=6, log_every=3, eval_each_epoch=False, select_best=False)
    events: list[tuple[str, set[str]]] = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                stack = traceback.extract_stack()
                loader = any(f"torch{os.sep}utils{os.sep}data{os.sep}" in f.filename for f in stack)
                events.append(("read", {f.name for f in stack} | ({"DataLoader"} if loader else set())))
            return func(*args, **(kwargs or {}))

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: (
            events.append((_name, {f.name for f in traceback.extract_stack()})), _real(*a, **k))[1])
    with Preemption() as preempt, HostReads():
        assert t.loop(preempt)
    per_step = ("log_step", "evaluate", "save", "finalize", "all_reduce_max")  # log / eval / checkpoint steps
    outside = [(kind, stack) for kind, stack in events if not stack & set(per_step)]
    assert outside, "nothing recorded: the hooks missed the loop"
    # CPU tensors only: the collated batch, the loader's seed, the preemption flag (a gloo exchange started at
    # one step boundary and read at the next, so no rank waits for the others)
    host = {"batch_token_counts", "DataLoader", "agreed"}
    assert all(stack & host for kind, stack in outside), [
        (kind, sorted(stack)) for kind, stack in outside if not stack & host]
    flags = [kind for kind, stack in events if "agreed" in stack]
    assert flags.count("all_reduce") == 6 and flags.count("read") == 5  # each exchange read one step later


# ----------------------------------------------------------------------------- epoch_order

def test_epoch_order_is_a_seeded_permutation_that_advances_the_epoch(make, tmp_path):
    t = make()
    order = t.current_order().copy()
    assert len(t.train_ds) == N_TRAIN and sorted(order.tolist()) == list(range(N_TRAIN))
    assert np.array_equal(order, epoch_order(N_TRAIN, 0, 0, t.train_ds.lengths, t.tc.bucket_block))
    t.orders.clear()  # recomputed: same epoch and seed, same order
    assert np.array_equal(t.current_order(), order)
    other = make(out=tmp_path / "other")  # a second trainer with the same seed
    assert np.array_equal(other.current_order(), order)
    assert not np.array_equal(epoch_order(N_TRAIN, 0, 1, t.train_ds.lengths, t.tc.bucket_block), order)

    t.state.position = N_TRAIN // 8 * 8 - 8  # the last full global batch of the epoch still fits
    assert np.array_equal(t.current_order(), order) and (t.state.epoch, t.state.position) == (0, 80)
    t.train_step()
    assert (t.state.step, t.state.epoch, t.state.position) == (1, 0, 88)
    nxt = t.current_order().copy()  # 88 + 8 > 90: the 2 leftover rows are skipped, epoch 1 starts
    assert (t.state.epoch, t.state.position) == (1, 0)
    assert sorted(nxt.tolist()) == list(range(N_TRAIN)) and not np.array_equal(nxt, order)
    assert np.array_equal(nxt, epoch_order(N_TRAIN, 1, 0, t.train_ds.lengths, t.tc.bucket_block))
    t.train_step()
    assert (t.state.step, t.state.epoch, t.state.position) == (2, 1, 8)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_are_the_global_orders_steps_with_or_without_loader_workers(make, workers):
    """The step loader (DataLoader workers collating ahead) gives exactly the micro-batches the state's step
    takes from the global order, across an epoch end; moved state (a resume) restarts it at the new step; and
    starting a loader leaves the global RNG (the dropout masks) untouched."""
    t = make(batch_size=4, grad_accum=2, num_workers=workers)
    t.state.position = 64

    def expected():
        order = t.current_order()
        return [collate(t.train_ds, micro_batch(order, t.state.position, m, 0, 1, 4), t.pad_id) for m in range(2)]

    def same(a, b):
        return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    rng = torch.get_rng_state()
    seen = []
    for moved in (None, None, None, None, None, 40, None):  # 88 + 8 > 90: epoch 1 starts; then moved to 40
        if moved is not None:
            t.state.position = moved
        host = t.train_batches()
        seen.append((t.state.epoch, t.state.position))
        assert same(host, expected()), seen[-1]
        t.state.position += t.global_batch
    assert seen == [(0, 64), (0, 72), (0, 80), (1, 0), (1, 8), (1, 40), (1, 48)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(t.batches).__name__ == ("_MultiProcessingDataLoaderIter" if workers else "_SingleProcessDataLoaderIter")
    t.batches = None  # its workers stop now, as at the end of Trainer.run


# ----------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("metric", ["log_loss", "val_loss"])
def test_a_lower_is_better_metric_keeps_the_lowest_evaluation(make, monkeypatch, metric):
    """train.metric log_loss without metric_mode: best/ is the evaluation with the lowest log loss (it was the
    highest: classification defaulted to max)."""
    t = make(metric=metric, select_best=True, early_stopping_patience=2)
    assert t.cfg.train.metric_mode == "min"
    real = loop.task_metrics
    for step, value in enumerate([0.5, 0.7, 0.3, 0.4], 1):
        monkeypatch.setattr(loop, "task_metrics", lambda labels, p, pre, v=value: {**real(labels, p, pre),
                                                                                   "log_loss": v})
        t.state.step = step
        t.evaluate()
        assert t.state.best_metric == min([0.5, 0.7, 0.3, 0.4][:step])
    assert (t.state.best_step, t.state.evals_since_best, t.stop_reason) == (3, 1, None)



def test_evaluate_logs_val_metrics_keeps_best_and_counts_non_improving(make, monkeypatch):
    from sklearn.metrics import roc_auc_score

    t = make(early_stopping_patience=2, select_best=True)
    t.train_step()
    t.evaluate()
    assert t.model.training  # back in train mode (dropout on) for the next step
    (rec,) = [r for r in records(t.out) if r.get("split") == "val"]
    assert (rec["step"], rec["epoch"], rec["n"]) == (1, 0, N_VAL) and "classes" not in rec
    model = t.model.eval()
    with torch.no_grad():
        probs = torch.softmax(run_model(model, collate(t.val_ds, np.arange(N_VAL), t.pad_id)), -1)[:, 1].numpy()
    model.train()
    assert len(set(t.val_ds.enc.labels.tolist())) == 2
    assert rec["roc_auc"] == pytest.approx(roc_auc_score(t.val_ds.enc.labels, probs), abs=1e-6)
    assert all(k in rec for k in ("accuracy", "log_loss", "f1", "pr_auc"))
    s = t.state
    assert (s.best_metric, s.best_step, s.evals_since_best, s.last_eval_step) == (rec["roc_auc"], 1, 0, 1)
    best_file = os.path.join(t.best_dir, "model.safetensors")
    assert_same_weights(load_file(best_file), weights(t.model))
    best_bytes = open(best_file, "rb").read()

    t.state.step = 2  # the same weights again: equal is not better
    t.evaluate()
    assert (s.best_metric, s.best_step, s.evals_since_best, s.last_eval_step) == (rec["roc_auc"], 1, 1, 2)
    assert t.stop_reason is None

    real = loop.task_metrics

    def undefined(labels, p, pre):
        return {**real(labels, p, pre), "roc_auc": None}

    monkeypatch.setattr(loop, "task_metrics", undefined)
    t.state.step = 3  # undefined: neither best nor a count towards early stopping
    t.evaluate()
    assert (s.best_metric, s.best_step, s.evals_since_best, s.last_eval_step) == (rec["roc_auc"], 1, 1, 3)
    assert records(t.out)[-1]["roc_auc"] is None
    monkeypatch.setattr(loop, "task_metrics", real)

    t.state.step = 4  # second non-improving evaluation: patience 2 reached
    t.evaluate()
    assert s.evals_since_best == 2 and t.stop_reason and "early stopping" in t.stop_reason
    assert open(best_file, "rb").read() == best_bytes  # best/ untouched since step 1
    assert [r["step"] for r in records(t.out) if r.get("split") == "val"] == [1, 2, 3, 4]

    def better(labels, p, pre):
        return {**real(labels, p, pre), "roc_auc": rec["roc_auc"] + 0.01}

    monkeypatch.setattr(loop, "task_metrics", better)
    t.train_step()  # step 5, new weights
    t.evaluate()
    assert (s.best_metric, s.best_step, s.evals_since_best) == (pytest.approx(rec["roc_auc"] + 0.01), 5, 0)
    assert_same_weights(load_file(best_file), weights(t.model))


def test_evaluate_one_class_val_split_never_becomes_best(make, tmp_path, reviews):
    ones = [i for i in range(N_TRAIN, N_ROWS) if reviews.loc[i, "Recommended IND"] == 1]
    (tmp_path / "train.txt").write_text("\n".join(map(str, range(N_TRAIN))))
    (tmp_path / "val.txt").write_text("\n".join(map(str, ones)))
    t = make(data_section={"split": {"train_indices": str(tmp_path / "train.txt"),
                                     "val_indices": str(tmp_path / "val.txt")}})
    assert len(t.val_ds) == len(ones) and set(t.val_ds.enc.labels.tolist()) == {1}
    for step in (0, 1):
        t.state.step = step
        t.evaluate()
    assert (t.state.best_metric, t.state.best_step, t.state.evals_since_best, t.state.last_eval_step) == (None, None,
                                                                                                         0, 1)
    assert not os.path.exists(t.best_dir)
    assert [(r["step"], r["roc_auc"]) for r in records(t.out)] == [(0, None), (1, None)]


# ----------------------------------------------------------------------------- save -> restore

def test_save_then_restore_in_a_fresh_trainer_restores_everything(make, tmp_path):
    out = tmp_path / "run"
    t = make(out=out)
    t.train_step()
    t.train_step()
    t.evaluate()  # best/ at step 2
    t.train_step()
    t.save()
    ckpt_dir = out / "checkpoints" / "step_3"
    assert os.path.isfile(ckpt_dir / "COMPLETE") and os.path.isfile(ckpt_dir / "best" / "model.safetensors")
    saved = t.state.to_dict()
    assert (saved["step"], saved["position"], saved["best_step"], saved["last_eval_step"]) == (3, 24, 2, 2)
    w3 = weights(t.model)
    opt3 = copy.deepcopy(t.optimizer.state_dict())
    lr3 = t.scheduler.get_last_lr()
    rng3 = torch.get_rng_state()
    best3 = open(out / "best" / "model.safetensors", "rb").read()

    st4 = t.train_step()  # what the run did after the checkpoint: a resume repeats it
    t.log_step(st4)
    t.save_model(t.best_dir)  # best/ written after the checkpoint
    assert open(out / "best" / "model.safetensors", "rb").read() != best3
    w4 = weights(t.model)

    fresh = make(out=out, resume="auto")
    assert fresh.state.to_dict() == saved
    assert_same_weights(weights(fresh.model), w3)
    opt = fresh.optimizer.state_dict()
    assert opt["state"].keys() == opt3["state"].keys() and len(opt["state"]) == len(list(fresh.model.parameters()))
    for i, s in opt3["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt["state"][i][k], s[k]), (i, k)
    assert fresh.scheduler.get_last_lr() == lr3 and [g["lr"] for g in fresh.optimizer.param_groups] == lr3
    assert torch.equal(torch.get_rng_state(), rng3)
    assert open(out / "best" / "model.safetensors", "rb").read() == best3
    assert [r["step"] for r in records(out)] == [2]  # the step-4 record is cut; the step-2 eval stays

    st = fresh.train_step()  # the resumed step 4 is the same step 4
    assert float(st.loss_sum / st.denom) == pytest.approx(float(st4.loss_sum / st4.denom), rel=1e-6)
    assert (fresh.state.step, fresh.state.position) == (4, 32)
    for k, v in weights(fresh.model).items():
        torch.testing.assert_close(v, w4[k], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- finalize

@pytest.mark.parametrize("select_best,eval_at", [(True, 1), (False, 1), (True, None)],
                         ids=["best", "select_best_off", "never_evaluated"])
def test_finalize_writes_best_or_last_weights_and_the_summary(make, select_best, eval_at):
    t = make(select_best=select_best)
    for step in (1, 2):
        t.train_step()
        if step == eval_at:
            t.evaluate()
    last = weights(t.model)
    final = t.finalize()
    assert final == os.path.join(t.out, "final")
    got = load_file(os.path.join(final, "model.safetensors"))
    if select_best and eval_at:
        assert open(os.path.join(final, "model.safetensors"), "rb").read() == \
            open(os.path.join(t.best_dir, "model.safetensors"), "rb").read()
        assert any(not torch.equal(got[k], last[k]) for k in got)  # step 1's weights, not step 2's
    else:
        assert_same_weights(got, last)
        assert os.path.exists(t.best_dir) == (select_best and eval_at is not None)
    for name in ("model_spec.json", "preprocessing.json", "config.yaml", "tokenizer", "encoder/config.json"):
        assert os.path.exists(os.path.join(final, name)), name
    with open(os.path.join(final, "train_summary.json")) as f:
        summary = json.load(f)
    assert (summary["steps"], summary["epochs"], summary["best_step"], summary["world_size"],
            summary["strategy"]) == (2, 1, eval_at, 1, "none")  # epochs: a count (the one epoch begun)
    assert summary["epoch_progress"] == pytest.approx(16 / 88, abs=1e-4) and summary["stop_reason"] == "completed"
    assert summary["best_metric"] == t.state.best_metric and (summary["best_metric"] is None) == (eval_at is None)
    assert not os.path.exists(final + ".tmp")
    card = open(os.path.join(final, "README.md")).read()  # the model card: what it reads, predicts, scored
    for text in ("`Recommended IND`", "text: `Title`, `Review Text`", "numeric: `Rating`, `Age`",
                 "categorical: `Division Name`", f"fusion: `{t.spec.fusion}`", 'mmbert.load("PATH")',
                 "model.predict(df)"):
        assert text in card, text
    assert ("| roc_auc |" in card and "(step 1, the selected evaluation)" in card) == (eval_at == 1 and select_best)
    from mmbert.artifact import validate_model_dir

    validate_model_dir(final)  # the card is no part of the digest: the folder opens


# ----------------------------------------------------------------------------- TrainState

def test_train_state_round_trip_ignores_unknown_keys():
    s = TrainState(step=7, epoch=2, position=40, best_metric=0.81, best_step=5, evals_since_best=1, last_eval_step=6)
    d = s.to_dict()
    assert d == {"step": 7, "epoch": 2, "position": 40, "best_metric": 0.81, "best_step": 5, "evals_since_best": 1,
                 "last_eval_step": 6, "skipped_steps": 0}
    assert TrainState.from_dict(d) == s
    assert TrainState.from_dict(json.loads(json.dumps(d))) == s
    extra = {**d, "lr_plan": {"warmup": 0}, "config": {}, "snapshots": ["best"], "world_size": 2, "rng_restored": True}
    assert TrainState.from_dict(extra) == s
    assert TrainState.from_dict({"step": 3, "unknown": 1}) == TrainState(step=3)  # missing keys: the defaults
    assert TrainState.from_dict({}).to_dict() == TrainState().to_dict()


def test_preemption_handlers_are_the_callers_again_after_the_loop():
    """SIGTERM / SIGUSR1 set the flag during the loop only: after mmbert.train() in a notebook or a service,
    the process's own handlers are back (SIGTERM ends it again)."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    with Preemption() as p:
        assert all(signal.getsignal(sig) == p._handler for sig in Preemption.SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested and p.signal_name == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS} == before



# ----------------------------------------------------------------------------- forward_backward / optimizer_step

def test_train_step_is_forward_backward_then_optimizer_step(make, tmp_path):
    """forward_backward leaves gradients and no update; optimizer_step applies them, advances the lr schedule
    and clears them; together they are train_step (the same loss and weights as a twin trainer's train_step)."""
    t, twin = make(batch_size=4, grad_accum=2), make(out=tmp_path / "twin", batch_size=4, grad_accum=2)
    assert_same_weights(weights(t.model), weights(twin.model))
    before, lr0 = weights(t.model), t.scheduler.get_last_lr()
    rng = torch.get_rng_state()
    host = t.train_batches()
    loss_sum, denom = t.forward_backward(host)
    assert all(p.grad is not None for p in t.params) and float(denom) == 8.0
    assert_same_weights(weights(t.model), before)
    assert t.scheduler.get_last_lr() == lr0 and t.state.step == 0
    grad_norm = t.optimizer_step()
    assert float(grad_norm) > 0 and all(p.grad is None for p in t.params)
    assert any(not torch.equal(v, before[k]) for k, v in weights(t.model).items())
    assert t.scheduler.get_last_lr() != lr0
    torch.set_rng_state(rng)  # the same dropout masks
    st = twin.train_step()
    assert float(st.loss_sum / st.denom) == pytest.approx(float(loss_sum / denom), rel=1e-6)
    for k, v in weights(twin.model).items():
        torch.testing.assert_close(v, weights(t.model)[k], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- run visibility

def test_without_a_terminal_rank0_prints_a_progress_line_every_log_step(make, capsys):
    t = make(max_steps=4, log_every=2, progress=True, eval_each_epoch=False, select_best=False)
    assert t.run() == os.path.join(t.out, "final")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    pattern = (r"step (\d+)/4 \| epoch 1/1 \| loss \d+\.\d{4} \| lr enc \d\.\de[-+]\d\d head \d\.\de[-+]\d\d \| "
               r"\d+\.\d samples/s \| ETA \d+s")
    assert len(lines) == 2 and all(re.fullmatch(pattern, ln) for ln in lines), lines
    assert [re.match(r"step (\d+)", ln).group(1) for ln in lines] == ["2", "4"]
    train = [r for r in records(t.out) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:  # both groups' learning rates; `lr` stays the first group's (the head's)
        assert r["lr_encoder"] == pytest.approx(1e-3 * (1 - r["step"] / 4))
        assert r["lr_head"] == pytest.approx(5e-3 * (1 - r["step"] / 4)) and r["lr"] == r["lr_head"]


def test_progress_false_prints_no_progress_lines(make, capsys):
    t = make(max_steps=2, log_every=1, progress=False, eval_each_epoch=False, select_best=False)
    t.run()
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]


def test_progress_line_and_durations():
    from mmbert.training.progress import format_duration, progress_line

    assert [format_duration(s) for s in (0, 42, 312, 3780, 86400)] == ["0s", "42s", "5m12s", "1h03m", "24h00m"]
    assert progress_line(40, 600, 1, 1, 0.41234, {"encoder": 4.1e-5, "head": 8.2e-4}, 18.31, 312) == (
        "step 40/600 | epoch 1/1 | loss 0.4123 | lr enc 4.1e-05 head 8.2e-04 | 18.3 samples/s | ETA 5m12s")


# ----------------------------------------------------------------------------- train.max_time

def test_the_stop_flag_is_agreed_one_boundary_later_and_a_signal_outranks_the_time_limit(env):
    with Preemption() as p:
        p.request_stop()
        assert p.agreed() is None and p.agreed() == "max_time"
        p._handler(15, None)
        assert p.agreed() == "max_time" and p.agreed() == "signal"


def test_time_limit_keeps_room_for_the_agreed_step_and_the_checkpoint(monkeypatch):
    from mmbert.training import preemption

    clock = [1000.0]
    monkeypatch.setattr(preemption.time, "time", lambda: clock[0])
    limit = preemption.TimeLimit(100.0, started=1000.0)
    limit.begin(step=0)
    clock[0] = 1070.0  # steps of 10 s: at 70 s, 70 + 2 x 10 stays below the limit, at 80 s it reaches it
    assert not limit.near(7)
    clock[0] = 1080.0
    assert limit.near(8)
    limit.saved(30.0)  # a checkpoint took 30 s: stop earlier
    clock[0] = 1050.0
    assert limit.near(5) and not preemption.TimeLimit(None, 1000.0).near(5)


def test_max_time_stops_with_a_checkpoint_and_resume_auto_finishes(make, tmp_path, caplog):
    out = tmp_path / "run"
    t = make(out=out, max_steps=100_000, max_time="1s", eval_each_epoch=False, select_best=False)
    logging.getLogger("mmbert").addHandler(caplog.handler)  # the run's logger does not propagate
    try:
        assert t.run() is None
    finally:
        logging.getLogger("mmbert").removeHandler(caplog.handler)
    stop = t.state.step
    assert 0 < stop < 100_000 and not os.path.exists(out / "final")
    assert os.path.isfile(out / "checkpoints" / f"step_{stop}" / "COMPLETE")
    assert any(f"stopped at step {stop}" in m and "train.max_time (1s)" in m and "--resume auto" in m
               for m in caplog.messages), caplog.messages
    resumed = make(out=out, resume="auto", max_steps=stop + 2, eval_each_epoch=False, select_best=False)
    assert resumed.state.step == stop
    assert resumed.run() == str(out / "final")
    with open(out / "final" / "train_summary.json") as f:
        assert json.load(f)["steps"] == stop + 2
