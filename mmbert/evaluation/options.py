"""evaluate.py's options as one typed object: the flags of evaluate.py and the keywords of mmbert.evaluate are
generated from these fields (name -> --name-with-dashes; a bool defaulting True -> --no-NAME), and
`resolved()` checks them and expands the model directories. Torch-free: the command line imports it before
anything heavy."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError

SPLITS = ("train", "val", "test")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMPORTANCE_REPEATS, IMPORTANCE_SEED = 3, 0  # --importance's defaults
IMPORTANCE_OPTIONS = ("importance_repeats", "importance_rows", "importance_seed")
PATH_OPTIONS = ("output_dir", "onnx", "data", "indices", "cache_dir")


@dataclass
class EvalOptions:
    model_dir: list[str] = field(default_factory=list, metadata={
        "nargs": "+", "metavar": "DIR",
        "help": "a model directory written by train.py (RUN/final or RUN/best); several, or a folder with "
                "ensemble.json (train.py --seeds), score their mean probability as one ensemble; optional with "
                "--onnx (then the export folder is used)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "folder for the prediction files, metrics.json and the pictures (required)"})
    onnx: Optional[str] = field(default=None, metadata={
        "metavar": "FILE", "help": "score with onnxruntime through an exported model (export.py output: model.onnx, "
                                   "model.int8.onnx or its folder) instead of PyTorch"})
    data: Optional[str] = field(default=None, metadata={
        "help": "data file or folder (CSV/TSV/Parquet/JSONL); default: data.path of MODEL_DIR/config.yaml"})
    split: Optional[str] = field(default=None, metadata={
        "choices": SPLITS, "help": "score the rows of this training split, as recorded in MODEL_DIR/config.yaml "
                                   "(index file, split file, or fractions + seed)"})
    indices: Optional[str] = field(default=None, metadata={
        "metavar": "FILE", "help": "score these rows of --data (one 0-based row index per line), in the order listed"})
    id_column: Optional[str] = field(default=None, metadata={
        "help": "column carried into the prediction files (default: the training config's id column)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "rows per forward pass and rank (default 32)"})
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS, "help": "PyTorch scoring: autocast dtype (auto: bf16 on CUDA, fp32 on CPU)"})
    max_eval_rows: Optional[int] = field(default=None, metadata={
        "min": 1, "metavar": "N", "help": "score only the first N selected rows"})
    cache: bool = field(default=True, metadata={
        "help": "read and tokenize the rows once per node into the token cache (--no-cache: on every rank)"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "token cache folder (default: data.cache_dir's default, ~/.cache/mmbert/tokenized)"})
    plots: bool = field(default=True, metadata={"help": "write the PNG pictures (--no-plots: skip them)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress: none)"})
    importance: bool = field(default=False, metadata={
        "help": "labelled data: also permutation importance per configured column and the text-only / tabular-only "
                "view (importance.json, importance.png); costs 1 + columns x repeats + 2 scorings of the rows"})
    importance_repeats: Optional[int] = field(default=None, metadata={
        "min": 1, "metavar": "R", "help": f"permutations per column (default {IMPORTANCE_REPEATS}): the spread "
                                          f"over them is reported"})
    importance_rows: Optional[int] = field(default=None, metadata={
        "min": 1, "metavar": "N", "help": "use a seeded sample of N of the selected rows"})
    importance_seed: Optional[int] = field(default=None, metadata={
        "help": f"seed of the permutations and the row sample (default {IMPORTANCE_SEED})"})
    num_threads: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "CPU threads per process (default: cores / local processes)"})
    timeout_s: int = field(default=1800, metadata={"min": 1, "help": "collective timeout in seconds (default 1800, as train)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom code of the encoder/tokenizer"})
    debug: bool = field(default=False, metadata={"help": "show tracebacks"})
    # filled by resolved(), never given (init=False: no flag, no keyword): every member scored
    model_dirs: list[str] = field(default_factory=list, init=False, repr=False)

    @property
    def main_model_dir(self) -> str:
        """The first member: its config.yaml and preprocessing.json (shared by the members) select and read
        the rows."""
        if not self.model_dirs:
            raise ValueError("EvalOptions.resolved() first: the model directories are not expanded yet")
        return self.model_dirs[0]

    def model_name(self) -> str:
        """What scores the rows, for messages: the export, the model directory, or the ensemble's members."""
        if self.onnx or len(self.model_dirs) == 1:
            return self.onnx or self.model_dirs[0]
        return f"ensemble of {len(self.model_dirs)} ({', '.join(self.model_dirs)})"

    def resolved(self, prog: str = "evaluate.py") -> "EvalOptions":
        """A new, checked copy (this one is left as it is): paths as str, --importance's defaults filled in,
        model_dir defaulting to the export's folder with --onnx, and model_dirs expanded (an ensemble folder
        to its members, a finished run to its final/)."""
        opts = dataclasses.replace(self, **_paths(self))
        opts.check(prog)
        if opts.importance:
            opts.importance_repeats = IMPORTANCE_REPEATS if opts.importance_repeats is None else opts.importance_repeats
            opts.importance_seed = IMPORTANCE_SEED if opts.importance_seed is None else opts.importance_seed
        if not opts.model_dir:  # the export folder holds config.yaml, preprocessing.json and tokenizer/ too
            opts.model_dir = [opts.onnx if os.path.isdir(opts.onnx) else os.path.dirname(os.path.abspath(opts.onnx))]
        if opts.onnx:
            opts.model_dirs = [opts.model_dir[0]]
        else:
            from ..ensemble import resolve_model_dirs  # lazily: it imports torch

            opts.model_dirs = resolve_model_dirs(opts.model_dir)
        return opts

    def check(self, prog: str = "evaluate.py"):
        """The rules between the options, each a one-line ConfigError naming the flag."""
        if not self.output_dir:
            raise ConfigError(f"{prog}: --output-dir is required (the prediction files and metrics go there)")
        if self.split and self.indices:
            raise ConfigError(f"{prog}: argument --indices: not allowed with argument --split")
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), prog)
        given = [n for n in IMPORTANCE_OPTIONS if getattr(self, n) is not None]
        if given and not self.importance:  # never silently ignored
            raise ConfigError(f"{prog}: {_flag(given[0])} needs --importance")
        if self.onnx and self.precision != "auto":
            raise ConfigError(f"{prog}: --precision applies to PyTorch scoring; an ONNX graph runs in the precision "
                              f"it was exported in (export.py --quantize int8 for a quantized copy)")
        if not self.model_dir and not self.onnx:
            raise ConfigError(f"{prog}: give --model-dir (a trained model) or --onnx (an exported one)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _paths(opts: EvalOptions) -> dict:
    """model_dir as a list of str (one path may be given alone), the other paths as str (os.PathLike too)."""
    dirs = opts.model_dir
    dirs = [] if dirs is None else [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
    out = {"model_dir": [os.fspath(d) for d in dirs]}
    out.update({n: os.fspath(getattr(opts, n)) for n in PATH_OPTIONS if getattr(opts, n) is not None})
    return out


def _check_field(f: dataclasses.Field, value, prog: str):
    """The checks a field's metadata names: "choices", "min" (an integer >= min)."""
    if value is None:
        return
    choices, low = f.metadata.get("choices"), f.metadata.get("min")
    if choices and value not in choices:
        raise ConfigError(f"{prog}: argument {_flag(f.name)}: invalid choice: {value!r} "
                          f"(choose from {', '.join(map(repr, choices))})")
    if low is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{prog}: {_flag(f.name)} must be an integer, got {value!r}")
        if value < low:
            raise ConfigError(f"{prog}: {_flag(f.name)} must be >= {low}, got {value}")
