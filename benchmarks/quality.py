#!/usr/bin/env python
"""Quality on the standard split (data/splits) of the Women's Clothing reviews, reported the way the
published results are, plus the fusion ablation and a tf-idf + one-hot logistic-regression control.

    python benchmarks/quality.py --run runs/womens_clothing          # score a trained run (RUN/final)
    python benchmarks/quality.py --train                               # train the default config, then score it
    python benchmarks/quality.py --ablation --max-steps 400            # every fusion, same budget each
    python benchmarks/quality.py --train --members 42,43,44            # train.py --seeds: members + their ensemble
    python benchmarks/quality.py --run runs/quality/ensemble           # an ensemble folder: each member + the ensemble
    python benchmarks/quality.py --regression                          # regression baselines only (seconds)
    python benchmarks/quality.py --regression --run runs/womens_clothing_regression   # + a trained run

Per model, on the test split (2,349 rows):
    best_threshold_f1   positive-class F1 at the threshold that maximises it *on the test set* (as published)
    val_threshold_f1    F1 at the threshold chosen on the val split (what a deployment could do)
    argmax_f1           F1 of the argmax prediction (threshold 0.5)
    roc_auc, pr_auc, mcc, accuracy, log_loss
Scoring goes through evaluate.py (the same code users run), on the val and test splits recorded in the
run's config.yaml. Writes JSON (default benchmarks/results/quality.json or ablation.json).

--regression (config default configs/womens_clothing_regression.yaml): RMSE, MAE, R^2 and Spearman on the test
split of a trained run (--run / --train) and of two baselines: the train mean, and tf-idf + one-hot +
standardised numerics -> Ridge with alpha chosen on val (default output benchmarks/results/regression.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Published on the same test split (bert-base-uncased, 110M parameters; shared/data/README.md)
PUBLISHED = [
    {"model": "published: bert-base text only", "best_threshold_f1": 0.957, "roc_auc": 0.969, "pr_auc": 0.992},
    {"model": "published: bert-base best fusion (weighted feature sum)", "best_threshold_f1": 0.962,
     "roc_auc": 0.977, "pr_auc": 0.994},
    {"model": "published: bert-base all columns as text", "best_threshold_f1": 0.968, "roc_auc": 0.981,
     "pr_auc": 0.995},
]

# ablation arms: fusion + whether tabular columns are also serialised into the text
SERIAL_ALL = "[Rating, Age, Positive Feedback Count, Division Name, Department Name, Class Name]"
ARMS = {
    "text_only": ["model.fusion=text_only", "data.serialize_columns=[]"],
    "tab_only": ["model.fusion=tab_only", "data.serialize_columns=[]"],
    "concat": ["model.fusion=concat", "data.serialize_columns=[]"],
    "gated": ["model.fusion=gated", "data.serialize_columns=[]"],
    "cross_attn": ["model.fusion=cross_attn", "data.serialize_columns=[]"],
    "cross_attn_tokens": ["model.fusion=cross_attn_tokens", "data.serialize_columns=[]"],
    "text_only+all_serialised": ["model.fusion=text_only", f"data.serialize_columns={SERIAL_ALL}"],
    "text_only+rating_serialised": ["model.fusion=text_only", "data.serialize_columns=[Rating]"],
    "cross_attn+rating_serialised": ["model.fusion=cross_attn", "data.serialize_columns=[Rating]"],
    "cross_attn_tokens+rating_serialised": ["model.fusion=cross_attn_tokens", "data.serialize_columns=[Rating]"],
}


def f1_at(labels: np.ndarray, p: np.ndarray, thr: float) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, (p >= thr).astype(int), zero_division=0))


def test_metrics(labels_val, p_val, labels_test, p_test) -> dict:
    """The report row for one model from its val and test probabilities of the positive class."""
    from sklearn import metrics as M

    from mmbert.metrics import best_threshold_f1

    best_f1, best_thr = best_threshold_f1(labels_test, p_test)
    _, val_thr = best_threshold_f1(labels_val, p_val)
    return {"best_threshold_f1": best_f1, "best_threshold": best_thr,
            "val_threshold_f1": f1_at(labels_test, p_test, val_thr), "val_threshold": val_thr,
            "argmax_f1": f1_at(labels_test, p_test, 0.5),
            "roc_auc": float(M.roc_auc_score(labels_test, p_test)),
            "pr_auc": float(M.average_precision_score(labels_test, p_test)),
            "mcc": float(M.matthews_corrcoef(labels_test, (p_test >= 0.5).astype(int))),
            "accuracy": float(M.accuracy_score(labels_test, (p_test >= 0.5).astype(int))),
            "log_loss": float(M.log_loss(labels_test, np.clip(p_test, 1e-7, 1 - 1e-7), labels=[0, 1]))}


def score_run(model_dir: str, out: str, nproc: int, plots: bool = False) -> dict:
    """evaluate.py on the run's val and test splits -> test_metrics."""
    import pandas as pd

    probs = {}
    for split in ("val", "test"):
        d = os.path.join(out, f"eval_{split}")
        args = ["--model-dir", model_dir, "--split", split, "--output-dir", d, "--no-progress"]
        if not (plots and split == "test"):
            args.append("--no-plots")
        common.run_checked(common.script_cmd(nproc, "evaluate.py", args), f"evaluate.py on {model_dir} --split {split}")
        with open(os.path.join(d, "metrics.json")) as f:
            classes = json.load(f)["classes"]
        if len(classes) != 2:
            raise SystemExit(f"{model_dir}: quality.py reports binary metrics; the model has classes {classes}")
        df = pd.read_csv(os.path.join(d, "predictions.tsv"), sep="\t", dtype={"label": str})
        probs[split] = ((df["label"] == str(classes[1])).to_numpy().astype(int), df[f"prob_{classes[1]}"].to_numpy())
    return test_metrics(*probs["val"], *probs["test"])


def score_trained(name: str, model_dir: str, nproc: int, plots: bool = True) -> dict:
    row = score_run(model_dir, name, nproc, plots=plots)
    with open(os.path.join(model_dir, "train_summary.json")) as f:
        row.update(model=f"mmbert {name}", train=json.load(f))
    return row


def score_ensemble(folder: str, nproc: int) -> list[dict]:
    """A row per member (its final/) and one for the ensemble (evaluate.py --model-dir FOLDER: the mean of the
    members' probabilities), with the members' summed training time."""
    with open(os.path.join(folder, "ensemble.json")) as f:
        members = json.load(f)["members"]
    rows = []
    for m in members:
        model_dir = os.path.join(folder, m["dir"])
        rows.append(score_trained(os.path.dirname(model_dir), model_dir, nproc, plots=False))
        print(f"[{common.now()}] member {m['dir']}: " + " ".join(f"{c}={rows[-1][c]:.4f}" for c in COLS), flush=True)
    row = score_run(folder, os.path.join(folder, "eval_ensemble"), nproc, plots=True)
    row.update(model=f"mmbert ensemble of {len(members)} ({folder})", seeds=[m.get("seed") for m in members],
               train_seconds_total=round(sum(r["train"]["seconds"] for r in rows)))
    return [*rows, row]


def train_run(out: str, config: str, sets: list[str], nproc: int, extra: list[str]) -> float:
    args = ["--config", config, "--output-dir", out, "--overwrite", *extra]
    for kv in ["train.progress=false", *sets]:
        args += ["--set", kv]
    cmd = common.script_cmd(nproc, "train.py", args)
    t0 = time.time()
    common.run_checked(cmd, f"train.py ({' '.join(cmd)})")
    return time.time() - t0


def linear_features(config: str):
    """(data config, splits, X_train, X_val, X_test): tf-idf (word 1-2 grams) of the text columns + one-hot
    categoricals + standardised numerics (train medians for missing values), fitted on train. The same split
    and columns as the config."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from mmbert.config import load_config
    from mmbert.data.pipeline import load_splits

    dc = load_config(config, []).data
    splits = load_splits(dc)

    def text(df):
        return df[dc.text_columns].fillna("").astype(str).agg(" . ".join, axis=1).tolist()

    tr = splits["train"].df
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    onehot = OneHotEncoder(handle_unknown="ignore")
    scaler = StandardScaler()
    med = tr[dc.numeric_columns].median()

    def features(df, fit=False):
        num = df[dc.numeric_columns].astype(float).fillna(med).to_numpy()
        cat = df[dc.categorical_columns].fillna("<missing>").astype(str).to_numpy()
        if fit:
            return sp.hstack([tfidf.fit_transform(text(df)), onehot.fit_transform(cat),
                              sp.csr_matrix(scaler.fit_transform(num))]).tocsr()
        return sp.hstack([tfidf.transform(text(df)), onehot.transform(cat),
                          sp.csr_matrix(scaler.transform(num))]).tocsr()

    return dc, splits, features(tr, fit=True), features(splits["val"].df), features(splits["test"].df)


def tfidf_control(config: str, seed: int = 0) -> dict:
    """linear_features -> logistic regression, C chosen on val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    t0 = time.time()
    dc, splits, Xtr, Xva, Xte = linear_features(config)

    def labels(df):
        return df[dc.label_column].astype(int).to_numpy()

    ytr, yva, yte = labels(splits["train"].df), labels(splits["val"].df), labels(splits["test"].df)
    best = None
    for C in (1.0, 4.0, 16.0):
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(Xtr, ytr)
        auc = roc_auc_score(yva, clf.predict_proba(Xva)[:, 1])
        if best is None or auc > best[0]:
            best = (auc, C, clf)
    _, C, clf = best
    row = test_metrics(yva, clf.predict_proba(Xva)[:, 1], yte, clf.predict_proba(Xte)[:, 1])
    row.update(model=f"tf-idf + one-hot logistic regression (C={C:g} on val)", seconds=round(time.time() - t0, 1))
    return row


def regression_baselines(config: str) -> list[dict]:
    """Test-split rows of the train-mean predictor and of linear_features -> Ridge (alpha chosen on val RMSE),
    scored by the metric code training and evaluate.py use."""
    from sklearn.linear_model import Ridge

    from mmbert.metrics import compute_regression_metrics

    t0 = time.time()
    dc, splits, Xtr, Xva, Xte = linear_features(config)
    ytr, yva, yte = (splits[k].df[dc.label_column].astype(float).to_numpy() for k in ("train", "val", "test"))
    rows = [{"model": "mean predictor (train mean)",
             **compute_regression_metrics(yte, np.full(len(yte), ytr.mean()))}]
    best = None
    for alpha in (0.3, 1.0, 3.0, 10.0, 30.0):
        reg = Ridge(alpha=alpha).fit(Xtr, ytr)
        rmse = compute_regression_metrics(yva, reg.predict(Xva))["rmse"]
        if best is None or rmse < best[0]:
            best = (rmse, alpha, reg)
    rmse_val, alpha, reg = best
    rows.append({"model": f"tf-idf + one-hot + numerics Ridge (alpha={alpha:g} on val)",
                 **compute_regression_metrics(yte, reg.predict(Xte)), "val_rmse": rmse_val,
                 "seconds": round(time.time() - t0, 1)})
    return rows


def score_regression_run(run: str, nproc: int) -> dict:
    """evaluate.py on the run's test split -> its regression metrics."""
    d = os.path.join(run, "eval_test")
    args = ["--model-dir", os.path.join(run, "final"), "--split", "test", "--output-dir", d, "--no-progress"]
    common.run_checked(common.script_cmd(nproc, "evaluate.py", args), f"evaluate.py on {run} --split test")
    with open(os.path.join(d, "metrics.json")) as f:
        m = json.load(f)
    if "rmse" not in m:
        raise SystemExit(f"{run}: not a regression model (no rmse in {d}/metrics.json)")
    return {"model": f"mmbert {run}", **{k: m[k] for k in ("n", "rmse", "mae", "mse", "r2", "spearman")}}


COLS = ("best_threshold_f1", "val_threshold_f1", "argmax_f1", "roc_auc", "pr_auc", "mcc")


REGRESSION_COLS = ("rmse", "mae", "r2", "spearman")


def print_table(rows: list[dict], cols: tuple = COLS):
    w = max(len(r["model"]) for r in rows) + 2
    print(f"{'model':<{w}}" + "".join(f"{c:>18}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v, sd = r.get(c), r.get(f"{c}_sd")
            cells.append(f"{'':>18}" if v is None else f"{v:>12.4f}" + (f" ±{sd:.3f}" if sd else " " * 6))
        print(f"{r['model']:<{w}}" + "".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--run", help="a finished training output dir (its final/ is scored)")
    what.add_argument("--train", action="store_true", help="train the config as it is, then score it")
    what.add_argument("--ablation", action="store_true", help="train and score every arm with the same budget")
    ap.add_argument("--config", help="default configs/womens_clothing.yaml (--regression: "
                                      "configs/womens_clothing_regression.yaml)")
    ap.add_argument("--regression", action="store_true", help="regression metrics and baselines (mean, Ridge)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)}")
    ap.add_argument("--max-steps", type=int, help="ablation budget in optimizer steps (default: the config's epochs)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per ablation arm")
    ap.add_argument("--members", metavar="S1,S2,...", help="with --train: train.py --seeds (an ensemble), then score "
                                                          "each member and the ensemble")
    ap.add_argument("--nproc", type=int, default=1, help="processes for train.py / evaluate.py (torchrun when > 1)")
    ap.add_argument("--work-dir", default="runs/quality", help="where trained runs and evaluations go")
    ap.add_argument("--set", action="append", default=[], help="extra train.py --set overrides (every arm)")
    ap.add_argument("--no-tfidf", action="store_true", help="skip the tf-idf control")
    ap.add_argument("--out", help="JSON to write (default benchmarks/results/quality.json or ablation.json)")
    a = ap.parse_args()
    os.chdir(common.ROOT)
    if a.regression:
        return regression_main(a)
    if not (a.run or a.train or a.ablation):
        ap.error("one of the arguments --run --train --ablation is required (or --regression)")
    a.config = a.config or "configs/womens_clothing.yaml"
    rows = []
    if a.run or a.train:
        run = a.run
        if a.train:
            run = os.path.join(a.work_dir, "ensemble" if a.members else "default")
            secs = train_run(run, a.config, a.set, a.nproc, ["--seeds", a.members] if a.members else [])
            print(f"[{common.now()}] trained {run} in {secs:.0f}s", flush=True)
        if os.path.isfile(os.path.join(run, "ensemble.json")):
            rows += score_ensemble(run, a.nproc)
        else:
            rows.append(score_trained(run, os.path.join(run, "final"), a.nproc))
    else:
        extra = ["--max-steps", str(a.max_steps)] if a.max_steps else []
        # one evaluation per run at the end: the same budget for every arm, no selection on val
        sets = ["train.eval_every=null", "train.eval_each_epoch=false", "train.select_best=false",
                "train.early_stopping_patience=null", "train.checkpoint_every=null", *a.set]
        for arm in a.arms.split(","):
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r} (choose from {', '.join(ARMS)})")
            per_seed = []
            for seed in range(1, a.seeds + 1):
                out = os.path.join(a.work_dir, f"{arm}_s{seed}")
                secs = train_run(out, a.config, [*ARMS[arm], *sets, f"train.seed={seed}"], a.nproc, extra)
                m = score_run(os.path.join(out, "final"), out, a.nproc)
                m["train_seconds"] = round(secs)
                per_seed.append(m)
                print(f"[{common.now()}] {arm} seed {seed}: " + " ".join(f"{c}={m[c]:.4f}" for c in COLS)
                      + f" ({secs:.0f}s)", flush=True)
            row = {"model": arm, "seeds": a.seeds, "runs": per_seed}
            for c in (*COLS, "accuracy", "log_loss"):
                vals = [m[c] for m in per_seed]
                row[c] = statistics.mean(vals)
                if len(vals) > 1:
                    row[f"{c}_sd"] = statistics.stdev(vals)
            rows.append(row)
    if not a.no_tfidf:
        rows.append(tfidf_control(a.config))
    rows += PUBLISHED
    print()
    print_table(rows)
    out = common.write_result("ablation" if a.ablation else "quality", {"rows": rows}, a, a.out)
    print("wrote", out)


def regression_main(a):
    """--regression: the trained run's row (with --run / --train), then the baselines."""
    if a.ablation:
        raise SystemExit("--regression takes --run or --train (or neither: the baselines only), not --ablation")
    a.config = a.config or "configs/womens_clothing_regression.yaml"
    rows = []
    run = a.run
    if a.train:
        run = os.path.join(a.work_dir, "regression")
        secs = train_run(run, a.config, a.set, a.nproc, [])
        print(f"[{common.now()}] trained {run} in {secs:.0f}s", flush=True)
    if run:
        rows.append(score_regression_run(run, a.nproc))
    rows += regression_baselines(a.config)
    print()
    print_table(rows, REGRESSION_COLS)
    out = common.write_result("regression", {"rows": rows}, a, a.out)
    print("wrote", out)


if __name__ == "__main__":
    main()
