"""Config: typed YAML + CLI overrides, one clear message naming the key for every mistake."""
from __future__ import annotations

import os

import pytest
import yaml
from conftest import ROOT, assert_one_line_error, train_cli, write_config

from mmbert.cli import parse_train_args
from mmbert.config import Config, load_config
from mmbert.errors import ConfigError


@pytest.fixture
def cfg_path(tmp_path):
    # Config tests never load the encoder or the data: plain strings are enough.
    return write_config(tmp_path / "c.yaml", "some/encoder", "data.parquet")


def _with(path, section, **values):
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw[section].update(values)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def test_valid_file_loads_typed_values(cfg_path):
    cfg = load_config(cfg_path)
    assert isinstance(cfg, Config)
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.split.fractions == [0.75, 0.25]
    assert cfg.data.text_columns == ["Title", "Review Text"]
    assert cfg.model.hidden_dim == 32 and cfg.model.num_heads == 2


def test_shipped_config_is_valid():
    cfg = load_config(os.path.join(ROOT, "configs", "womens_clothing.yaml"))
    assert cfg.data.label_column == "Recommended IND"
    assert cfg.model.fusion == "cross_attn"
    assert cfg.data.split.train_indices == os.path.abspath("data/splits/train_idx.txt")  # absolute once loaded


@pytest.mark.parametrize("section,key,expected", [
    ("train", "bach_size", "train.bach_size"),
    ("model", "hiden_dim", "model.hiden_dim"),
    ("data", "split", "data.split.sed"),  # nested section: the full dotted path is named
])
def test_unknown_key_is_named(cfg_path, section, key, expected):
    value = {"fractions": [0.5, 0.5], "sed": 1} if key == "split" else 8
    _with(cfg_path, section, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    msg = str(e.value)
    assert f"'{expected}'" in msg
    assert "\n" not in msg


def test_unknown_section_is_named(cfg_path):
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(cfg_path, [("trian.lr", 1.0)])


@pytest.mark.parametrize("key,value", [
    ("train.batch_size", "eight"),
    ("train.batch_size", 2.5),
    ("train.lr", "fast"),
    ("train.progress", "yes"),
    ("model.fusion", "attention"),
    ("data.text_columns", {"a": 1}),
    ("data.split", 3),
])
def test_wrong_type_is_named(cfg_path, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path, [(key, value)])
    assert f"'{key}'" in str(e.value)


def test_number_coercion(cfg_path):
    cfg = load_config(cfg_path, [("train.lr", "2e-5"), ("train.batch_size", 4.0), ("data.text_columns", "Title")])
    assert cfg.train.lr == pytest.approx(2e-5)
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)
    assert cfg.data.text_columns == ["Title"]  # a single string becomes a one-item list


def test_num_heads_must_divide_hidden_dim(cfg_path):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path, [("model.hidden_dim", 30), ("model.num_heads", 4)])
    assert "model.num_heads" in str(e.value) and "30" in str(e.value)
    assert load_config(cfg_path, [("model.hidden_dim", 32), ("model.num_heads", 4)]).model.num_heads == 4


def test_tab_only_needs_tabular_columns(cfg_path):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path, [("model.fusion", "tab_only"), ("data.numeric_columns", []),
                               ("data.categorical_columns", [])])
    assert "tab_only" in str(e.value) and "numeric_columns" in str(e.value)
    # with one tabular column it is fine
    cfg = load_config(cfg_path, [("model.fusion", "tab_only"), ("data.numeric_columns", ["Age"]),
                                 ("data.categorical_columns", [])])
    assert cfg.model.fusion == "tab_only"


@pytest.mark.parametrize("overrides,fragment", [
    ([("data.max_tokens", 4)], "data.max_tokens"),
    ([("train.batch_size", 0)], "train.batch_size"),
    ([("model.dropout", 1.0)], "model.dropout"),
    ([("data.split.fractions", [0.5, 0.6])], "data.split.fractions"),
    ([("data.numeric_columns", ["Title"])], "Title"),  # a column with two roles
    ([("data.label_column", None)], "data.label_column"),
])
def test_impossible_values_are_named(cfg_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(cfg_path, overrides)


def test_set_values_are_parsed_as_yaml(cfg_path):
    cfg, _ = parse_train_args([
        "--config", cfg_path,
        "--set", "train.lr=1e-4",
        "--set", "train.max_grad_norm=null",
        "--set", "train.bucket_by_length=false",
        "--set", "data.text_columns=[Title, Review Text]",
        "--set", "data.split.seed=7",
        "--set", "train.class_weights=[1, 3.5]",
        "--set", "data.text_separator= | ",
    ])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_grad_norm is None
    assert cfg.train.bucket_by_length is False
    assert cfg.data.text_columns == ["Title", "Review Text"]
    assert cfg.data.split.seed == 7
    assert cfg.train.class_weights == [1.0, 3.5]
    assert cfg.data.split.fractions == [0.75, 0.25]  # untouched sibling key kept


def test_set_errors(cfg_path):
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_train_args(["--config", cfg_path, "--set", "train.lr"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_train_args(["--config", cfg_path, "--set", "lr=0.1"])
    with pytest.raises(ConfigError, match="'train.bach_size'"):
        parse_train_args(["--config", cfg_path, "--set", "train.bach_size=4"])


def test_shortcut_flags(cfg_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg, _ = parse_train_args([
        "--config", cfg_path, "--data", "other.csv", "--output-dir", "runs/y", "--strategy", "ddp",
        "--fusion", "gated", "--max-steps", "3", "--max-train-rows", "32", "--max-eval-rows", "16",
        "--batch-size", "4", "--max-tokens", "64", "--max-chunks", "3", "--log-every", "2",
        "--checkpoint-every", "5", "--resume", str(ckpt), "--seed", "11", "--overwrite",
    ])
    assert cfg.data.path == os.path.abspath("other.csv")
    assert cfg.train.output_dir == "runs/y"
    assert cfg.dist.strategy == "ddp"
    assert cfg.model.fusion == "gated"
    assert cfg.train.max_steps == 3
    assert cfg.data.max_train_rows == 32 and cfg.data.max_eval_rows == 16
    assert cfg.train.batch_size == 4
    assert cfg.data.max_tokens == 64 and cfg.data.max_chunks == 3
    assert cfg.train.log_every == 2 and cfg.train.checkpoint_every == 5
    assert cfg.train.resume == str(ckpt)
    assert cfg.train.seed == 11
    assert cfg.train.overwrite is True
    assert cfg.model.hidden_dim == 32  # from the file


def test_precedence_flag_over_set_over_file(cfg_path):
    cfg, _ = parse_train_args(["--config", cfg_path, "--set", "train.batch_size=4"])
    assert cfg.train.batch_size == 4
    cfg, _ = parse_train_args(["--config", cfg_path, "--set", "train.batch_size=4", "--batch-size", "2"])
    assert cfg.train.batch_size == 2
    cfg, _ = parse_train_args(["--config", cfg_path, "--resume", "auto"])
    assert cfg.train.resume == "auto"


def test_bad_flag_values_are_config_errors(cfg_path):
    with pytest.raises(ConfigError, match="fusion"):
        parse_train_args(["--config", cfg_path, "--fusion", "attention"])
    with pytest.raises(ConfigError, match="strategy"):
        parse_train_args(["--config", cfg_path, "--strategy", "horovod"])
    with pytest.raises(ConfigError, match="max-steps"):
        parse_train_args(["--config", cfg_path, "--max-steps", "two"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        parse_train_args(["--config", cfg_path, "--max-steps", "0"])
    with pytest.raises(ConfigError, match="train.resume"):
        parse_train_args(["--config", cfg_path, "--resume", "/no/such/checkpoint"])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


# ----------------------------------------------------------------------------- through train.py
# Real processes: the same kind of mistakes end in one `error:` line (exit 2).

@pytest.mark.slow
@pytest.mark.parametrize("args,fragments", [
    (["--set", "data.labels=[1]"], ["'data.labels'", "at least 2 distinct"]),
    (["--set", "data.labels=[0, 1, 0]"], ["'data.labels'", "at least 2 distinct"]),
    (["--set", "train.bach_size=4"], ["'train.bach_size'"]),  # unknown key
    (["--set", "train.lr=fast"], ["'train.lr'", "fast"]),  # wrong type
    (["--set", "model.fusion=attention"], ["'model.fusion'", "attention"]),  # unknown fusion
    (["--strategy", "horovod"], ["--strategy", "horovod"]),  # unknown strategy
], ids=["one pinned label", "repeated pinned label", "unknown key", "wrong type", "unknown fusion",
        "unknown strategy"])
def test_train_bad_config_is_one_line(train_cfg, tmp_path, args, fragments):
    assert_one_line_error(train_cli(train_cfg, tmp_path / "run", *args), *fragments)


@pytest.mark.slow
def test_train_wrong_class_weight_length(train_cfg, tmp_path):
    r = train_cli(train_cfg, tmp_path / "run", "--set", "train.class_weights=[1, 2, 3]")
    assert_one_line_error(r, "'train.class_weights'", "3 values", "2 classes")


@pytest.mark.slow
@pytest.mark.parametrize("encoder,fragments", [
    ("no-such-org/no-such-model", ["tokenizer 'no-such-org/no-such-model'", "HF_HUB_OFFLINE=1"]),
    ("/no/such/encoder/folder", ["encoder folder not found: /no/such/encoder/folder"]),
], ids=["hub id", "folder"])
def test_train_encoder_not_found_offline(train_cfg, tmp_path, encoder, fragments):
    r = train_cli(train_cfg, tmp_path / "run", "--encoder", encoder, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r, *fragments)


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(train_cfg, tmp_path):
    r = train_cli(train_cfg, tmp_path / "run", "--data", str(tmp_path / "nope.csv"), "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "DataError" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: data file not found: {tmp_path / 'nope.csv'}"
