"""Command line of train.py: --config, --set section.key=value, and shortcut flags."""
from __future__ import annotations

import argparse

from .config import FUSIONS, STRATEGIES, Config, _parse_scalar, load_config
from .errors import ConfigError

# flag -> (config key, type)
SHORTCUTS = {
    "data": ("data.path", str),
    "output_dir": ("train.output_dir", str),
    "strategy": ("dist.strategy", str),
    "fusion": ("model.fusion", str),
    "encoder": ("model.encoder", str),
    "max_steps": ("train.max_steps", int),
    "epochs": ("train.epochs", int),
    "max_train_rows": ("data.max_train_rows", int),
    "max_eval_rows": ("data.max_eval_rows", int),
    "batch_size": ("train.batch_size", int),
    "max_tokens": ("data.max_tokens", int),
    "max_chunks": ("data.max_chunks", int),
    "log_every": ("train.log_every", int),
    "checkpoint_every": ("train.checkpoint_every", int),
    "eval_every": ("train.eval_every", int),
    "resume": ("train.resume", str),
    "seed": ("train.seed", int),
    "lr": ("train.lr", float),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise ConfigError(f"{self.prog}: {message}")


def build_train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Train a text + tabular cross-attention classifier.")
    p.add_argument("--config", help="YAML config file (sections: data, model, train, dist)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable); the value is parsed as YAML")
    p.add_argument("--data", help="data file (CSV/TSV/Parquet/JSONL) replacing data.path")
    p.add_argument("--output-dir")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--fusion", choices=FUSIONS)
    p.add_argument("--encoder", help="hub id or local folder of a BERT-family encoder")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train-rows", type=int, metavar="N", help="use the first N rows of the train split")
    p.add_argument("--max-eval-rows", type=int, metavar="N", help="use the first N rows of val/test")
    p.add_argument("--batch-size", type=int, help="per rank")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--max-chunks", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in OUTPUT/checkpoints) or a checkpoint dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_train_args(argv) -> tuple[Config, argparse.Namespace]:
    args = build_train_parser().parse_args(argv)
    overrides = []
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        overrides.append((key.strip(), _parse_scalar(value)))
    for name, (key, _) in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides.append((key, value))
    if args.overwrite:
        overrides.append(("train.overwrite", True))
    return load_config(args.config, overrides), args
