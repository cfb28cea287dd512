"""Settings declared once (mmbert/settings.py): every config key is a flag and an mmbert.train keyword with the
same meaning, unknown names point at the right one, validation changes nothing, and docs/CONFIGURATION.md is
generated from the fields. No model, no data loading."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import typing

import pytest
import yaml
from conftest import ROOT

from mmbert.api import _config
from mmbert.cli import (build_eval_parser, build_train_parser, configuration_reference, parse_eval_args,
                        parse_train_args)
from mmbert.config import Config, config_from_dict, load_config, parse_duration
from mmbert.errors import ConfigError
from mmbert.evaluation.options import EvalOptions
from mmbert.settings import build, by_name, given, leaves, split_optional

VALID = {"data": {"path": "d.csv", "text_columns": ["Title"], "label_column": "y"}}


def _flag_text(leaf) -> list[str]:
    """A non-default value for the leaf's flag, as typed on the command line."""
    base = split_optional(leaf.tp)[0]
    if base is bool:
        return [leaf.flag]
    if "const" in leaf.meta:
        return [leaf.flag]
    choices = leaf.choices()
    if choices:
        return [leaf.flag, next(str(c) for c in reversed(choices) if c != leaf.default)]
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        return [leaf.flag, "0.25,0.75" if item is float else "1,2" if item is not str else "a,b"]
    return [leaf.flag, {int: "3", float: "0.5", str: "x"}[base]]


def _nested(pairs) -> dict:
    raw: dict = {}
    for key, value in pairs:
        *sections, name = key.split(".")
        node = raw
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return raw


def test_every_config_key_is_a_flag_with_help():
    options = {o for a in build_train_parser()._actions for o in a.option_strings}
    for leaf in leaves(Config):
        assert leaf.flag in options, leaf.key
        assert leaf.meta.get("help"), f"{leaf.key} has no help text"
    assert {"--data", "--label", "--split-seed", "--accept-changed-data", "--no-cache", "--overwrite",
            "--max-eval-rows", "--text-columns", "--no-progress", "--max-time", "--num-proc"} <= options


@pytest.mark.parametrize("leaf", leaves(Config), ids=lambda lf: lf.key)
def test_flag_keyword_and_yaml_key_set_the_same_value(leaf):
    args = build_train_parser().parse_args(_flag_text(leaf))
    (key, value), = given(args, Config).items()
    assert key == leaf.key and value != leaf.default
    keyword = True if "const" in leaf.meta else value  # a const flag's keyword is a switch
    named = by_name(Config)[leaf.name]
    assert named.key == leaf.key and named.python_value(keyword) == value
    from_yaml = build(Config, _nested([(leaf.key, value)]))
    from_flag = build(Config, _nested(given(args, Config).items()))
    assert from_yaml == from_flag


def _table(folder, name: str, text: list[str], numeric: tuple = ()):
    """A data file holding just these columns and the label y (a role flag infers the columns it does not name,
    from the file: here there are none left to infer)."""
    import pandas as pd

    columns = {c: [f"{c} value number {i}" for i in range(12)] for c in text}
    columns.update({c: [i * 1.5 for i in range(12)] for c in numeric})
    pd.DataFrame({**columns, "y": [0, 1] * 6}).to_csv(folder / name, index=False)


def test_a_whole_config_from_flags_keywords_and_yaml_is_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _table(tmp_path, "d.csv", ["a", "b"], numeric=("n",))
    flags = ["--data", "d.csv", "--label", "y", "--text-columns", "a,b", "--numeric-columns", "n", "--split-seed",
             "7", "--fractions", "0.8,0.2", "--max-eval-rows", "5", "--no-cache", "--overwrite",
             "--accept-changed-data", "--lr", "2e-4", "--fusion", "gated", "--strategy", "ddp", "--max-time", "90m",
             "--no-progress", "--report-to", "tensorboard", "--activation-checkpointing", "--eval-every", "null"]
    keywords = dict(data="d.csv", label="y", text_columns=["a", "b"], numeric_columns=["n"], split_seed=7,
                    fractions=[0.8, 0.2], max_eval_rows=5, cache=False, overwrite=True, accept_changed_data=True,
                    lr=2e-4, fusion="gated", strategy="ddp", max_time="90m", progress=False,
                    report_to=["tensorboard"], activation_checkpointing=True, eval_every=None)
    raw = {"data": {"path": "d.csv", "label_column": "y", "text_columns": ["a", "b"], "numeric_columns": ["n"],
                    "split": {"seed": 7, "fractions": [0.8, 0.2]}, "max_eval_rows": 5, "cache": False},
           "model": {"fusion": "gated"},
           "train": {"overwrite": True, "resume_data_changed": "accept", "lr": 2e-4, "max_time": "90m",
                     "progress": False, "report_to": ["tensorboard"], "eval_every": None},
           "dist": {"strategy": "ddp", "activation_checkpointing": True}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    from_flags, _ = parse_train_args(flags)
    assert from_flags == _config(None, keywords, None) == load_config(str(path)) == load_config(None, base=raw)
    assert from_flags.data.path == os.path.abspath("d.csv") and from_flags.data.split.seed == 7
    assert from_flags.train.resume_data_changed == "accept" and from_flags.data.cache is False


def test_flags_win_over_set_and_keywords_over_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _table(tmp_path, "x.csv", ["t"])
    cfg, _ = parse_train_args(["--set", "train.lr=0.1", "--lr", "0.2", "--set", "data.path=x.csv", "--label", "y",
                               "--text-columns", "t"])
    assert cfg.train.lr == 0.2
    cfg, _ = parse_train_args(["--data", "x.csv", "--label", "y", "--text-columns", "t", "--strategy", "none",
                               "--max-grad-norm", "null"])
    assert cfg.dist.strategy == "none" and cfg.train.max_grad_norm is None  # the word none, and null
    assert _config({"data": VALID["data"]}, {"lr": 0.2}, {"train.lr": 0.1}).train.lr == 0.2


@pytest.mark.parametrize("call,fragments", [
    (lambda: load_config(None, [("train.learning_rate", 1e-4)], base=VALID), ["'train.learning_rate'",
                                                                               "mmbert calls it 'train.lr'"]),
    (lambda: load_config(None, [("train.gradient_accumulation_steps", 2)], base=VALID), ["'train.grad_accum'"]),
    (lambda: load_config(None, [("train.bach_size", 2)], base=VALID), ["did you mean 'train.batch_size'"]),
    (lambda: load_config(None, [("data.split.sed", 2)], base=VALID), ["did you mean 'data.split.seed'"]),
    (lambda: load_config(None, [("num_train_epochs", 2)], base=VALID), ["mmbert calls it 'train.epochs'"]),
    (lambda: parse_train_args(["--learning-rate", "1e-4"]), ["unknown flag --learning-rate: mmbert calls it --lr"]),
    (lambda: parse_train_args(["--logging-steps", "5"]), ["unknown flag --logging-steps: mmbert calls it --log-every"]),
    (lambda: parse_train_args(["--save-total-limit", "5"]), ["mmbert calls it --keep-checkpoints"]),
    (lambda: parse_train_args(["--per-device-train-batch-size", "5"]), ["mmbert calls it --batch-size"]),
    (lambda: parse_train_args(["--resume-from-checkpoint", "x"]), ["mmbert calls it --resume"]),
    (lambda: parse_train_args(["--bach-size", "5"]), ["unknown flag --bach-size: did you mean --batch-size?"]),
    (lambda: parse_train_args(["--cache"]), ["unknown flag --cache: did you mean --no-cache?"]),
    (lambda: _config(VALID, {"learning_rate": 1e-4}, None), ["unknown option 'learning_rate': mmbert calls it lr"]),
    (lambda: _config(VALID, {"save_steps": 10}, None), ["mmbert calls it checkpoint_every"]),
    (lambda: _config(VALID, {"max_step": 10}, None), ["unknown option 'max_step': did you mean max_steps?"]),
    (lambda: _config(VALID, {"no_cache": True}, None), ["use cache=False"]),
    (lambda: parse_eval_args(["--model-dir", "m", "--output-dir", "o", "--max-rows", "3"]),
     ["unknown flag --max-rows: did you mean --max-eval-rows?"]),
])
def test_unknown_names_point_at_the_mmbert_name(call, fragments):
    with pytest.raises(ConfigError) as e:
        call()
    assert "\n" not in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_validation_changes_nothing():
    cfg = load_config(None, base={**VALID, "train": {"metric": None}})
    before = copy.deepcopy(cfg)
    cfg.validate()
    assert cfg == before and cfg.train.metric is None and cfg.train.metric_mode is None
    from mmbert.task import metric_mode_of, metric_of, with_resolved_metric

    resolved = with_resolved_metric(cfg)
    assert (resolved.train.metric, resolved.train.metric_mode) == (metric_of(cfg), metric_mode_of(cfg))
    assert cfg == before  # a new object


def test_checks_live_with_their_section():
    for raw, fragment in (({"data": {"max_tokens": 4}}, "'data.max_tokens' must be >= 8 (room for"),
                          ({"model": {"dropout": 1.0}}, "'model.dropout' must be in [0, 1)"),
                          ({"train": {"lr": 0}}, "'train.lr' must be > 0"),
                          ({"train": {"max_steps": 0}}, "'train.max_steps' must be >= 1 when set"),
                          ({"train": {"num_workers": -1}}, "'train.num_workers' must be >= 0 when set"),
                          ({"data": {"num_proc": 0}}, "'data.num_proc' must be >= 1 when set"),
                          ({"train": {"report_to": ["neptune"]}}, "'neptune' is not one of"),
                          ({"model": {"fusion": "attention"}}, "'model.fusion': 'attention' is not one of"),
                          ({"train": {"max_time": "soon"}}, "'train.max_time': 'soon' is not a duration")):
        with pytest.raises(ConfigError) as e:
            config_from_dict(raw, check=False).validate(roles=False)
        assert fragment in str(e.value)


def test_parse_duration():
    assert [parse_duration(t) for t in ("23h30m", "90m", "3600s", "2h", "1d", "45", "1.5h")] == \
        [84600, 5400, 3600, 7200, 86400, 45, 5400]
    for bad in ("", "h", "3x", "1h 2", "0m", "-5"):
        with pytest.raises(ConfigError, match="train.max_time"):
            parse_duration(bad)


def test_defaults_are_the_shipped_recipe():
    with open(os.path.join(ROOT, "configs", "womens_clothing.yaml")) as f:
        recipe = yaml.safe_load(f)
    default = Config()
    for section, key in (("model", "pooling"), ("data", "max_chunks"), ("train", "head_lr"), ("model", "fusion"),
                         ("train", "lr"), ("train", "schedule"), ("train", "warmup_ratio"), ("data", "max_tokens")):
        assert getattr(getattr(default, section), key) == recipe[section][key], f"{section}.{key}"


def test_data_paths_are_absolute_once_loaded(tmp_path):
    cfg = load_config(None, base={"data": {**VALID["data"], "split": {"train_file": "t.csv", "val_file": "~/v.csv"}}})
    assert cfg.data.path == os.path.abspath("d.csv") and cfg.data.split.train_file == os.path.abspath("t.csv")
    assert cfg.data.split.val_file == os.path.expanduser("~/v.csv")
    assert load_config(None, base={"data": {**VALID["data"], "path": "hub:org/name"}}).data.path == "hub:org/name"


def test_a_saved_config_with_the_former_progress_key_still_loads():
    cfg = config_from_dict({**VALID, "train": {"progress_bar": False}}, check=False)
    assert cfg.train.progress is False
    # and repeats as a training config (`mmbert train --config RUN/config.yaml`)
    assert load_config(None, base={**VALID, "train": {"progress_bar": False}}).train.progress is False


def test_train_with_data_and_label_only_gets_past_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"review": f"a review of item {i} that is long enough", "age": 20 + i, "y": i % 2} for i in range(40)]
    import pandas as pd

    pd.DataFrame(rows).to_csv("reviews.csv", index=False)
    cfg, _ = parse_train_args(["--data", "reviews.csv", "--label", "y"])
    assert cfg.data.text_columns == ["review"] and cfg.data.label_column == "y"
    assert _config(None, {"data": "reviews.csv", "label": "y"}, None) == cfg  # mmbert.train's keywords
    from mmbert.config import DataConfig

    assert _config(Config(data=DataConfig(path="reviews.csv", label_column="y")), {}, None) == cfg
    # a Config naming a role is a config file naming it: the whole truth, as the same dict (no inferred `age`)
    named = Config(data=DataConfig(path="reviews.csv", label_column="y", text_columns=["review"]))
    as_dict = _config({"data": {"path": "reviews.csv", "label_column": "y", "text_columns": ["review"]}}, {}, None)
    assert _config(named, {}, None) == as_dict and as_dict.data.numeric_columns == []


def test_evaluate_flags_are_generated_from_eval_options():
    options = {o for a in build_eval_parser()._actions for o in a.option_strings}
    for leaf in leaves(EvalOptions):
        assert leaf.flag in options
    assert {"--max-eval-rows", "--no-plots", "--no-progress", "--no-cache", "--importance"} <= options
    assert "--max-rows" not in options


def test_api_never_imports_the_command_line():
    code = "import sys, mmbert, mmbert.api; assert 'mmbert.cli' not in sys.modules, 'api imported cli'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with open(os.path.join(ROOT, "mmbert", "api.py")) as f:
        assert "from .cli" not in f.read()


def test_the_configuration_reference_is_generated_from_the_fields():
    with open(os.path.join(ROOT, "docs", "CONFIGURATION.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == configuration_reference(), ("docs/CONFIGURATION.md is stale: run "
                                      "`python -m mmbert.cli --reference > docs/CONFIGURATION.md`")
    for leaf in leaves(Config):
        assert f"`{leaf.key}` | `{leaf.flag}`" in committed


def test_model_fusion_is_checked_against_the_fusion_registry(tmp_path, monkeypatch):
    from mmbert.models.registry import register_fusion, unregister_fusion

    monkeypatch.chdir(tmp_path)
    _table(tmp_path, "d.csv", ["t"])

    base = {**VALID, "model": {"fusion": "test_mean"}}
    register_fusion("test_mean", "mmbert.models.fusion:ConcatFusion", description="a fusion registered by a test")
    try:
        assert load_config(None, base=base).model.fusion == "test_mean"
        cfg, _ = parse_train_args(["--data", "d.csv", "--label", "y", "--text-columns", "t", "--fusion", "test_mean"])
        assert cfg.model.fusion == "test_mean"
    finally:
        unregister_fusion("test_mean")
    with pytest.raises(ConfigError, match="'model.fusion': 'test_mean' is not one of cross_attn"):
        load_config(None, base=base)


def test_help_shows_every_flag_with_its_text():
    text = " ".join(build_train_parser("train.py").format_help().split())  # unwrapped
    assert "(+9% samples/s" in text and "option_strings" not in text
    assert all(leaf.flag in text for leaf in leaves(Config))
    assert "--max-eval-rows" in build_eval_parser().format_help()
