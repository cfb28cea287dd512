"""The command line: `mmbert train | evaluate | export | predict` (also `python -m mmbert`), and the
parsers behind train.py, evaluate.py and export.py, which are thin wrappers of the same functions."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .config import FUSIONS, STRATEGIES, Config, _parse_scalar, load_config
from .errors import ConfigError, run_main

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
    "seeds": ("train.seeds", list),
    "lr": ("train.lr", float),
}
SPLITS = ("train", "val", "test")
IMPORTANCE_REPEATS, IMPORTANCE_SEED = 3, 0  # evaluate --importance's defaults


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        raise ConfigError(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------- train

def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Train a text + tabular cross-attention classifier.")
    p.add_argument("--config", help="YAML config file, or the name of a packaged config (womens_clothing)")
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
    p.add_argument("--accept-changed-data", action="store_true",
                   help="resume even though a data file changed since the checkpoint: its rows train under the run's "
                        "fitted preprocessing (train.resume_data_changed: accept)")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                   help="train one ensemble member per seed into OUTPUT/seed_S and write OUTPUT/ensemble.json "
                        "(evaluate.py / export.py --model-dir OUTPUT score their mean probability)")
    p.add_argument("--lr", type=float)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    p.add_argument("--no-cache", action="store_true", help="read and tokenize the data on every rank, bypassing "
                                                           "the token cache (data.cache: false)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 42,43,44; got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed, e.g. 42,43,44")
    return seeds


def parse_train_args(argv, prog: str = "train.py") -> tuple[Config, argparse.Namespace]:
    args = build_train_parser(prog).parse_args(argv)
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
    if args.no_cache:
        overrides.append(("data.cache", False))
    if args.accept_changed_data:
        overrides.append(("train.resume_data_changed", "accept"))
    return load_config(args.config, overrides), args


def train_command(argv, prog: str = "train.py"):
    from .training.loop import train

    cfg, _ = parse_train_args(argv, prog)
    train(cfg)


# ----------------------------------------------------------------------------- evaluate

def build_eval_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Evaluate (labelled data) or predict (unlabelled data) with a trained model "
                                       "directory, on one process or many.")
    p.add_argument("--model-dir", nargs="+", metavar="DIR",
                   help="a model directory written by train.py (RUN/final or RUN/best); several, or a folder "
                        "with ensemble.json (train.py --seeds), score their mean probability as one ensemble; "
                        "optional with --onnx (then the export folder is used)")
    p.add_argument("--onnx", metavar="FILE", help="score with onnxruntime through an exported model (export.py "
                                                 "output: model.onnx, model.int8.onnx or its folder) instead of PyTorch")
    p.add_argument("--data", help="data file or folder (CSV/TSV/Parquet/JSONL); default: data.path of MODEL_DIR/config.yaml")
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--split", choices=SPLITS,
                      help="score the rows of this training split, as recorded in MODEL_DIR/config.yaml "
                           "(index file, split file, or fractions + seed)")
    rows.add_argument("--indices", metavar="FILE", help="score these rows of --data (one 0-based row index per line), "
                                                        "in the order listed")
    p.add_argument("--id-column", help="column carried into the prediction files (default: the training config's id column)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass and rank (default 32)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="PyTorch scoring: autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-rows", type=int, metavar="N", help="score only the first N selected rows")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--no-cache", action="store_true", help="read and tokenize the rows on every rank instead of once "
                                                           "per node into the token cache")
    p.add_argument("--cache-dir", help="token cache folder (default: data.cache_dir's default, "
                                       "~/.cache/mmbert/tokenized)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--importance", action="store_true",
                   help="labelled data: also permutation importance per configured column and the text-only / "
                        "tabular-only view (importance.json, importance.png); costs 1 + columns x repeats + 2 "
                        "scorings of the rows")
    p.add_argument("--importance-repeats", type=int, metavar="R",
                   help="permutations per column (default 3): the spread over them is reported")
    p.add_argument("--importance-rows", type=int, metavar="N", help="use a seeded sample of N of the selected rows")
    p.add_argument("--importance-seed", type=int, help="seed of the permutations and the row sample (default 0)")
    p.add_argument("--num-threads", type=int, help="CPU threads per process (default: cores / local processes)")
    p.add_argument("--timeout-s", type=int, default=1800, help="collective timeout in seconds (default 1800)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the encoder/tokenizer")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_eval_args(argv, prog: str = "evaluate.py") -> argparse.Namespace:
    args = build_eval_parser(prog).parse_args(argv)
    for name in ("batch_size", "max_rows", "num_threads", "timeout_s", "importance_repeats", "importance_rows"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"{prog}: --{name.replace('_', '-')} must be >= 1, got {v}")
    check_importance_args(args, prog)
    if args.onnx and args.precision != "auto":
        raise ConfigError(f"{prog}: --precision applies to PyTorch scoring; an ONNX graph runs in the precision it "
                          f"was exported in (export.py --quantize int8 for a quantized copy)")
    if not args.model_dir and not args.onnx:
        raise ConfigError(f"{prog}: give --model-dir (a trained model) or --onnx (an exported one)")
    if not args.model_dir:  # the export folder holds config.yaml, preprocessing.json and tokenizer/ too
        args.model_dir = [args.onnx if os.path.isdir(args.onnx) else os.path.dirname(os.path.abspath(args.onnx))]
    set_model_dirs(args)
    return args


def set_model_dirs(args: argparse.Namespace):
    """args.model_dirs: every member (an ensemble folder, or several --model-dir, expanded); args.model_dir:
    the first, whose preprocessing.json and config.yaml (shared by the members) select and read the rows."""
    from .ensemble import resolve_model_dirs

    args.model_dirs = [args.model_dir[0]] if args.onnx else resolve_model_dirs(args.model_dir)
    args.model_dir = args.model_dirs[0]


def check_importance_args(args: argparse.Namespace, prog: str):
    """--importance-* only with --importance (never silently ignored); then their defaults."""
    given = [n for n in ("importance_repeats", "importance_rows", "importance_seed") if getattr(args, n) is not None]
    if given and not args.importance:
        raise ConfigError(f"{prog}: --{given[0].replace('_', '-')} needs --importance")
    if args.importance_repeats is None:
        args.importance_repeats = IMPORTANCE_REPEATS
    if args.importance_seed is None:
        args.importance_seed = IMPORTANCE_SEED


def evaluate_command(argv, prog: str = "evaluate.py"):
    from .evaluation.run import evaluate

    evaluate(parse_eval_args(argv, prog))


# ----------------------------------------------------------------------------- export

def build_export_parser(prog: str = "export.py") -> argparse.ArgumentParser:
    from .export.onnx import EXPORTERS, INT8_TOLERANCE

    p = _Parser(prog=prog, description="Export a consolidated model directory (RUN/final) to ONNX.")
    p.add_argument("--model-dir", required=True, nargs="+", metavar="DIR",
                   help="consolidated model directory, e.g. runs/NAME/final; several, or a folder with "
                        "ensemble.json (train.py --seeds), export one graph averaging their probabilities")
    p.add_argument("--output", required=True, help="the .onnx file to write (or a folder: FOLDER/model.onnx); "
                   "preprocessing.json, model_spec.json and tokenizer/ are written beside it. The folder must be "
                   "new, empty or an earlier export (which is replaced)")
    p.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 copy (NAME.int8.onnx) for CPU")
    p.add_argument("--int8-tolerance", type=float, default=INT8_TOLERANCE, metavar="DP",
                   help=f"refuse the int8 copy when its probabilities differ from fp32 by more than this on the "
                   f"verification rows (default {INT8_TOLERANCE:g})")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's default)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="auto: torch.export (dynamo), falling back to TorchScript if that fails or does not verify")
    p.add_argument("--data", help="rows to verify on (default: the run's val/test split from its config.yaml)")
    p.add_argument("--rows", type=int, default=48, help="how many rows to verify on (default 48)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |p_onnx - p_torch| allowed (default 1e-4)")
    p.add_argument("--report", help="also write the export report (JSON) to this file")
    p.add_argument("--debug", action="store_true", help="show tracebacks and exporter output")
    return p


def export_options(options: dict) -> dict:
    """export_onnx's keyword arguments from the flags' Python names (tolerance -> atol), checked."""
    known = {"quantize", "opset", "exporter", "data", "rows", "tolerance", "int8_tolerance", "debug"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"export: unknown option '{unknown[0]}' (options: {', '.join(sorted(known))})")
    if options.get("int8_tolerance") is not None and not options["int8_tolerance"] >= 0:
        raise ConfigError(f"export: --int8-tolerance must be >= 0, got {options['int8_tolerance']:g}")
    out = {k: v for k, v in options.items() if v is not None}
    if "tolerance" in out:
        out["atol"] = out.pop("tolerance")
    return out


def export_command(argv, prog: str = "export.py"):
    import json
    import logging

    from .export.onnx import export_onnx

    args = build_export_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = export_onnx(args.model_dir, args.output, **export_options(
        {k: getattr(args, k) for k in ("quantize", "opset", "exporter", "data", "rows", "tolerance",
                                       "int8_tolerance", "debug")}))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"wrote {', '.join(report['files'])} + preprocessing.json, model_spec.json, tokenizer/ in {report['folder']}")


# ----------------------------------------------------------------------------- predict

def build_predict_parser(prog: str = "mmbert predict") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Score a data file with a trained model directory (PyTorch) or an export "
                                       "folder (onnxruntime), in one process; write one row per input row.")
    p.add_argument("model", nargs="+", help="a model directory (RUN/final), a finished run (RUN), an export folder / "
                                            ".onnx, or an ensemble (a folder with ensemble.json, or several model "
                                            "directories)")
    p.add_argument("--data", required=True, help="data file or folder (CSV/TSV/Parquet/JSONL) with the training columns")
    p.add_argument("--output", required=True, help="predictions file (.tsv or .csv): id (when configured), "
                                                   "probability column(s) and pred, or a regression's prediction")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--device", help="PyTorch device for a model directory (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code of the encoder/tokenizer")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def predict_command(argv, prog: str = "mmbert predict"):
    import logging

    import pandas as pd

    from .api import load
    from .data.io import load_table
    from .evaluation.run import score_columns, write_tsv

    args = build_predict_parser(prog).parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"{prog}: --batch-size must be >= 1, got {args.batch_size}")
    if not args.output.endswith((".tsv", ".csv")):
        raise ConfigError(f"{prog}: --output {args.output}: the file name must end with .tsv or .csv")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{prog}: --output {args.output}: folder {folder} does not exist or is not writable")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model = load(args.model[0] if len(args.model) == 1 else args.model, trust_remote_code=args.trust_remote_code,
                 device=args.device)
    id_column = model.metadata["id_column"]
    df = load_table(args.data, [id_column] if id_column else [])
    scores = model.scores(df, args.batch_size)
    out = {"row": range(len(df))}
    if id_column and id_column in df.columns:
        out[id_column] = df[id_column].to_numpy()
    out.update(score_columns(model.preprocessor, scores))
    write_tsv(pd.DataFrame(out), args.output)
    print(f"wrote {len(df)} predictions of {' '.join(args.model)} ({model.backend}) to {args.output}")


# ----------------------------------------------------------------------------- mmbert COMMAND

COMMANDS = {"train": train_command, "evaluate": evaluate_command, "export": export_command, "predict": predict_command}


def main(argv: Optional[list[str]] = None):
    """`mmbert COMMAND ...`: the installed console script and `python -m mmbert`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and DataLoader forks
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import __version__

    if argv[:1] == ["--version"]:
        print(f"mmbert {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = (f"usage: mmbert {{{','.join(COMMANDS)}}} ... (mmbert {__version__})\n"
                 "  train     train a model (as train.py; under torchrun / accelerate launch / srun too)\n"
                 "  evaluate  metrics, prediction files and curves on labelled or unlabelled data (as evaluate.py)\n"
                 "  export    ONNX export verified with onnxruntime (as export.py)\n"
                 "  predict   score a data file in one process with a model directory or an export\n"
                 "`mmbert COMMAND --help` for a command's options.")
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return
        print(f"error: unknown command '{argv[0]}'\n{usage}" if argv else usage, file=sys.stderr)
        sys.exit(2)
    command = argv[0]
    run_main(lambda rest: COMMANDS[command](rest, f"mmbert {command}"))(argv[1:])
