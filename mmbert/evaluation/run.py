"""evaluate.py: score a data file with a trained model directory on any number of processes.

Every rank loads the model directory (safetensors + JSON only) as a plain, replicated model: whatever
strategy trained it, inference needs no sharding (with --onnx, an onnxruntime session of an exported
model and the preprocessing shipped beside it take the model's place). Each rank scores its shard of the
length-sorted, padded order (same number of batches everywhere); the scores (class probabilities, or a
regression's prediction in original units) are all-gathered and the padding repeats dropped by row position,
so every input row counts exactly once.

Outputs (OUT = --output-dir):
    predictions.tsv           all rows once, in input order (rank 0): row, [id], [label], then prob_<class>
                              per class and pred (classification) or prediction (regression)
    test_result_rank{r}.tsv   several processes: rank r's own rows (no padding repeats), in input order
    metrics.json              labelled data only (rank 0)
    *.png                     classification: ROC / PR curves and confusion matrix (labelled data), probability
                              histogram; regression: predicted-vs-actual scatter and residual histogram
                              (labelled data), prediction histogram
    importance.json / .png    --importance (labelled data): permutation importance per column (importance.py)
"""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Callable, Optional

import numpy as np
import pandas as pd

from .. import fsutil
from ..data.dataset import TableDataset
from ..data.tokenize import pad_id
from ..distributed.env import DistEnv, cleanup, init_distributed
from ..distributed.gather import gather_objects
from ..distributed.precision import autocast, resolve_precision
from ..ensemble import open_models
from ..errors import ArtifactError, ConfigError, MMBertError
from ..metrics import per_class_report, summary_table, task_metrics
from ..scoring import Scorer, predict, torch_scorer
from ..serving import MANIFEST, OnnxScorer
from ..task import REGRESSION
from .importance import FILES as IMPORTANCE_FILES
from .importance import run_importance
from .options import EvalOptions
from .outputs import check_scores, label_column, score_columns, stage_tsv, write_json, write_tsv
from .plots import ALL as PLOT_FILES
from .plots import task_plots
from .rows import Selection, check_data_exists, scored_rows

log = logging.getLogger("mmbert")
main_log = logging.getLogger("mmbert.main")  # messages every rank would repeat: rank 0 only

PREDICTIONS = "predictions.tsv"
METRICS = "metrics.json"
RANK_FILE = "test_result_rank{}.tsv"


# ----------------------------------------------------------------------------- scorer (the pluggable part)

def load_torch_scorer(opts: EvalOptions, env: DistEnv):
    """(scorer, preprocessor, tokenizer) from the model directory: the consolidated safetensors weights
    in a plain model on this rank's device (an ensemble of them with several directories)."""
    md = open_models(opts.model_dirs, opts.trust_remote_code)
    md.model.to(env.device)
    precision = resolve_precision(opts.precision, env.device)
    return torch_scorer(md.model, env.device, lambda: autocast(precision, "none", env.device)), md.pre, md.tokenizer


# A scorer loader returns (batch -> scores callable, Preprocessor, tokenizer); run_evaluation takes it as
# argument. The scorer gets the host batch of `collate` and returns B x K scores (K = 1: regression).
ScorerLoader = Callable[[EvalOptions, DistEnv], "tuple[Scorer, object, object]"]


def load_onnx_scorer(opts: EvalOptions, env: DistEnv):
    """(scorer, preprocessor, tokenizer) from an export folder: onnxruntime scores, and the preprocessing
    and tokenizer shipped beside the ONNX file (the same ones the served model uses)."""
    import torch

    s = OnnxScorer(opts.onnx, threads=torch.get_num_threads())
    if os.path.realpath(opts.main_model_dir) != os.path.realpath(s.folder):
        check_exported_from(s, opts.main_model_dir)
    return s.scores, s.preprocessor, s.tokenizer


def check_exported_from(s: OnnxScorer, model_dir: str):
    """--onnx with another --model-dir: that folder's config chooses the rows (split, indices, data path), so it
    must be the model the graph was exported from (the manifest's built_from digests)."""
    from ..artifact import model_dir_digest

    built = [b["digest"] for e in s.manifest.get("exports", {}).values() for b in e.get("built_from", [])]
    if not built:
        fsutil.warn_unverified(s.folder, f"records no model folder it was exported from, so --model-dir {model_dir}")
    elif model_dir_digest(model_dir) not in built:
        raise ArtifactError(f"--model-dir {model_dir} is not the model {s.path} was exported from (its digest is not "
                            f"in {MANIFEST}'s built_from): its config would choose the rows to score; give the model "
                            f"folder it was exported from, or leave --model-dir out")


def default_scorer_loader(opts: EvalOptions) -> ScorerLoader:
    """PyTorch on the model directory, or onnxruntime with --onnx. Everything else (row selection,
    sharding, gathering, files, metrics, plots) is the same code for both."""
    return load_onnx_scorer if opts.onnx else load_torch_scorer


# ----------------------------------------------------------------------------- output files

def prediction_frame(ds: TableDataset, positions: np.ndarray, scores: np.ndarray, pre) -> pd.DataFrame:
    """One row per position: row (0-based row number in the data file), id, label (when known), then the
    score columns (score_columns)."""
    enc, id_column = ds.enc, pre.id_column
    cols: dict = {"row": enc.rows[positions]}
    if id_column and enc.ids is not None:
        ids = enc.ids.take(positions) if hasattr(enc.ids, "take") else [enc.ids[i] for i in positions]
        cols[id_column] = np.asarray([*ids, None], dtype=object)[:-1]
    if enc.labels is not None:
        cols["label"] = label_column(pre, enc.labels[positions])
    cols.update(score_columns(pre, scores))
    return pd.DataFrame(cols)


def agree(step: Callable[[], object]):
    """Run `step` on this rank and all-gather whether it worked on every rank: if one failed, all stop with
    its error, so rank 0 never writes the merged files while a rank's own part is missing."""
    error = None
    value = None
    try:
        value = step()
    except OSError as e:
        error = f"cannot write {e.filename or 'output'}: {e.strerror or e}"
    except MMBertError as e:
        error = str(e)
    errors = gather_objects(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        rank, msg = failed[0]
        raise ConfigError(msg if len(errors) == 1 else f"rank {rank}: {msg}")
    return value


def clear_outputs(out: str):
    """Remove what an earlier run left in OUT (e.g. rank files of a larger world size, or metrics.json
    before a prediction run), so the folder only describes this run."""
    stale = glob.glob(os.path.join(out, RANK_FILE.format("*"))) + [
        os.path.join(out, f) for f in (PREDICTIONS, METRICS, *PLOT_FILES, *IMPORTANCE_FILES)]
    for f in stale:
        if os.path.isfile(f):
            os.remove(f)


# ----------------------------------------------------------------------------- the run

def evaluate(opts: EvalOptions, scorer_loader: Optional[ScorerLoader] = None) -> dict:
    """evaluate.py: score the selected rows with `opts` (checked and expanded here unless they already are)."""
    opts = opts if opts.model_dirs else opts.resolved()  # resolving again would re-read every ensemble member
    env = init_distributed(opts.timeout_s, opts.num_threads)
    try:
        result = run_evaluation(opts, env, scorer_loader or default_scorer_loader(opts))
        # every rank done (rank 0 writes the merged files last) before any tears the group down: a rank that
        # destroys it while a peer still works in it can abort in gloo's threads ("terminate called ...")
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        return result
    finally:
        cleanup(env)


def prepare_output_dir(opts: EvalOptions) -> str:
    out = opts.output_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out}: {e.strerror}") from None
    if not opts.onnx:
        from ..artifact import require_model_dir

        for d in opts.model_dirs:
            require_model_dir(d)  # named before any data error, as load_artifact would
    return out


def run_evaluation(opts: EvalOptions, env: DistEnv, scorer_loader: ScorerLoader) -> dict:
    t0 = time.time()
    out = prepare_output_dir(opts)
    check_data_exists(opts.data)  # a bad data file is reported before seconds go into loading the model
    scorer, pre, tokenizer = scorer_loader(opts, env)
    ds, sel, labelled = scored_rows(opts, env, pre, tokenizer)
    if opts.importance and not labelled:
        raise ConfigError(f"--importance needs labelled rows: {sel.file} has no label column '{pre.label_column}'")
    if env.is_main:
        clear_outputs(out)  # before predict(): its all-gather orders this before any rank writes
        log.info("%s: %d rows (%s)%s | model %s | %d process%s on %s", sel.file, len(ds), sel.description,
                 "" if labelled else f" | no label column '{pre.label_column}': prediction run",
                 opts.model_name(), env.world_size, "es" if env.world_size > 1 else "", env.device)

    own, own_probs, probs = predict(None, ds, env.rank, env.world_size, env.device, opts.batch_size, pad_id(tokenizer),
                                    progress=env.is_main and opts.progress, scorer=scorer,
                                    num_classes=pre.num_outputs)
    check_scores(probs, ds, pre, opts.model_name())
    if env.world_size > 1:  # one process: predictions.tsv alone holds its rows (a rank file would repeat them)
        write_rank_file(out, env, ds, own, own_probs, pre)
    result = write_outputs(opts, env, sel, ds, probs, pre, labelled, t0) if env.is_main else {}
    if opts.importance:  # every rank scores: after the evaluation's files are written
        run_importance(opts, env, scorer, pre, tokenizer)
    return result


def write_rank_file(out: str, env: DistEnv, ds: TableDataset, own: np.ndarray, own_probs: np.ndarray, pre):
    """This rank's own rows in input order, renamed into place once every rank has staged its own."""
    order = np.argsort(own, kind="stable")
    rank_file = os.path.join(out, RANK_FILE.format(env.rank))
    staged = agree(lambda: stage_tsv(prediction_frame(ds, own[order], own_probs[order], pre), rank_file))
    os.replace(staged, rank_file)


def write_outputs(opts: EvalOptions, env: DistEnv, sel: Selection, ds: TableDataset, probs: np.ndarray,
                  pre, labelled: bool, t0: float) -> dict:
    """Rank 0: predictions.tsv, metrics.json (labelled data), the pictures and the summary on screen."""
    out = opts.output_dir
    write_tsv(prediction_frame(ds, np.arange(len(ds)), probs, pre), os.path.join(out, PREDICTIONS))
    result = write_metrics(opts, env, sel, ds, probs, pre, t0) if labelled else {}
    pictures = [] if not opts.plots else task_plots(out, probs, pre, ds.enc.labels if labelled else None,
                                                    result.get("confusion_matrix"))
    print(summary(sel, ds, probs, pre, result, env.world_size, time.time() - t0, out, pictures), flush=True)
    return result


def write_metrics(opts: EvalOptions, env: DistEnv, sel: Selection, ds: TableDataset, probs: np.ndarray,
                  pre, t0: float) -> dict:
    labels = ds.enc.labels
    result = task_metrics(labels, probs, pre)
    if pre.task != REGRESSION:
        result["per_class"] = per_class_report(labels, probs, pre.class_names)
    # what preprocessing counted (unseen categories, duplicate ids, cut texts, missing values ...)
    result["data_report"] = ds.enc.report
    dirs = opts.model_dirs
    result["run"] = {"model_dir": dirs[0] if len(dirs) == 1 else dirs, "onnx": opts.onnx, "data": sel.file,
                     "rows": sel.description, "world_size": env.world_size, "seconds": round(time.time() - t0, 2)}
    write_json(os.path.join(opts.output_dir, METRICS), result)
    return result


def summary(sel: Selection, ds: TableDataset, probs: np.ndarray, pre, metrics: dict,
            world: int, seconds: float, out: str, pictures: list[str]) -> str:
    """One screen: what was scored, the metrics (or the predicted class counts / prediction range), where the
    files are."""
    class_names = pre.class_names
    head = (f"== {'evaluation' if metrics else 'prediction'}: {len(ds)} rows of {sel.file} ({sel.description}), "
            f"{world} process{'es' if world > 1 else ''}, {seconds:.1f}s")
    lines = [head]
    if metrics:
        lines.append(summary_table(metrics))
        cm = metrics.get("confusion_matrix")
        if cm and len(class_names) <= 8:
            w = max(6, *(len(c) for c in class_names), *(len(str(v)) for r in cm for v in r)) + 1
            lines.append("confusion matrix (rows: true, columns: predicted)")
            lines.append(" " * w + "".join(f"{c:>{w}}" for c in class_names))
            lines += [f"{c:>{w}}" + "".join(f"{v:>{w}}" for v in row) for c, row in zip(class_names, cm)]
    elif pre.task == REGRESSION:
        p = probs[:, 0]
        lines.append(f"predicted {pre.label_column}: mean {p.mean():.4g}, std {p.std():.4g}, min {p.min():.4g}, "
                     f"max {p.max():.4g}")
    else:
        counts = np.bincount(probs.argmax(1), minlength=len(class_names)) if len(probs) else []
        lines.append("predicted classes: " + ", ".join(f"{c}={int(n)}" for c, n in zip(class_names, counts)))
    files = [PREDICTIONS] + ([RANK_FILE.format("{0.." + str(world - 1) + "}")] if world > 1 else [])
    if metrics:
        files.append(METRICS)
    files += [os.path.basename(p) for p in pictures]
    lines.append(f"outputs in {out}: " + ", ".join(files))
    return "\n".join(lines)
