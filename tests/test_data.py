"""Data: chunked tokenization, dynamic collate, preprocessing fitted on train only, labels, bad input."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmbert.config import DataConfig, SplitConfig
from mmbert.data.dataset import collate
from mmbert.data.io import load_table
from mmbert.data.pipeline import build_dataset, load_splits
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import chunk_tokenize, load_tokenizer
from mmbert.errors import DataError, MMBertError

NUM = ["Rating", "Age", "Positive Feedback Count"]
CAT = ["Division Name", "Department Name", "Class Name"]
LABEL = "Recommended IND"


def dcfg(**kw) -> DataConfig:
    base = {"text_columns": ["Title", "Review Text"], "numeric_columns": list(NUM), "categorical_columns": list(CAT),
                "label_column": LABEL, "max_tokens": 16, "max_chunks": 3}
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return load_tokenizer(tiny_bert)


@pytest.fixture
def train_test(reviews):
    """A train/test split with the file row numbers as index (300 / 100 rows)."""
    return reviews.iloc[:300].copy(), reviews.iloc[300:].copy()


# ----------------------------------------------------------------------------- chunking

def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_long_text_gives_several_framed_chunks(tok, reviews):
    text = max(reviews["Review Text"].dropna(), key=len)
    ids = _ids(tok, text)
    assert len(ids) > 100
    (chunks,), truncated = chunk_tokenize(tok, [text], max_tokens=16, max_chunks=100)
    assert truncated == 0
    assert len(chunks) == -(-len(ids) // 14)  # ceil(n / (16 - 2))
    for c in chunks:
        assert c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id
        assert len(c) <= 16
        assert tok.cls_token_id not in c[1:-1] and tok.sep_token_id not in c[1:-1]
    assert all(len(c) == 16 for c in chunks[:-1])  # only the last chunk is short
    assert [t for c in chunks for t in c[1:-1]] == ids  # nothing lost, nothing duplicated, order kept


def test_texts_beyond_max_chunks_are_cut_and_counted(tok, reviews):
    texts = list(reviews["Review Text"].dropna().iloc[:40])
    lens = [len(_ids(tok, t)) for t in texts]
    over = sum(n > 3 * 14 for n in lens)
    assert 0 < over < len(texts)
    chunks, truncated = chunk_tokenize(tok, texts, max_tokens=16, max_chunks=3)
    assert truncated == over
    for t, n, ch in zip(texts, lens, chunks):
        assert 1 <= len(ch) <= 3
        body = [x for c in ch for x in c[1:-1]]
        assert body == _ids(tok, t)[:3 * 14]  # the first max_chunks chunks are kept


def test_empty_text_gives_one_chunk(tok):
    chunks, truncated = chunk_tokenize(tok, ["", "hello"], max_tokens=16, max_chunks=3)
    assert truncated == 0
    assert [c.tolist() for c in chunks[0]] == [[tok.cls_token_id, tok.sep_token_id]]
    assert len(chunks[1]) == 1 and len(chunks[1][0]) == 2 + len(_ids(tok, "hello"))


def test_pipeline_reports_cut_texts(tok, train_test):
    train, _ = train_test
    pre = Preprocessor.fit(train, dcfg(), "tok", "train.parquet")
    ds = build_dataset(pre, tok, train, "train.parquet")
    texts, _ = pre.texts(train)
    expected = sum(len(_ids(tok, t)) > 3 * 14 for t in texts)
    assert expected > 0
    assert ds.truncated_texts == expected
    assert ds.enc.report["texts_cut_at_max_chunks"] == expected
    assert ds.lengths.tolist() == [sum(len(c) for c in ch) for ch in ds.chunks]


def _toy_dataset(tok, texts, max_tokens=16, max_chunks=3):
    df = pd.DataFrame({"t": texts, "x": np.arange(len(texts), dtype=float), "y": [0, 1] * (len(texts) // 2)})
    pre = Preprocessor.fit(df, DataConfig(text_columns=["t"], numeric_columns=["x"], label_column="y",
                                          max_tokens=max_tokens, max_chunks=max_chunks), "tok", "toy.csv")
    return build_dataset(pre, tok, df, "toy.csv")


def test_collate_pads_chunks_and_tokens_to_the_batch_maxima(tok):
    short, mid = "a short one", "a slightly longer text that still fits"
    long = " ".join(["the dress fits well and the colour is lovely"] * 6)
    ds = _toy_dataset(tok, [short, long, "", mid])
    n_chunks = [len(ch) for ch in ds.chunks]
    assert n_chunks[1] == 3 and n_chunks[0] == n_chunks[2] == n_chunks[3] == 1

    b = collate(ds, [0, 2, 3, 1], pad_id=tok.pad_token_id)
    B, C, T = b["input_ids"].shape
    assert (B, C, T) == (4, 3, 16)
    assert b["attention_mask"].shape == (4, 3, 16)
    assert b["chunk_mask"].tolist() == [[True, False, False], [True, False, False], [True, False, False],
                                        [True, True, True]]
    assert b["chunk_index"].tolist() == np.flatnonzero(b["chunk_mask"].reshape(-1).numpy()).tolist()
    for row, i in enumerate([0, 2, 3, 1]):
        for c in range(C):
            tokens = ds.chunks[i][c] if c < len(ds.chunks[i]) else np.zeros(0)
            k = len(tokens)
            assert b["input_ids"][row, c, :k].tolist() == tokens.tolist()
            assert (b["input_ids"][row, c, k:] == tok.pad_token_id).all()
            assert b["attention_mask"][row, c].tolist() == [1] * k + [0] * (T - k)
    assert b["labels"].tolist() == [0, 0, 1, 1]
    assert b["index"].tolist() == [0, 2, 3, 1]
    assert b["numeric"].shape == (4, 1) and b["missing"].shape == (4, 1) and b["categorical"].shape == (4, 0)

    # a batch of short texts is padded to its own maxima, not to max_tokens / max_chunks
    b = collate(ds, [0, 3], pad_id=tok.pad_token_id)
    longest = max(len(ds.chunks[0][0]), len(ds.chunks[3][0]))
    assert b["input_ids"].shape == (2, 1, longest) and longest < 16
    assert b["chunk_mask"].all()
    b = collate(ds, [2], pad_id=tok.pad_token_id)
    assert b["input_ids"].shape == (1, 1, 2)


# ----------------------------------------------------------------------------- preprocessing

def test_fit_uses_the_train_split_only(train_test):
    train, test = train_test
    pre = Preprocessor.fit(train, dcfg(), "tok", "f")
    for c in NUM:
        v = train[c].astype(float)
        st = pre.numeric_stats[c]
        assert st["median"] == pytest.approx(v.median())
        assert st["mean"] == pytest.approx(v.mean())
        assert st["std"] == pytest.approx(v.std(ddof=0))
    # the full data has different statistics, so they really come from train alone
    full = pd.concat([train, test])["Positive Feedback Count"].astype(float)
    assert full.mean() != pytest.approx(pre.numeric_stats["Positive Feedback Count"]["mean"])
    for c in CAT:
        assert pre.vocabularies[c] == sorted(set(train[c].dropna().astype(str)))
    # a refit on train with wildly different test rows around gives the very same state
    test2 = test.copy()
    test2["Age"] = 1000
    assert Preprocessor.fit(train, dcfg(), "tok", "f") == pre

    enc = pre.transform(test, "f")
    for j, c in enumerate(NUM):
        st = pre.numeric_stats[c]
        expected = (test[c].to_numpy(float) - st["mean"]) / st["std"]
        np.testing.assert_allclose(enc.numeric[:, j], expected, rtol=1e-5, atol=1e-5)
    assert enc.rows.tolist() == list(range(300, 400))


def test_json_round_trip_gives_identical_tensors(tmp_path, tok, train_test):
    train, test = train_test
    train, test = train.copy(), test.copy()
    train.loc[train.index[:5], "Age"] = np.nan
    test.loc[test.index[:3], "Age"] = np.nan
    test.loc[test.index[3], "Class Name"] = "Spacesuits"
    train[LABEL] = train[LABEL].map({0: "no", 1: "yes"})
    test[LABEL] = test[LABEL].map({0: "no", 1: "yes"})
    pre = Preprocessor.fit(train, dcfg(), "tok", "f")
    path = str(tmp_path / "preprocessing.json")
    pre.save(path)
    pre2 = Preprocessor.load(path)
    assert pre2 == pre
    assert pre2.classes == ["no", "yes"]
    a = build_dataset(pre, tok, test, "f")
    b = build_dataset(pre2, tok, test, "f")
    assert a.enc.texts == b.enc.texts
    for k in ("numeric", "missing", "categorical", "labels", "rows"):
        np.testing.assert_array_equal(getattr(a.enc, k), getattr(b.enc, k))
    ba, bb = collate(a, np.arange(len(a)), 0), collate(b, np.arange(len(b)), 0)
    assert ba.keys() == bb.keys()
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), k
    assert a.enc.report == b.enc.report
    assert a.enc.report["unseen_categories"] == {"Class Name": 1}


def test_missing_numerics_imputed_with_train_median_and_flagged(train_test):
    train, test = train_test
    train, test = train.copy(), test.copy()
    gone = train.index[::7]
    train.loc[gone, "Age"] = np.nan
    test.loc[test.index[:4], "Age"] = np.nan
    pre = Preprocessor.fit(train, dcfg(), "tok", "f")
    present = train["Age"].dropna().to_numpy(float)
    st = pre.numeric_stats["Age"]
    assert st["median"] == pytest.approx(np.median(present))
    filled = train["Age"].fillna(np.median(present)).to_numpy(float)
    assert st["mean"] == pytest.approx(filled.mean()) and st["std"] == pytest.approx(filled.std())
    j = NUM.index("Age")
    imputed = (st["median"] - st["mean"]) / st["std"]
    for df, missing_rows in ((train, set(gone)), (test, set(test.index[:4]))):
        enc = pre.transform(df, "f")
        is_missing = np.array([r in missing_rows for r in df.index])
        assert enc.missing[:, j].tolist() == is_missing.astype(float).tolist()
        np.testing.assert_allclose(enc.numeric[is_missing, j], imputed, rtol=1e-6)
        assert np.isfinite(enc.numeric).all()
        assert (enc.missing[:, [0, 2]] == 0).all()


def test_blank_string_in_numeric_column_is_missing(train_test):
    train, _ = train_test
    train = train.copy()
    train["Age"] = train["Age"].astype(str)
    train.loc[train.index[2], "Age"] = "  "
    pre = Preprocessor.fit(train, dcfg(), "tok", "f")
    enc = pre.transform(train, "f")
    assert enc.missing[:, NUM.index("Age")].sum() == 1 and enc.missing[2, NUM.index("Age")] == 1


def test_unseen_categories_map_to_zero_and_are_counted(train_test):
    train, test = train_test
    test = test.copy()
    pre = Preprocessor.fit(train, dcfg(), "tok", "f")
    j = CAT.index("Class Name")
    test.loc[test.index[[0, 5, 9]], "Class Name"] = "Spacesuits"
    test.loc[test.index[1], "Class Name"] = None  # missing: index 0 too, but not "unseen"
    enc = pre.transform(test, "f")
    assert enc.categorical[[0, 1, 5, 9], j].tolist() == [0, 0, 0, 0]
    assert enc.report["unseen_categories"] == {"Class Name": 3}
    vocab = pre.vocabularies["Class Name"]
    r = 2
    assert enc.categorical[r, j] == vocab.index(str(test["Class Name"].iloc[r])) + 1
    assert (enc.categorical[[i for i in range(len(test)) if i not in (0, 1, 5, 9)], j] > 0).all()


def test_integer_categories_survive_a_float_column(train_test):
    """An int category column read as floats in another split (a missing value there) still matches."""
    train, test = train_test
    cfg = dcfg(categorical_columns=["Clothing ID"])
    pre = Preprocessor.fit(train, cfg, "tok", "f")
    test = test.copy()
    test["Clothing ID"] = test["Clothing ID"].astype(float)
    test.loc[test.index[0], "Clothing ID"] = np.nan
    seen = test["Clothing ID"].isin(train["Clothing ID"].astype(float))
    enc = pre.transform(test, "f")
    assert (enc.categorical[:, 0] > 0).tolist() == seen.tolist()
    assert enc.report.get("unseen_categories", {}).get("Clothing ID", 0) == int((~seen).sum() - 1)


# ----------------------------------------------------------------------------- labels

def test_int_labels(train_test):
    train, test = train_test
    pre = Preprocessor.fit(train, dcfg(numeric_columns=["Age"], label_column="Rating"), "tok", "f")
    assert pre.label_type == "int" and pre.classes == [1, 2, 3, 4, 5] and pre.num_classes == 5
    enc = pre.transform(test, "f")
    assert enc.labels.tolist() == (test["Rating"] - 1).tolist()


def test_string_labels_binary_and_multiclass(train_test):
    train, test = train_test
    tr, te = train.copy(), test.copy()
    tr[LABEL] = tr[LABEL].map({0: "no", 1: "yes"})
    te[LABEL] = te[LABEL].map({0: "no", 1: "yes"})
    pre = Preprocessor.fit(tr, dcfg(), "tok", "f")
    assert pre.label_type == "string" and pre.classes == ["no", "yes"]
    assert pre.transform(te, "f").labels.tolist() == test[LABEL].tolist()

    cfg = dcfg(categorical_columns=["Division Name", "Class Name"], label_column="Department Name")
    pre = Preprocessor.fit(train, cfg, "tok", "f")
    classes = sorted(set(train["Department Name"]))
    assert pre.classes == classes and pre.num_classes == len(classes) >= 3
    enc = pre.transform(test[test["Department Name"].isin(classes)], "f")
    assert enc.labels.tolist() == [classes.index(v) for v in test["Department Name"] if v in classes]


def test_onehot_labels_from_a_jsonl_file(tmp_path, train_test):
    train, _ = train_test
    df = train[["Title", "Review Text", "Age"]].copy()
    k = train["Rating"].to_numpy() - 1  # 5 classes
    df["y"] = [[int(i == c) for i in range(5)] for c in k]
    path = tmp_path / "onehot.jsonl"
    df.to_json(path, orient="records", lines=True)
    loaded = load_table(str(path))
    pre = Preprocessor.fit(loaded, dcfg(numeric_columns=["Age"], categorical_columns=[], label_column="y"),
                           "tok", str(path))
    assert pre.label_type == "onehot" and pre.classes == [0, 1, 2, 3, 4]
    assert pre.transform(loaded, str(path)).labels.tolist() == k.tolist()
    bad = loaded.copy()
    bad.at[7, "y"] = [1, 1, 0, 0, 0]
    with pytest.raises(DataError, match=r"column 'y', row 7"):
        pre.transform(bad, str(path))


@pytest.mark.parametrize("bad", [7, "maybe"])
def test_label_outside_the_map_names_the_row(train_test, bad):
    train, test = train_test
    pre = Preprocessor.fit(train, dcfg(), "tok", "train.csv")
    test = test.copy().astype({LABEL: object})
    test.loc[317, LABEL] = bad
    with pytest.raises(DataError) as e:
        pre.transform(test, "val.csv")
    msg = str(e.value)
    assert "val.csv" in msg and f"'{LABEL}'" in msg and "row 317" in msg and str(bad) in msg


def test_missing_label_names_the_row(train_test):
    train, _ = train_test
    train = train.copy().astype({LABEL: object})
    train.loc[42, LABEL] = None
    with pytest.raises(DataError, match=r"'Recommended IND', row 42: the label is missing"):
        Preprocessor.fit(train, dcfg(), "tok", "train.csv")


def test_non_numeric_value_in_numeric_column(train_test):
    train, test = train_test
    pre = Preprocessor.fit(train, dcfg(), "tok", "train.csv")
    test = test.copy().astype({"Age": object})
    test.loc[355, "Age"] = "forty-two"
    with pytest.raises(DataError) as e:
        pre.transform(test, "val.csv")
    msg = str(e.value)
    assert "val.csv" in msg and "'Age'" in msg and "row 355" in msg and "forty-two" in msg
    tr = train.copy().astype({"Rating": object})
    tr.loc[12, "Rating"] = "five"
    with pytest.raises(DataError, match=r"numeric column 'Rating', row 12"):
        Preprocessor.fit(tr, dcfg(), "tok", "train.csv")


# ----------------------------------------------------------------------------- splits and files

def test_splits_cover_every_row_once(tmp_path, reviews):
    path = str(tmp_path / "r.parquet")
    reviews.to_parquet(path)
    splits = load_splits(dcfg(path=path, split=SplitConfig(fractions=[0.7, 0.2, 0.1], seed=3)))
    sizes = {k: len(s.df) for k, s in splits.items()}
    assert sizes == {"train": 280, "val": 80, "test": 40}
    rows = np.concatenate([s.df.index.to_numpy() for s in splits.values()])
    assert sorted(rows.tolist()) == list(range(400))
    again = load_splits(dcfg(path=path, split=SplitConfig(fractions=[0.7, 0.2, 0.1], seed=3)))
    assert all(again[k].df.index.equals(splits[k].df.index) for k in splits)

    (tmp_path / "tr.txt").write_text("\n".join(map(str, range(0, 400, 2))) + "\n")
    (tmp_path / "va.txt").write_text("\n".join(map(str, range(1, 400, 2))) + "\n")
    s = load_splits(dcfg(path=path, split=SplitConfig(train_indices=str(tmp_path / "tr.txt"),
                                                      val_indices=str(tmp_path / "va.txt")),
                         max_train_rows=50, max_eval_rows=20))
    assert s["train"].df.index.tolist() == list(range(0, 100, 2))
    assert s["val"].df.index.tolist() == list(range(1, 40, 2))
    assert s["train"].df["Age"].tolist() == reviews["Age"].iloc[0:100:2].tolist()


def test_missing_column_names_column_and_file(tmp_path, reviews):
    path = str(tmp_path / "no_text.csv")
    reviews.drop(columns=["Review Text"]).to_csv(path, index=False)
    with pytest.raises(DataError) as e:
        load_splits(dcfg(path=path, split=SplitConfig(fractions=[0.5, 0.5])))
    assert "'Review Text'" in str(e.value) and path in str(e.value)


# ----------------------------------------------------------------------------- broken rows, stray and pinned labels

def test_broken_row_names_the_file_and_line(tmp_path):
    from mmbert.data.io import load_table
    from mmbert.errors import DataError

    path = tmp_path / "broken.csv"
    path.write_text("a,b\n1,2\n3,4,5\n6,7\n")
    with pytest.raises(DataError, match=rf"cannot read data file {path}: .*line 3"):
        load_table(str(path))


def test_stray_label_in_the_train_split_is_warned_about_by_row(work, tok):
    """In the train split there is no label map yet: a `7` in 0/1 data becomes a third class. Training logs the
    label map with its counts and warns about a class with a single row, naming file, column and row."""
    import logging

    from mmbert.config import DataConfig
    from mmbert.data.pipeline import build_dataset, log_label_map
    from mmbert.data.preprocess import Preprocessor

    df = pd.read_csv(work / "label7.csv")
    cfg = DataConfig(text_columns=["Title"], numeric_columns=["Age"], label_column=LABEL, max_tokens=16, max_chunks=1)
    pre = Preprocessor.fit(df, cfg, "tok", "label7.csv")
    assert pre.classes == [0, 1, 7]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mmbert.main")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_label_map(pre, build_dataset(pre, tok, df, "label7.csv"), "label7.csv")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    counts = df[LABEL].value_counts()
    assert f"label map of '{LABEL}' (train rows): 0={counts[0]}, 1={counts[1]}, 7=1" in messages
    warning = [m for r, m in zip(records, messages) if r.levelno == logging.WARNING and "only train row" in m]
    assert warning == [f"label7.csv: column '{LABEL}', row 131: label 7 is the only train row of its class (every "
                       f"distinct train label is a class): check for a stray value"]


def test_pinned_label_map_keeps_its_order_and_names(work):
    """The pinned order is the class order (binary: the second is the positive class); string maps work too."""
    from mmbert.config import DataConfig
    from mmbert.data.preprocess import Preprocessor

    df = pd.read_csv(work / "train.csv")
    cfg = DataConfig(text_columns=["Title"], label_column=LABEL, labels=[1, 0])
    pre = Preprocessor.fit(df, cfg, "tok", "train.csv")
    assert pre.classes == [1, 0] and pre.labels_pinned
    labels = df[LABEL].to_numpy()
    assert (pre.encode_labels(df, "train.csv") == 1 - labels).all()
    named = df.assign(**{LABEL: np.where(labels == 1, "yes", "no")})
    cfg = DataConfig(text_columns=["Title"], label_column=LABEL, labels=["no", "yes", "maybe"])
    pre = Preprocessor.fit(named, cfg, "tok", "named.csv")
    assert pre.classes == ["no", "yes", "maybe"] and pre.label_type == "string"
    assert (pre.encode_labels(named, "named.csv") == labels).all()


# ----------------------------------------------------------------------------- text and numeric edge cases

def test_empty_and_whitespace_texts_are_counted_and_give_one_empty_chunk(tok):
    from mmbert.config import DataConfig
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.preprocess import Preprocessor

    df = pd.DataFrame({"a": ["fine", "", "   \n\t", None, np.nan, "ok"], "b": [None, " ", "", "  ", None, "x"],
                       "x": [1.0, 2, 3, 4, 5, 6], "y": [0, 1, 0, 1, 0, 1]})
    pre = Preprocessor.fit(df, DataConfig(text_columns=["a", "b"], numeric_columns=["x"], label_column="y",
                                          max_tokens=16, max_chunks=2), "tok", "t.csv")
    ds = build_dataset(pre, tok, df, "t.csv")
    assert ds.enc.texts == ["fine", "", "", "", "", "ok. x"]
    assert ds.enc.report["empty_texts"] == 4
    for i in (1, 2, 3, 4):  # one [CLS] [SEP] chunk: the model masks it (tests/test_model.py)
        assert [c.tolist() for c in ds.chunks[i]] == [[tok.cls_token_id, tok.sep_token_id]]


@pytest.mark.parametrize("kind", ["sentences", "long words", "one word"])
def test_100k_character_text_is_capped_by_max_chunks_and_reported(tok, kind):
    """A 100k-character text keeps exactly the first max_chunks chunks of its full tokenization, and is
    counted as cut when it has more; a text slightly over the character cap loses nothing."""
    from mmbert.data.tokenize import chunk_tokenize

    text = {"sentences": "The dress fits well and the colour is lovely. " * 2200,
            "long words": ("a" * 150 + " ") * 700,  # each word one [UNK]: 700 tokens
            "one word": "a" * 100_000}[kind]  # one [UNK]: nothing to cut
    short = "x" * 600 + " fits well" * 10  # just over 3 x 14 x 16 characters: the cap must not cut it
    assert len(text) >= 100_000
    full = [tok(t, add_special_tokens=False)["input_ids"] for t in (text, short)]
    chunks, truncated = chunk_tokenize(tok, [text, short], max_tokens=16, max_chunks=3)
    assert truncated == (1 if len(full[0]) > 42 else 0)
    assert truncated == {"sentences": 1, "long words": 1, "one word": 0}[kind]
    for ch, ids in zip(chunks, full):
        assert len(ch) <= 3 and all(c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id for c in ch)
        assert [t for c in ch for t in c[1:-1]] == ids[:42]


def test_infinite_and_huge_numerics_are_missing_or_clipped_and_counted():
    """+-inf, and values beyond float32's range (infinite for the model), are missing (median + indicator);
    standardised values beyond +-1e4 are clipped: every case counted, every model input finite."""
    from mmbert.config import DataConfig
    from mmbert.data.preprocess import Preprocessor

    df = pd.DataFrame({"t": ["a"] * 6, "x": [1.0, np.inf, 3.0, -np.inf, 1e39, 5.0], "y": [0, 1] * 3})
    pre = Preprocessor.fit(df, DataConfig(text_columns=["t"], numeric_columns=["x"], label_column="y"), "tok", "f")
    assert pre.numeric_stats["x"]["median"] == 3.0  # from the finite values only
    enc = pre.transform(df, "f")
    assert enc.missing[:, 0].tolist() == [0, 1, 0, 1, 1, 0]
    assert np.isfinite(enc.numeric).all()
    assert enc.report == {"infinite_numeric_as_missing": {"x": 3}}
    test = df.assign(x=[1e30, -1e30, 2.0, np.nan, 4.0, 1e38])
    enc = pre.transform(test, "f")
    assert enc.report == {"numeric_clipped": {"x": 3}}
    assert enc.numeric[:, 0].tolist()[:2] == [1e4, -1e4] and np.isfinite(enc.numeric).all()


# ----------------------------------------------------------------------------- stale cache, ids

@pytest.mark.parametrize("new_rows", [4, 6], ids=["same size", "different size"])
def test_rewritten_file_with_restored_mtime_is_read_again(tmp_path, monkeypatch, new_rows):
    """cp -p / rsync -t / tar restore the old mtime over new content: the new rows must be read, never the
    cached old ones (the datasets cache keyed a local file on path + mtime)."""
    from mmbert.data.io import load_table

    monkeypatch.setenv("MMBERT_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.csv"
    pd.DataFrame({"id": [1, 2, 3, 4], "x": [0.5] * 4}).to_csv(path, index=False)
    before = os.stat(path)
    assert load_table(str(path))["id"].tolist() == [1, 2, 3, 4]
    new = pd.DataFrame({"id": [5 + i for i in range(new_rows)], "x": [0.5] * new_rows})
    new.to_csv(path, index=False)
    if new_rows == 4:
        assert os.path.getsize(path) == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert load_table(str(path))["id"].tolist() == new["id"].tolist()


def test_integer_ids_of_a_parquet_file_with_missing_values_stay_integers(tmp_path, monkeypatch):
    """Parquet/JSON ids are cast to text in Arrow: a nullable int64 column does not go through float."""
    from mmbert.data.io import load_table

    monkeypatch.setenv("MMBERT_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "t.parquet"
    pd.DataFrame({"rid": pd.array([9007199254740993, None, 123], dtype="Int64"), "x": [1.0, 2, 3]}).to_parquet(path)
    ids = load_table(str(path), ["rid"])["rid"]
    assert ids[0] == "9007199254740993" and pd.isna(ids[1]) and ids[2] == "123"
    assert load_table(str(path))["x"].tolist() == [1.0, 2.0, 3.0]  # other columns keep their types


# ----------------------------------------------------------------------------- evaluation shards: fewer rows than ranks

def test_eval_shard_gives_every_rank_the_same_number_of_positions():
    from mmbert.data.samplers import eval_shard

    for n in range(1, 8):
        for world in range(1, 6):
            parts = [eval_shard(n, r, world, np.arange(n)) for r in range(world)]
            assert len({len(s) for s, _ in parts}) == 1
            own = np.concatenate([s[real] for s, real in parts])
            assert sorted(own.tolist()) == list(range(n))


# ----------------------------------------------------------------------------- property-based preprocessing

_texts = st.one_of(st.none(), st.just(""), st.just(" \t\n"), st.text(max_size=40),
                   st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=600))
_numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                     st.sampled_from(["", " ", "3.5", "1e3", "-7", "NaN", "inf"]), st.booleans())
_cats = st.one_of(st.none(), st.just(float("nan")), st.text(max_size=5), st.integers(0, 5),
                  st.floats(0, 5).map(float))


@st.composite
def tables(draw, label_kind: str):
    n = draw(st.integers(1, 12))

    def col(s):
        return draw(st.lists(s, min_size=n, max_size=n))

    labels = col(st.sampled_from([0, 1, 2] if label_kind == "int" else ["no", "yes"]))
    df = pd.DataFrame({"t1": col(_texts), "t2": col(_texts), "x": col(_numbers), "c": col(_cats), "y": labels})
    # now and then one bad cell: a missing label, text in the numeric column
    if draw(st.integers(0, 7)) == 0:
        df.loc[draw(st.integers(0, n - 1)), "y"] = None
    if draw(st.integers(0, 7)) == 0:
        df["x"] = df["x"].astype(object)
        df.loc[draw(st.integers(0, n - 1)), "x"] = "abc"
    # odd dtypes for the same values: pandas' nullable / categorical / string types, float32, bool
    for c, dtypes in (("x", ["Float64", "float32", "string", "bool"]), ("c", ["category", "string", "Int64"]),
                      ("y", ["Int64", "string", "category"])):
        dtype = draw(st.sampled_from([None, *dtypes]))
        if dtype is not None:
            try:
                df[c] = df[c].astype(dtype)
            except (TypeError, ValueError, OverflowError):
                pass  # these values cannot take that dtype: keep them as they are
    return df


@st.composite
def train_and_test(draw):
    kind = draw(st.sampled_from(["int", "str"]))
    return draw(tables(kind)), draw(tables(kind))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tables=train_and_test())
def test_random_tables_give_valid_tensors_or_a_clear_error(tok, tables):
    from mmbert.config import DataConfig
    from mmbert.data.dataset import collate
    from mmbert.data.pipeline import build_dataset
    from mmbert.data.preprocess import Preprocessor

    train, test = tables
    test.index = test.index + 1000  # rows of another file
    cfg = DataConfig(text_columns=["t1", "t2"], numeric_columns=["x"], categorical_columns=["c"], label_column="y",
                     max_tokens=12, max_chunks=2)
    try:
        pre = Preprocessor.fit(train, cfg, "tok", "train.csv")
        for df, file in ((train, "train.csv"), (test, "test.csv")):
            ds = build_dataset(pre, tok, df, file)
            b = collate(ds, np.arange(len(ds)), tok.pad_token_id)
            n = len(df)
            B, C, T = b["input_ids"].shape
            assert B == n and 1 <= C <= 2 and 2 <= T <= 12
            assert b["attention_mask"].shape == (B, C, T) and b["chunk_mask"][:, 0].all()
            assert torch.isfinite(b["numeric"]).all() and b["numeric"].shape == (n, 1)
            assert set(b["missing"].unique().tolist()) <= {0.0, 1.0}
            assert ((b["categorical"] >= 0) & (b["categorical"] <= len(pre.vocabularies["c"]))).all()
            assert ((b["labels"] >= 0) & (b["labels"] < pre.num_classes)).all() and pre.num_classes >= 2
            assert ds.enc.rows.tolist() == df.index.tolist()
    except MMBertError as e:
        msg = str(e)
        assert "\n" not in msg and ("train.csv" in msg or "test.csv" in msg), msg


def test_building_in_blocks_gives_the_whole_frames_dataset(tok, reviews, monkeypatch):
    """build_dataset encodes and tokenizes BUILD_BLOCK rows at a time: arrays, chunks, row numbers and the
    data-fix report (duplicate ids counted across blocks, unseen categories, cut texts summed) are those of
    the frame in one block; keep_texts=False keeps no text."""
    from mmbert.data import pipeline
    from mmbert.data.preprocess import Preprocessor

    df = reviews.iloc[:200].copy()
    df.insert(0, "rid", [f"r{i}" for i in range(120)] + [f"r{i % 50}" for i in range(80)])
    train, test = df.iloc[:120], df.iloc[120:].copy()  # test's last 30 ids repeat ids of its first blocks
    test.loc[test.index[::9], "Class Name"] = "never seen"
    pre = Preprocessor.fit(train, dcfg(id_column="rid", max_chunks=1), "tok", "f")
    whole = pipeline.build_dataset(pre, tok, test, "f")
    monkeypatch.setattr(pipeline, "BUILD_BLOCK", 7)
    blocks = pipeline.build_dataset(pre, tok, test, "f", keep_texts=False)
    assert whole.enc.report["duplicate_ids"] == 30 and whole.enc.report["texts_cut_at_max_chunks"] > 0
    assert blocks.enc.report == whole.enc.report and blocks.truncated_texts == whole.truncated_texts
    for k in ("rows", "numeric", "missing", "categorical", "labels", "ids"):
        np.testing.assert_array_equal(getattr(blocks.enc, k), getattr(whole.enc, k), err_msg=k)
    assert [[c.tolist() for c in r] for r in blocks.chunks] == [[c.tolist() for c in r] for r in whole.chunks]
    assert blocks.enc.texts == [] and len(whole.enc.texts) == 80


def test_a_label_of_non_integer_numbers_stops_with_the_choice_to_make():
    """3.5 as a label (label_type auto) would train one class per value and exit 0: the user chooses instead;
    integers stored as floats (0.0 / 1.0) stay classes, and regression or string labels take the values."""
    df = pd.DataFrame({"t": ["a b c"] * 6, "y": [1.5, 2.0, 3.25, 1.5, 2.0, 3.25]})
    with pytest.raises(DataError, match=r"f.csv: label column 'y' holds non-integer numbers \(e.g. 1.5\): to predict "
                                        r"the number, give --task regression .*--label-type string"):
        Preprocessor.fit(df, DataConfig(text_columns=["t"], label_column="y"), "tok", "f.csv")
    as_floats = df.assign(y=[0.0, 1.0] * 3)
    assert Preprocessor.fit(as_floats, DataConfig(text_columns=["t"], label_column="y"), "tok", "f").classes == [0, 1]
    strings = Preprocessor.fit(df, DataConfig(text_columns=["t"], label_column="y", label_type="string"), "tok", "f")
    assert strings.classes == ["1.5", "2.0", "3.25"]
    regression = Preprocessor.fit(df, DataConfig(text_columns=["t"], label_column="y", task="regression"), "tok", "f")
    assert regression.task == "regression"
