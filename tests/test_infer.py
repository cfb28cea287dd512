"""Column roles inferred from the train split (mmbert/data/infer.py) when the config names none: the guess per
kind of column, explicit choices kept, the printed table, clear errors, and a run trained from a DataFrame
and a label alone."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import yaml

from mmbert.config import Config, DataConfig, SplitConfig
from mmbert.data.infer import complete_config, infer_roles
from mmbert.errors import ConfigError, DataError

N = 60


def frame(n: int = N) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    words = ["soft", "fabric", "runs", "small", "lovely", "colour", "returned", "it", "great", "fit", "tight"]
    return pd.DataFrame({
        "id": [f"r{i:04d}" for i in range(n)],  # unique strings with no spaces
        "Unnamed: 0": np.arange(n),  # a saved index
        "review": [" ".join(rng.choice(words, 8)) + f" #{i}" for i in range(n)],  # long, distinct
        "color": rng.choice(["red", "blue", "green", "black"], n),  # few distinct
        "code": [f"c{k}" for k in rng.integers(0, n, n)],  # many distinct, but short
        "stars": rng.integers(1, 6, n),  # few distinct numbers
        "price": rng.normal(50, 10, n).round(2),  # many distinct numbers
        "flag": rng.random(n) > 0.5,
        "const": 7,
        "empty": pd.Series([None] * n, dtype=object),
        "y": rng.integers(0, 2, n),
    })


EXPECTED = {"text": ["review"], "numeric": ["price"], "categorical": ["color", "code", "stars", "flag"]}


def roles_of(r) -> dict:
    return {"text": r.text_columns, "numeric": r.numeric_columns, "categorical": r.categorical_columns}


def test_each_kind_of_column_gets_its_role():
    r = infer_roles(frame(), "y")
    assert roles_of(r) == EXPECTED and r.id_column == "id"
    by = {c.name: c for c in r.columns}
    assert [c.name for c in r.columns] == list(frame().columns)
    assert by["Unnamed: 0"].role == "left out" and "unique per row" in by["Unnamed: 0"].why  # the second id
    assert by["const"].role == "left out" and "one value" in by["const"].why
    assert by["empty"].role == "left out" and "missing" in by["empty"].why
    assert by["y"].role == "label" and by["review"].mean_length > 15
    table = r.table().splitlines()
    assert table[0].split() == ["column", "dtype", "distinct", "mean", "length", "role", "why"]
    assert len(table) == 1 + len(frame().columns) and "proposed as data.id_column" in table[1]
    again = infer_roles(frame(), "y")
    assert again == r  # deterministic


def test_numbers_written_as_text_and_ids_by_name():
    df = frame()
    df["weight"] = [("NA" if i % 7 == 0 else f"{50 + i * 0.37:.2f}") for i in range(N)]  # a CSV with NA cells
    df["Clothing ID"] = np.arange(N) % 13  # a code, not a quantity
    df["row_counter"] = np.arange(N) * 3 + 5  # integers increasing in file order: unique per row
    df["motto"] = [f"go team {i}" for i in range(N)]  # unique, but a phrase: no id
    df["opt_in"] = pd.Series([True, False, None] * (N // 3), dtype=object)  # booleans with missing values
    df["when"] = pd.date_range("2024-01-01", periods=N)
    r = infer_roles(df, "y")
    assert "weight" in r.numeric_columns and "Clothing ID" in r.categorical_columns
    assert "row_counter" not in r.features() and "motto" in r.categorical_columns
    assert "opt_in" in r.categorical_columns and "dates are not used" in r.columns[-1].why


def test_fixed_lists_ignored_columns_and_a_given_id_are_respected():
    r = infer_roles(frame(), "y", fixed={"text": ["color"], "numeric": []}, ignore=["code"])
    assert r.text_columns == ["color"] and r.numeric_columns == []
    assert r.categorical_columns == ["stars", "flag"]
    by = {c.name: c for c in r.columns}
    assert by["review"].role == "left out" and "data.text_columns is given explicitly" in by["review"].why
    assert by["price"].role == "left out" and by["code"].why == "data.ignore_columns"
    r = infer_roles(frame(), "y", id_column="Unnamed: 0")
    assert r.id_column is None and {c.name: c.role for c in r.columns}["Unnamed: 0"] == "id"
    assert {c.name: c.role for c in r.columns}["id"] == "left out"


def write(tmp_path, df, name="t.csv") -> str:
    path = str(tmp_path / name)
    df.to_csv(path, index=False)
    return path


def config(path: str, label: str | None = "y", **data) -> Config:
    return Config(data=DataConfig(path=path, label_column=label, **data))


def test_complete_config_infers_from_the_train_rows_only(tmp_path, capsys, monkeypatch):
    df = frame()
    df["late"] = np.where(np.arange(N) < 30, "same", df["review"])  # constant in the train rows only
    path = write(tmp_path, df)
    (tmp_path / "train.txt").write_text("\n".join(map(str, range(30))))
    (tmp_path / "val.txt").write_text("\n".join(map(str, range(30, N))))
    cfg = config(path, split=SplitConfig(train_indices=str(tmp_path / "train.txt"), val_indices=str(tmp_path / "val.txt")))
    before = dataclasses.replace(cfg)
    monkeypatch.delenv("RANK", raising=False)
    out = complete_config(cfg, {"data.path", "data.label_column"})
    assert cfg == before  # a new config; the given one is untouched
    assert roles_of(out.data) == EXPECTED and out.data.id_column == "id" and out.model.fusion == cfg.model.fusion
    printed = capsys.readouterr().out
    assert f"column roles inferred from {path} (train split, 30 rows)" in printed
    assert "late" in printed and "one value in every row ('same')" in printed
    monkeypatch.setenv("RANK", "1")  # other ranks infer alike and print nothing
    assert complete_config(cfg, {"data.label_column"}) == out and capsys.readouterr().out == ""


def test_complete_config_keeps_an_explicit_config_untouched(tmp_path, capsys):
    path = write(tmp_path, frame())
    cfg = config(path, text_columns=["review"])
    assert complete_config(cfg, {"data.text_columns"}) is cfg and capsys.readouterr().out == ""
    cfg = config(path, categorical_columns=["color"], id_column=None)  # any role column: no inference at all
    assert complete_config(cfg, set()) is cfg
    # role lists given explicitly (empty) stay empty; a given id column and fusion stay as given
    out = complete_config(config(path), {"data.numeric_columns", "data.categorical_columns", "data.id_column"})
    assert (out.data.text_columns, out.data.numeric_columns, out.data.categorical_columns) == (["review"], [], [])
    assert out.data.id_column is None


def test_roles_given_on_the_command_line_fix_those_columns_and_the_rest_is_inferred(tmp_path, capsys):
    """--text-columns review (a flag, not a config file) keeps review as the only text and infers the others;
    `code`, a categorical guess, becomes text when the flag names it."""
    path = write(tmp_path, frame())
    cfg = config(path, text_columns=["review", "code"])
    out = complete_config(cfg, {"data.text_columns"}, frozenset({"data.text_columns"}))
    assert out.data.text_columns == ["review", "code"] and out.data.numeric_columns == ["price"]
    assert out.data.categorical_columns == ["color", "stars", "flag"]
    assert "code" in capsys.readouterr().out


def test_no_text_column_means_a_tabular_model_unless_fusion_is_given(tmp_path):
    path = write(tmp_path, frame().drop(columns=["review"]))
    assert complete_config(config(path), set()).model.fusion == "tab_only"
    assert complete_config(config(path), {"model.fusion"}).model.fusion == Config().model.fusion


def test_complete_config_errors(tmp_path):
    path = write(tmp_path, frame())
    with pytest.raises(DataError, match=r"t\.csv: label column 'Y' is missing \(closest: 'y'"):
        complete_config(config(path, label="Y"), set())
    with pytest.raises(ConfigError, match="'data.label_column' is not set: .*--label COLUMN.* has columns id, "):
        complete_config(config(path, label=None), set())
    with pytest.raises(ConfigError, match="no data to train on: give the table with --data FILE"):
        complete_config(config(None), set())
    bare = write(tmp_path, frame()[["const", "empty", "id", "y"]], "bare.csv")
    with pytest.raises(DataError, match=r"bare\.csv: no column can be a feature .*'const': one value in every row"):
        complete_config(config(bare), set())


@pytest.mark.slow
def test_train_from_a_dataframe_and_a_label_alone(tiny_bert, reviews, tmp_path):
    """mmbert.train(data=df, label=...) with no config: the roles inferred, saved in config.yaml, and the
    model scores a file."""
    import mmbert

    df = reviews.iloc[:120].copy()
    df.insert(0, "review_id", [f"r{i:04d}" for i in range(len(df))])
    run = mmbert.train(data=df, label="Recommended IND", output_dir=str(tmp_path / "run"), max_steps=2,
                       overrides={"model.encoder": tiny_bert, "model.hidden_dim": 32, "model.num_heads": 2,
                                  "data.max_tokens": 32, "train.batch_size": 8})
    with open(os.path.join(run.model_dir, "config.yaml")) as f:
        saved = yaml.safe_load(f)["data"]
    assert saved["text_columns"] == ["Title", "Review Text"] and saved["id_column"] == "review_id"
    assert saved["categorical_columns"] == ["Clothing ID", "Rating", "Division Name", "Department Name", "Class Name"]
    assert saved["numeric_columns"] == ["Age", "Positive Feedback Count"]
    assert os.path.basename(os.path.dirname(saved["path"])) == "frames"
    df.iloc[:20].drop(columns=["Recommended IND"]).to_csv(tmp_path / "new.csv", index=False)
    model = mmbert.load(run.model_dir)
    pred = model.predict(str(tmp_path / "new.csv"))
    assert len(pred) == 20 and set(pred) <= {0, 1}
    np.testing.assert_allclose(model.predict_proba(tmp_path / "new.csv"), model.predict_proba(df.iloc[:20]), atol=1e-6)
    res = mmbert.evaluate(run.model_dir, output_dir=str(tmp_path / "eval"), data=df.iloc[:30])
    assert res.metrics["n"] == 30


@pytest.mark.slow
def test_train_command_with_a_file_and_a_label(tiny_bert, reviews, tmp_path):
    """`mmbert train --data FILE --label COL`, no config, on 2 ranks: the roles are inferred alike on both,
    the table printed once, the run's config.yaml holds them; a misspelt label is one line naming the file."""
    from conftest import assert_one_line_error, run_cli

    path = tmp_path / "reviews.csv"
    reviews.iloc[:120].to_csv(path, index=False)
    tiny = ["--encoder", tiny_bert, "--hidden-dim", "32", "--num-heads", "2", "--max-tokens", "32", "--max-steps", "1"]
    r = run_cli(["train.py", "--data", str(path), "--label", "Recommended IND", "--output-dir", str(tmp_path / "run"),
                 "--strategy", "ddp", *tiny], nproc=2)
    assert r.stdout.count("column roles inferred from") == 1, r.stdout[-3000:]
    with open(tmp_path / "run" / "final" / "config.yaml") as f:
        saved = yaml.safe_load(f)["data"]
    assert saved["text_columns"] == ["Title", "Review Text"] and saved["numeric_columns"] == ["Age", "Positive Feedback Count"]
    r = run_cli(["-m", "mmbert", "train", "--data", str(path), "--label", "recommended ind", "--output-dir",
                 str(tmp_path / "run2"), *tiny], check=False)
    assert_one_line_error(r, "reviews.csv: label column 'recommended ind' is missing (closest: 'Recommended IND'")
