"""The Python API.

    import mmbert
    run = mmbert.train("configs/womens_clothing.yaml", output_dir="runs/api", max_steps=50)
    model = mmbert.load(run.model_dir)              # or an export folder: scored by onnxruntime
    model.predict(df)                               # labels in the training data's own values (regression:
                                                    # the predicted target, in its own units)
    model.predict_proba(df)                         # one column per class (classifiers only)

Loading reads JSON, YAML (safe_load), safetensors and ONNX only: no pickle, and no remote code unless the
caller passes trust_remote_code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import pandas as pd

from .errors import ArtifactError, ConfigError, DataError


class Predictor:
    """Scores raw rows (a pandas DataFrame holding the training columns, or the path of a data file or folder
    holding them; the label column may be absent)
    with the preprocessing and tokenizer the model was trained with."""

    def __init__(self, score: Callable[[dict], Any], pre, tokenizer, metadata: dict):
        self._score, self._pre, self._tokenizer = score, pre, tokenizer
        self.metadata = metadata

    @property
    def classes(self) -> list:
        """The label values in the model's class order, as in the training data (e.g. [0, 1] or ['neg', 'pos']);
        [] for a regression model."""
        return list(self._pre.classes)

    @property
    def task(self) -> str:
        """classification or regression."""
        return self._pre.task

    @property
    def preprocessor(self):
        """The fitted preprocessing the model was trained with (preprocessing.json)."""
        return self._pre

    @property
    def backend(self) -> str:
        return self.metadata["backend"]

    def scores(self, rows, batch_size: int = 32) -> np.ndarray:
        """The model's scores of the rows as a float32 array: (rows, classes) probabilities, or for a regression
        (rows, 1) predictions in the target's original units."""
        from .data.pipeline import build_dataset
        from .data.tokenize import pad_id
        from .serving import score_dataset

        df = self._rows(rows)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        k = self._pre.num_outputs
        if len(df) == 0:
            return np.zeros((0, k), np.float32)
        pre = self._pre
        if pre.id_column and pre.id_column not in df.columns:  # ids label outputs; scoring needs none
            pre = dataclasses.replace(pre, id_column=None)
        # positions 0..n-1 (preprocessing numbers rows by the index); the caller's index labels the output
        ds = build_dataset(pre, self._tokenizer, df.reset_index(drop=True), "<rows>", with_labels=False,
                           name="predict")
        return score_dataset(self._score, ds, pad_id(self._tokenizer), k, batch_size)

    def predict_proba(self, rows, batch_size: int = 32, as_pandas: bool = True):
        """Probabilities: a DataFrame with one column per class (`classes`) and the rows' index, or with
        as_pandas=False a float32 array of shape (rows, classes). Classifiers only."""
        if self.task == "regression":
            raise ConfigError(f"{self.metadata['path']} is a regression model: it has no class probabilities "
                              f"(predict() gives the predicted '{self._pre.label_column}')")
        df = self._rows(rows)
        probs = self.scores(df, batch_size)
        return pd.DataFrame(probs, index=df.index, columns=self.classes) if as_pandas else probs

    def predict(self, rows, batch_size: int = 32, as_pandas: bool = True):
        """The most probable class of each row, in the label's original values, or a regression's predicted
        target in its original units (a Series named after the label column, with the rows' index; an array
        with as_pandas=False)."""
        df = self._rows(rows)
        scores = self.scores(df, batch_size)
        if self.task == "regression":
            values = scores[:, 0]
        else:
            values = np.asarray(self.classes)[scores.argmax(1)]  # ints stay ints, strings strings
        if as_pandas:
            return pd.Series(values, index=df.index, name=self._pre.label_column)
        return values

    def _rows(self, rows) -> pd.DataFrame:
        """A table's rows as given, or read from a data file or folder (load_table: CSV/TSV/Parquet/JSONL,
        save_to_disk, hub:NAME) with the id column read as text, as evaluation reads it."""
        if not isinstance(rows, (str, os.PathLike)):
            return _frame(rows)
        from .data.io import HUB_PREFIX, load_table

        path = os.fspath(rows)
        if not (os.path.exists(path) or path.startswith(HUB_PREFIX)):
            raise DataError(f"rows to score must be a pandas DataFrame (or a list of dicts / a dict of columns) or "
                            f"the path of a data file or folder: {path[:80]!r} is neither")
        return _frame(load_table(path, [self._pre.id_column] if self._pre.id_column else []))

    def __repr__(self):
        m = self.metadata
        what = "task=regression" if self.task == "regression" else f"classes={self.classes}"
        return f"Predictor({m['path']!r}, backend={m['backend']}, fusion={m['fusion']}, {what})"


def _duplicate_columns(df: pd.DataFrame) -> list:
    """Column names that appear more than once, each once, in order."""
    return list(dict.fromkeys(df.columns[df.columns.duplicated()]))


def _frame(rows) -> pd.DataFrame:
    if isinstance(rows, (list, dict)):
        try:
            rows = pd.DataFrame(rows)
        except ValueError as e:  # e.g. a dict of scalars
            raise DataError(f"rows to score: {e} (one row as a dict: pass [row])") from None
    if not isinstance(rows, pd.DataFrame):
        raise DataError(f"rows to score must be a pandas DataFrame (or a list of dicts / a dict of columns), "
                        f"got {type(rows).__name__}")
    dup = _duplicate_columns(rows)
    if dup:  # df[name] would be a frame, not a column: which one is the model's input?
        shown = ", ".join(repr(c) for c in dup[:10]) + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
        several = len(dup) > 1
        raise DataError(f"rows to score: column name{'s' if several else ''} {shown} appear{'' if several else 's'} "
                        f"more than once: rename or drop the duplicates")
    return rows


def _metadata(path: str, backend: str, spec: dict, pre, extra: Optional[dict] = None) -> dict:
    return {"path": path, "backend": backend, "fusion": spec.get("fusion"), "encoder": spec.get("encoder"),
            "task": pre.task, "label_column": pre.label_column, "classes": list(pre.classes),
            "target_mean": pre.target_mean, "target_std": pre.target_std, "id_column": pre.id_column,
            "text_columns": list(pre.text_columns), "numeric_columns": list(pre.numeric_columns),
            "categorical_columns": list(pre.categorical_columns), "max_tokens": pre.max_tokens,
            "max_chunks": pre.max_chunks, **(extra or {})}


def _read_json(path: str) -> Optional[dict]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            v = json.load(f)
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def _load_export(path: str, num_threads: Optional[int]) -> Predictor:
    from .serving import OnnxScorer

    s = OnnxScorer(path, threads=num_threads)
    if s.task != s.preprocessor.task:
        raise ArtifactError(f"{s.path}: the graph's output '{s.output}' is a {s.task} model's but preprocessing.json "
                            f"beside it is a {s.preprocessor.task}'s")
    spec = _read_json(os.path.join(s.folder, "model_spec.json")) or {}
    exports = s.manifest.get("exports", {})  # keyed by the fp32 file; an int8 copy's report sits inside it
    export = exports.get(os.path.basename(s.path)) or next(iter(exports.values()), {})
    meta = _metadata(s.path, "onnxruntime", spec, s.preprocessor,
                     {"precision": "int8" if s.path.endswith(".int8.onnx") else "fp32", "export": export})
    return Predictor(s.scores, s.preprocessor, s.tokenizer, meta)


def _load_model_dir(path, trust_remote_code: bool, device: Optional[str]) -> Predictor:
    """One model directory, or several / an ensemble folder as one ensemble (mmbert/ensemble.py)."""
    import torch

    from .ensemble import open_models
    from .scoring import torch_scorer

    md = open_models(path, trust_remote_code)
    try:
        dev = torch.device(device or "cpu")
        md.model.to(dev)
    except (RuntimeError, AssertionError) as e:  # an unknown device string, CUDA missing from this torch ...
        raise ConfigError(f"device '{device}' cannot be used here: {str(e).splitlines()[0]}") from None
    members = md.members or [md.path]
    summaries = [_read_json(os.path.join(d, "train_summary.json")) for d in members]
    extra = {"device": str(dev), "train_summary": summaries[0]}
    if md.members:
        extra["ensemble"] = [{"dir": d, "fusion": m.spec.fusion, "train_summary": t}
                             for d, m, t in zip(members, md.model.members, summaries)]
    meta = _metadata(md.path if not md.members else members, "torch", md.spec.to_dict(), md.pre, extra)
    return Predictor(torch_scorer(md.model, dev), md.pre, md.tokenizer, meta)


def load(path, trust_remote_code: bool = False, device: Optional[str] = None,
         num_threads: Optional[int] = None) -> Predictor:
    """A Predictor for `path`: a trained model directory (RUN/final or RUN/best; a run's output directory
    means its final/), scored with PyTorch on `device` (default cpu); a list of them, or a folder with
    ensemble.json (train.py --seeds), as one ensemble averaging their probabilities; or an export
    (export.py's folder, or one of its .onnx files), scored with onnxruntime on `num_threads` threads."""
    from .ensemble import ENSEMBLE_FILE

    if isinstance(path, (list, tuple)):
        if not path:
            raise ArtifactError("mmbert.load: the list of model directories is empty: give one model directory "
                                "(RUN/final), an export folder, or several model directories as an ensemble")
        return _load_model_dir([os.fspath(p) for p in path], trust_remote_code, device)
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".onnx"):
        return _load_export(path, num_threads)
    if not os.path.isdir(path):
        raise ArtifactError(f"no model at {path}: give a trained model directory (RUN/final) or an export folder")
    if os.path.isfile(os.path.join(path, "model_spec.json")) and os.path.isfile(os.path.join(path, "model.safetensors")):
        return _load_model_dir(path, trust_remote_code, device)
    if os.path.isfile(os.path.join(path, "model.onnx")):
        return _load_export(path, num_threads)
    if os.path.isfile(os.path.join(path, ENSEMBLE_FILE)) or os.path.isfile(os.path.join(path, "final", "model_spec.json")):
        return _load_model_dir(path, trust_remote_code, device)  # ensemble.resolve_model_dirs: members / final/
    raise ArtifactError(f"{path} is neither a model directory (model_spec.json + model.safetensors), an export "
                        f"(model.onnx), an ensemble ({ENSEMBLE_FILE}) nor a finished run (final/)")


# ----------------------------------------------------------------------------- train / evaluate / export

@contextlib.contextmanager
def _process_state_kept():
    """What a run sets up in its process for itself (train.py's process ends with it) is put back when the call
    returns or raises: torch's thread count, deterministic-algorithms and TF32 settings, its global RNG, sys.excepthook
    (init_process_group wraps it, one more `[rank0]:` prefix per call), the handlers, levels and propagation of
    the loggers that existed (and of mmbert's), and the environment variables (MASTER_ADDR ...)."""
    import sys

    import torch

    threads, rng, hook, env = torch.get_num_threads(), torch.get_rng_state(), sys.excepthook, dict(os.environ)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    loggers = _logging_state()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # dist.tf32 sets them
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        sys.excepthook = hook
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
        for logger, (handlers, level, propagate, disabled) in loggers.items():
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled


def _logging_state() -> dict:
    import logging

    ours = [logging.getLogger(name) for name in ("mmbert", "mmbert.main")]
    others = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return {lg: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
            for lg in [logging.getLogger(), *ours, *others]}


def _data_path(data, what: str):
    """data= of train / evaluate: a path as given; a DataFrame or datasets.Dataset as the path of its rows
    written once as Parquet (without the index) in the frames cache."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return data
    if type(data).__module__.startswith("datasets.") and hasattr(data, "to_pandas"):  # a Dataset, not a dict
        data = data.to_pandas()
    if not isinstance(data, pd.DataFrame):
        raise ConfigError(f"{what}: data must be a file or folder path, a pandas DataFrame or a datasets.Dataset "
                          f"(a DatasetDict: save_to_disk it and give the folder), got {type(data).__name__}")
    return _frame_file(data, what)


def _frame_file(df: pd.DataFrame, what: str) -> str:
    """FRAMES/<sha256 of the Parquet bytes>.parquet beside the datasets cache: the same rows give the same file,
    so every rank of a launch names one file, and each writes it atomically (temporary file, then rename)."""
    import hashlib
    import io

    from .data.io import _cache_dir
    from .fsutil import mkstemp

    if len(df) == 0 or len(df.columns) == 0:
        raise DataError(f"{what}: the DataFrame has no {'rows' if len(df.columns) else 'columns'}")
    df = df.rename(columns=str)
    dup = _duplicate_columns(df)
    if dup:
        raise DataError(f"{what}: column {dup[0]!r} appears more than once in the DataFrame: rename or drop it")
    buf = io.BytesIO()
    try:
        df.to_parquet(buf, index=False)
    except Exception as e:  # pyarrow's conversion errors (mixed types in a column ...) come in several types
        why = "; ".join(str(a).splitlines()[0] for a in e.args) or type(e).__name__  # pyarrow: (cause, column)
        raise DataError(f"{what}: the DataFrame cannot be stored as Parquet: {why[:300]} (give each column one "
                        f"type, e.g. df[column].astype(str))") from None
    raw = buf.getvalue()
    folder = os.path.join(os.path.dirname(_cache_dir().rstrip(os.sep)), "frames")
    path = os.path.join(folder, hashlib.sha256(raw).hexdigest() + ".parquet")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except BaseException:  # a full disk, an interrupt: no stray temporary file
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


@dataclass
class TrainResult:
    output_dir: str
    model_dir: Optional[str]  # OUTPUT/final (OUTPUT with seeds=[...]: the ensemble); None when preempted (resume="auto")
    summary: dict  # final/train_summary.json: steps, best_step, best_metric, metric, seconds ... ({"members": [...]})
    metrics_file: str  # OUTPUT/metrics.jsonl: every logged step and evaluation


def load_train_config(path: Optional[str] = None, overrides: Optional[list] = None,
                      base: Optional[dict] = None):
    """load_config for a training run (train.py and mmbert.train): when the config names no role column, column
    inference (mmbert/data/infer.py) fills the roles in from the train split before the role rules run."""
    from .config import read_config
    from .data.infer import complete_config

    cfg, explicit = read_config(path, overrides, base)
    cfg = complete_config(cfg, explicit, frozenset(key for key, _ in overrides or []))
    cfg.validate()
    return cfg


def _set_keys(config) -> dict:
    """A Config as the mapping of sections a YAML file would hold: only what differs from the defaults, so a role
    list, id column or fusion left at its default is left to column inference as in a file that omits it."""
    from .config import Config, _set_path, flatten

    default = flatten(Config().to_dict())
    raw: dict = {}
    for key, value in flatten(config.to_dict()).items():
        if default.get(key) != value:
            _set_path(raw, key, value)
    return raw


def _config(config, options: dict, overrides: Optional[dict]):
    """The run's config: `config` (a YAML path, a packaged config's name, a dict of sections or a Config), then
    `overrides` (dotted keys, as --set), then `options` (the flags' Python names), as the command line orders them."""
    from .config import Config
    from .settings import by_name, unknown_keyword_message

    names, pairs = by_name(Config), list((overrides or {}).items())
    for name, value in options.items():
        if name not in names:
            raise ConfigError(unknown_keyword_message(name, Config, "mmbert.train")
                              + " (every config key is an option: docs/CONFIGURATION.md)")
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        pairs.append((names[name].key, names[name].python_value(value)))
    if isinstance(config, Config):  # as the config file it stands for: the keys it sets away from the defaults
        config = _set_keys(config)
    if isinstance(config, dict):
        return load_train_config(None, pairs, base=config)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"mmbert.train: config must be a YAML path, a packaged config name, a dict or a Config, "
                          f"got {type(config).__name__}")
    return load_train_config(os.fspath(config) if config else None, pairs)


def train(config: Union[str, dict, Any, None] = None, overrides: Optional[dict] = None, **options) -> TrainResult:
    """Train as train.py does (one process, or every rank of a torchrun / accelerate / srun launch).

    config: a YAML file, the name of a packaged config (e.g. "womens_clothing"), a dict of sections or a Config.
    options: every config key by its flag's Python name (docs/CONFIGURATION.md), e.g. output_dir="runs/x",
    max_steps=50, lr=1e-4, label="y", text_columns=["title", "body"], resume="auto", overwrite=True,
    cache=False; they win over overrides, dotted keys: {"train.lr": 1e-4, ...}.
    data: a file or folder, or a pandas DataFrame / datasets.Dataset; with label="COLUMN" and no config, the
    column roles are inferred from the train split (printed as a table)."""
    from .training.loop import train as run_training

    if "data" in options:
        options = {**options, "data": _data_path(options["data"], "mmbert.train")}
    cfg = _config(config, options, overrides)
    with _process_state_kept():
        final = run_training(cfg)
    out = cfg.train.output_dir
    summary = {}
    if final and cfg.train.seeds:  # an ensemble: OUTPUT holds ensemble.json and a run per seed
        from .ensemble import read_ensemble

        summary = {"members": [_read_json(os.path.join(d, "train_summary.json")) for d in read_ensemble(final)]}
    elif final:
        summary = _read_json(os.path.join(final, "train_summary.json")) or {}
    return TrainResult(out, final, summary, os.path.join(out, "metrics.jsonl"))


@dataclass
class EvalResult:
    output_dir: str
    predictions: str  # OUTPUT/predictions.tsv: every row once, in input order
    metrics: dict  # labelled data: what metrics.json holds (empty for a prediction run, and on ranks > 0)
    importance: Optional[dict] = None  # importance=True: what importance.json holds (None on ranks > 0)


def evaluate(model_dir=None, output_dir: Optional[str] = None, **options) -> EvalResult:
    """evaluate.py as a function: options are its flags by Python name (docs/CONFIGURATION.md: data=,
    split="test", indices=, onnx=, id_column=, batch_size=, max_eval_rows=, plots=False, progress=False,
    importance=True, importance_rows= ...). Returns the files, the metrics and (importance=True) the
    permutation importance."""
    from .evaluation.importance import IMPORTANCE_JSON
    from .evaluation.options import EvalOptions
    from .evaluation.run import PREDICTIONS
    from .evaluation.run import evaluate as run_evaluation
    from .settings import by_name, unknown_keyword_message

    if output_dir is None:
        raise ConfigError("mmbert.evaluate: output_dir is required (the prediction files and metrics go there)")
    unknown = [name for name in options if name not in by_name(EvalOptions)]
    if unknown:
        raise ConfigError(unknown_keyword_message(unknown[0], EvalOptions, "mmbert.evaluate"))
    if "data" in options:
        options = {**options, "data": _data_path(options["data"], "mmbert.evaluate")}
    opts = EvalOptions(model_dir=[] if model_dir is None else model_dir, output_dir=output_dir, **options)
    opts = opts.resolved("mmbert.evaluate")
    with _process_state_kept():
        metrics = run_evaluation(opts)
    importance = _read_json(os.path.join(opts.output_dir, IMPORTANCE_JSON)) if opts.importance and metrics else None
    return EvalResult(opts.output_dir, os.path.join(opts.output_dir, PREDICTIONS), metrics, importance)


# export.py's options by their flags' Python names (tolerance is export's atol)
EXPORT_OPTIONS = ("quantize", "opset", "exporter", "data", "rows", "tolerance", "int8_tolerance", "debug")


def _export_options(options: dict) -> dict:
    """export's keyword arguments from the flags' Python names, checked; None means the default."""
    from .settings import closest

    unknown = sorted(set(options) - set(EXPORT_OPTIONS))
    if unknown:
        near = closest(unknown[0], EXPORT_OPTIONS)
        raise ConfigError(f"export: unknown option '{unknown[0]}'" + (f": did you mean {near}?" if near else "")
                          + f" (options: {', '.join(sorted(EXPORT_OPTIONS))})")
    if options.get("int8_tolerance") is not None and not options["int8_tolerance"] >= 0:
        raise ConfigError(f"export: --int8-tolerance must be >= 0, got {options['int8_tolerance']:g}")
    out = {k: v for k, v in options.items() if v is not None}
    if "tolerance" in out:
        out["atol"] = out.pop("tolerance")
    return out


def export_onnx(model_dir, output_dir: str, **options) -> dict:
    """export.py as a function (not `export`: that name is the mmbert.export package): the export folder
    output_dir (a path ending in .onnx names the file); quantize="int8", opset=, exporter=, data=, rows=,
    tolerance=, int8_tolerance=. Returns the export report (files, exporter, opset, verification, int8 drift)."""
    from .export import onnx

    with _process_state_kept():
        return onnx.export_onnx(model_dir, output_dir, **_export_options(options))
