"""The command line: `mmbert train | evaluate | export | predict` (also `python -m mmbert`), and the
parsers behind train.py, evaluate.py and export.py, which are thin wrappers of the same functions. The train
and evaluate flags are generated from the settings' fields (mmbert/settings.py): one flag per config key /
evaluate option."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .config import Config, _parse_scalar
from .errors import ConfigError, run_main
from .settings import add_flags, given, unknown_flag_message


class _Parser(argparse.ArgumentParser):
    """One-line errors (exit 2, like every other user error); an unknown flag names the closest one, or the
    mmbert name of a Hugging Face Trainer argument, when the parser knows its settings class."""

    def __init__(self, *a, settings=None, **kw):
        super().__init__(*a, **kw)
        self.settings = settings

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")

    def parse_args(self, args=None, namespace=None):
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            flag = next((r for r in rest if r.startswith("-")), None)
            if flag and self.settings is not None:
                self.error(unknown_flag_message(flag, self.settings))
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return ns


# ----------------------------------------------------------------------------- train

def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, settings=Config, allow_abbrev=False,
                description="Train a text + tabular cross-attention classifier. Every config key is also a flag "
                            "(docs/CONFIGURATION.md); flags win over --set, which wins over --config.")
    p.add_argument("--config", help="YAML config file, or the name of a packaged config (womens_clothing)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable); the value is parsed as YAML")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_flags(p, Config)
    return p


def train_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    """--set pairs, then the given flags (later pairs win)."""
    overrides = []
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        overrides.append((key.strip(), _parse_scalar(value)))
    return overrides + list(given(args, Config).items())


def parse_train_args(argv, prog: str = "train.py") -> tuple[Config, argparse.Namespace]:
    """The run's config: --config, --set and the flags; column roles inferred when none is named."""
    from .api import load_train_config

    args = build_train_parser(prog).parse_args(argv)
    return load_train_config(args.config, train_overrides(args)), args


def train_command(argv, prog: str = "train.py"):
    from .training.loop import train

    cfg, _ = parse_train_args(argv, prog)
    train(cfg)


# ----------------------------------------------------------------------------- evaluate

def build_eval_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    from .evaluation.options import EvalOptions

    p = _Parser(prog=prog, settings=EvalOptions, allow_abbrev=False,
                description="Evaluate (labelled data) or predict (unlabelled data) with a trained model directory, "
                            "on one process or many.")
    add_flags(p, EvalOptions, label="option")
    return p


def parse_eval_args(argv, prog: str = "evaluate.py"):
    """evaluate.py's flags as checked EvalOptions (model directories expanded)."""
    from .evaluation.options import EvalOptions

    args = build_eval_parser(prog).parse_args(argv)
    return EvalOptions(**given(args, EvalOptions)).resolved(prog)


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
    p.add_argument("--output-dir", required=True, help="the export folder (FOLDER/model.onnx; a path ending in .onnx "
                   "names the file): preprocessing.json, model_spec.json and tokenizer/ are written beside it. The "
                   "folder must be new, empty or an earlier export (which is replaced)")
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


def export_command(argv, prog: str = "export.py"):
    import json
    import logging

    from .api import EXPORT_OPTIONS, export_onnx

    args = build_export_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = export_onnx(args.model_dir, args.output_dir, **{k: getattr(args, k) for k in EXPORT_OPTIONS})
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


# ----------------------------------------------------------------------------- docs/CONFIGURATION.md

def configuration_reference() -> str:
    """docs/CONFIGURATION.md: every config key and evaluate option, from their fields."""
    from .evaluation.options import EvalOptions
    from .settings import HF_NAMES, hints, reference_table

    parts = [
        "# Configuration reference",
        "",
        "Generated from the settings' declarations (mmbert/config.py, mmbert/evaluation/options.py) by "
        "`python -m mmbert.cli --reference > docs/CONFIGURATION.md`; a test keeps it equal to them.",
        "",
        "Every config key is a YAML key (`section: {key: value}`), a `train` flag, an `mmbert.train(...)` keyword "
        "(the flag's name with underscores, e.g. `max_eval_rows=`, `label=`) and a `--set SECTION.KEY=VALUE`. "
        "Lists are comma-separated on the command line (`--text-columns Title,Review`); `null` clears an optional "
        "value. A bool that defaults to true is switched off with `--no-NAME` (keyword `NAME=False`). The train "
        "command also takes `--config FILE|NAME`, `--set SECTION.KEY=VALUE` (repeatable; flags win over it, it wins "
        "over the file) and `--debug`. An unknown key, flag or keyword names the closest valid one.",
        "",
    ]
    parts += [reference_table(hints(Config)[section], section, f"{section}.") for section in hints(Config)]
    parts += ["## Hugging Face Trainer names", "", "What a `transformers.TrainingArguments` user may type, and the "
              "mmbert key the error message points to:", "", "| Trainer name | mmbert key |", "|---|---|"]
    parts += [f"| `{name}` | `{key}` |" for name, key in HF_NAMES.items()] + [""]
    parts += ["", reference_table(EvalOptions, "evaluate (`mmbert evaluate`, evaluate.py, mmbert.evaluate)",
                                  key_label="option")]
    return "\n".join(parts)


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


if __name__ == "__main__":  # python -m mmbert.cli --reference > docs/CONFIGURATION.md
    if sys.argv[1:] != ["--reference"]:
        sys.exit("usage: python -m mmbert.cli --reference")
    sys.stdout.write(configuration_reference())
