"""Typed run configuration: YAML file + CLI overrides, validated with one clear message per error."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .task import validate_task

FUSIONS = ("cross_attn", "cross_attn_tokens", "concat", "gated", "text_only", "tab_only")
STRATEGIES = ("auto", "fsdp", "ddp", "none")
POOLINGS = ("pooler", "cls", "mean")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class SplitConfig:
    # One of: index files (one 0-based row index per line) ...
    train_indices: Optional[str] = None
    val_indices: Optional[str] = None
    test_indices: Optional[str] = None
    # ... separate files ...
    train_file: Optional[str] = None
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    # ... or fractions of one file, shuffled with a seed (train, val, test).
    fractions: Optional[list[float]] = None
    seed: int = 0


@dataclass
class DataConfig:
    path: Optional[str] = None
    text_columns: list[str] = field(default_factory=list)
    text_separator: str = ". "
    numeric_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)
    label_column: Optional[str] = None
    # auto: classification, unless label_type is float (mmbert/task.py)
    task: Literal["auto", "classification", "regression"] = "auto"
    # auto: one-hot when the column holds lists, else the sorted distinct values of the train split; float: a
    # regression target (standardised with the train split's mean and std).
    label_type: Literal["auto", "int", "string", "onehot", "float"] = "auto"
    # The label map, pinned and in order (binary: the second is the positive class). Without it the map is
    # every distinct train label; with it a train label outside the list stops training, naming the row.
    labels: Optional[list[int | str]] = None
    id_column: Optional[str] = None
    # Tabular columns also written into the text as "Name: value." (they stay tabular features too).
    serialize_columns: list[str] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_tokens: int = 128
    max_chunks: int = 4
    # Pad every training batch to max_chunks x max_tokens (what fixed-length pipelines do); only for
    # benchmarks: dynamic padding computes the same result on fewer tokens.
    pad_to_max: bool = False
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    # The tokenized train/val splits and fitted preprocessing are stored once (per node) under cache_dir and
    # memory-mapped by every rank (mmbert/data/cache.py); false reads and tokenizes the table on every rank.
    cache: bool = True
    cache_dir: Optional[str] = None  # default: ~/.cache/mmbert/tokenized


@dataclass
class ModelConfig:
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: Literal[POOLINGS] = "pooler"  # type: ignore[valid-type]
    hidden_dim: int = 384
    fusion: Literal[FUSIONS] = "cross_attn"  # type: ignore[valid-type]
    num_heads: int = 4
    dropout: float = 0.1
    # The encoder's attention-probability dropout; null keeps the pretrained config's (0.1 for MiniLM).
    # With 0, PyTorch's SDPA runs its fused (flash) kernel when training on CPU; with > 0 it falls back to
    # the unfused math kernel (~13% slower steps at 128 tokens; docs/PERFORMANCE.md).
    attention_dropout: Optional[float] = None
    # Keep the encoder's input word embeddings (half of all-MiniLM-L6-v2's 22.7M parameters) fixed: no
    # gradient, all-reduce or AdamW update for them (+9% samples/s on 2 DDP CPU ranks; docs/PERFORMANCE.md).
    freeze_word_embeddings: bool = False
    cat_embedding_dim: int = 16
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 16  # per rank
    grad_accum: int = 1
    lr: float = 5e-5
    head_lr: Optional[float] = None  # fusion/head/tabular learning rate; defaults to lr
    weight_decay: float = 0.01
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: Optional[int] = None
    max_grad_norm: Optional[float] = 1.0
    class_weights: Optional[list[float]] = None
    # auto: cross_entropy for classification, mse for regression (on the standardised target)
    loss: Literal["auto", "cross_entropy", "mse", "huber"] = "auto"
    huber_delta: float = 1.0  # in standard deviations of the train target
    eval_every: Optional[int] = None  # steps; evaluation also runs at the end of each epoch
    eval_each_epoch: bool = True
    # null: roc_auc (classification) / rmse (regression); metric_mode: the metric's direction (mmbert/metrics.py TABLE),
    # which an explicit value may only repeat
    metric: Optional[str] = None
    metric_mode: Optional[Literal["max", "min"]] = None
    early_stopping_patience: Optional[int] = None  # evaluations without improvement
    select_best: bool = True  # final/ holds the best evaluated weights
    log_every: int = 10
    checkpoint_every: Optional[int] = None
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "auto" or a checkpoint directory
    # resume on data files whose bytes changed since the checkpoint: refuse, or accept (their rows train under the
    # run's fitted preprocessing; --accept-changed-data)
    resume_data_changed: Literal["refuse", "accept"] = "refuse"
    overwrite: bool = False
    seed: int = 42
    # Train one member per seed into OUTPUT/seed_S and write OUTPUT/ensemble.json (mmbert/ensemble.py): evaluate,
    # export and mmbert.load take OUTPUT as one model averaging the members' probabilities.
    seeds: Optional[list[int]] = None
    bucket_by_length: bool = True
    bucket_block: int = 64
    num_threads: Optional[int] = None
    # Processes that collate the next steps' batches while this one trains (torch DataLoader workers, fed by
    # the global resumable order). None: 2 on GPU, 0 on CPU (where the ranks' threads already use the cores).
    num_workers: Optional[int] = None
    eval_batch_size: Optional[int] = None
    progress_bar: bool = True
    deterministic: bool = False
    # torch.compile of each encoder layer (dynamic shapes), on every strategy; the first steps pay the compile
    compile: bool = False
    # Experiment trackers that also get every metrics.jsonl record, on rank 0 (mmbert/training/tracking.py):
    # tensorboard (event files in OUTPUT_DIR/tensorboard), wandb, mlflow (optional installs), or none.
    report_to: list[str] = field(default_factory=list)


@dataclass
class DistConfig:
    # auto (null too): what `accelerate launch` names, else fsdp on several processes and none on one
    # (mmbert/distributed/parallel.py resolve_strategy); none on several processes is refused.
    strategy: Optional[Literal[STRATEGIES]] = "auto"  # type: ignore[valid-type]
    wrap_policy: Optional[Literal["class", "size", "class+size", "none"]] = None
    wrap_classes: Optional[list[str]] = None  # default: the encoder's _no_split_modules
    min_params: Optional[int] = None
    sharding: Optional[Literal["auto", "full", "shard_grad_op", "hybrid"]] = None  # None: accelerate env or auto
    # auto (None too, unless accelerate names one): bf16 on CUDA, fp32 on CPU; every strategy (mmbert/distributed/
    # precision.py): autocast under none / ddp, FSDP2's MixedPrecisionPolicy under fsdp; fp16 scales the loss
    mixed_precision: Optional[Literal["auto", "fp32", "bf16", "fp16"]] = None
    # recompute each encoder layer in backward (every strategy; the units FSDP wraps): less memory, same losses
    activation_checkpointing: Optional[bool] = None
    cpu_offload: Optional[bool] = None
    # FSDP's all-gather / reduce-scatter on gloo: point-to-point exchanges (None: p2p) or gloo's own
    collectives: Optional[Literal["p2p", "native"]] = None
    # fp32 matmuls on CUDA in TF32 (tensor cores); false: full fp32
    tf32: bool = True
    timeout_s: int = 600


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- typed coercion

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys in '{prefix.rstrip('.') or 'top level'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _parse_scalar(text: str):
    """A --set value is parsed as YAML, so `4`, `1e-4`, `true`, `null`, `[a, b]` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(raw: dict, dotted: str, value):
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


# Configs shipped inside the package (with the data they train on): usable by name from an installed mmbert,
# e.g. `mmbert train --config womens_clothing`.
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
# data.* keys that say where the token cache is, not what it holds: outside its key, free to change on resume
DATA_CACHE_KEYS = ("cache", "cache_dir")
SPLIT_PATH_KEYS = ("train_indices", "val_indices", "test_indices", "train_file", "val_file", "test_file")


def packaged_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PACKAGED_DIR) if f.endswith(".yaml"))


def resolve_config_path(path: str) -> str:
    """A config file as given, or the packaged config of that name."""
    if os.path.isfile(path) or os.sep in path or path.endswith((".yaml", ".yml")):
        return path
    named = os.path.join(PACKAGED_DIR, path + ".yaml")
    if os.path.isfile(named):
        return named
    raise ConfigError(f"config file not found: {path} (packaged configs: {', '.join(packaged_configs())})")


def _anchor_packaged_paths(raw: dict, path: str):
    """A packaged config's relative data paths resolve against the current directory when all of them exist
    there (a clone's data/), else all against the package's own copy: the config trains from any directory."""
    if not os.path.realpath(path).startswith(os.path.realpath(PACKAGED_DIR) + os.sep):
        return
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    split = data.get("split") if isinstance(data.get("split"), dict) else {}
    relative = [(section, key) for section, key in [(data, "path"), *((split, k) for k in SPLIT_PATH_KEYS)]
                if isinstance(section.get(key), str) and not os.path.isabs(section[key])]
    if all(os.path.exists(section[key]) for section, key in relative):
        return  # all of them here: never a mix of the current directory's table and the package's index files
    for section, key in relative:
        section[key] = os.path.join(os.path.dirname(os.path.realpath(path)), section[key])


def load_config(path: Optional[str] = None, overrides: Optional[list[tuple[str, Any]]] = None,
                base: Optional[dict] = None) -> Config:
    """The config of a YAML file (or `base`, a mapping of sections) with dotted-key overrides applied."""
    import copy

    raw: dict = copy.deepcopy(base) if base else {}
    if path:
        path = resolve_config_path(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, dist)")
        _anchor_packaged_paths(raw, path)
    for key, value in overrides or []:
        if "." not in key:
            raise ConfigError(f"--set {key}: use section.key=value (sections: data, model, train, dist)")
        _set_path(raw, key, value)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict, check: bool = True) -> Config:
    """A Config from a mapping of sections; `check=False` types every key but skips cross-key validation."""
    cfg = _build(Config, raw)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    positive = {
        "data.max_tokens": d.max_tokens, "data.max_chunks": d.max_chunks, "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum, "train.epochs": t.epochs, "train.log_every": t.log_every,
        "model.hidden_dim": m.hidden_dim, "model.num_heads": m.num_heads, "train.keep_checkpoints": t.keep_checkpoints,
        "train.bucket_block": t.bucket_block, "dist.timeout_s": cfg.dist.timeout_s,
    }
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {v}")
    for key, v in {"train.max_steps": t.max_steps, "train.checkpoint_every": t.checkpoint_every,
                   "train.eval_every": t.eval_every, "data.max_train_rows": d.max_train_rows,
                   "data.max_eval_rows": d.max_eval_rows, "train.num_threads": t.num_threads,
                   "train.eval_batch_size": t.eval_batch_size,
                   "train.early_stopping_patience": t.early_stopping_patience}.items():
        if v is not None and v < 1:
            raise ConfigError(f"config key '{key}' must be >= 1 when set, got {v}")
    if t.num_workers is not None and t.num_workers < 0:
        raise ConfigError(f"config key 'train.num_workers' must be >= 0 when set, got {t.num_workers}")
    if d.max_tokens < 8:
        raise ConfigError(f"config key 'data.max_tokens' must be >= 8 (room for [CLS], [SEP] and text), got {d.max_tokens}")
    if m.hidden_dim % m.num_heads:
        raise ConfigError(f"config key 'model.num_heads' ({m.num_heads}) must divide model.hidden_dim ({m.hidden_dim})")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {m.dropout}")
    if m.attention_dropout is not None and not 0 <= m.attention_dropout < 1:
        raise ConfigError(f"config key 'model.attention_dropout' must be in [0, 1), got {m.attention_dropout}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"config key 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if not d.label_column:
        raise ConfigError("config key 'data.label_column' is required for training")
    validate_task(cfg)
    if d.labels is not None:
        if len(d.labels) < 2 or len({str(v) for v in d.labels}) != len(d.labels):
            raise ConfigError(f"config key 'data.labels' must list at least 2 distinct classes, got {d.labels}")
        if d.label_type == "onehot":
            raise ConfigError("config key 'data.labels' does not apply to one-hot labels (data.label_type: onehot)")
    if m.fusion != "tab_only" and not d.text_columns:
        raise ConfigError(f"config key 'data.text_columns' is empty but model.fusion is '{m.fusion}' (use tab_only)")
    if m.fusion == "tab_only" and not (d.numeric_columns or d.categorical_columns):
        raise ConfigError("model.fusion is 'tab_only' but data.numeric_columns and data.categorical_columns are empty")
    roles = [*d.text_columns, *d.numeric_columns, *d.categorical_columns]
    dup = sorted({c for c in roles if roles.count(c) > 1})
    if dup:
        raise ConfigError(f"column '{dup[0]}' is given more than one role in data.text_columns/numeric_columns/categorical_columns")
    if d.label_column in roles:
        raise ConfigError(f"data.label_column '{d.label_column}' is also used as a feature column")
    for c in d.serialize_columns:
        if c not in d.numeric_columns and c not in d.categorical_columns:
            raise ConfigError(f"data.serialize_columns: '{c}' is not a numeric or categorical column")
    s = d.split
    if s.fractions is not None:
        if len(s.fractions) not in (2, 3) or any(f < 0 for f in s.fractions) or abs(sum(s.fractions) - 1) > 1e-6:
            raise ConfigError(f"config key 'data.split.fractions' must be 2 or 3 non-negative numbers summing to 1, got {s.fractions}")
        if s.train_indices or s.train_file:
            raise ConfigError("data.split: give fractions or index files or separate files, not several")
    if s.train_indices and s.train_file:
        raise ConfigError("data.split: give train_indices or train_file, not both")
    bad = [v for v in t.report_to if v not in REPORT_TO]
    if bad:
        raise ConfigError(f"config key 'train.report_to': {bad[0]!r} is not one of {', '.join(REPORT_TO)}")
    if "none" in t.report_to and len(set(t.report_to)) > 1:
        raise ConfigError(f"config key 'train.report_to': 'none' cannot be combined with trackers, got {t.report_to}")
    validate_seeds(t)
    if t.resume not in (None, "auto") and not os.path.isdir(t.resume):
        raise ConfigError(f"config key 'train.resume': '{t.resume}' is neither 'auto' nor a checkpoint directory")


def validate_seeds(t: TrainConfig) -> None:
    if t.seeds is None:
        return
    if not t.seeds or len(set(t.seeds)) != len(t.seeds) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t.seeds):
        raise ConfigError(f"config key 'train.seeds' must list distinct integers >= 0 (one ensemble member each), "
                          f"got {t.seeds}")
    if t.resume not in (None, "auto"):
        raise ConfigError(f"config key 'train.resume': with train.seeds only 'auto' applies (each member resumes "
                          f"its own checkpoints), got '{t.resume}'")
