"""One Trainer in this process (plain python: world 1; under torchrun: every rank), a few real train steps,
and what the precision policy did, written to OUT/rank{R}.json. Used by tests/test_precision.py.

argv: config.yaml, out dir, JSON options {"steps", "inf_after_first_trained" (the last rank writes an inf into
its own gradients on the step after the first one that changed the weights),
"resume_from_step" (save at that step, build a second Trainer that resumes and report its scaler)}."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from mmbert.config import load_config
from mmbert.distributed.env import cleanup, init_distributed
from mmbert.distributed.parallel import unwrap
from mmbert.training.build import build_run
from mmbert.training.loop import Trainer


def build(cfg, env) -> Trainer:
    return Trainer(cfg, env, build_run(cfg, env))


def first_encoder_linear(model: nn.Module) -> nn.Module:
    return next(m for n, m in unwrap(model).named_modules() if "layer.0" in n and isinstance(m, nn.Linear))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class SavedBytes:
    """Bytes of the tensors autograd keeps for backward in the first step (what activation checkpointing
    trades for recomputation); tensors saved inside a checkpointed region are the checkpoint's, not counted."""

    def __init__(self):
        self.first_step, self.steps = 0, 0

    def pack(self, x: torch.Tensor):
        if self.steps == 0:
            self.first_step += x.numel() * x.element_size()
        return x

    def unpack(self, x: torch.Tensor):
        return x


def poisoned(t: Trainer, unscale):
    """unscale_ after an inf is written into this rank's own (local) gradient: after DDP's all-reduce and FSDP's
    reduce-scatter, so only this rank can see it."""
    def run(optimizer):
        grad = next(p.grad for p in t.params if p.grad is not None)
        local(grad).view(-1)[0] = float("inf")
        unscale(optimizer)
    return run


def main():
    cfg_path, out, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cfg = load_config(cfg_path, [("train.output_dir", out + "/run")])
    os.makedirs(out + "/run", exist_ok=True)
    env = init_distributed(60)
    t = build(cfg, env)
    seen: list[str] = []
    # the dtype the encoder's matmul computed in (autocast casts inside the op: its output shows it)
    first_encoder_linear(t.model).register_forward_hook(lambda m, args, out: seen.append(str(out.dtype)))
    real_unscale = t.scaler.unscale_
    saved = SavedBytes()
    report: dict = {"losses": [], "scales": [], "skipped": [], "changed": []}
    for step in range(1, opts["steps"] + 1):
        if opts.get("inf_after_first_trained") and "inf_step" not in report and any(report["changed"]):
            report["inf_step"] = step  # fp16's first steps may overflow on their own while the scale settles
        inject = step == report.get("inf_step") and env.rank == env.world_size - 1
        t.scaler.unscale_ = poisoned(t, real_unscale) if inject else real_unscale
        before = [local(p).detach().clone() for p in t.params]
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            st = t.train_step()
        loss = st.loss_sum.clone()
        dist.all_reduce(loss)
        saved.steps += 1
        report["losses"].append(float(loss / st.denom))
        report["scales"].append(t.scaler.value)
        report["skipped"].append(t.state.skipped_steps)
        report["changed"].append(any(not torch.equal(b, local(p).detach()) for b, p in zip(before, t.params)))
        if step == opts.get("resume_from_step"):
            t.save()
    report["matmul_dtypes"] = sorted(set(seen))
    report["param_dtypes"] = sorted({str(p.dtype) for p in t.model.parameters()})
    report["optimizer_state_dtypes"] = sorted({str(v.dtype) for s in t.optimizer.state.values()
                                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0})
    report["runs"] = t.plan.describe()
    report["saved_bytes"] = saved.first_step
    if opts.get("resume_from_step"):
        t.metrics.close()
        resumed = build(load_config(cfg_path, [("train.output_dir", out + "/run"), ("train.resume", "auto")]), env)
        report["resumed_step"], report["resumed_scale"] = resumed.state.step, resumed.scaler.value
        report["resumed_skipped"] = resumed.state.skipped_steps
    with open(f"{out}/rank{env.rank}.json", "w") as f:
        json.dump(report, f)
    cleanup()


if __name__ == "__main__":
    main()
