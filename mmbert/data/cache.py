"""The tokenized run data, built once per node and memory-mapped by every rank.

A training run's splits, fitted preprocessing and tokens depend only on the data files, the data config and
the tokenizer; the rows evaluate.py scores, on those and the model's preprocessing. They are stored once
under `data.cache_dir` / `--cache-dir` (default: beside the datasets cache, `~/.cache/mmbert/tokenized`, or
$MMBERT_DATASETS_CACHE/../tokenized), one folder per key:

    KEY/preprocessing.json      the Preprocessor fitted on the train split (evaluate: the model's)
    KEY/meta.json               what the key was made of, the build's seconds; per split: rows, source file,
                                description, the data-fix report, texts cut at max_chunks, each Arrow file's size;
                                the sha256 of every other file of the folder (`files`)
    KEY/{train,val,data}.arrow  Arrow IPC, one record batch: row int64, tokens large_list<int32> (every chunk's
                                [CLS] ... [SEP], concatenated), chunk_lens list<int32>, numeric / missing
                                list<float32>, categorical list<int64>, label int64 (float64: a regression target), id string (when configured)
    KEY/COMPLETE                written last: a folder without it is never read

KEY is a digest of: the data files' bytes (also of split and index files; never their mtime), every
`data.*` key but the cache's own, the encoder name, the tokenizer's full serialization, and CACHE_FORMAT
(evaluate.py's key: evaluation/rows.py). A second run, a resume or a SLURM requeue on the same inputs maps
the folder instead of reading and tokenizing the table; any change to an input is a new key. Local rank 0
of each node computes the key and builds a missing folder in `KEY.tmp-*`, renaming it into place (a
concurrent builder's rename loses and is discarded); the node's other ranks wait on a collective without a
timeout that matters (each says so in one line once the wait passes 5 s), and every rank stops with the
builder's error if the build fails. The builder tokenizes in `data.num_proc` worker processes (default: the
node's cores / its local processes; contiguous shards of the rows, concatenated in order, so neither the
folder's bytes nor its key depend on it), with progress lines on rank 0 (a bar on a terminal;
docs/TOKEN_CACHE.md). A folder whose files do not match meta.json (truncated, damaged at the same size, or
written by another format) is rebuilt, with a warning: local rank 0 checks every file's sha256 before its
node maps the folder (0.8 s for the 310 MiB of the 40x table of benchmarks/data_scale.py on 2 busy cores,
next to its ~2 min build and 5 ms to map it unchecked; the node's other ranks check sizes only, and map
only a folder their local rank 0 has checked or built). Folders and files follow the umask, so users can
share a cache; a folder this user cannot read is one error naming it, never a rebuild.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Callable, Optional

import numpy as np

from ..config import DATA_CACHE_KEYS, SPLIT_PATH_KEYS
from ..distributed.gather import gather_objects
from ..errors import ConfigError, DataError, MMBertError
from ..fsutil import mkdtemp
from .dataset import TableDataset
from .preprocess import Encoded, Preprocessor
from .tokenize import BuildOptions, Chunks, build_options

log = logging.getLogger("mmbert")
main_log = logging.getLogger("mmbert.main")

CACHE_FORMAT = 3  # 3: meta.json's sha256 of every file
SPLITS_CACHED = ("train", "val")


def default_cache_dir() -> str:
    from .io import _cache_dir

    return os.path.join(os.path.dirname(_cache_dir().rstrip(os.sep)), "tokenized")


def _file_digest(h, path: str):
    """The bytes behind a data path: a file, a folder of tables, a save_to_disk folder (every file in it), or a
    hub dataset (the fingerprints datasets gives its cached splits)."""
    from .io import HUB_PREFIX, _content_key, _files_and_format, _load_hf, dataset_dict_splits, is_saved_dataset

    if path.startswith(HUB_PREFIX):
        dd = _load_hf(path)
        h.update(f"{path}\0{sorted((k, v._fingerprint) for k, v in dd.items())}\0".encode())
        return
    if os.path.isdir(path) and (is_saved_dataset(path) or dataset_dict_splits(path) is not None):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)  # everything save_to_disk wrote
    elif os.path.isdir(path):
        files = _files_and_format(path)[0]
    else:
        files = [path]
    h.update(f"{path}\0{_content_key(files) if all(map(os.path.isfile, files)) else 'missing'}\0".encode())


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without truncation/padding: settings a call changes (chunk_tokenize sets its own)
        text = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = [getattr(tokenizer, k, None) for k in ("cls_token_id", "sep_token_id", "bos_token_id",
                                                        "eos_token_id", "pad_token_id")]
    return hashlib.blake2b(f"{text}\0{specials}".encode(), digest_size=16).hexdigest()


# The modules that turn a table into cached rows: a change to any of them (an upgrade, a fix) is a new key.
CODE_FILES = ("config.py", "data/io.py", "data/pipeline.py", "data/preprocess.py", "data/tokenize.py",
              "data/cache.py", "evaluation/rows.py")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.blake2b(digest_size=16)
    for rel in CODE_FILES:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def new_key(payload: dict):
    """A digest started with the format, the code and `payload` (JSON); the caller adds the files' bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": CACHE_FORMAT, "code": code_digest(), **payload}, sort_keys=True,
                        default=str).encode())
    return h


def data_config_source(d) -> tuple[dict, list]:
    """(every data.* key but the cache's own, the paths they read: data.path and the split/index files)."""
    keys = asdict(d)
    for k in DATA_CACHE_KEYS:
        keys.pop(k, None)
    return keys, [d.path, *(getattr(d.split, k) for k in SPLIT_PATH_KEYS)]


def finish_key(h, paths) -> str:
    """The digest `h` with the bytes behind every given path (None: not configured) added."""
    for path in paths:
        if path:
            _file_digest(h, path)
    return h.hexdigest()


def data_digests(d) -> dict[str, str]:
    """{path: digest of its bytes} of every data path the data config reads (data.path, split/index files):
    what a run records in its checkpoints, so that a resume notices data changed under its weights."""
    out = {}
    for path in data_config_source(d)[1]:
        if path:
            h = hashlib.blake2b(digest_size=16)
            _file_digest(h, path)
            out[path] = h.hexdigest()
    return out


def run_data_key(cfg, tokenizer, fitted: Optional[Preprocessor] = None) -> str:
    """The digest of everything the run data is made of (see the module docstring); with `fitted` (a resume
    that keeps its run's fit on changed data), that preprocessing too."""
    data, paths = data_config_source(cfg.data)
    fit = {"preprocessing": fitted.to_dict()} if fitted is not None else {}
    return finish_key(new_key({"data": data, "encoder": cfg.model.encoder, "tokenizer": tokenizer_digest(tokenizer),
                               **fit}), paths)


# ----------------------------------------------------------------------------- writing

def _split_table(ds: TableDataset):
    import pyarrow as pa

    e, c = ds.enc, ds.chunks
    cols = {
        "row": pa.array(np.asarray(e.rows, dtype=np.int64)),
        "tokens": pa.LargeListArray.from_arrays(pa.array(c.offsets.astype(np.int64)), pa.array(c.tokens)),
        "chunk_lens": pa.LargeListArray.from_arrays(pa.array(c.chunk_offsets.astype(np.int64)), pa.array(c.chunk_lens)),
        "numeric": _rows_of(e.numeric, pa.float32()),
        "missing": _rows_of(e.missing, pa.float32()),
        "categorical": _rows_of(e.categorical, pa.int64()),
        "label": pa.array(e.labels if e.labels is not None else [None] * len(e),
                          type=pa.float64() if e.labels is not None and e.labels.dtype.kind == "f" else pa.int64()),
    }
    if e.ids is not None:
        cols["id"] = pa.array([None if v is None else str(v) for v in e.ids], type=pa.large_string())
    return pa.table(cols)


def _rows_of(matrix: np.ndarray, dtype):
    import pyarrow as pa

    n, k = matrix.shape
    offsets = np.arange(0, (n + 1) * k, k, dtype=np.int64) if k else np.zeros(n + 1, np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(matrix).reshape(-1),
                                                                       type=dtype))


def file_sha256(path: str) -> str:
    # the fastest hashlib digest here (~1 GB/s; blake2b ~0.7); raw OSErrors (fsutil.sha256 makes them
    # ArtifactErrors), so that read_cache tells a permission problem from damage
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_cache(folder: str, pre: Preprocessor, parts: dict[str, tuple[TableDataset, dict]], key: str,
                extra: Optional[dict] = None):
    """Write into a fresh KEY.tmp-* folder, then rename it to `folder` (first writer wins). `parts` maps a
    split name to its dataset and what meta.json says of it (source file, description)."""
    import pyarrow as pa

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)  # umask's mode: other users may map it
    try:
        pre.save(os.path.join(tmp, "preprocessing.json"))
        meta = {"format": CACHE_FORMAT, "key": key, **(extra or {}), "splits": {}}
        for name, (ds, info) in parts.items():
            path = os.path.join(tmp, f"{name}.arrow")
            table = _split_table(ds)
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(1, len(table)))
            meta["splits"][name] = {"rows": len(ds), **info, "report": ds.enc.report,
                                    "truncated": ds.truncated_texts, "bytes": os.path.getsize(path)}
        meta["files"] = {name: file_sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=int)
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        try:
            os.rename(tmp, folder)
        except OSError as e:  # another builder's folder is there already: theirs is as good as ours
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def read_split(path: str, rows: int, report: dict, truncated: int) -> TableDataset:
    """A split mapped from its Arrow file: token ids, chunk lengths and tabular arrays are views of the file,
    and a row's chunks are cut out when it is collated. Nothing per row is held in Python."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    n = table.num_rows
    if n != rows or n == 0:
        raise ValueError(f"{os.path.basename(path)} has {n} rows, meta.json says {rows}")
    split = [name for name in table.column_names if table.column(name).num_chunks != 1]
    if split:  # every reader below takes chunk 0 as the whole column
        raise ValueError(f"{os.path.basename(path)}: column {split[0]} is in several record batches")
    col = {name: table.column(name).chunk(0) for name in table.column_names}

    def view(arr):
        return arr.to_numpy(zero_copy_only=True)

    tokens, lens, label = col["tokens"], col["chunk_lens"], col["label"]
    chunks = Chunks(view(tokens.values), view(tokens.offsets), view(lens.values), view(lens.offsets))
    enc = Encoded(rows=view(col["row"]), texts=[], numeric=_matrix(col["numeric"], n),
                  missing=_matrix(col["missing"], n), categorical=_matrix(col["categorical"], n),
                  labels=label.to_numpy(zero_copy_only=False) if label.null_count == 0 else None,
                  ids=_Strings(col["id"]) if "id" in col else None, report=report)
    return TableDataset(enc, chunks, truncated)


class _Strings:
    """Ids read from the Arrow column when asked for, not held as n Python strings."""

    def __init__(self, arr):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return self.arr[int(i)].as_py()

    def take(self, positions) -> list:
        return self.arr.take(np.asarray(positions, dtype=np.int64)).to_pylist()


def _matrix(arr, n: int) -> np.ndarray:
    values = arr.values.to_numpy(zero_copy_only=True)
    return values.reshape(n, len(values) // n if n else 0)


class CacheUnreadable(ConfigError):
    """A cache folder or file this user may not read: a permission problem, never a reason to rebuild."""


def unreadable(path: str, hint: str) -> CacheUnreadable:
    return CacheUnreadable(f"token cache {path} cannot be read: permission denied (made by another user with a "
                           f"private umask?); ask its owner to make it readable (chmod -R a+rX), or {hint}")


def _check_files(folder: str, meta: dict, verify: bool):
    """Each Arrow file has the size meta.json records; with `verify`, every file its sha256."""
    for name, m in meta["splits"].items():
        size = os.path.getsize(os.path.join(folder, f"{name}.arrow"))
        if size != m["bytes"]:
            raise ValueError(f"{name}.arrow has {size} bytes, {m['bytes']} were written")
    for name, digest in (meta["files"].items() if verify else ()):
        if file_sha256(os.path.join(folder, name)) != digest:
            raise ValueError(f"{name} differs from what was written (its sha256)")


def read_cache(folder: str, verify: bool = True,
               hint: str = "use another cache folder") -> Optional[tuple[Preprocessor, dict[str, TableDataset], dict]]:
    """(preprocessor, datasets, meta) of a complete folder, or None (with a warning) when it does not match
    its meta.json (`verify`: also every file's content); CacheUnreadable when this user may not read it."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {meta.get('format')}, this mmbert reads {CACHE_FORMAT}")
        _check_files(folder, meta, verify)
        pre = Preprocessor.load(os.path.join(folder, "preprocessing.json"))
        datasets = {name: read_split(os.path.join(folder, f"{name}.arrow"), m["rows"], m["report"], m["truncated"])
                    for name, m in meta["splits"].items()}
    except PermissionError as e:
        raise unreadable(e.filename or folder, hint) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MMBertError) as e:
        log.warning("token cache %s is damaged or stale (%s): rebuilding it", folder, str(e).splitlines()[0])
        return None
    return pre, datasets, meta


# ----------------------------------------------------------------------------- one build per node

def _wait_group(env):
    """A gloo group whose collectives may wait as long as a build takes (the default group's timeout is
    sized for training steps, not for tokenizing millions of rows)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(days=7))


def _read_or_build(folder: str, key: str, build: Callable[[], tuple], hint: str,
                   opts: BuildOptions) -> tuple[Optional[tuple], bool]:
    """(what read_cache gives, whether it was built here): the complete folder as it is (its content
    checked), or built now (tokenized as `opts` say)."""
    existed = os.path.isdir(folder)
    if existed and not os.access(folder, os.R_OK | os.X_OK):
        raise unreadable(folder, hint)
    got = read_cache(folder, hint=hint) if os.path.isfile(os.path.join(folder, "COMPLETE")) else None
    if got is not None:
        return got, False
    if existed:  # damaged (never a folder that appeared since: another node's builder may have just made it)
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"token cache {folder} is damaged and this user cannot remove it (permission denied); "
                              f"ask its owner to delete it, or {hint}")
    log.info("token cache: building %s", folder)
    t0 = time.perf_counter()
    with build_options(opts):
        pre, parts, extra = build()
    write_cache(folder, pre, parts, key, {**extra, "build_seconds": round(time.perf_counter() - t0, 3)})
    return None, True


def _build_error(e: BaseException, root: str, hint: str) -> str:
    """The builder's one line for every rank."""
    if isinstance(e, MMBertError):
        return str(e)
    if isinstance(e, OSError) and e.filename and os.path.abspath(str(e.filename)).startswith(os.path.abspath(root)):
        return f"cannot write the token cache {root}: {e.strerror or e} ({hint})"
    if isinstance(e, OSError) and e.filename:
        return f"cannot read {e.filename}: {e.strerror or e}"
    log.debug("token cache build failed", exc_info=True)
    return f"building the token cache in {root} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({hint})"


WAIT_NOTICE_S = 5.0  # a wait this long is a build (or a check of a large folder): worth a line


@contextlib.contextmanager
def _waiting_notice(env):
    """On a rank that waits for its node's builder: one line once the wait passes WAIT_NOTICE_S. Said at INFO
    past the logger's level (the other ranks log warnings only): it is that rank's only sign of life."""
    if env.local_rank == 0:
        yield
        return

    def say():
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, "token cache: rank %d waits for local rank 0 "
                                  "to build (or check) the token cache", (env.rank,), None))

    timer = threading.Timer(WAIT_NOTICE_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _agree_on(env, group, error: Optional[str], folder: Optional[str]) -> str:
    """Every rank learns whether each node's builder succeeded (all stop with the first error) and which
    folder its own node's builder (local rank 0 on the same host) made."""
    host = socket.gethostname()
    outcomes = gather_objects((error, folder, host, env.local_rank), group)
    failed = [e for e, *_ in outcomes if e]
    if failed:  # the builder's error, on every rank
        raise DataError(failed[0])
    leaders = [f for _, f, h, lr in outcomes if lr == 0 and h == host]
    return leaders[0] if leaders else outcomes[0][1]


def node_cache(env, root: str, key_fn: Callable[[], str], build: Callable[[], tuple], hint: str,
               num_proc: Optional[int] = None, bar: bool = True) -> tuple[Preprocessor, dict, dict]:
    """(preprocessor, {split: mapped dataset}, meta) from the folder root/KEY. Only each node's local rank 0
    computes KEY (hashing the data files is its job alone) and, when the folder is missing or damaged, runs
    `build()` -> (pre, {split: (TableDataset, info dict)}, extra meta) and writes it, tokenizing in `num_proc`
    processes (None: the node's cores / its local processes) with progress lines (`bar`: a bar on a terminal);
    the node's other ranks wait, then every rank maps the folder, and all stop unless every rank could."""
    group = _wait_group(env)
    error, folder, got, built = None, None, None, False
    if env.local_rank == 0:
        try:
            key = key_fn()
            folder = os.path.join(root, key)
            opts = BuildOptions(num_proc, env.local_world_size, progress=True, bar=bar)
            got, built = _read_or_build(folder, key, build, hint, opts)
        except Exception as e:  # any failure, also one outside our errors, must reach the waiting ranks
            error = _build_error(e, root, hint)
    with _waiting_notice(env):
        folder = _agree_on(env, group, error, folder)
    problem = None
    if got is None:  # a waiting rank, or the builder after its build: local rank 0 checked or wrote the content
        try:
            got = read_cache(folder, verify=False, hint=hint)
        except CacheUnreadable as e:
            problem = str(e)
        if got is None and problem is None:
            problem = f"token cache {folder} cannot be read on rank {env.rank} after it was built ({hint})"
    problems = [p for p in gather_objects(problem, group) if p]
    if problems:
        raise ConfigError(problems[0])
    pre, datasets, meta = got
    log.info("token cache: %s (%s)", folder, ", ".join(f"{n} {m['rows']} rows" for n, m in meta["splits"].items()))
    if built:
        log.info("token cache: built in %.1f s", meta["build_seconds"])
    else:  # the build logged these as it went
        for name, m in meta["splits"].items():
            for k, v in m["report"].items():
                main_log.warning("%s (%s): %s = %s", name, m["file"], k, v)
        for line in meta.get("warnings", []):
            main_log.warning("%s", line)
    return pre, datasets, meta


def cached_run_data(cfg, env, tokenizer, build: Callable[[], tuple], fitted: Optional[Preprocessor] = None) -> tuple:
    """Training's (preprocessor, {split: dataset}, meta) from the cache, built with `build()` -> (pre, splits,
    {name: TableDataset}) when missing; `fitted`: the preprocessing `build` applies instead of fitting (a key
    of its own)."""
    def parts():
        pre, splits, datasets = build()
        info = {n: {"file": splits[n].file, "description": splits[n].description} for n in datasets}
        return pre, {n: (ds, info[n]) for n, ds in datasets.items()}, {}

    return node_cache(env, cfg.data.cache_dir or default_cache_dir(), lambda: run_data_key(cfg, tokenizer, fitted),
                      parts, hint="set data.cache_dir, or --no-cache", num_proc=cfg.data.num_proc,
                      bar=cfg.train.progress)
