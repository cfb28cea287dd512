"""evaluate.py --importance: seeded permutations and row samples, a permuted text / serialized column re-encoded
consistently, the modality masks, primary_metric, importance.json; and, on a model trained on data with a planted
signal, the planted column ranked first far above the noise columns, the same numbers on 2 ranks as on 1, the
Python API, and the one-line refusal on unlabelled rows."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line_error, run_cli, write_config

from mmbert.evaluation import importance as imp


# ----------------------------------------------------------------------------- the pure parts

def test_permutations_and_row_sample_depend_on_the_seed_only():
    a, b = imp.permutations(50, 3, seed=7), imp.permutations(50, 3, seed=7)
    assert len(a) == 3 and all((x == y).all() for x, y in zip(a, b))  # every rank draws the same ones
    assert all(sorted(p.tolist()) == list(range(50)) for p in a)
    assert not (a[0] == a[1]).all() and not (a[0] == imp.permutations(50, 1, seed=8)[0]).all()
    s = imp.subset_positions(100, 30, seed=7)
    assert len(s) == 30 and len(set(s.tolist())) == 30 and (np.diff(s) > 0).all()
    assert (s == imp.subset_positions(100, 30, seed=7)).all() and not (s == imp.subset_positions(100, 30, 8)).all()
    assert (imp.subset_positions(10, None, 0) == np.arange(10)).all()
    assert (imp.subset_positions(10, 25, 0) == np.arange(10)).all()


@pytest.fixture(scope="module")
def small(tiny_bert, tmp_path_factory):
    """A Preprocessor with a text, a serialized numeric, a plain numeric and a categorical column; its rows."""
    from mmbert.config import load_config
    from mmbert.data.preprocess import Preprocessor
    from mmbert.data.tokenize import load_tokenizer

    rng = np.random.default_rng(0)
    n = 12
    df = pd.DataFrame({"note": [f"note number {w}" for w in ("one two three four five six seven eight nine ten "
                                                             "eleven twelve").split()],
                       "x": np.round(rng.normal(size=n), 2), "z": rng.normal(size=n),
                       "colour": rng.choice(["red", "green", "blue"], n), "y": np.arange(n) % 2})
    df.loc[3, "z"] = np.nan
    work = tmp_path_factory.mktemp("imp_small")
    cfg = load_config(write_config(work / "c.yaml", tiny_bert, str(work / "d.csv"), data={
        "text_columns": ["note"], "numeric_columns": ["x", "z"], "categorical_columns": ["colour"],
        "serialize_columns": ["x"], "label_column": "y", "max_tokens": 32, "max_chunks": 1}))
    pre = Preprocessor.fit(df, cfg.data, tiny_bert, "d.csv")
    return pre, load_tokenizer(tiny_bert), df


def tokens(ds, i: int) -> list[list[int]]:
    return [c.tolist() for c in ds.chunks[i]]


def test_permuted_text_and_serialized_columns_are_encoded_again_consistently(small):
    from mmbert.data.tokenize import chunk_tokenize

    pre, tok, df = small
    perm = imp.permutations(len(df), 1, seed=3)[0]
    base = imp.encode(pre, tok, df, "d.csv")

    def expect(xs, notes):  # the text preprocessing writes: "x: VALUE. NOTE"
        chunks, _ = chunk_tokenize(tok, [f"x: {x:g}. {t}" for x, t in zip(xs, notes)], 32, 1)
        return [[c.tolist() for c in chunks[i]] for i in range(len(xs))]

    x, notes = df["x"].to_numpy(), df["note"].tolist()
    assert [tokens(base, i) for i in range(len(df))] == expect(x, notes)
    text = imp.encode(pre, tok, imp.permute_column(df, "note", perm), "d.csv")
    assert [tokens(text, i) for i in range(len(df))] == expect(x, [notes[j] for j in perm])
    np.testing.assert_array_equal(text.enc.numeric, base.enc.numeric)
    ser = imp.encode(pre, tok, imp.permute_column(df, "x", perm), "d.csv")  # in the text and the numeric input
    assert [tokens(ser, i) for i in range(len(df))] == expect(x[perm], notes)
    np.testing.assert_array_equal(ser.enc.numeric[:, 0], base.enc.numeric[perm, 0])
    np.testing.assert_array_equal(ser.enc.numeric[:, 1], base.enc.numeric[:, 1])
    cat = imp.encode(pre, tok, imp.permute_column(df, "colour", perm), "d.csv")
    np.testing.assert_array_equal(cat.enc.categorical, base.enc.categorical[perm])
    z = imp.encode(pre, tok, imp.permute_column(df, "z", perm), "d.csv")  # the missing value moves with its row
    np.testing.assert_array_equal(z.enc.missing[:, 1], base.enc.missing[perm, 1])
    for ds in (text, ser, cat, z):  # labels and row numbers stay: only the column moves
        assert (ds.enc.labels == base.enc.labels).all() and (ds.enc.rows == base.enc.rows).all()
    assert [imp.in_text(pre, c) for c in ("note", "x", "z", "colour")] == [True, True, False, False]
    reused = imp.encode(pre, tok, imp.permute_column(df, "z", perm), "d.csv", tokens_of=base)  # as run_importance
    assert [tokens(reused, i) for i in range(len(df))] == [tokens(z, i) for i in range(len(df))]
    np.testing.assert_array_equal(reused.enc.numeric, z.enc.numeric)


def test_modality_masks(small):
    pre, tok, df = small
    base = imp.encode(pre, tok, df, "d.csv")
    views = imp.modality_masks(pre)
    assert {k: v[0] for k, v in views.items()} == {"text_only": "tabular", "tabular_only": "text"}
    no_text = imp.encode(pre, tok, df, "d.csv", views["tabular_only"][1])
    assert all(tokens(no_text, i) == [[tok.cls_token_id, tok.sep_token_id]] for i in range(len(df)))
    np.testing.assert_array_equal(no_text.enc.numeric, base.enc.numeric)
    no_tab = imp.encode(pre, tok, df, "d.csv", views["text_only"][1])
    st = [pre.numeric_stats[c] for c in ("x", "z")]
    np.testing.assert_allclose(no_tab.enc.numeric, np.tile([(s["median"] - s["mean"]) / s["std"] for s in st],
                                                           (len(df), 1)), rtol=1e-6)
    assert (no_tab.enc.missing == 1).all() and (no_tab.enc.categorical == 0).all()
    assert (base.enc.categorical > 0).all()
    assert [tokens(no_tab, i) for i in range(len(df))] == [tokens(base, i) for i in range(len(df))]


def test_primary_metric():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = np.clip(0.4 * y + 0.6 * rng.random(40), 0, 1)
    probs = np.stack([1 - p, p], 1)
    assert imp.primary_metric(y, probs) == ("roc_auc", pytest.approx(roc_auc_score(y, p)), True)
    name, value, higher = imp.primary_metric(np.ones(5, int), probs[:5])  # one class: AUC undefined
    assert (name, higher) == ("log_loss", False)
    assert value == pytest.approx(log_loss(np.ones(5), probs[:5], labels=[0, 1]))
    three = rng.dirichlet(np.ones(3), 30)
    y3 = np.arange(30) % 3
    assert imp.primary_metric(y3, three) == ("roc_auc", pytest.approx(
        roc_auc_score(y3, three, multi_class="ovr", average="macro")), True)
    assert imp.primary_metric(y3 % 2, three)[0] == "log_loss"  # class 2 absent
    assert imp.drop(0.9, 0.6, True) == pytest.approx(0.3) and imp.drop(0.2, 0.5, False) == pytest.approx(0.3)


def test_importance_json_schema_ranks_and_picture(tmp_path):
    drops = {"a": [0.01, -0.01, 0.0], "b": [0.3, 0.2, 0.25], "c": [0.05, 0.07, 0.06]}
    body = imp.summarize("roc_auc", True, 0.9, drops, {"a": "text", "b": "numeric", "c": "categorical"}, ["b"],
                         {"text_only": ("tabular", 0.6), "tabular_only": ("text", 0.85)})
    body.update(rows=10, repeats=3, scorings=12, seconds=1.0)
    paths = imp.write_importance(str(tmp_path), body)
    got = json.loads((tmp_path / "importance.json").read_text())
    assert [c["column"] for c in got["columns"]] == ["b", "c", "a"] and [c["rank"] for c in got["columns"]] == [1, 2, 3]
    b = got["columns"][0]
    assert b == {"column": "b", "kind": "numeric", "serialized": True, "mean_drop": pytest.approx(0.25),
                 "std": pytest.approx(np.std([0.3, 0.2, 0.25])), "repeats": [0.3, 0.2, 0.25], "rank": 1}
    assert got["modality"] == {"text_only": {"masked": "tabular", "value": 0.6, "drop": pytest.approx(0.3)},
                               "tabular_only": {"masked": "text", "value": 0.85, "drop": pytest.approx(0.05)}}
    assert (got["metric"], got["baseline"], got["higher_is_better"]) == ("roc_auc", 0.9, True)
    assert os.path.getsize(paths[1]) > 1000
    table = imp.importance_table(got)
    assert table.index("b") < table.index(" c ") and "numeric*" in table and "text only (tabular masked)" in table


def test_importance_flags_are_checked():
    from mmbert.cli import parse_eval_args
    from mmbert.errors import ConfigError

    base = ["--model-dir", "m", "--output-dir", "o"]
    with pytest.raises(ConfigError, match="--importance-rows needs --importance"):
        parse_eval_args(base + ["--importance-rows", "5"])
    with pytest.raises(ConfigError, match="--importance-repeats must be >= 1, got 0"):
        parse_eval_args(base + ["--importance", "--importance-repeats", "0"])
    a = parse_eval_args(base + ["--importance"])
    assert (a.importance_repeats, a.importance_seed, a.importance_rows) == (3, 0, None)


# ----------------------------------------------------------------------------- a planted signal

def planted_table(n: int, seed: int) -> pd.DataFrame:
    """The label is `signal > 0`; `noise`, `colour` and the text are independent of it."""
    rng = np.random.default_rng(seed)
    words = np.array("apple river stone cloud paper window garden pencil".split())
    signal = rng.normal(size=n)
    return pd.DataFrame({"note": [" ".join(rng.choice(words, 4)) for _ in range(n)], "signal": signal,
                         "noise": rng.normal(size=n), "colour": rng.choice(["red", "green", "blue"], n),
                         "y": (signal > 0).astype(int)})


@pytest.fixture(scope="module")
def planted(tiny_bert, tmp_path_factory):
    """A tiny model trained on 420 planted rows; the val split (180 rows) is what importance scores."""
    work = tmp_path_factory.mktemp("planted")
    data = str(work / "planted.csv")
    planted_table(600, seed=0).to_csv(data, index=False)
    out = str(work / "run")
    cfg = write_config(work / "c.yaml", tiny_bert, data, data={
        "text_columns": ["note"], "numeric_columns": ["signal", "noise"], "categorical_columns": ["colour"],
        "label_column": "y", "max_tokens": 16, "max_chunks": 1, "split": {"fractions": [0.7, 0.3], "seed": 0}},
                       train={"output_dir": out, "batch_size": 16, "lr": 3e-3, "head_lr": None, "seed": 0})
    run_cli(["train.py", "--config", cfg, "--max-steps", "60", "--strategy", "none"])
    return os.path.join(out, "final"), work


def evaluate_importance(model: str, out, *args: str, nproc: int = 1):
    """One thread per process: the tiny model scores fastest so on a shared machine."""
    return run_cli(["evaluate.py", "--model-dir", model, "--split", "val", "--output-dir", str(out), "--batch-size",
                    "16", "--no-progress", "--num-threads", "1", "--importance", *args], nproc=nproc)


def read_importance(out) -> dict:
    return json.loads((out / "importance.json").read_text())


@pytest.fixture(scope="module")
def one_rank(planted):
    model, work = planted
    r = evaluate_importance(model, work / "eval1")
    return read_importance(work / "eval1"), r, work / "eval1"


@pytest.mark.slow
def test_planted_column_ranks_first_far_above_the_noise(one_rank):
    got, r, out = one_rank
    cols = {c["column"]: c for c in got["columns"]}
    assert got["metric"] == "roc_auc" and got["rows"] == got["rows_selected"] == 180 and got["repeats"] == 3
    assert got["scorings"] == 1 + 4 * 3 + 2 and got["baseline"] > 0.9  # the model learnt the signal
    metrics = json.loads((out / "metrics.json").read_text())
    assert got["baseline"] == pytest.approx(metrics["roc_auc"], abs=1e-6)  # the same rows and scores as evaluation
    assert got["columns"][0]["column"] == "signal" and cols["signal"]["rank"] == 1
    assert cols["signal"]["mean_drop"] > 0.3 and min(cols["signal"]["repeats"]) > 0.3  # shuffling it is near chance
    for noise in ("noise", "colour", "note"):
        assert abs(cols[noise]["mean_drop"]) < 0.05 and max(cols[noise]["repeats"]) < 0.1, cols[noise]
    assert got["modality"]["text_only"]["drop"] > 0.3  # the tabular side holds the signal
    assert got["modality"]["tabular_only"]["drop"] < 0.1
    assert "== permutation importance: roc_auc" in r.stdout and "importance: 15 scorings of 180 rows" in r.stdout
    assert os.path.getsize(out / "importance.png") > 1000


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(planted, one_rank):
    model, work = planted
    ref, _, _ = one_rank
    out = work / "eval2"
    evaluate_importance(model, out, "--no-plots", nproc=2)
    got = read_importance(out)
    assert got["world_size"] == 2 and not (out / "importance.png").exists()
    assert [c["column"] for c in got["columns"]] == [c["column"] for c in ref["columns"]]
    # ROC-AUC counts pairs: two rows whose probabilities lie within float32 rounding of each other may swap
    # when batches are composed differently, moving it by 1 / (positives x negatives) (90 x 90 here); a
    # different permutation or row set on a rank moves the drops by about their spread between repeats
    tol = 3e-4
    assert got["baseline"] == pytest.approx(ref["baseline"], abs=tol)
    for a, b in zip(got["columns"], ref["columns"]):
        np.testing.assert_allclose(a["repeats"], b["repeats"], rtol=0, atol=tol)
    for view in ("text_only", "tabular_only"):
        assert got["modality"][view]["value"] == pytest.approx(ref["modality"][view]["value"], abs=tol)


@pytest.mark.slow
def test_api_row_sample_and_prediction_run_refusal(planted, tmp_path):
    import mmbert

    model, work = planted
    res = mmbert.evaluate(model, output_dir=str(tmp_path / "api"), split="val", plots=False, progress=False,
                          num_threads=1, importance=True, importance_rows=60, importance_repeats=2, importance_seed=5)
    assert res.importance == read_importance(tmp_path / "api")
    assert (res.importance["rows"], res.importance["rows_selected"], res.importance["repeats"]) == (60, 180, 2)
    assert res.importance["columns"][0]["column"] == "signal" and res.metrics["n"] == 180
    nolabel = tmp_path / "nolabel.csv"
    planted_table(20, seed=1).drop(columns=["y"]).to_csv(nolabel, index=False)
    r = run_cli(["evaluate.py", "--model-dir", model, "--data", str(nolabel), "--output-dir", str(tmp_path / "p"),
                 "--importance"], check=False)
    assert_one_line_error(r, "--importance needs labelled rows", str(nolabel), "'y'")
