"""Bad data files through train.py and evaluate.py in real processes: missing, empty, header-only and non-UTF-8
files, a missing column, text in a numeric column, labels outside the label map (fitted or pinned), and usable
data with unseen categories and duplicate ids. Each stop is the user-facing contract of docs/RELIABILITY.md:
exit code 2, exactly one stderr line starting with `error: `, no traceback, and the file / column / row named."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import LABEL, assert_one_line_error, eval_cli, train_cli, write_config

pytestmark = pytest.mark.slow


BAD_FILES = {  # case -> (file, fragments the one-line message must name besides the file)
    "missing file": ("does_not_exist.csv", ["not found"]),
    "empty file": ("empty.csv", ["is empty"]),
    "header only": ("header_only.csv", ["header but no rows"]),
    "non-UTF-8 bytes": ("latin1.csv", ["line {latin1_line}", "not valid UTF-8"]),
    "missing column": ("no_age.csv", ["column 'Age' is missing"]),
    "non-numeric text": ("age_text.csv", ["'Age'", "row 123", "forty-two"]),
}


def expected(work, name: str, fragments: list[str]) -> list[str]:
    if name == "latin1.csv":  # the physical line of the bad byte (quoted newlines: not simply row + 2)
        raw = (work / name).read_bytes()
        line = raw[:raw.index(b"caf\xe9")].count(b"\n") + 1
        fragments = [f.format(latin1_line=line) for f in fragments]
    return fragments


# ----------------------------------------------------------------------------- train.py

@pytest.mark.parametrize("case", list(BAD_FILES))
def test_train_bad_data_file_is_one_line(work, train_cfg, tmp_path, case):
    name, fragments = BAD_FILES[case]
    path = str(work / name)
    fragments = expected(work, name, fragments)
    r = train_cli(train_cfg, tmp_path / "run", "--data", path)
    assert_one_line_error(r, path, *fragments)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_train_label_outside_the_label_map(work, tiny_bert, tmp_path):
    """Binary train file (0/1); the val file has a `7`: the label map is fitted on train, so the 7 is named."""
    val = str(work / "val_label7.csv")
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, None,
                       data={"split": {"train_file": str(work / "train.csv"), "val_file": val}})
    r = train_cli(cfg, tmp_path / "run")
    assert_one_line_error(r, val, f"column '{LABEL}'", "row 11", "label 7", "[0, 1]")


def test_pinned_label_map_stops_at_a_stray_train_label(work, tiny_bert, tmp_path):
    """With data.labels the map is fixed up front, so the `7` in the train file is an error naming its row,
    not a third class."""
    train = str(work / "label7.csv")
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, None,
                       data={"split": {"train_file": train, "val_file": str(work / "train.csv")}})
    r = train_cli(cfg, tmp_path / "run", "--set", "data.labels=[0, 1]")
    assert_one_line_error(r, train, f"column '{LABEL}'", "row 131", "label 7", "[0, 1] pinned by data.labels")


# ----------------------------------------------------------------------------- evaluate.py

EVAL_BAD_FILES = dict(BAD_FILES, **{"label outside the label map": ("label7.csv", [f"'{LABEL}'", "row 131",
                                                                                  "label 7", "[0, 1]"])})


@pytest.mark.parametrize("case", list(EVAL_BAD_FILES))
def test_evaluate_bad_data_file_is_one_line(work, model_dir, tmp_path, case):
    name, fragments = EVAL_BAD_FILES[case]
    path = str(work / name)
    fragments = expected(work, name, fragments)
    r = eval_cli(model_dir, path, tmp_path / "out")
    assert_one_line_error(r, path, *fragments)
    assert not (tmp_path / "out" / "predictions.tsv").exists()


def test_evaluate_unseen_categories_and_duplicate_ids_are_counted_and_reported(work, model_dir, tmp_path):
    """Usable data: unseen categories map to index 0 (unknown) and duplicate ids are kept (rows are told
    apart by `row`); both are counted in a warning, and every row is scored once."""
    df = pd.read_csv(work / "good.csv").iloc[120:].copy()
    df.loc[df.index[[0, 3, 5]], "Class Name"] = "Spacesuits"
    seen = set(pd.read_csv(work / "train.csv")["Class Name"].dropna())
    unseen = int((df["Class Name"].notna() & ~df["Class Name"].isin(seen)).sum())
    assert unseen >= 3
    df.insert(0, "rid", [f"id{i % 30}" for i in range(len(df))])  # 40 rows, 10 ids seen twice
    path = str(tmp_path / "unseen.csv")
    df.to_csv(path, index=False)
    r = eval_cli(model_dir, path, tmp_path / "out", "--id-column", "rid")
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert f"unseen_categories = {{'Class Name': {unseen}}}" in log and "duplicate_ids = 10" in log
    pred = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert pred["row"].tolist() == list(range(40)) and pred["rid"].tolist() == df["rid"].tolist()
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())["data_report"]
    assert report["unseen_categories"] == {"Class Name": unseen} and report["duplicate_ids"] == 10
