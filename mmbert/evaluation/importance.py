"""evaluate.py --importance: permutation importance per configured column, and the modality view.

Each configured column (text, numeric, categorical, in preprocessing.json's order) is permuted as a whole
column of the raw rows and the rows are encoded and tokenized again, so a column that data.serialize_columns
also writes into the text moves in both places together. The drop of the model's primary metric (baseline
minus permuted, signed so that a positive drop means the column helps) is averaged over --importance-repeats
permutations. The modality view masks one side of the model: "text only" gives every row the tabular inputs
of a row whose values are all missing (numerics imputed as at training, categoricals unknown); "tabular only"
gives every row the empty text (the special tokens only, serialized values included).

Every scoring goes through mmbert.scoring.predict on every rank (each row once, merged on every rank), so
every rank computes the same numbers; the row subset and the permutations come from generators seeded by
--importance-seed alone, identical on every rank. Rank 0 writes importance.json, importance.png and the table.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..data.dataset import TableDataset
from ..data.preprocess import Encoded, Z_MAX
from ..data.tokenize import chunk_tokenize, pad_id
from ..metrics import DEFAULT_METRIC, VAL_LOSS, compute_metrics, compute_regression_metrics, metric_row
from ..models.registry import TABULAR, TEXT, fusion_names, sides_read
from ..scoring import predict
from ..task import CLASSIFICATION, REGRESSION
from .options import EvalOptions
from .outputs import check_scores, write_json
from .rows import select_rows

log = logging.getLogger("mmbert")
main_log = logging.getLogger("mmbert.main")  # rank 0 only

IMPORTANCE_JSON = "importance.json"
IMPORTANCE_PNG = "importance.png"
FILES = (IMPORTANCE_JSON, IMPORTANCE_PNG)
BOTH_SIDES = frozenset({TEXT, TABULAR})


# ----------------------------------------------------------------------------- the pure parts

def primary_metric(labels: np.ndarray, probs: np.ndarray, task: str = CLASSIFICATION) -> tuple[str, float, bool]:
    """(name, value, higher_is_better) of the model's primary metric, read from the metrics evaluation
    reports (mmbert/metrics.py): for a regression RMSE; else ROC-AUC (binary; macro one-vs-rest beyond two
    classes), or log loss where ROC-AUC is undefined (a class absent from the rows). The choice depends on the
    labels only, so the baseline and every permuted scoring use the same metric."""
    if task == REGRESSION:
        m = compute_regression_metrics(labels, np.asarray(probs)[:, 0])
    else:
        m = compute_metrics(labels, probs, [str(j) for j in range(np.asarray(probs).shape[1])])
    name = DEFAULT_METRIC[task] if m[DEFAULT_METRIC[task]] is not None else VAL_LOSS[task]
    return name, m[name], metric_row(name, task).higher_is_better


def drop(baseline: float, value: float, higher_is_better: bool) -> float:
    """How much worse `value` is than the baseline (positive: the change hurt the model)."""
    return baseline - value if higher_is_better else value - baseline


def subset_positions(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """The rows --importance-rows keeps: a seeded sample (in input order), the same on every rank."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 0]).choice(n, size=limit, replace=False))


def permutations(n: int, repeats: int, seed: int) -> list[np.ndarray]:
    """One permutation of the n rows per repeat, shared by every column of that repeat (the columns are
    compared on the same shuffles); drawn from the seed alone, so identical on every rank and every call."""
    return [np.random.default_rng([seed, 1, r]).permutation(n) for r in range(repeats)]


def permute_column(df: pd.DataFrame, column: str, perm: np.ndarray) -> pd.DataFrame:
    """A copy of `df` whose `column` holds the values of rows `perm` (dtype and row numbers kept)."""
    out = df.copy()
    out[column] = df[column].iloc[perm].set_axis(df.index)
    return out


def columns_of(pre, sides: frozenset[str] = BOTH_SIDES) -> list[tuple[str, str]]:
    """(column, kind) of every configured input column the model reads, in preprocessing.json's order: a text
    column when it reads text, a tabular one when it reads tabular columns or the column is serialized into
    a text it reads (`sides`: model_sides; permuting a column it never sees would only cost scorings)."""
    def reads(c, kind):
        return (TEXT if kind == "text" else TABULAR) in sides or (TEXT in sides and in_text(pre, c))

    cols = ([(c, "text") for c in pre.text_columns] + [(c, "numeric") for c in pre.numeric_columns]
            + [(c, "categorical") for c in pre.categorical_columns])
    return [(c, kind) for c, kind in cols if reads(c, kind)]


def encode(pre, tokenizer, df: pd.DataFrame, file: str, edit: Optional[Callable[[Encoded], None]] = None,
           tokens_of: Optional[TableDataset] = None) -> TableDataset:
    """The labelled dataset of `df`, `edit` applied to the encoding first; its texts tokenized again, or the
    tokens of `tokens_of` taken over (when the change cannot touch the texts). Unlike build_dataset this logs
    no data report: the permuted copies would repeat the scored rows' one."""
    enc = pre.transform(df, file, with_labels=True)
    if edit is not None:
        edit(enc)
    if tokens_of is not None:
        chunks, cut = tokens_of.chunks, tokens_of.truncated_texts
    else:
        chunks, cut = chunk_tokenize(tokenizer, enc.texts, pre.max_tokens, pre.max_chunks)
    enc.texts = []
    return TableDataset(enc, chunks, cut)


def in_text(pre, column: str) -> bool:
    """Whether the column's values are part of the text (a text column, or serialized into it)."""
    return column in pre.text_columns or column in pre.serialize_columns


def mask_text(enc: Encoded):
    enc.texts = [""] * len(enc)  # tokenized to [CLS] [SEP]


def mask_tabular(pre) -> Callable[[Encoded], None]:
    """Every numeric missing (imputed with the train median, as training imputes) and every category unknown."""
    imputed = np.asarray([np.clip((pre.numeric_stats[c]["median"] - pre.numeric_stats[c]["mean"])
                                  / pre.numeric_stats[c]["std"], -Z_MAX, Z_MAX) for c in pre.numeric_columns],
                         dtype=np.float32)

    def edit(enc: Encoded):
        enc.numeric[:] = imputed
        enc.missing[:] = 1.0
        enc.categorical[:] = 0
    return edit


def modality_masks(pre, sides: frozenset[str] = BOTH_SIDES) -> dict[str, tuple[str, Callable[[Encoded], None]]]:
    """view -> (side masked, edit); a view is left out when the side it masks has no columns or is not read by
    the model (`sides`: model_sides): it would be the baseline again."""
    views = {}
    if TABULAR in sides and (pre.numeric_columns or pre.categorical_columns):
        views["text_only"] = ("tabular", mask_tabular(pre))
    if TEXT in sides and pre.text_columns:
        views["tabular_only"] = ("text", mask_text)
    return views


def model_sides(args) -> frozenset[str]:
    """The sides (text, tabular) the scored model reads, told by its fusion (an ensemble: any member's) from
    model_spec.json, or for --onnx from the export manifest; both sides when the manifest names none."""
    from ..artifact import read_spec
    from ..serving import read_manifest

    if args.onnx:
        path = os.path.join(args.onnx, "model.onnx") if os.path.isdir(args.onnx) else args.onnx
        entry = read_manifest(os.path.dirname(os.path.abspath(path))).get("exports", {}).get(os.path.basename(path))
        entry = entry if isinstance(entry, dict) else {}
        members = (entry.get("ensemble") or {}).get("members") or [entry]
        fusions = [m.get("fusion") if isinstance(m, dict) else None for m in members]
    else:
        fusions = [read_spec(d).fusion for d in args.model_dirs]
    return sides_read(fusions) if set(fusions) <= set(fusion_names()) else BOTH_SIDES


def summarize(metric: str, higher: bool, baseline: float, drops: dict[str, list[float]],
              kinds: dict[str, str], serialized: list[str], modality: dict[str, tuple[str, float]]) -> dict:
    """importance.json's body: columns ordered by mean drop (rank 1 = most important; ties keep the
    configured order), std over the repeats (population std, as scikit-learn's permutation_importance)."""
    stats = [(c, float(np.mean(v)), float(np.std(v)), [float(x) for x in v]) for c, v in drops.items()]
    order = sorted(range(len(stats)), key=lambda i: -stats[i][1])
    columns = [{"column": stats[i][0], "kind": kinds[stats[i][0]], "serialized": stats[i][0] in serialized,
                "mean_drop": stats[i][1], "std": stats[i][2], "repeats": stats[i][3], "rank": r + 1}
               for r, i in enumerate(order)]
    views = {name: {"masked": side, "value": value, "drop": drop(baseline, value, higher)}
             for name, (side, value) in modality.items()}
    return {"metric": metric, "higher_is_better": higher, "baseline": baseline,
            "drop": "baseline minus permuted" if higher else "permuted minus baseline",
            "columns": columns, "modality": views}


# ----------------------------------------------------------------------------- the run

@dataclass
class Scoring:
    """Scores a dataset on every rank (mmbert.scoring.predict: each row once) and returns its metric."""
    batch_size: int
    source: str  # what scores the rows, for messages
    env: object
    scorer: Callable
    pre: object
    tokenizer: object
    file: str
    base: Optional[TableDataset] = None  # the unchanged rows' dataset, once scored: its tokens are reused

    def metric(self, df: pd.DataFrame, edit: Optional[Callable[[Encoded], None]] = None,
               same_text: bool = False) -> tuple[str, float, bool]:
        """The metric of `df` (`edit` applied); same_text: its texts are the baseline's (tokens reused)."""
        ds = encode(self.pre, self.tokenizer, df, self.file, edit, self.base if same_text else None)
        if self.base is None:
            self.base = ds
        _, _, probs = predict(None, ds, self.env.rank, self.env.world_size, self.env.device, self.batch_size,
                              pad_id(self.tokenizer), scorer=self.scorer, num_classes=self.pre.num_outputs)
        check_scores(probs, ds, self.pre, self.source)
        return primary_metric(ds.enc.labels, probs, self.pre.task)


def run_importance(opts: EvalOptions, env, scorer: Callable, pre, tokenizer) -> dict:
    """Every rank: the baseline, each column's permutations and the modality views, scored on the selected
    rows (a seeded subset with --importance-rows). Rank 0 writes importance.json / .png and prints the table."""
    t0 = time.time()
    sel = select_rows(opts)
    rows = subset_positions(len(sel.df), opts.importance_rows, opts.importance_seed)
    df = sel.df.iloc[rows]
    sides = model_sides(opts)
    cols, masks, repeats = columns_of(pre, sides), modality_masks(pre, sides), opts.importance_repeats
    scorings = 1 + len(cols) * repeats + len(masks)
    main_log.info("importance: %d scorings of %d rows%s (baseline + %d columns x %d repeats + %d modality views)",
                  scorings, len(df), "" if len(df) == len(sel.df) else f" (a seeded sample of {len(sel.df)})",
                  len(cols), repeats, len(masks))
    s = Scoring(opts.batch_size, opts.model_name(), env, scorer, pre, tokenizer, sel.file)
    t1 = time.time()
    metric, baseline, higher = s.metric(df)
    each = time.time() - t1
    main_log.info("importance: baseline %s %.4f (%.1fs; about %.0fs for the rest)", metric, baseline, each,
                  each * (scorings - 1))
    perms = permutations(len(df), repeats, opts.importance_seed)
    drops: dict[str, list[float]] = {}
    for c, _ in cols:
        drops[c] = [drop(baseline, s.metric(permute_column(df, c, p), same_text=not in_text(pre, c))[1], higher)
                    for p in perms]
        main_log.info("importance: %s: drop %.4f +- %.4f", c, np.mean(drops[c]), np.std(drops[c]))
    modality = {name: (side, s.metric(df, edit, same_text=side == "tabular")[1])
                for name, (side, edit) in masks.items()}
    result = summarize(metric, higher, baseline, drops, dict(cols), list(pre.serialize_columns), modality)
    result.update({"rows": int(len(df)), "rows_selected": int(len(sel.df)), "repeats": repeats,
                   "seed": opts.importance_seed, "scorings": scorings, "data": sel.file,
                   "selection": sel.description, "world_size": env.world_size,
                   "seconds": round(time.time() - t0, 2)})
    if env.is_main:
        write_importance(opts.output_dir, result, plot=opts.plots)
        print(importance_table(result), flush=True)
    return result


def write_importance(out: str, result: dict, plot: bool = True) -> list[str]:
    path = os.path.join(out, IMPORTANCE_JSON)
    write_json(path, result)
    if not plot:
        return [path]
    plot_importance(result, os.path.join(out, IMPORTANCE_PNG))
    return [path, os.path.join(out, IMPORTANCE_PNG)]


MODALITY_LABELS = {"text_only": "text only (tabular masked)", "tabular_only": "tabular only (text masked)"}


def importance_table(result: dict) -> str:
    m = result["metric"]
    lines = [f"== permutation importance: {m} {result['baseline']:.4f} on {result['rows']} rows, "
             f"{result['repeats']} repeat{'s' if result['repeats'] > 1 else ''}, {result['scorings']} scorings, "
             f"{result['seconds']:.1f}s (drop: {result['drop']})"]
    w = max([len("column"), *(len(c["column"]) for c in result["columns"])])
    lines.append(f"{'rank':>4}  {'column':<{w}}  {'kind':<12}  {'drop':>8}  {'std':>7}")
    for c in result["columns"]:
        kind = c["kind"] + ("*" if c["serialized"] else "")
        lines.append(f"{c['rank']:>4}  {c['column']:<{w}}  {kind:<12}  {c['mean_drop']:>8.4f}  {c['std']:>7.4f}")
    if any(c["serialized"] for c in result["columns"]):
        lines.append("* also written into the text (data.serialize_columns): permuted in both places")
    for name, v in result["modality"].items():
        lines.append(f"{MODALITY_LABELS[name]:<28}  {m} {v['value']:.4f}  drop {v['drop']:.4f}")
    return "\n".join(lines)


def plot_importance(result: dict, path: str):
    """Horizontal bars: each column's mean drop with its std as error bar (most important on top), and
    below them the modality view's drops in another colour."""
    from .plots import _figure, _save

    cols, views = result["columns"], list(result["modality"].items())
    labels = [c["column"] for c in cols] + [MODALITY_LABELS[n] for n, _ in views]
    fig = _figure(7, 1.5 + 0.35 * len(labels))
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    ax.barh(y[:len(cols)], [c["mean_drop"] for c in cols], xerr=[c["std"] for c in cols], color="tab:blue",
            capsize=3, label="column permuted (mean, std over repeats)")
    if views:
        ax.barh(y[len(cols):], [v["drop"] for _, v in views], color="tab:orange", label="one side masked")
    ax.set_yticks(y, labels=labels, fontsize="small")
    ax.axvline(0, color="grey", lw=1)
    ax.legend(fontsize="small", loc="lower right")
    ax.set(xlabel=f"drop in {result['metric']} ({result['drop']})",
           title=f"permutation importance\n{result['metric']} {result['baseline']:.4f} on {result['rows']} rows, "
                 f"{result['repeats']} repeats")
    _save(fig, path)
