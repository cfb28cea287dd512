"""Parallelism: FSDP2 (`fully_shard`) with auto-wrap policies, DDP, or none; settings resolved from the
config first, then accelerate's FSDP_* / ACCELERATE_MIXED_PRECISION env vars, then defaults."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .env import DistEnv
from .p2p_comm import use_p2p_collectives
from .precision import DTYPES, resolve_precision, set_tf32

log = logging.getLogger("mmbert")

_ACC_WRAP = {"TRANSFORMER_BASED_WRAP": "class", "SIZE_BASED_WRAP": "size", "NO_WRAP": "none"}
_ACC_SHARD = {"FULL_SHARD": "full", "1": "full", "SHARD_GRAD_OP": "shard_grad_op", "2": "shard_grad_op",
              "HYBRID_SHARD": "hybrid", "4": "hybrid", "_HYBRID_SHARD_ZERO2": "hybrid", "5": "hybrid"}
_ACC_PRECISION = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
DEFAULT_MIN_PARAMS = 1_000_000
AUTO_UNSHARDED_FRACTION = 0.10  # dist.sharding auto: the most of a rank's memory that unsharded parameters may take


@dataclass
class ParallelPlan:
    strategy: str
    wrap_policy: str
    wrap_classes: Optional[list[str]]
    min_params: int
    sharding: str
    mixed_precision: str  # fp32 | bf16 | fp16
    activation_checkpointing: bool
    cpu_offload: bool
    collectives: str = "p2p"  # gloo FSDP all-gather / reduce-scatter: p2p (mmbert.distributed.p2p_comm) | native
    compile: bool = False  # torch.compile of every wrap unit of the encoder (train.compile)
    tf32: bool = True  # fp32 matmuls on CUDA in TF32

    def as_config(self) -> dict:
        """The dist.* keys that reproduce this plan (those the strategy uses; the rest stay unset)."""
        fsdp = self.strategy == "fsdp"
        units = fsdp or self.activation_checkpointing or self.compile
        keys = {"strategy": self.strategy, "mixed_precision": self.mixed_precision, "tf32": self.tf32,
                "activation_checkpointing": self.activation_checkpointing}
        if units:
            keys.update(wrap_policy=self.wrap_policy, wrap_classes=self.wrap_classes, min_params=self.min_params)
        if fsdp:
            keys.update(sharding=self.sharding, cpu_offload=self.cpu_offload, collectives=self.collectives)
        return keys

    def describe(self) -> str:
        """What every rank runs, for the start-up line."""
        return (f"strategy={self.strategy} precision={self.mixed_precision} activation_checkpointing="
                f"{self.activation_checkpointing} compile={self.compile}")

    @property
    def param_dtype(self) -> torch.dtype:
        return DTYPES[self.mixed_precision]


def _env_bool(name: str) -> Optional[bool]:
    v = os.environ.get(name)
    return None if v is None else v.strip().lower() in ("1", "true", "yes")


def auto_reason(world_size: int) -> str:
    """Why dist.strategy auto chose what it did, for the start-up line (an exported ACCELERATE_* variable outside
    `accelerate launch` shows here)."""
    if world_size == 1:
        return "one process"
    if "ACCELERATE_MIXED_PRECISION" in os.environ or _env_bool("ACCELERATE_USE_FSDP"):
        return "accelerate launch's config"
    return f"{world_size} processes"


def resolve_strategy(requested: Optional[str], world_size: int) -> str:
    """dist.strategy for this launch. auto: what `accelerate launch` names (its FSDP config, or DDP for its
    multi-process MULTI_GPU / MULTI_CPU types), else fsdp for several processes and none for one. Several
    processes always train one model: `none` there would train a replica per rank and keep rank 0's."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("accelerate launch with a DeepSpeed config: mmbert trains with FSDP or DDP; use "
                          "launch/accelerate_fsdp.yaml or launch/accelerate_ddp.yaml")
    if requested in (None, "auto"):
        if world_size == 1:
            return "none"
        if _env_bool("ACCELERATE_USE_FSDP"):
            return "fsdp"
        return "ddp" if "ACCELERATE_MIXED_PRECISION" in os.environ else "fsdp"
    if requested == "none" and world_size > 1:
        raise ConfigError(f"config key 'dist.strategy': 'none' on {world_size} processes would train {world_size} "
                          f"separate models; use auto, fsdp or ddp, or launch one process")
    return requested


def check_applies(dcfg, strategy: str, activation_checkpointing: bool):
    """A dist.* key the config sets that this strategy cannot use is refused, never silently ignored."""
    only_fsdp = {"sharding": dcfg.sharding, "collectives": dcfg.collectives, "cpu_offload": dcfg.cpu_offload}
    units = {"wrap_policy": dcfg.wrap_policy, "wrap_classes": dcfg.wrap_classes, "min_params": dcfg.min_params}
    if strategy == "fsdp":
        return
    for key, value in only_fsdp.items():
        if value not in (None, False):
            raise ConfigError(f"config key 'dist.{key}' needs strategy fsdp (this run: {strategy})")
    for key, value in units.items():
        if value is not None and not activation_checkpointing:
            raise ConfigError(f"config key 'dist.{key}' picks FSDP units (or activation checkpointing units), "
                              f"but this run is {strategy} without activation checkpointing")


def resolve_plan(dcfg, device: torch.device, world_size: int = 1, compile: bool = False) -> ParallelPlan:
    env = os.environ
    strategy = resolve_strategy(dcfg.strategy, world_size)
    wrap = dcfg.wrap_policy or _ACC_WRAP.get(env.get("FSDP_AUTO_WRAP_POLICY", "").upper(), "class")
    classes = dcfg.wrap_classes
    if classes is None and env.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        classes = [c.strip() for c in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",") if c.strip()]
    min_params = dcfg.min_params
    if min_params is None:
        try:
            min_params = int(env.get("FSDP_MIN_NUM_PARAMS", "0")) or DEFAULT_MIN_PARAMS
        except ValueError:
            min_params = DEFAULT_MIN_PARAMS
    sharding = dcfg.sharding or _ACC_SHARD.get(env.get("FSDP_SHARDING_STRATEGY", "").upper())
    if sharding is None:
        reshard = _env_bool("FSDP_RESHARD_AFTER_FORWARD")
        sharding = "auto" if reshard is None else ("full" if reshard else "shard_grad_op")
    precision = resolve_precision(dcfg.mixed_precision or _ACC_PRECISION.get(
        env.get("ACCELERATE_MIXED_PRECISION", "").lower()), device)
    ac = dcfg.activation_checkpointing
    if ac is None:
        ac = bool(_env_bool("FSDP_ACTIVATION_CHECKPOINTING"))
    offload = dcfg.cpu_offload
    if offload is None:
        offload = strategy == "fsdp" and bool(_env_bool("FSDP_OFFLOAD_PARAMS"))
    check_applies(dcfg, strategy, ac)
    return ParallelPlan(strategy, wrap, classes, min_params, sharding, precision, ac, offload,
                        dcfg.collectives or "p2p", compile, dcfg.tf32)


# ----------------------------------------------------------------------------- wrap policies

def default_wrap_classes(model: nn.Module) -> list[str]:
    """The encoder's `_no_split_modules` (BertEmbeddings, BertLayer for BERT)."""
    te = getattr(model, "text_encoder", None)
    names = list(getattr(te.encoder, "_no_split_modules", None) or []) if te is not None else []
    return names


def units_by_class(model: nn.Module, class_names: list[str]) -> list[str]:
    wanted = set(class_names)
    return [name for name, m in model.named_modules() if name and type(m).__name__ in wanted]


def units_by_size(model: nn.Module, min_params: int) -> list[str]:
    """Bottom-up: a module becomes a unit when the parameters it holds outside already-chosen units
    reach `min_params` (like torch's size_based_auto_wrap_policy)."""
    chosen: list[str] = []

    def visit(name: str, module: nn.Module) -> int:
        count = sum(p.numel() for p in module.parameters(recurse=False))
        for child_name, child in module.named_children():
            count += visit(f"{name}.{child_name}" if name else child_name, child)
        if name and count >= min_params:
            chosen.append(name)
            return 0
        return count

    visit("", model)
    return chosen


def plan_units(model: nn.Module, policy: str, classes: Optional[list[str]], min_params: int) -> list[str]:
    """Names of the submodules that get their own FSDP unit, children before parents. The fusion block
    and head always form one unit; the root (not listed) is always wrapped last."""
    if policy == "none":
        units: list[str] = []
    else:
        units = []
        if "class" in policy:
            names = classes or default_wrap_classes(model)
            found = units_by_class(model, names)
            if names and not found:
                present = sorted({type(m).__name__ for m in model.modules()})
                raise ConfigError(f"dist.wrap_classes {names} match no module of the model (classes: {', '.join(present[:30])})")
            units += found
        if "size" in policy:
            units += [u for u in units_by_size(model, min_params) if u not in units]
    if hasattr(model, "fusion_head") and "fusion_head" not in units:
        units.append("fusion_head")
    # children before parents: deeper names first, stable otherwise
    return sorted(units, key=lambda n: -n.count("."))


# ----------------------------------------------------------------------------- apply

def _set_submodule(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build_mesh(env: DistEnv, sharding: str):
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "hybrid":
        return init_device_mesh(env.device.type, (env.num_nodes, env.world_size // env.num_nodes),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))


def device_memory_bytes(device: torch.device) -> int:
    """GPU memory, or the host's RAM capped by this process's cgroup limit (containers, SLURM jobs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                ram = min(ram, int(f.read().strip()))
        except (OSError, ValueError):  # no such cgroup file, or "max": no limit
            continue
    return ram


def resolve_sharding(model: nn.Module, plan: ParallelPlan, env: DistEnv) -> str:
    """`auto`: keep the parameters unsharded from forward to backward (`shard_grad_op`) when the whole model, at
    the parameter dtype, takes at most AUTO_UNSHARDED_FRACTION of this rank's share of device memory; `full`
    otherwise. Keeping them costs at most what DDP holds anyway and saves one all-gather of every unit per
    step (on CPU the collectives run on the training thread, so that is step time, not overlapped time);
    gradients and optimizer state stay sharded either way."""
    if plan.sharding != "auto":
        return plan.sharding
    nbytes = sum(p.numel() for p in model.parameters()) * plan.param_dtype.itemsize
    share = device_memory_bytes(env.device) / (env.local_world_size if env.device.type == "cpu" else 1)
    # every rank must choose alike (the choice decides which collectives it issues): the smallest share decides
    share = -all_reduce_max(-share) if dist.is_initialized() else share
    return "shard_grad_op" if nbytes <= AUTO_UNSHARDED_FRACTION * share else "full"


def apply_fsdp(model: nn.Module, plan: ParallelPlan, env: DistEnv) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    plan.sharding = resolve_sharding(model, plan, env)
    mesh = build_mesh(env, plan.sharding)
    reshard = plan.sharding != "shard_grad_op"
    mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if plan.cpu_offload and env.device.type == "cuda" else None
    if plan.cpu_offload and env.device.type != "cuda":
        log.info("cpu_offload: parameters already live on the CPU; nothing to offload")
    common = dict(mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    if offload is not None:
        common["offload_policy"] = offload
    units = plan_units(model, plan.wrap_policy, plan.wrap_classes, plan.min_params)
    if plan.param_dtype != torch.float32:
        _keep_layernorms_fp32(model, common)
    # Frozen parameters never change, so every rank keeps them whole (as DDP does) instead of all-gathering
    # them every step; in fp32 only, where an ignored parameter's dtype matches its unit's compute dtype.
    # (fully_shard's ignored_params is newer than torch 2.6: there the frozen parameters are sharded as before)
    can_ignore = plan.param_dtype == torch.float32 and "ignored_params" in inspect.signature(fully_shard).parameters
    frozen = {p for p in model.parameters() if not p.requires_grad} if can_ignore else set()
    for module in [model.get_submodule(name) for name in units] + [model]:
        module = getattr(module, "_checkpoint_wrapped_module", module)
        ignored = {p for p in module.parameters() if p in frozen}
        if ignored and all(p in ignored for p in module.parameters()) and module is not model:
            continue  # nothing of this unit to shard (the size policy's own unit for a frozen word table)
        fully_shard(module, **common, **({"ignored_params": ignored} if ignored else {}))
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    p2p = plan.collectives == "p2p" and use_p2p_collectives(sharded, mesh.get_group(-1))
    log.info("FSDP2: %d units + root, sharding=%s, precision=%s, activation_checkpointing=%s, collectives=%s",
             len(units), plan.sharding, plan.mixed_precision, plan.activation_checkpointing,
             "p2p" if p2p else "native")
    return model


def _keep_layernorms_fp32(model: nn.Module, common: dict):
    """LayerNorms as their own fp32 units; their output is cast back to the dtype that came in."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fp32 = dict(common, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            fully_shard(m, **fp32)
            m.register_forward_pre_hook(lambda mod, args: setattr(mod, "_mmbert_in_dtype", args[0].dtype), prepend=True)
            m.register_forward_hook(lambda mod, args, out: out.to(mod._mmbert_in_dtype))


def encoder_units(model: nn.Module, plan: ParallelPlan) -> list[str]:
    """The outermost wrap units that hold encoder computation (layers: not the embeddings, not the fusion
    head): what activation checkpointing recomputes and train.compile compiles, on every strategy. A unit
    inside another (the size policy nests them) would be recomputed or compiled twice."""
    units = [n for n in plan_units(model, plan.wrap_policy, plan.wrap_classes, plan.min_params)
             if n.startswith("text_encoder.") and "Embedding" not in type(model.get_submodule(n)).__name__]
    return [n for n in units if not any(n.startswith(other + ".") for other in units)]


def checkpoint_and_compile(model: nn.Module, plan: ParallelPlan):
    """Activation checkpointing (non-reentrant: exact, the same losses) and torch.compile (dynamic shapes:
    bucketed batches change length every step) of each encoder unit, in place, before any wrapping."""
    if not (plan.activation_checkpointing or plan.compile):
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    units = encoder_units(model, plan)
    if not units:
        key = "dist.activation_checkpointing" if plan.activation_checkpointing else "train.compile"
        raise ConfigError(f"config key '{key}': the model has no encoder layer to apply it to (dist.wrap_policy "
                          f"'{plan.wrap_policy}', model.fusion tab_only or dist.wrap_classes picking none); "
                          f"turn it off or choose the units with dist.wrap_policy / dist.wrap_classes")
    for name in units:
        unit = model.get_submodule(name)
        if plan.compile:
            unit.compile(dynamic=True)  # in place: parameter names (checkpoints, model files) are unchanged
        if plan.activation_checkpointing:
            _set_submodule(model, name, checkpoint_wrapper(unit))


def parallelize(model: nn.Module, plan: ParallelPlan, env: DistEnv) -> nn.Module:
    if not any(p.is_meta for p in model.parameters()):  # meta: a plan (benchmarks/plan.py), shapes only
        model.to(env.device)
    set_tf32(env.device, plan.tf32 and plan.mixed_precision == "fp32")
    checkpoint_and_compile(model, plan)
    if plan.strategy == "fsdp":
        return apply_fsdp(model, plan, env)
    if plan.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no second gradient copy, no
        # copy into/out of the buckets each step)
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def grad_sync(model: nn.Module, plan: ParallelPlan, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on non-final micro-steps of gradient accumulation."""
    if plan.strategy == "ddp" and not sync:
        return model.no_sync()
    if plan.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """Global gradient norm, correct for sharded (DTensor) parameters; clips when max_norm is set."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def all_reduce_max(value: float) -> float:
    """The largest `value` over all ranks (a CPU tensor: gloo carries it beside NCCL)."""
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    return all_reduce_max(1.0 if flag else 0.0) > 0
