"""AdamW with no weight decay on biases and LayerNorm weights; warmup schedules stepped per optimizer step."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr: float | None) -> list[dict]:
    """Four groups: (encoder | rest) x (decay | no decay). Norm weights and biases (and 1-D params) get no decay."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        is_encoder = "text_encoder.encoder." in name
        groups.setdefault((is_encoder, no_decay), []).append(p)
    out = []
    for (is_encoder, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr": lr if is_encoder else (head_lr or lr), "role": "encoder" if is_encoder else "head"})
    return out


def lr_by_role(optimizer, lrs: list[float]) -> dict[str, float]:
    """{"encoder": lr, "head": lr} of the groups' current lrs (`lrs`, the scheduler's last), one per role."""
    out: dict[str, float] = {}
    for g, lr in zip(optimizer.param_groups, lrs):
        out.setdefault(g.get("role", "head"), lr)
    return out


def build_optimizer(model: nn.Module, tcfg) -> torch.optim.Optimizer:
    groups = param_groups(model, tcfg.weight_decay, tcfg.lr, tcfg.head_lr)
    # fused: one kernel per parameter instead of ~12 multi-tensor passes; on CPU it is ~4x faster than
    # foreach (200 -> 50 ms per step for all-MiniLM-L6-v2 on one core), and works for DTensor (FSDP2) too.
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    kind = "fused" if device.type in ("cpu", "cuda") else "foreach"
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.999), eps=1e-8, **{kind: True})


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer, plan, step: int = 0):
    """LambdaLR positioned before optimizer step `step` (0-based), from each group's configured lr.

    The schedule is a pure function of the step and the plan (warmup, total, kind), so a resumed run
    rebuilds it instead of loading a scheduler state that would carry the old total and base lrs."""
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # LambdaLR takes its base lrs from here when starting past step 0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.warmup, plan.total, plan.schedule), last_epoch=step - 1)
