"""Data: chunked tokenization, dynamic collate, preprocessing fitted on train only, labels, bad input."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmbert.config import DataConfig, SplitConfig
from mmbert.data.dataset import collate
from mmbert.data.io import load_table
from mmbert.data.pipeline import build_dataset, load_splits
from mmbert.data.preprocess import Preprocessor
from mmbert.data.tokenize import chunk_tokenize, load_tokenizer
from mmbert.errors import DataError

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
