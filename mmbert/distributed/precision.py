"""One precision policy for every strategy.

`auto` is bf16 on CUDA and fp32 on CPU (bf16 matmul is far slower than fp32 on CPUs); bf16, fp16 and fp32 are
explicit. Master weights and optimizer state are always fp32:
- `none` / `ddp` compute forward and loss under `torch.autocast` (the parameters stay fp32);
- `fsdp` casts its all-gathered parameters through FSDP2's MixedPrecisionPolicy and reduces in fp32, so no
  autocast is applied on top.
fp16 scales the loss (a gradient scaler on every strategy; on several ranks the sharded one, which agrees on
an inf/nan across ranks): a step with inf/nan gradients is skipped and the scale halved. fp32 on CUDA uses TF32
matmuls unless `dist.tf32: false`.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Optional

import torch

log = logging.getLogger("mmbert")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: Optional[str], device: torch.device) -> str:
    """`auto` (or unset) -> bf16 on CUDA, fp32 elsewhere."""
    precision = requested or "auto"
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type == "cpu":
        log.warning("mixed precision %s on CPU: expect it to be much slower than fp32", precision)
    return precision


def autocast(precision: str, strategy: str, device: torch.device):
    """The context that forward and loss run in: autocast to the policy's dtype for none / ddp; nothing for fp32,
    and nothing under FSDP (its MixedPrecisionPolicy already computes in that dtype)."""
    if precision == "fp32" or strategy == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def set_tf32(device: torch.device, enabled: bool):
    """TF32 tensor-core matmuls for fp32 on CUDA (torch's default is off for matmul)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class LossScaler:
    """fp16's dynamic loss scale around backward and the optimizer step; for other precisions every method is
    the plain step (scale 1, never skips)."""

    def __init__(self, precision: str, strategy: str, device: torch.device):
        self.enabled = precision == "fp16"
        # several ranks: the scaler that all-reduces its inf/nan flag, so every rank skips or steps alike (an FSDP
        # rank sees only its shard of the gradients)
        self.across_ranks = self.enabled and strategy != "none"
        self.scaler = None
        if self.across_ranks:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device.type)
        elif self.enabled:
            self.scaler = torch.amp.GradScaler(device.type)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale_(self, optimizer):
        """Gradients back to their true size (before clipping); finds inf/nan on every rank."""
        if self.enabled:
            with warnings.catch_warnings():  # its found-inf flag is a 1-element tensor DTensor replicates
                warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
                self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """The optimizer step unless the gradients hold inf/nan; True when the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        if self.across_ranks:
            # the scaler's fused-optimizer path wants a 0-d found-inf flag, which the sharded scaler's (1-element,
            # all-reduced over ranks) is not: the plain path skips the step on the host when any rank found inf
            optimizer._step_supports_amp_scaling = False
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # a skipped step halves the scale

    @property
    def value(self) -> float:
        return self.scaler.get_scale() if self.enabled else 1.0

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.enabled else None

    def load_state_dict(self, state: Optional[dict]):
        if self.enabled and state:
            self.scaler.load_state_dict(state)
