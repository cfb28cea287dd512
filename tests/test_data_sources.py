"""`data.path` / `--data` beyond files: a `Dataset.save_to_disk` folder, a `DatasetDict.save_to_disk` folder
(its train / validation / test become the run's splits), and `hub:NAME[:CONFIG]` (clear offline error)."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
from conftest import write_config

from mmbert.config import load_config
from mmbert.data.io import load_table
from mmbert.data.pipeline import load_splits, select_splits
from mmbert.errors import ConfigError, DataError


@pytest.fixture
def frames(reviews):
    df = reviews.iloc[:90].copy()
    df.insert(0, "rid", [f"{i:05d}" for i in range(len(df))])  # leading zeros: ids must stay text
    return df


def test_saved_dataset_folder_reads_like_the_file(frames, tmp_path):
    datasets.Dataset.from_pandas(frames, preserve_index=False).save_to_disk(str(tmp_path / "saved"))
    frames.to_parquet(tmp_path / "d.parquet")
    got, ref = load_table(str(tmp_path / "saved"), ["rid"]), load_table(str(tmp_path / "d.parquet"), ["rid"])
    assert got.equals(ref) and got["rid"].iloc[3] == "00003"


def test_dataset_dict_folder_gives_the_splits(frames, tiny_bert, tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frames.iloc[:60], preserve_index=False),
                               "validation": datasets.Dataset.from_pandas(frames.iloc[60:75], preserve_index=False),
                               "test": datasets.Dataset.from_pandas(frames.iloc[75:], preserve_index=False)})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "dd"),
                                   data={"id_column": "rid", "split": {}}))
    splits = load_splits(cfg.data)
    assert {k: len(v.df) for k, v in splits.items()} == {"train": 60, "val": 15, "test": 15}
    assert splits["val"].df["rid"].tolist() == frames["rid"].iloc[60:75].tolist()
    assert splits["test"].file == f"{tmp_path / 'dd'}[test]"
    # one split's folder is a table of its own; the dict itself needs a split named
    assert len(load_table(str(tmp_path / "dd" / "test"))) == 15
    with pytest.raises(DataError, match="is a DatasetDict with splits train, validation, test"):
        load_table(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match="its splits are used"):
        select_splits(load_config(write_config(tmp_path / "f.yaml", tiny_bert, str(tmp_path / "dd"))).data)


def test_dataset_dict_without_a_configured_column_is_the_column_error(frames, tiny_bert, tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frames.drop(columns=["Age"]), preserve_index=False)}
                         ).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "dd"), data={"split": {}}))
    with pytest.raises(DataError, match=r"dd\[train\]: configured column 'Age' is missing"):
        load_splits(cfg.data)


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load dataset hub:mmbert-no-such/reviews:default \(HF_HUB_OFFLINE=1"):
        load_table("hub:mmbert-no-such/reviews:default")


def test_token_cache_key_follows_a_saved_dataset_s_bytes(frames, tiny_bert, tmp_path):
    from mmbert.data.cache import run_data_key
    from mmbert.data.tokenize import load_tokenizer

    tok = load_tokenizer(tiny_bert)
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frames, preserve_index=False)}).save_to_disk(
        str(tmp_path / "dd"))
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "dd"), data={"split": {}}))
    before = run_data_key(cfg, tok)
    changed = frames.copy()
    changed.loc[changed.index[0], "Title"] = "changed"
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(changed, preserve_index=False)}).save_to_disk(
        str(tmp_path / "dd"))
    assert run_data_key(cfg, tok) != before and np.all(load_splits(cfg.data)["train"].df["Title"].iloc[:1] == "changed")
