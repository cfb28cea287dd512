"""Typed run configuration. Each key is declared once, as a field with its type, default, help and checks
(mmbert/settings.py setting()); the train flags, mmbert.train's keywords and docs/CONFIGURATION.md come from the
fields. A YAML file + --set overrides + flags, validated section by section with one clear message per error;
validation never changes the config."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .models.registry import fusion_names
from .settings import build, check_fields, leaves, register_root, setting, suggestion
from .task import validate_task

STRATEGIES = ("auto", "fsdp", "ddp", "none")
POOLINGS = ("pooler", "cls", "mean")
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class SplitConfig:
    """One of: index files (one 0-based row index per line), separate files, or fractions of one file."""
    train_indices: Optional[str] = setting(None, "train rows of data.path: a file of 0-based row indices")
    val_indices: Optional[str] = setting(None, "validation rows of data.path (index file)")
    test_indices: Optional[str] = setting(None, "test rows of data.path (index file)")
    train_file: Optional[str] = setting(None, "a separate train file (instead of data.path's rows)")
    val_file: Optional[str] = setting(None, "a separate validation file")
    test_file: Optional[str] = setting(None, "a separate test file")
    fractions: Optional[list[float]] = setting(
        None, "fractions of data.path (train, val[, test]), shuffled with data.split.seed")
    seed: int = setting(0, "seed of the fractions' shuffle", flag="split_seed")

    def validate(self) -> None:
        check_fields(self, "data.split.")
        if self.fractions is not None:
            f = self.fractions
            if len(f) not in (2, 3) or any(v < 0 for v in f) or abs(sum(f) - 1) > 1e-6:
                raise ConfigError(f"config key 'data.split.fractions' must be 2 or 3 non-negative numbers summing "
                                  f"to 1, got {f}")
            if self.train_indices or self.train_file:
                raise ConfigError("data.split: give fractions or index files or separate files, not several")
        if self.train_indices and self.train_file:
            raise ConfigError("data.split: give train_indices or train_file, not both")


@dataclass
class DataConfig:
    path: Optional[str] = setting(None, "data file or folder (CSV/TSV/Parquet/JSONL), or hub:NAME; made absolute "
                                        "when the config is loaded", flag="data")
    text_columns: list[str] = setting([], "text columns, joined with text_separator (none named: inferred)")
    text_separator: str = setting(". ", "what joins the text columns")
    numeric_columns: list[str] = setting([], "numeric columns (none named: inferred)")
    categorical_columns: list[str] = setting([], "categorical columns (none named: inferred)")
    ignore_columns: list[str] = setting([], "columns that column inference leaves out")
    label_column: Optional[str] = setting(None, "the column to predict (required)", flag="label")
    task: Literal["auto", "classification", "regression"] = setting(
        "auto", "auto: classification, unless label_type is float")
    label_type: Literal["auto", "int", "string", "onehot", "float"] = setting(
        "auto", "auto: one-hot when the column holds lists, else the sorted distinct values of the train split; "
                "float: a regression target (standardised with the train split's mean and std)")
    labels: Optional[list[int | str]] = setting(
        None, "the label map, pinned and in order (binary: the second is the positive class); a train label "
              "outside it stops training, naming the row")
    id_column: Optional[str] = setting(None, "column carried into the prediction files")
    serialize_columns: list[str] = setting(
        [], "tabular columns also written into the text as 'Name: value.' (they stay tabular features too)")
    split: SplitConfig = setting(SplitConfig)
    max_tokens: int = setting(128, "tokens per chunk", min=8, note="room for [CLS], [SEP] and text")
    max_chunks: int = setting(2, "chunks of max_tokens per row (longer text is cut)", min=1)
    pad_to_max: bool = setting(False, "pad every training batch to max_chunks x max_tokens (benchmarks only)")
    max_train_rows: Optional[int] = setting(None, "use the first N rows of the train split", min=1)
    max_eval_rows: Optional[int] = setting(None, "use the first N rows of val/test", min=1)
    cache: bool = setting(True, "store the tokenized splits once per node under cache_dir, memory-mapped by every "
                                "rank (false: read and tokenize on every rank)")
    cache_dir: Optional[str] = setting(None, "token cache folder (default ~/.cache/mmbert/tokenized)")
    num_proc: Optional[int] = setting(None, "processes that tokenize when the token cache is built (default: the "
                                            "node's cores / local processes)", min=1)

    def validate(self, roles: bool = True) -> None:
        """Each key's checks; roles: also the column-role rules (false before column inference has run)."""
        check_fields(self, "data.")
        self.split.validate()
        if self.labels is not None:
            if len(self.labels) < 2 or len({str(v) for v in self.labels}) != len(self.labels):
                raise ConfigError(f"config key 'data.labels' must list at least 2 distinct classes, got {self.labels}")
            if self.label_type == "onehot":
                raise ConfigError("config key 'data.labels' does not apply to one-hot labels (data.label_type: onehot)")
        if roles:
            self.validate_roles()

    def validate_roles(self) -> None:
        if not self.label_column:
            raise ConfigError("config key 'data.label_column' is required for training")
        roles = [*self.text_columns, *self.numeric_columns, *self.categorical_columns]
        dup = sorted({c for c in roles if roles.count(c) > 1})
        if dup:
            raise ConfigError(f"column '{dup[0]}' is given more than one role in "
                              f"data.text_columns/numeric_columns/categorical_columns")
        if self.label_column in roles:
            raise ConfigError(f"data.label_column '{self.label_column}' is also used as a feature column")
        for c in self.serialize_columns:
            if c not in self.numeric_columns and c not in self.categorical_columns:
                raise ConfigError(f"data.serialize_columns: '{c}' is not a numeric or categorical column")


@dataclass
class ModelConfig:
    encoder: str = setting("sentence-transformers/all-MiniLM-L6-v2", "hub id or local folder of a BERT-family "
                                                                     "encoder")
    pooling: Literal[POOLINGS] = setting(  # type: ignore[valid-type]
        "mean", "text vector of a chunk: masked mean of token states, [CLS], or the encoder's pooler")
    hidden_dim: int = setting(384, "fusion width", min=1)
    fusion: str = setting("cross_attn", "how text and tabular features meet (mmbert/models/registry.py)",
                          choices=fusion_names)
    num_heads: int = setting(4, "attention heads of the fusion (must divide hidden_dim)", min=1)
    dropout: float = setting(0.1, "dropout of the fusion and head", min=0, below=1)
    attention_dropout: Optional[float] = setting(
        None, "the encoder's attention-probability dropout; null keeps the pretrained config's (0.1 for MiniLM). "
              "With 0, SDPA runs its fused kernel when training on CPU (> 0: ~13% slower steps at 128 tokens; "
              "docs/PERFORMANCE.md)", min=0, below=1)
    freeze_word_embeddings: bool = setting(
        False, "keep the encoder's input word embeddings fixed: no gradient, all-reduce or AdamW update for them "
               "(+9% samples/s on 2 DDP CPU ranks; docs/PERFORMANCE.md)")
    cat_embedding_dim: int = setting(16, "embedding width of each categorical column", min=1)
    trust_remote_code: bool = setting(False, "allow custom code of the encoder/tokenizer")

    def validate(self) -> None:
        check_fields(self, "model.")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"config key 'model.num_heads' ({self.num_heads}) must divide model.hidden_dim "
                              f"({self.hidden_dim})")


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/default", "the run's folder (checkpoints, final/, best/, metrics.jsonl)")
    epochs: int = setting(1, "passes over the train split", min=1)
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps", min=1)
    batch_size: int = setting(16, "rows per step and rank", min=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", min=1)
    lr: float = setting(5e-5, "encoder learning rate", above=0)
    head_lr: Optional[float] = setting(1e-3, "fusion/head/tabular learning rate (null: lr)", above=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    schedule: Literal["linear", "cosine", "constant"] = setting("linear", "learning-rate schedule after warmup")
    warmup_ratio: float = setting(0.06, "warmup steps as a fraction of all steps", min=0, below=1)
    warmup_steps: Optional[int] = setting(None, "warmup steps (instead of warmup_ratio)", min=0)
    max_grad_norm: Optional[float] = setting(1.0, "gradient clipping norm (null: no clipping)", above=0)
    class_weights: Optional[list[float]] = setting(None, "cross-entropy weight of each class, in class order")
    loss: Literal["auto", "cross_entropy", "mse", "huber"] = setting(
        "auto", "auto: cross_entropy for classification, mse for regression (on the standardised target)")
    huber_delta: float = setting(1.0, "huber loss threshold, in standard deviations of the train target", above=0)
    eval_every: Optional[int] = setting(None, "evaluate every N steps (also at the end of each epoch)", min=1)
    eval_each_epoch: bool = setting(True, "evaluate at the end of each epoch")
    metric: Optional[str] = setting(None, "validation metric that selects best/ and stops early (null: roc_auc "
                                          "for classification, rmse for regression)")
    metric_mode: Optional[Literal["max", "min"]] = setting(
        None, "the metric's direction (mmbert/metrics.py TABLE), which an explicit value may only repeat")
    early_stopping_patience: Optional[int] = setting(None, "stop after N evaluations without improvement", min=1)
    select_best: bool = setting(True, "final/ holds the best evaluated weights")
    log_every: int = setting(10, "steps between log lines / metrics records", min=1)
    checkpoint_every: Optional[int] = setting(None, "steps between checkpoints", min=1)
    keep_checkpoints: int = setting(2, "checkpoints kept", min=1)
    resume: Optional[str] = setting(None, "'auto' (newest complete checkpoint in OUTPUT/checkpoints) or a "
                                          "checkpoint directory")
    resume_data_changed: Literal["refuse", "accept"] = setting(
        "refuse", "resume on data files whose bytes changed since the checkpoint: refuse, or accept (their rows "
                  "train under the run's fitted preprocessing)", flag="accept_changed_data", const="accept")
    overwrite: bool = setting(False, "replace a finished run in output_dir")
    seed: int = setting(42, "seed of initialisation, data order and dropout")
    seeds: Optional[list[int]] = setting(
        None, "train one ensemble member per seed into OUTPUT/seed_S and write OUTPUT/ensemble.json", metavar="S1,S2")
    bucket_by_length: bool = setting(True, "batch rows of similar length together")
    bucket_block: int = setting(64, "batches per length-sorted block", min=1)
    num_threads: Optional[int] = setting(None, "CPU threads per process (default: cores / local processes)", min=1)
    num_workers: Optional[int] = setting(
        None, "DataLoader processes collating the next batches (default: 2 on GPU, 0 on CPU)", min=0)
    eval_batch_size: Optional[int] = setting(None, "rows per evaluation step and rank (default: batch_size)", min=1)
    progress: bool = setting(True, "progress on rank 0: a bar on a terminal, else a plain line every log_every steps; also the token cache build's progress")
    max_time: Optional[str] = setting(None, "stop cleanly (with a checkpoint) after this long, e.g. 23h30m, 90m, "
                                            "3600s")
    deterministic: bool = setting(False, "torch deterministic algorithms")
    compile: bool = setting(False, "torch.compile each encoder layer (the first steps pay the compile)")
    report_to: list[str] = setting([], "experiment trackers that also get every metrics record: tensorboard, "
                                       "wandb, mlflow or none", choices=REPORT_TO)

    def validate(self) -> None:
        check_fields(self, "train.")
        if "none" in self.report_to and len(set(self.report_to)) > 1:
            raise ConfigError(f"config key 'train.report_to': 'none' cannot be combined with trackers, "
                              f"got {self.report_to}")
        validate_seeds(self)
        if self.resume not in (None, "auto") and not os.path.isdir(self.resume):
            raise ConfigError(f"config key 'train.resume': '{self.resume}' is neither 'auto' nor a checkpoint "
                              f"directory")
        if self.max_time is not None:
            parse_duration(self.max_time, "train.max_time")


@dataclass
class DistConfig:
    strategy: Optional[Literal[STRATEGIES]] = setting(  # type: ignore[valid-type]
        "auto", "auto: what `accelerate launch` names, else fsdp on several processes and none on one")
    wrap_policy: Optional[Literal["class", "size", "class+size", "none"]] = setting(None, "FSDP wrapping policy")
    wrap_classes: Optional[list[str]] = setting(None, "FSDP-wrapped classes (default: the encoder's "
                                                      "_no_split_modules)")
    min_params: Optional[int] = setting(None, "size policy: parameters per wrapped unit", min=1)
    sharding: Optional[Literal["auto", "full", "shard_grad_op", "hybrid"]] = setting(
        None, "FSDP sharding (default: accelerate's environment, or auto)")
    mixed_precision: Optional[Literal["auto", "fp32", "bf16", "fp16"]] = setting(
        None, "auto: bf16 on CUDA, fp32 on CPU (unless accelerate names one); fp16 scales the loss")
    activation_checkpointing: Optional[bool] = setting(
        None, "recompute each encoder layer in backward: less memory, same losses")
    cpu_offload: Optional[bool] = setting(None, "FSDP: keep parameters on the CPU")
    collectives: Optional[Literal["p2p", "native"]] = setting(
        None, "FSDP on gloo: point-to-point exchanges (default) or gloo's own collectives")
    tf32: bool = setting(True, "fp32 matmuls on CUDA in TF32 (tensor cores)")
    timeout_s: int = setting(1800, "collective timeout in seconds: how long ranks wait for each other (e.g. while rank 0 alone writes the model or the merged files)", min=1)

    def validate(self) -> None:
        check_fields(self, "dist.")


@register_root
@dataclass
class Config:
    data: DataConfig = setting(DataConfig)
    model: ModelConfig = setting(ModelConfig)
    train: TrainConfig = setting(TrainConfig)
    dist: DistConfig = setting(DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, roles: bool = True) -> None:
        """Every section's checks, then the rules across sections; never changes the config. roles=False
        leaves out the column-role rules (before column inference has filled the roles in)."""
        self.data.validate(roles)
        self.model.validate()
        self.train.validate()
        self.dist.validate()
        validate_task(self)
        if roles:
            self._validate_fusion_roles()

    def _validate_fusion_roles(self) -> None:
        from .models.registry import fusion_spec

        d, fusion = self.data, self.model.fusion
        if fusion_spec(fusion).text and not d.text_columns:
            raise ConfigError(f"config key 'data.text_columns' is empty but model.fusion is '{fusion}' (use tab_only)")
        if not fusion_spec(fusion).text and not (d.numeric_columns or d.categorical_columns):
            raise ConfigError(f"model.fusion is '{fusion}' but data.numeric_columns and data.categorical_columns "
                              f"are empty")


def parse_duration(text, key: str = "train.max_time") -> float:
    """Seconds of a duration: "23h30m", "90m", "3600s", "2h", "1d", or a plain number of seconds."""
    s = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", s)
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        seconds = float(s)
    elif parts and "".join(n + u for n, u in parts) == s:
        seconds = sum(float(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    else:
        raise ConfigError(f"config key '{key}': {text!r} is not a duration (e.g. 23h30m, 90m, 3600s, 2h)")
    if not seconds > 0:
        raise ConfigError(f"config key '{key}' must be a duration > 0, got {text!r}")
    return seconds


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
# data.* keys that say where and how the token cache is built, not what it holds: outside its key, free to
# change on resume
DATA_CACHE_KEYS = ("cache", "cache_dir", "num_proc")
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


def absolute_data_paths(raw: dict):
    """data.path and the split files resolve against the current directory now, so the saved config names the
    same files from anywhere (a hub: name or a URL stays as is)."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    split = data.get("split") if isinstance(data.get("split"), dict) else {}
    for section, key in [(data, "path"), *((split, k) for k in SPLIT_PATH_KEYS)]:
        v = section.get(key)
        if isinstance(v, str) and v and not v.startswith("hub:") and "://" not in v:
            section[key] = os.path.abspath(os.path.expanduser(v))


def _read_yaml(path: str) -> dict:
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
    return raw


def read_config(path: Optional[str] = None, overrides: Optional[list[tuple[str, Any]]] = None,
                base: Optional[dict] = None) -> tuple[Config, set[str]]:
    """The config of a YAML file (or `base`, a mapping of sections) with dotted-key overrides applied, every key
    checked but not yet the column-role rules; and the dotted keys given explicitly (file, base or overrides)."""
    raw: dict = renamed_keys(_read_yaml(path) if path else copy.deepcopy(base) if base else {})
    for key, value in overrides or []:
        if "." not in key:
            hint = suggestion(key, [lf.key for lf in leaves(Config)])
            raise ConfigError(f"--set {key}: use section.key=value (sections: data, model, train, dist){hint}")
        _set_path(raw, key, value)
    absolute_data_paths(raw)
    cfg = build(Config, raw)
    cfg.validate(roles=False)
    return cfg, set(flatten(raw))


def load_config(path: Optional[str] = None, overrides: Optional[list[tuple[str, Any]]] = None,
                base: Optional[dict] = None) -> Config:
    """The config of a YAML file (or `base`, a mapping of sections) with dotted-key overrides applied, validated."""
    cfg, _ = read_config(path, overrides, base)
    cfg.validate()
    return cfg


# keys that configs written by earlier versions use -> their names now (saved model directories stay readable)
RENAMED_KEYS = {("train", "progress_bar"): ("train", "progress")}


def renamed_keys(raw: dict) -> dict:
    """`raw` (a mapping of sections, changed in place) with the keys of RENAMED_KEYS under their names now."""
    for (section, old), (_, new) in RENAMED_KEYS.items():
        if isinstance(raw.get(section), dict) and old in raw[section]:
            raw[section].setdefault(new, raw[section].pop(old))
    return raw


def config_from_dict(raw: dict, check: bool = True) -> Config:
    """A Config from a mapping of sections; `check=False` types every key but skips cross-key validation."""
    cfg = build(Config, renamed_keys(copy.deepcopy(raw)))
    if check:
        cfg.validate()
    return cfg



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
