#!/usr/bin/env python
"""Plan FSDP past this machine: per-rank memory and traffic of OUR parallelisation at a simulated world size.

    python benchmarks/plan.py --encoder bert-large --world-sizes 8 64 512
    python benchmarks/plan.py --encoder bert-base --sharding full shard_grad_op hybrid --wrap-policy class size
    python benchmarks/plan.py --encoder-config path/to/hf_folder_or_config.json --json plan.json

For each (world size, sharding, wrap policy) the REAL model (`MultimodalClassifier` around an HF encoder
built from its config by `load_encoder`, as a saved model is re-opened) is created with every weight on the
meta device (no download, no allocation), then `resolve_plan` + `parallelize` -- the calls training makes --
shard it over a fake process group of W ranks (`torch.testing._internal.distributed.fake_pg`: collectives are
no-ops, so W=512 runs in one process). Hybrid sharding uses the same 2-D (replicate x shard) mesh
`build_mesh` builds, N nodes x --gpus-per-node ranks.

From the sharded model (per rank, default rank 0, which holds the largest dim-0 chunk of every tensor):
  params      sum of DTensor `to_local()` bytes (the fp32 master shards; compute-dtype copies are transient)
  grads       the same local shards in the parameter's own dtype (FSDP2 reduce-scatters in fp32 and keeps
              fp32 sharded grads under bf16 mixed precision), for parameters with requires_grad
  optimizer   AdamW: exp_avg + exp_avg_sq like each local shard, plus its fp32 `step` scalar
  units       every `fully_shard`ed module's parameter group: full size, padded shard size, compute dtype
              (its MixedPrecisionPolicy: LayerNorms are their own fp32 units under bf16), reshard-after-forward
Derived from those units (formulas):
  largest unit    the biggest unit's full parameter bytes in its compute dtype (the all-gather output)
  gather peak     2 x largest unit (the unit computing + the one prefetched) + the largest unit's unsharded
                  grads in the compute dtype and, when that is not the reduce dtype, their reduce-dtype copy
  traffic         ring collectives, bytes each rank receives per optimizer step, over the shard group (size S)
                  and, for hybrid, the replicate group (size R), padded shard p of each unit:
                  all-gather      (S-1) x p x compute bytes, once in forward and again in backward for units
                                  that reshard after forward (full, hybrid; not shard_grad_op)
                  reduce-scatter  (S-1) x p x reduce bytes (fp32)
                  all-reduce      hybrid only: 2 (R-1)/R x p x reduce bytes across replicas
  activations     `activation_bytes` (an analytic estimate for BERT layers; its docstring has the formula)
  total           params + grads + optimizer + gather peak + batch x activations/sample + --reserve-gb
                  (CUDA context and allocator slack); fits 40 / 80 GB (10^9 bytes) when total <= that.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository root on sys.path, HF offline)

PRESETS = {  # name -> BertConfig keyword arguments
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, max_position_embeddings=512),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=30522, max_position_embeddings=512),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522, max_position_embeddings=512),  # all-MiniLM-L6-v2
}
GB = 10**9


# ----------------------------------------------------------------------------- the real model, on meta

def encoder_config(name: str):
    """An HF config: a preset name, an HF config folder, or a config.json file."""
    from transformers import AutoConfig, BertConfig

    if name in PRESETS:
        return BertConfig(**PRESETS[name])
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name)
    if os.path.isfile(name):
        with open(name) as f:
            d = json.load(f)
        return AutoConfig.for_model(d.pop("model_type", "bert"), **d)
    raise SystemExit(f"error: --encoder '{name}' is neither a preset ({', '.join(PRESETS)}) nor a config path")


def default_spec(encoder: str = "plan", config: str | None = None, cardinality: int = 32):
    """The ModelSpec training would build: the model section of `config` (the shipped config by default),
    one numeric input per numeric column and `cardinality` categories per categorical column (the fitted
    vocabulary sizes are unknown without data; tabular embeddings are well under 1% of the parameters)."""
    from mmbert.config import load_config
    from mmbert.models.classifier import ModelSpec

    cfg = load_config(config or os.path.join(common.ROOT, "configs", "womens_clothing.yaml"))
    mc, dc = cfg.model, cfg.data
    return ModelSpec(fusion=mc.fusion, hidden_dim=mc.hidden_dim, num_heads=mc.num_heads, dropout=mc.dropout,
                     pooling=mc.pooling, num_numeric=len(dc.numeric_columns),
                     cardinalities=[cardinality] * len(dc.categorical_columns),
                     cat_embedding_dim=mc.cat_embedding_dim, num_classes=2, encoder=encoder)


def meta_model(spec, encoder_cfg_dir: str, freeze_word_embeddings: bool = False):
    """`artifact.build_model` from an encoder config folder, every tensor on the meta device."""
    import torch

    from mmbert.artifact import build_model
    from mmbert.models.classifier import freeze_word_embeddings as freeze

    with torch.device("meta"):
        model = build_model(spec, None, pretrained=False, encoder_config_dir=encoder_cfg_dir)
    if freeze_word_embeddings:
        freeze(model)
    return model


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """A fake process group of `world` ranks (this process is `rank`): collectives do nothing."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_plan(strategy="fsdp", sharding="full", wrap_policy="class", mixed_precision="bf16",
              activation_checkpointing=False, min_params=None, wrap_classes=None):
    """The ParallelPlan training resolves from these `dist.*` config keys (on a CUDA device)."""
    import torch

    from mmbert.config import DistConfig
    from mmbert.distributed.parallel import resolve_plan

    dcfg = DistConfig(strategy=strategy, wrap_policy=wrap_policy, wrap_classes=wrap_classes, min_params=min_params,
                      sharding=sharding, mixed_precision=mixed_precision,
                      activation_checkpointing=activation_checkpointing, cpu_offload=False)
    return resolve_plan(dcfg, torch.device("cuda"))


def shard(model, plan, world: int, rank: int = 0, gpus_per_node: int = 8):
    """`parallelize(model, plan, env)` for rank `rank` of `world` (needs a process group of that size)."""
    import torch

    from mmbert.distributed.env import DistEnv
    from mmbert.distributed.parallel import parallelize

    local = min(gpus_per_node, world)
    if plan.sharding == "hybrid" and world % local:
        raise ValueError(f"hybrid sharding needs whole nodes: world size {world} is not a multiple of {local}")
    env = DistEnv(rank, world, rank % local, local, torch.device("cpu"), "plan")
    return parallelize(model, plan, env)


# ----------------------------------------------------------------------------- what the sharded model holds

@dataclass
class Unit:
    name: str
    numel: int  # full (unsharded) parameters
    padded_shard_numel: int  # per rank, as all-gathered / reduce-scattered
    compute_bytes: int  # bytes per element in forward/backward (the unit's param_dtype)
    reduce_bytes: int
    reshard_after_forward: bool
    shard_size: int
    replicate_size: int


def fsdp_units(model) -> list[Unit]:
    """Every fully_shard'ed module's parameter group, read from FSDP2's own state."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    units = []
    for name, m in model.named_modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        if group is None:  # a unit with no parameters of its own
            continue
        mp, info = group.mp_policy, group.mesh_info
        numel = padded = compute = 0
        for fp in group.fsdp_params:
            p = fp.sharded_param
            dtype = mp.param_dtype if mp.param_dtype is not None and p.dtype.is_floating_point else p.dtype
            numel += p.numel()  # a DTensor's numel is the global one
            padded += math.prod(fp.padded_sharded_param_size)
            compute = max(compute, torch.empty((), dtype=dtype).element_size())
        reduce = torch.empty((), dtype=mp.reduce_dtype).element_size() if mp.reduce_dtype else compute
        units.append(Unit(name.replace("._checkpoint_wrapped_module", "") or "<root>", numel, padded, compute,
                          reduce, group.post_forward_mesh_info is not None, info.shard_mesh_size,
                          getattr(info, "replicate_mesh_size", 1)))
    return units


def state_bytes(model) -> dict:
    """Per-rank bytes of parameter shards, gradient shards and AdamW state, from the local DTensor shards."""
    from torch.distributed.tensor import DTensor

    params = grads = optim = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        n = local.numel() * local.element_size()
        params += n
        if p.requires_grad:
            grads += n  # grads are sharded like the parameter, in its dtype (fp32 master)
            optim += 2 * n + 4  # exp_avg, exp_avg_sq (zeros_like the shard) + the fp32 step scalar
    return {"param_bytes": params, "grad_bytes": grads, "optim_bytes": optim,
            "state_bytes": params + grads + optim}


def traffic(units: list[Unit]) -> dict:
    """Bytes each rank receives per optimizer step (ring collectives; see the module docstring)."""
    ag = rs = ar = 0.0
    for u in units:
        s, r = u.shard_size, u.replicate_size
        gathers = 2 if u.reshard_after_forward else 1
        ag += gathers * (s - 1) * u.padded_shard_numel * u.compute_bytes
        rs += (s - 1) * u.padded_shard_numel * u.reduce_bytes
        ar += 2 * (r - 1) / r * u.padded_shard_numel * u.reduce_bytes
    return {"all_gather_bytes": int(ag), "reduce_scatter_bytes": int(rs), "all_reduce_bytes": int(ar)}


def gather_peak(units: list[Unit]) -> dict:
    big = max(units, key=lambda u: u.numel * u.compute_bytes)
    largest = big.numel * big.compute_bytes
    grads = big.numel * big.compute_bytes + (big.numel * big.reduce_bytes if big.reduce_bytes != big.compute_bytes else 0)
    return {"largest_unit": big.name, "largest_unit_bytes": largest, "gather_peak_bytes": 2 * largest + grads}


# ----------------------------------------------------------------------------- activations (formula)

def activation_bytes(enc_cfg, tokens: int, compute_bytes: int, checkpointing: bool) -> dict:
    """Activation memory per sample of `tokens` tokens, kept from forward for backward, for a BERT encoder.

    Per layer (T tokens, H hidden, I intermediate, A heads, b compute-dtype bytes, n = 4: the LayerNorms run
    in fp32 under our bf16 policy, so they save an fp32 copy of their input), fused SDPA (flash /
    memory-efficient: no T x T attention matrix is stored; dropout masks are regenerated from the RNG):
        layer input (Q/K/V matmul input)   T H b        Q, K, V (SDPA inputs)        3 T H b
        SDPA output (+ out-proj input)     T H b        SDPA logsumexp               4 A T
        2 dropout masks (1 byte/element)   2 T H        2 LayerNorm inputs + stats   2 (T H n + 8 T)
        FFN input                          T H b        GELU input and output        2 T I b
      = T [H (6 b + 2 n + 2) + 2 I b + 4 A + 16]   (bf16: T (22 H + 4 I + 4 A + 16))
    Embeddings (not checkpointed): LayerNorm input T H n + 8 T and a dropout mask T H.
    Without activation checkpointing: L layers + embeddings. With it (checkpoint_wrapper on each layer)
    only each layer's input T H b is kept, plus one layer's full set while it is recomputed in backward.
    Not counted: the fusion/head (O(H) per sample), the activation gradients of the layer being
    differentiated, and the T x T scores of the unfused (math) attention kernel."""
    T, H = tokens, enc_cfg.hidden_size
    I, A, L = enc_cfg.intermediate_size, enc_cfg.num_attention_heads, enc_cfg.num_hidden_layers
    b, n = compute_bytes, 4
    layer = T * (H * (6 * b + 2 * n + 2) + 2 * I * b + 4 * A + 16)
    emb = T * H * (n + 1) + 8 * T
    kept = (L * T * H * b + layer) if checkpointing else L * layer
    return {"layer_bytes": layer, "activation_bytes_per_sample": kept + emb}


# ----------------------------------------------------------------------------- one configuration

def plan_one(spec, enc_dir: str, enc_cfg, world: int, sharding: str, wrap_policy: str, precision: str,
             batch: int, tokens: int, checkpointing: bool, rank: int = 0, gpus_per_node: int = 8,
             min_params=None, freeze_word_embeddings: bool = False, reserve_gb: float = 1.0) -> dict:
    """One row: build the meta model, shard it with our plan at `world` ranks, read what rank `rank` holds."""
    t0 = time.perf_counter()
    plan = make_plan("fsdp", sharding, wrap_policy, precision, checkpointing, min_params)
    model = meta_model(spec, enc_dir, freeze_word_embeddings)
    total_params = sum(p.numel() for p in model.parameters())
    with fake_world(world, rank):
        shard(model, plan, world, rank, gpus_per_node)
        units = fsdp_units(model)
        state = state_bytes(model)
    b = 2 if precision in ("bf16", "fp16") else 4
    act = activation_bytes(enc_cfg, tokens, b, checkpointing)
    row = {"encoder": getattr(enc_cfg, "_plan_name", enc_cfg.model_type), "world_size": world, "rank": rank,
           "sharding": sharding, "wrap_policy": wrap_policy, "mixed_precision": precision,
           "activation_checkpointing": checkpointing, "batch": batch, "tokens": tokens,
           "total_params": total_params, "units": len(units), **state, **gather_peak(units), **traffic(units),
           **act, "activation_bytes": batch * act["activation_bytes_per_sample"]}
    row["total_bytes"] = int(row["state_bytes"] + row["gather_peak_bytes"] + row["activation_bytes"] + reserve_gb * GB)
    row["fits_40gb"] = row["total_bytes"] <= 40 * GB
    row["fits_80gb"] = row["total_bytes"] <= 80 * GB
    row["unit_list"] = [asdict(u) for u in units]  # --json: every FSDP unit
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def fmt(n: float) -> str:
    """Decimal units, like the 40 / 80 GB cards."""
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


COLUMNS = [  # header -> cell
    ("encoder", lambda r: r["encoder"]), ("W", lambda r: str(r["world_size"])),
    ("sharding", lambda r: r["sharding"]), ("wrap", lambda r: r["wrap_policy"]),
    ("prec", lambda r: r["mixed_precision"]), ("AC", lambda r: "y" if r["activation_checkpointing"] else "n"),
    ("units", lambda r: str(r["units"])), ("params", lambda r: fmt(r["param_bytes"])),
    ("grads", lambda r: fmt(r["grad_bytes"])), ("AdamW", lambda r: fmt(r["optim_bytes"])),
    ("largest unit", lambda r: fmt(r["largest_unit_bytes"])), ("gather peak", lambda r: fmt(r["gather_peak_bytes"])),
    ("act/sample", lambda r: fmt(r["activation_bytes_per_sample"])), ("act x batch", lambda r: fmt(r["activation_bytes"])),
    ("all-gather/step", lambda r: fmt(r["all_gather_bytes"])),
    ("reduce-scatter/step", lambda r: fmt(r["reduce_scatter_bytes"])),
    ("all-reduce/step", lambda r: fmt(r["all_reduce_bytes"])), ("total", lambda r: fmt(r["total_bytes"])),
    ("40GB", lambda r: "yes" if r["fits_40gb"] else "no"), ("80GB", lambda r: "yes" if r["fits_80gb"] else "no"),
]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="bert-base", help=f"a preset ({', '.join(PRESETS)}) or an HF config path")
    ap.add_argument("--encoder-config", default=None, help="an HF config folder or config.json (overrides --encoder)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--sharding", nargs="+", default=["full"], choices=["full", "shard_grad_op", "hybrid"])
    ap.add_argument("--wrap-policy", nargs="+", default=["class"], choices=["class", "size", "class+size", "none"])
    ap.add_argument("--min-params", type=int, default=None, help="size policy threshold (default: parallel.py's)")
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--batch", type=int, default=8, help="samples per rank per micro-step")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sample")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--freeze-word-embeddings", action="store_true")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="hybrid: ranks per node (the shard group)")
    ap.add_argument("--rank", type=int, default=0, help="the rank to report (0 holds the largest shards)")
    ap.add_argument("--config", default=None, help="model section and column counts (default: the shipped config)")
    ap.add_argument("--reserve-gb", type=float, default=1.0, help="CUDA context + allocator slack in the total")
    ap.add_argument("--json", default=None, metavar="OUT")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    import logging

    mlog = logging.getLogger("mmbert")
    level = mlog.level
    mlog.setLevel(logging.WARNING)  # parallelize's per-call INFO line
    try:
        return _run(a)
    finally:
        mlog.setLevel(level)


def _run(a) -> list[dict]:
    name = a.encoder_config or a.encoder
    enc_cfg = encoder_config(name)
    spec = default_spec(name, a.config)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as enc_dir:
        enc_cfg.save_pretrained(enc_dir)
        enc_cfg._plan_name = os.path.basename(name.rstrip("/"))
        for world in a.world_sizes:
            for sharding in a.sharding:
                for wrap in a.wrap_policy:
                    rows.append(plan_one(spec, enc_dir, enc_cfg, world, sharding, wrap, a.mixed_precision, a.batch,
                                         a.tokens, a.activation_checkpointing, a.rank, a.gpus_per_node,
                                         a.min_params, a.freeze_word_embeddings, a.reserve_gb))
    print(f"{name}: {rows[0]['total_params']:,} parameters; per rank {a.rank}, batch {a.batch} x {a.tokens} tokens\n")
    print(markdown(rows))
    print(f"\n{len(rows)} configurations in {time.perf_counter() - t0:.1f} s")
    if a.json:
        common.write_result("plan", {"rows": rows}, a, a.json)
        print("wrote", a.json)
    return rows


if __name__ == "__main__":
    main()
