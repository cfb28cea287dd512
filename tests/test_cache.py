"""The token cache (mmbert/data/cache.py): the cached splits are the tokenized ones, byte for byte; a second
run reads instead of tokenizing; any changed input, a damaged folder or an older format rebuilds; concurrent
builders never corrupt it; on 2 ranks one process builds, and a failed build stops every rank in one line."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, write_config

from mmbert.config import load_config
from mmbert.data import cache
from mmbert.data.dataset import collate
from mmbert.distributed.env import DistEnv

ENV = DistEnv(0, 1, 0, 1, None, "none")


@pytest.fixture
def cfg_path(tiny_bert, reviews, tmp_path):
    df = reviews.iloc[:120].copy()
    df.insert(0, "rid", [f"id{i:03d}" for i in range(len(df))])
    df.to_csv(tmp_path / "d.csv", index=False)
    return write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"),
                        data={"id_column": "rid", "cache_dir": str(tmp_path / "tok")})


def build_and_read(cfg, calls: list):
    from mmbert.assembly import _tokenized_splits
    from mmbert.data.tokenize import load_tokenizer

    tok = load_tokenizer(cfg.model.encoder)

    def build():
        calls.append(1)
        return _tokenized_splits(cfg, tok, True)

    return cache.cached_run_data(cfg, ENV, tok, build), tok


def test_cached_splits_equal_the_tokenized_ones(cfg_path):
    from mmbert.assembly import _tokenized_splits

    cfg = load_config(cfg_path)
    calls = []
    (pre, got, meta), tok = build_and_read(cfg, calls)
    ref_pre, _, ref = _tokenized_splits(cfg, tok, True)
    assert calls == [1] and pre == ref_pre and set(got) == {"train", "val"}
    for name in ("train", "val"):
        a, b = got[name], ref[name]
        assert len(a) == len(b) == meta["splits"][name]["rows"]
        for field in ("rows", "numeric", "missing", "categorical", "labels"):
            np.testing.assert_array_equal(getattr(a.enc, field), getattr(b.enc, field), err_msg=field)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        assert [a.enc.ids[i] for i in range(len(a))] == list(b.enc.ids)
        assert all(len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
                   for x, y in zip((a.chunks[i] for i in range(len(a))), b.chunks))
        idx = np.argsort(-b.lengths)[:7]
        ba, bb = collate(a, idx, 0), collate(b, idx, 0)
        assert ba.keys() == bb.keys() and all(np.array_equal(ba[k].numpy(), bb[k].numpy()) for k in ba)
        assert a.enc.report == b.enc.report and a.truncated_texts == b.truncated_texts


def test_second_run_reads_and_changed_inputs_rebuild(cfg_path, tmp_path):
    cfg = load_config(cfg_path)
    calls = []
    build_and_read(cfg, calls)
    build_and_read(cfg, calls)
    assert calls == [1]  # read, not rebuilt
    # the data file rewritten in place at the same size with its mtime restored: a new key
    st = os.stat(tmp_path / "d.csv")
    text = (tmp_path / "d.csv").read_text()
    (tmp_path / "d.csv").write_text(text.replace("id000", "id999", 1))
    os.utime(tmp_path / "d.csv", ns=(st.st_atime_ns, st.st_mtime_ns))
    (_, got, _), _ = build_and_read(cfg, calls)
    assert calls == [1, 1] and got["train"].enc.ids[0] == "id999" or "id999" in {got["val"].enc.ids[i] for i in range(len(got["val"]))}
    # a changed data key, another max_tokens: a new key too
    build_and_read(load_config(cfg_path, [("data.max_tokens", 16)]), calls)
    assert len(calls) == 3
    assert len([d for d in os.listdir(tmp_path / "tok") if not d.startswith(".")]) == 3


@pytest.mark.parametrize("damage", ["truncate", "format"])
def test_damaged_or_older_cache_is_rebuilt(cfg_path, damage, caplog):
    cfg = load_config(cfg_path)
    calls = []
    build_and_read(cfg, calls)
    folder = os.path.join(cfg.data.cache_dir, os.listdir(cfg.data.cache_dir)[0])
    if damage == "truncate":
        path = os.path.join(folder, "train.arrow")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        meta = json.load(open(os.path.join(folder, "meta.json")))
        meta["format"] = 0
        json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    (_, got, _), _ = build_and_read(cfg, calls)
    assert calls == [1, 1] and len(got["train"]) == 90
    assert "damaged or stale" in caplog.text


def _build_in_process(cfg_path: str, q):
    cfg = load_config(cfg_path)
    (_, got, _), _ = build_and_read(cfg, [])
    q.put(len(got["train"]))


def test_concurrent_builders_leave_one_complete_folder(cfg_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(cfg_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0] and sorted(q.get() for _ in procs) == [90, 90]
    cache_dir = load_config(cfg_path).data.cache_dir
    entries = os.listdir(cache_dir)
    assert len(entries) == 1 and os.path.isfile(os.path.join(cache_dir, entries[0], "COMPLETE"))


def test_cache_keys_may_change_on_resume():
    from mmbert.training.resume import config_changes

    frozen, applied = config_changes({"data": {"cache": True, "cache_dir": "/a", "num_proc": None, "max_tokens": 8}},
                                     {"data": {"cache": False, "cache_dir": "/b", "num_proc": 4, "max_tokens": 8}})
    assert frozen == [] and applied == []


@pytest.mark.slow
def test_two_ranks_build_once_and_train_as_without_the_cache_or_loader_workers(cfg_path, tmp_path):
    common = ["train.py", "--config", cfg_path, "--strategy", "fsdp", "--max-steps", "3"]
    r = run_cli([*common, "--output-dir", str(tmp_path / "a")], nproc=2)
    assert (r.stdout + r.stderr).count("token cache: building") == 1
    run_cli([*common, "--output-dir", str(tmp_path / "b"), "--no-cache"], nproc=2)
    # the warm run also collates in 2 loader workers per rank, from the memory-mapped cache
    r = run_cli([*common, "--output-dir", str(tmp_path / "c"), "--set", "train.num_workers=2"], nproc=2)
    assert "token cache: building" not in r.stdout + r.stderr

    def losses(out):
        return [rec["loss"] for rec in map(json.loads, open(out / "metrics.jsonl")) if "loss" in rec]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") == losses(tmp_path / "c")


@pytest.mark.slow
def test_a_failed_build_stops_every_rank_with_its_error(tiny_bert, reviews, tmp_path):
    df = reviews.iloc[:80].copy()
    df.loc[df.index[5], "Recommended IND"] = 7  # outside the pinned label map
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"),
                       data={"labels": [0, 1], "cache_dir": str(tmp_path / "tok")})
    r = run_cli(["train.py", "--config", cfg, "--output-dir", str(tmp_path / "o"), "--max-steps", "2"], nproc=2,
                check=False)
    assert r.returncode != 0
    import re

    # each rank writes its own line (two processes may interleave them on the terminal)
    errors = re.findall(r"\[rank (\d)\] error: (.*?row 5: label 7 is not in the label map \[0, 1\] pinned by "
                        r"data\.labels)", r.stderr)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], r.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_tokenizes_once_per_node_and_follows_a_rewritten_file(work, model_dir, tmp_path):
    """evaluate.py on 2 ranks: one process reads and tokenizes, both map the cache; the predictions equal
    --no-cache's byte for byte; a second run reads the cache; the file rewritten in place (same size, mtime
    restored) is tokenized again and scored as it now is."""
    import shutil

    data = tmp_path / "d.csv"
    shutil.copy(work / "good.csv", data)

    def evaluate(out, *extra):
        r = run_cli(["evaluate.py", "--model-dir", model_dir, "--data", str(data), "--output-dir", str(tmp_path / out),
                     "--no-progress", "--no-plots", "--cache-dir", str(tmp_path / "tok"), *extra], nproc=2)
        return (r.stdout + r.stderr).count("token cache: building"), (tmp_path / out / "predictions.tsv").read_text()

    built, cached = evaluate("a")
    _, direct = evaluate("b", "--no-cache")
    again, cached_again = evaluate("c")
    assert (built, again) == (1, 0) and cached == direct == cached_again and len(direct.splitlines()) == 161
    st = os.stat(data)
    text = data.read_text()
    review = pd.read_csv(data)["Review Text"][1][:30]
    assert text.count(review) == 1
    data.write_text(text.replace(review, review[::-1]))  # row 1's review reversed: same bytes, other order
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    rebuilt, after = evaluate("d")
    _, direct_after = evaluate("e", "--no-cache")
    assert rebuilt == 1 and after == direct_after != direct
    assert len(os.listdir(tmp_path / "tok")) == 2


def test_a_split_file_in_several_batches_or_short_of_rows_is_rebuilt(cfg_path, caplog):
    """Every reader takes a column's first batch as the whole column: a file whose columns span several
    record batches (or with fewer rows than meta.json says) must be rebuilt, never read short."""
    import pyarrow as pa

    cfg = load_config(cfg_path)
    calls = []
    build_and_read(cfg, calls)
    folder = os.path.join(cfg.data.cache_dir, os.listdir(cfg.data.cache_dir)[0])
    path = os.path.join(folder, "train.arrow")
    table = pa.ipc.open_file(path).read_all()
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=50)  # 90 rows: batches of 50 and 40
    meta = json.load(open(os.path.join(folder, "meta.json")))
    meta["splits"]["train"]["bytes"] = os.path.getsize(path)  # sizes and checksums agree: only the batches
    meta["files"]["train.arrow"] = cache.file_sha256(path)  # give it away
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    (_, got, _), _ = build_and_read(cfg, calls)
    assert calls == [1, 1] and len(got["train"]) == 90 and "several record batches" in caplog.text


def test_the_key_follows_the_code_that_makes_the_rows(cfg_path, monkeypatch):
    from mmbert.data.tokenize import load_tokenizer

    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.model.encoder)
    root = os.path.dirname(os.path.abspath(cache.__file__))
    assert all(os.path.isfile(os.path.join(os.path.dirname(root), f)) for f in cache.CODE_FILES)
    before = cache.run_data_key(cfg, tok)
    cache.code_digest.cache_clear()
    monkeypatch.setattr(cache, "CODE_FILES", cache.CODE_FILES + ("errors.py",))  # as if the code had changed
    try:
        assert cache.run_data_key(cfg, tok) != before
    finally:
        cache.code_digest.cache_clear()


def test_any_build_failure_is_one_line_for_every_rank(tmp_path):
    def build():
        raise RuntimeError("tokenizer exploded\nsecond line")

    with pytest.raises(cache.DataError, match=r"building the token cache in .* failed: RuntimeError: tokenizer "
                                                r"exploded \(use --no-cache\)$"):
        cache.node_cache(ENV, str(tmp_path / "tok2"), lambda: "k", build, hint="use --no-cache")
    root = str(tmp_path / "tok3")
    assert cache._build_error(PermissionError(13, "Permission denied", os.path.join(root, "k.tmp")), root, "h") == \
        f"cannot write the token cache {root}: Permission denied (h)"
    assert cache._build_error(PermissionError(13, "Permission denied", "/data/t.csv"), root, "h") == \
        "cannot read /data/t.csv: Permission denied"


def test_evaluate_with_data_keys_only_the_file_it_scores(model_dir, work):
    """With --data and no --split, the training run's data (its path may be a hub id, gone, or huge) is
    neither read nor hashed."""
    import argparse

    from mmbert.evaluation.rows import _rows_source

    args = argparse.Namespace(model_dir="/nonexistent", data=str(work / "good.csv"), split=None, indices=None)
    assert _rows_source(args) == ({}, [str(work / "good.csv"), None])


def test_loader_workers_leave_preemption_to_the_trainer_but_stop_when_told():
    """SIGUSR1 (preemption) and SIGINT may reach every process of the step: a worker must not die of them. It
    must still die of SIGTERM, which shutdown and interpreter exit send (ignoring it hung pytest at exit)."""
    import signal
    import time

    from mmbert.data.loader import _ignore_stop_signals

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    # SIGTERM as a DataLoader worker has it (torch's handler dies of it), whatever this process installed
    p = ctx.Process(target=lambda: (signal.signal(signal.SIGTERM, signal.SIG_DFL), _ignore_stop_signals(0),
                                    ready.set(), time.sleep(60)))
    p.start()
    assert ready.wait(60)  # the handlers are in place (a loaded machine may take a while to get there)
    for sig in (signal.SIGUSR1, signal.SIGINT):
        os.kill(p.pid, sig)
    time.sleep(1)
    alive = p.is_alive()
    p.terminate()
    p.join(10)
    assert alive and p.exitcode == -signal.SIGTERM


# ----------------------------------------------------------------------------- num_proc and progress

@pytest.fixture
def cfg300(tiny_bert, reviews, tmp_path):
    reviews.iloc[:300].to_csv(tmp_path / "d300.csv", index=False)
    return write_config(tmp_path / "c300.yaml", tiny_bert, str(tmp_path / "d300.csv"),
                        data={"cache_dir": str(tmp_path / "tok300")})


def _build_with(cfg_path: str, cache_dir: str, num_proc, tokenizer=None):
    from mmbert.assembly import _tokenized_splits
    from mmbert.data.tokenize import load_tokenizer

    cfg = load_config(cfg_path, [("data.cache_dir", cache_dir), ("data.num_proc", num_proc)])
    tok = tokenizer or load_tokenizer(cfg.model.encoder)
    return cache.cached_run_data(cfg, ENV, tok, lambda: _tokenized_splits(cfg, tok, True))


def test_num_proc_builds_the_same_cache_byte_for_byte(cfg300, tmp_path, caplog, monkeypatch):
    """Tokenized by 2 worker processes (contiguous shards, concatenated in order), the cache folder has the
    same key and the same bytes as tokenized in the building process; progress lines as it goes."""
    import logging

    from mmbert.data import tokenize

    monkeypatch.setattr(tokenize, "SHARD_ROWS", 16)  # 225 train rows: 15 shards, a line every 10%
    caplog.set_level(logging.INFO, logger="mmbert")
    metas = {n: _build_with(cfg300, str(tmp_path / f"tok{n}"), n)[2] for n in (1, 2)}
    assert metas[1]["key"] == metas[2]["key"] and metas[1]["files"] == metas[2]["files"]
    for n in (1, 2):
        folder = tmp_path / f"tok{n}" / metas[n]["key"]
        assert {f: cache.file_sha256(str(folder / f)) for f in metas[n]["files"]} == metas[1]["files"]
    text = caplog.text
    assert "tokenized train: 225 rows in" in text and "rows/s, 1 process)" in text and "rows/s, 2 processes)" in text
    assert [f"tokenizing train: {p}% (" in text for p in range(10, 100, 10)] == [True] * 9
    assert "tokenizing train: 100%" not in text and "tokenized val: 75 rows in" in text


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, caplog):
    import io
    import logging

    from mmbert.data.tokenize import Progress

    caplog.set_level(logging.INFO, logger="mmbert")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stderr, bar in ((io.StringIO(), None), (Tty(), "tqdm")):
        monkeypatch.setattr("sys.stderr", stderr)
        with Progress("train", 20_000, show=True) as p:
            assert type(p.bar).__name__ == (bar or "NoneType")
            for _ in range(10):
                p.update(2_000)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("tokenizing train: ") for m in lines) == 9  # the non-terminal run's 10% ... 90%
    assert lines[3].startswith("tokenizing train: 40% (8,000/20,000 rows, ") and lines[3].endswith(" rows/s)")
    assert sum(m.startswith("tokenized train: 20,000 rows in ") for m in lines) == 2
    with Progress("train", 100, show=False) as p:  # outside a cache build: nothing said
        p.update(100)
    assert len(caplog.records) == 11


class _Picky:
    """The real tokenizer, raising on a text with BOOM in it (as a tokenizer may on a text it cannot take)."""

    def __init__(self, tok):
        self.tok, self.parent = tok, os.getpid()

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, texts, **kw):
        if any("BOOM" in t for t in texts):
            raise ValueError("cannot encode BOOM\nsecond line")
        if any("DIE" in t for t in texts) and os.getpid() != self.parent:  # as a worker the kernel killed
            os._exit(9)
        return self.tok(texts, **kw)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_text_the_tokenizer_fails_on_is_one_line_naming_its_row(tiny_bert, reviews, tmp_path, num_proc):
    from mmbert.data.tokenize import load_tokenizer

    df = reviews.iloc[:300].copy()
    df.loc[df.index[137], "Review Text"] = "it went BOOM"
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg_path = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"), data={"split": {}})
    with pytest.raises(cache.DataError) as e:
        _build_with(cfg_path, str(tmp_path / "tok"), num_proc, _Picky(load_tokenizer(tiny_bert)))
    assert str(e.value) == (f"{tmp_path / 'd.csv'}, row 137: the tokenizer failed on its text (ValueError: "
                            f"cannot encode BOOM)")
    assert e.value.__cause__ is None and e.value.__context__ is None  # no worker traceback behind it


def test_num_proc_unset_uses_the_nodes_share_of_cores_for_many_rows(monkeypatch):
    from mmbert.data import tokenize
    from mmbert.data.tokenize import AUTO_MIN_ROWS, BuildOptions, workers_for

    monkeypatch.setattr(tokenize, "available_cores", lambda: 16)
    assert workers_for(BuildOptions(None, local_world=4), AUTO_MIN_ROWS) == 4
    assert workers_for(BuildOptions(None, local_world=32), AUTO_MIN_ROWS) == 1
    assert workers_for(BuildOptions(None, local_world=1), AUTO_MIN_ROWS - 1) == 1  # a pool would not pay off
    assert workers_for(BuildOptions(3), 10) == 3 and workers_for(BuildOptions(3), 2) == 2
    with pytest.raises(cache.ConfigError, match="data.num_proc must be at least 1"):
        workers_for(BuildOptions(0), 10)


def test_a_waiting_rank_says_so_once_when_the_wait_is_long(monkeypatch, caplog):
    import logging
    import time

    monkeypatch.setattr(cache, "WAIT_NOTICE_S", 0.05)
    lg = logging.getLogger("mmbert")
    level = lg.level
    lg.setLevel(logging.WARNING)  # as on a rank other than 0
    try:
        with cache._waiting_notice(DistEnv(3, 4, 1, 2, None, "none")):
            time.sleep(1.0)
        with cache._waiting_notice(DistEnv(2, 4, 0, 2, None, "none")):  # the builder itself: no line
            time.sleep(0.2)
    finally:
        lg.setLevel(level)
    assert [r.getMessage() for r in caplog.records] == [
        "token cache: rank 3 waits for local rank 0 to build (or check) the token cache"]


def test_a_worker_that_dies_is_one_line(tiny_bert, reviews, tmp_path):
    from mmbert.data.tokenize import load_tokenizer

    df = reviews.iloc[:300].copy()
    df.loc[df.index[10], "Review Text"] = "DIE"
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg_path = write_config(tmp_path / "c.yaml", tiny_bert, str(tmp_path / "d.csv"))
    with pytest.raises(cache.DataError, match=r"^a tokenizer worker process died \(.*\): set data.num_proc lower, "
                                              r"or 1 to tokenize in the building process$"):
        _build_with(cfg_path, str(tmp_path / "tok"), 2, _Picky(load_tokenizer(tiny_bert)))
