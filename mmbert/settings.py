"""Settings declared once. A dataclass field carries its type, default, help, checks and (where its name alone
would clash) its flag; from the fields come the command-line flags, the Python API's keyword names, the value
checks, the closest-name suggestions and the reference tables of docs/CONFIGURATION.md. Torch-free: used by the
run config (mmbert/config.py) and evaluate's options (mmbert/evaluation/options.py). docs/CONFIGURATION.md
is written from them by `python -m mmbert.cli --reference > docs/CONFIGURATION.md`."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import MISSING
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError

# Hugging Face Trainer argument names -> the mmbert config key holding the same setting
HF_NAMES = {
    "learning_rate": "train.lr", "logging_steps": "train.log_every",
    "per_device_train_batch_size": "train.batch_size", "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume", "num_train_epochs": "train.epochs", "eval_steps": "train.eval_every",
    "save_steps": "train.checkpoint_every", "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "seed": "train.seed", "max_grad_norm": "train.max_grad_norm",
    "lr_scheduler_type": "train.schedule", "metric_for_best_model": "train.metric",
    "greater_is_better": "train.metric_mode", "load_best_model_at_end": "train.select_best",
    "dataloader_num_workers": "train.num_workers", "torch_compile": "train.compile", "max_steps": "train.max_steps",
    "output_dir": "train.output_dir", "overwrite_output_dir": "train.overwrite",
    "disable_tqdm": "train.progress", "max_seq_length": "data.max_tokens", "model_name_or_path": "model.encoder",
    "fp16": "dist.mixed_precision", "bf16": "dist.mixed_precision",
    "gradient_checkpointing": "dist.activation_checkpointing", "ddp_timeout": "dist.timeout_s",
    "label_names": "data.label_column",
}


def setting(default: Any = MISSING, help: str = "", *, min=None, above=None, below=None, choices=None,
            flag: Optional[str] = None, metavar: Optional[str] = None, const: Any = None,
            note: Optional[str] = None):
    """A dataclass field with its description: help; checks min (>=), above (>), below (<, with min: [min, below)),
    choices (a tuple, or a function returning one, for each value or list item); flag: the flag's name when the
    field's own name would clash (also its Python keyword); const: the flag takes no value and sets this one."""
    meta = {k: v for k, v in dict(help=help, min=min, above=above, below=below, choices=choices, flag=flag,
                                  metavar=metavar, const=const, note=note).items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- types

@functools.lru_cache(maxsize=None)
def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def split_optional(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str, label: str = "config key"):
    """value as type tp, or a ConfigError naming `label 'key'` (numbers from strings, a scalar as a 1-item list)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return coerce(value, a, key, label)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{label} '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label} '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [coerce(v, item, f"{key}[{i}]", label) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{label} '{key}': expected a mapping, got {type(value).__name__}")
        return build(tp, value, key + ".", label)
    return _scalar(value, tp, key, label)


def _scalar(value: Any, tp, key: str, label: str):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and float(value).is_integer():
        return int(value)
    if tp is float and (number or isinstance(value, str)):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and (isinstance(value, str) or number):
        return str(value)
    expected = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp)
    if expected is None:
        raise ConfigError(f"{label} '{key}': unsupported type {type_name(tp)}")
    raise ConfigError(f"{label} '{key}': expected {expected}, got {value!r}")


def build(cls, raw: dict, prefix: str = "", label: str = "config key"):
    """An instance of dataclass `cls` from a mapping, every value typed; an unknown key names the closest one."""
    h = hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = prefix + unknown[0]
        hint = suggestion(key, [lf.key for lf in leaves(_ROOTS.get(cls, cls))])
        raise ConfigError(f"unknown {label} '{key}'{hint} (known keys in '{prefix.rstrip('.') or 'top level'}': "
                          f"{', '.join(sorted(names))})")
    return cls(**{k: coerce(v, h[k], prefix + k, label) for k, v in raw.items()})


_ROOTS: dict = {}  # a section's class -> the top-level class: an unknown key's suggestion looks at every section


def register_root(cls, root=None):
    """Class decorator of a top-level config: suggestions for its sections' unknown keys name full keys."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints(cls)[f.name]):
            _ROOTS[hints(cls)[f.name]] = root or cls
            register_root(hints(cls)[f.name], root or cls)
    return cls


# --------------------------------------------------------------------------- fields -> names

@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str  # dotted config key, e.g. data.split.seed (a flat options class: the field name)
    name: str  # the flag's stem and the Python keyword, e.g. split_seed
    tp: Any
    field: dataclasses.Field

    @property
    def meta(self):
        return self.field.metadata

    @property
    def default(self):
        f = self.field
        return f.default_factory() if f.default_factory is not MISSING else f.default

    @property
    def flag(self) -> str:
        """The flag as typed: --name, --no-name for a bool defaulting to true."""
        dashed = self.name.replace("_", "-")
        switched_off = self.tp is bool and self.default is True and "const" not in self.meta
        return f"--no-{dashed}" if switched_off else f"--{dashed}"

    def choices(self) -> Optional[tuple]:
        c = self.meta.get("choices")
        if callable(c):
            c = c()
        base = split_optional(self.tp)[0]
        if c is None and typing.get_origin(base) is Literal:
            c = typing.get_args(base)
        return tuple(c) if c is not None else None

    def python_value(self, value):
        """A Python keyword's value as the config value (a const flag's keyword takes True/False)."""
        if "const" in self.meta and isinstance(value, bool):
            return self.meta["const"] if value else self.default
        return value


@functools.lru_cache(maxsize=None)
def leaves(cls, prefix: str = "") -> tuple[Leaf, ...]:
    out = []
    h = hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(h[f.name]):
            out += leaves(h[f.name], f"{prefix}{f.name}.")
        else:
            out.append(Leaf(prefix + f.name, f.metadata.get("flag", f.name).replace("-", "_"), h[f.name], f))
    names = [lf.name for lf in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash and not prefix:  # a programming error: give one of them an explicit flag=
        raise RuntimeError(f"{cls.__name__}: several settings are named {clash[0]!r}; give them setting(flag=...)")
    return tuple(out)


def by_name(cls) -> dict[str, Leaf]:
    """Python keyword / flag stem -> setting."""
    return {lf.name: lf for lf in leaves(cls)}


def closest(name: str, candidates) -> Optional[str]:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def suggestion(key: str, known: list[str]) -> str:
    """For an unknown dotted key: ": mmbert calls it 'train.lr'" for a Hugging Face Trainer name, ": did you
    mean 'train.batch_size'?" for a near miss (or the same name in another section), else ""."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    match = closest(key, same_leaf)
    if not match and HF_NAMES.get(leaf) in known:
        return f": mmbert calls it '{HF_NAMES[leaf]}'"
    match = match or (same_leaf[0] if same_leaf else closest(key, known))
    return f": did you mean '{match}'?" if match else ""


def name_hint(stem: str, cls, render, keyword: bool = False) -> str:
    """For an unknown flag or keyword (stem: its name with underscores): ": mmbert calls it --lr" for a Hugging
    Face Trainer name, ": did you mean --batch-size?" for a near miss, else ""; render(leaf) writes a setting
    as the caller's users type it."""
    stems, keys = by_name(cls), {lf.key: lf for lf in leaves(cls)}
    hf = HF_NAMES.get(stem)
    if hf in keys or hf in stems:
        return f": mmbert calls it {render(keys.get(hf) or stems[hf])}"
    if keyword and stem.startswith("no_") and stems.get(stem[3:]) and stems[stem[3:]].tp is bool:
        return f": use {stem[3:]}=False"
    match = closest(stem, stems)
    return f": did you mean {render(stems[match])}?" if match else ""


def unknown_flag_message(flag: str, cls) -> str:
    """'unknown flag --learning-rate: mmbert calls it --lr', '... --bach-size: did you mean --batch-size?'."""
    flag = flag.split("=", 1)[0]
    return f"unknown flag {flag}" + name_hint(flag.lstrip("-").replace("-", "_"), cls, lambda lf: lf.flag)


def unknown_keyword_message(name: str, cls, what: str) -> str:
    """"mmbert.train: unknown option 'learning_rate': mmbert calls it lr"."""
    return f"{what}: unknown option '{name}'" + name_hint(name, cls, lambda lf: lf.name, keyword=True)


# --------------------------------------------------------------------------- checks

def check_fields(obj, prefix: str = "", label: str = "config key") -> None:
    """Each field's declared checks (choices, min / above / below); nested sections check themselves."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None or dataclasses.is_dataclass(value):
            continue
        key = prefix + f.name
        choices = Leaf(key, f.name, hints(type(obj))[f.name], f).choices()
        if choices is not None:
            for v in value if isinstance(value, list) else [value]:
                if v not in choices:
                    raise ConfigError(f"{label} '{key}': {v!r} is not one of {', '.join(map(str, choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_bounds(value, meta, f"{label} '{key}'", split_optional(hints(type(obj))[f.name])[1])


def _check_bounds(v, meta, what: str, optional: bool):
    lo, gt, below = meta.get("min"), meta.get("above"), meta.get("below")
    when = " when set" if optional else ""
    note = f" ({meta['note']})" if meta.get("note") else ""
    if lo is not None and below is not None and not lo <= v < below:
        raise ConfigError(f"{what} must be in [{lo}, {below}){when}, got {v}")
    if lo is not None and not v >= lo:
        raise ConfigError(f"{what} must be >= {lo}{note}{when}, got {v}")
    if gt is not None and not v > gt:
        raise ConfigError(f"{what} must be > {gt}{when}, got {v}")


# --------------------------------------------------------------------------- flags

def _flag_text(text: str, tp):
    """A flag's text as a config value: lists comma-separated; strings as typed; numbers, booleans and null as
    YAML reads them."""
    base, optional = split_optional(tp)
    if optional and base is not str and text.strip() == "null":
        return None
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        return [_flag_text(t.strip(), item) for t in text.split(",") if t.strip()]
    if base is str or typing.get_origin(base) is Literal:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_PLURAL = {int: "integers", float: "numbers", str: "names"}


def _flag_type(leaf: Leaf, label: str):
    def parse(text: str):
        try:
            return coerce(_flag_text(text, leaf.tp), leaf.tp, leaf.key, label)
        except ConfigError as e:
            base = split_optional(leaf.tp)[0]
            if base in (int, float):
                raise ValueError(text) from None  # argparse's own "invalid int value: 'two'"
            if typing.get_origin(base) is list:
                item = _PLURAL.get(typing.get_args(base)[0], "values")
                raise argparse.ArgumentTypeError(f"expected comma-separated {item}, got {text!r} ({e})") from None
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = type_name(leaf.tp)
    return parse


def flag_help(leaf: Leaf) -> str:
    text = leaf.meta.get("help", "").replace("%", "%%")  # argparse formats help with %
    if leaf.tp is bool and "const" not in leaf.meta:
        return text
    default = leaf.default
    shown = "" if default in (None, [], "") or "default" in text else f" (default {_show(default)})"
    return f"{text}{shown}"


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _metavar(name: str, base) -> str:
    if typing.get_origin(base) is list:
        return "A,B"
    return {int: "N", float: "X"}.get(base, name.upper())


def add_flags(parser: argparse.ArgumentParser, cls, label: str = "config key"):
    """One flag per setting of `cls` (a section's in a help group of its own). A flag left out is absent from
    the parsed namespace; a given one is stored under its dotted key (vars(args)[key])."""
    groups: dict = {}
    for leaf in leaves(cls):
        section = leaf.key.split(".")[0] if "." in leaf.key else None
        if section not in groups:
            groups[section] = parser.add_argument_group(f"config section '{section}'") if section else parser
        group = groups[section]
        kw = dict(dest=leaf.key, default=argparse.SUPPRESS, help=flag_help(leaf))
        base, optional = split_optional(leaf.tp)
        if "const" in leaf.meta:
            group.add_argument(leaf.flag, action="store_const", const=leaf.meta["const"], **kw)
        elif base is bool and not optional:
            group.add_argument(leaf.flag, action="store_const", const=not leaf.default, **kw)
        elif base is bool:
            group.add_argument(leaf.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            choices = leaf.choices()
            metavar = leaf.meta.get("metavar") or ("{" + ",".join(map(str, choices)) + "}" if choices else
                                                   _metavar(leaf.name, base))
            if leaf.meta.get("nargs"):
                kw["nargs"] = leaf.meta["nargs"]
                item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else base
                leaf = dataclasses.replace(leaf, tp=item_type)
            group.add_argument(leaf.flag, type=_flag_type(leaf, label), metavar=metavar, **kw)


def given(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The flags given on the command line, by dotted key."""
    ns = vars(args)
    return {lf.key: ns[lf.key] for lf in leaves(cls) if lf.key in ns}


# --------------------------------------------------------------------------- the reference

def reference_table(cls, title: str, prefix: str = "", key_label: str = "key") -> str:
    rows = [f"## {title}", "", f"| {key_label} | flag | type | default | help |", "|---|---|---|---|---|"]
    for lf in leaves(cls):
        choices = lf.choices()
        tp = " \\| ".join(map(str, choices)) if choices else type_name(lf.tp).replace("|", "\\|")
        default = "" if lf.default is None else "`[]`" if lf.default == [] else f"`{_show(lf.default)}`"
        help_ = lf.meta.get("help", "").replace("|", "\\|")
        rows.append(f"| `{prefix}{lf.key}` | `{lf.flag}` | {tp} | {default} | {help_} |")
    return "\n".join(rows) + "\n"
