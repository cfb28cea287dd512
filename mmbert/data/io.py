"""Load a table (CSV, TSV, Parquet, JSON lines, or a folder of shards) with HF `datasets`."""
from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import json
import logging
import os
import stat
import tempfile
from typing import Iterable, Optional

import pandas as pd

from ..errors import DataError

log = logging.getLogger("mmbert")
main_log = logging.getLogger("mmbert.main")  # what every rank would say alike: rank 0 only

_FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
            ".jsonl": "json", ".json": "json", ".ndjson": "json"}


def _files_and_format(path: str) -> tuple[list[str], str, str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.splitext(f)[1].lower() in _FORMATS)
        if not files:
            raise DataError(f"data folder {path} holds no .csv/.tsv/.parquet/.jsonl files")
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len({_FORMATS[e] for e in exts}) > 1 or (".tsv" in exts and ".csv" in exts):
            raise DataError(f"data folder {path} mixes file formats: {sorted(exts)}")
        ext = exts.pop()
    else:
        if not os.path.exists(path):
            raise DataError(f"data file not found: {path}")
        files = [path]
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FORMATS:
            raise DataError(f"data file {path}: unknown format '{ext}' (use .csv, .tsv, .parquet or .jsonl)")
    return files, _FORMATS[ext], ext


HUB_PREFIX = "hub:"


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_info.json"))


def dataset_dict_splits(path: Optional[str]) -> Optional[list[str]]:
    """The split names when `path` is a DatasetDict: a `DatasetDict.save_to_disk` folder, or a hub dataset
    `hub:NAME[:CONFIG]`; None for anything else."""
    if not path:
        return None
    if path.startswith(HUB_PREFIX):
        return list(_load_hf(path))
    marker = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as f:
            return [str(s) for s in json.load(f)["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{marker} is not a DatasetDict index: {e}") from None


# A DatasetDict's split names for our train / val / test, in order of preference: the names HF datasets use
# (validation; dev in GLUE-style sets; eval, holdout and the like where a dataset was saved by hand).
DICT_SPLIT_NAMES = {"train": ("train", "training"),
                    "val": ("validation", "val", "valid", "dev", "eval", "evaluation"),
                    "test": ("test", "testing", "holdout")}


def dict_split_roles(path: str, available: list[str], names=tuple(DICT_SPLIT_NAMES)) -> dict[str, str]:
    """{our split: the DatasetDict's split} for `names`. Selecting every split (training) says in one warning
    which of the dict's splits it leaves unused, and that it trains without validation when none is named
    like one: never a silent choice."""
    roles = {role: next((n for n in DICT_SPLIT_NAMES[role] if n in available), None) for role in DICT_SPLIT_NAMES}
    if roles["train"] is None:
        raise DataError(f"{path}: the DatasetDict has no 'train' split (splits: {', '.join(available)})")
    if set(names) >= set(DICT_SPLIT_NAMES):
        _warn_unmapped_splits(path, available, roles)
    return {role: src for role, src in roles.items() if role in names and src is not None}


def _warn_unmapped_splits(path: str, available: list[str], roles: dict):
    unused = [n for n in available if n not in roles.values()]
    problems = ["no validation split: training without validation"] if roles["val"] is None else []
    if unused:
        problems.append(f"split{'s' if len(unused) > 1 else ''} {', '.join(unused)} not used")
    if problems:
        known = "; ".join(f"{role}: {'/'.join(names)}" for role, names in DICT_SPLIT_NAMES.items())
        main_log.warning("%s: DatasetDict with splits %s: %s (split names taken: %s); to choose, give the splits as "
                         "data.split.train_file / val_file / test_file (FOLDER/SPLIT)", path, ", ".join(available),
                         "; ".join(problems), known)


def _hub_name(path: str) -> tuple[str, Optional[str]]:
    """(NAME, CONFIG or None) of `hub:NAME[:CONFIG]`; an empty or malformed name is one line giving the form."""
    name, _, config = path[len(HUB_PREFIX):].partition(":")
    if not name.strip() or any(not part.strip() for part in name.split("/")) or name.count("/") > 1:
        raise DataError(f"'{path}' names no hub dataset: give it as {HUB_PREFIX}ORG/NAME "
                        f"(or {HUB_PREFIX}ORG/NAME:CONFIG)")
    return name, config or None


def _load_hf(path: str):
    """A saved Dataset or DatasetDict folder, or a hub dataset (a DatasetDict)."""
    import datasets

    datasets.disable_progress_bars()
    name, config = _hub_name(path) if path.startswith(HUB_PREFIX) else (None, None)
    try:
        if name is None:
            return datasets.load_from_disk(path)
        return datasets.load_dataset(name, config)
    except Exception as e:  # hub, network and format errors come in many types: one line naming the dataset
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only datasets already in the local HF cache load)" if offline else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load dataset {path}{hint}: {first[:300]}") from None


def load_table(path: str, text_columns: Iterable[str] = (), split: Optional[str] = None) -> pd.DataFrame:
    """Rows in file order (shards sorted by name). Raises DataError with the file name on any problem.
    `text_columns` (id columns) are read as text, whatever they look like: `00123` stays `00123`, a 19-digit
    id is not rounded through float, a missing value is None. Besides files and folders of files, `path` may
    be a `save_to_disk` folder, or a DatasetDict (its folder, or `hub:NAME[:CONFIG]`) with `split` naming
    one of its splits."""
    text_columns = list(text_columns)
    splits = dataset_dict_splits(path)
    if splits is not None:
        if split not in splits:
            raise DataError(f"{path} is a DatasetDict with splits {', '.join(splits)}: train with it as data.path "
                            f"(its splits become train / val / test), or give one split (FOLDER/SPLIT when saved)")
        return _frame(_load_hf(path)[split], text_columns, f"{path}[{split}]")
    if os.path.isdir(path) and is_saved_dataset(path):
        return _frame(_load_hf(path), text_columns, path)
    files, fmt, ext = _files_and_format(path)
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"data file {f} is empty")
    import datasets
    from datasets.utils import logging as ds_logging

    datasets.disable_progress_bars()
    kwargs = {}
    if fmt == "csv":
        kwargs["sep"] = "\t" if ext == ".tsv" else ","
        # keep text as text: no "NA" -> NaN guessing beyond empty cells
        kwargs["keep_default_na"] = False
        kwargs["na_values"] = [""]
        if text_columns:  # the raw field, untouched (datasets passes no dtype); names not in the file: ignored
            kwargs["converters"] = {c: str for c in text_columns}
    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its "Failed to read file" lines: we report the error once
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train",
                                  cache_dir=os.path.join(_cache_dir(), _content_key(files)), **kwargs)
    except Exception as e:  # datasets wraps parser errors in many types; report them with the file
        raise _diagnose(e, files, fmt, path) from None
    finally:
        ds_logging.set_verbosity(verbosity)
    if fmt == "json":  # the JSON reader keeps invalid UTF-8 bytes in strings, which fail later, anywhere
        import pyarrow as pa

        try:
            ds.data.table.validate(full=True)
        except pa.ArrowInvalid as e:
            if "utf8" in str(e).lower():
                raise _utf8_error(files, path) from None
            raise DataError(f"cannot read data file {path}: {str(e).splitlines()[0]}") from None
    return _frame(ds, text_columns, path)


def _frame(ds, text_columns: list[str], path: str) -> pd.DataFrame:
    df = _as_text(ds, text_columns, path).to_pandas()
    if len(df.columns) == 0:
        raise DataError(f"data file {path} has no columns")
    if len(df) == 0:
        raise DataError(f"data file {path} has a header but no rows")
    return df.reset_index(drop=True)


def _content_key(files: list[str]) -> str:
    """Digest of the files' names, sizes and bytes. The datasets cache keys a local file on its path and
    mtime, so a file rewritten with its old mtime restored (cp -p, rsync -t, tar) was read from the stale
    cache: one cache folder per content makes that impossible. Reading the bytes costs what parsing does."""
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f"{os.path.basename(f)}\0{os.path.getsize(f)}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return "content-" + h.hexdigest()


def _as_text(ds, columns: list[str], path: str):
    """Parquet / JSON id columns (ints, floats) as strings, cast in Arrow: exact for 64-bit ints, nulls kept."""
    import datasets

    for c in columns:
        if c in ds.column_names and ds.features[c] != datasets.Value("string"):
            try:
                ds = ds.cast_column(c, datasets.Value("string"))
            except (TypeError, ValueError, NotImplementedError) as e:  # lists, structs: no text form
                raise DataError(f"data file {path}: id column '{c}' cannot be read as text: "
                                f"{str(e).splitlines()[0]}") from None
    return ds


def _diagnose(e: Exception, files: list[str], fmt: str, path: str) -> DataError:
    """One DataError naming the file (and line) for a table that HF `datasets` failed to read."""
    cause = e.__cause__ or e.__context__
    if isinstance(e, UnicodeDecodeError) or isinstance(cause, UnicodeDecodeError):
        return _utf8_error(files, path)
    for f in files:  # a file with nothing but a header (or blank lines) makes the readers fail obscurely
        if _has_no_rows(f, fmt):
            return DataError(f"data file {f} " + ("holds no rows" if fmt == "json" else "has a header but no rows"))
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if cause is not None and str(cause).strip():
        msg = str(cause).strip().splitlines()[-1]
    return DataError(f"cannot read data file {path}: {msg}")


def _utf8_error(files: list[str], path: str) -> DataError:
    for f in files:
        bad = _first_invalid_utf8(f)
        if bad is not None:
            return DataError(f"data file {f}, line {bad[1]} (byte {bad[0]}) is not valid UTF-8: re-encode it as UTF-8")
    return DataError(f"data file {path} is not valid UTF-8: re-encode it as UTF-8")


def _first_invalid_utf8(path: str) -> Optional[tuple[int, int]]:
    """(byte offset, 1-based line) of the first byte that is not UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            pending = len(decoder.getstate()[0])  # bytes of a character split between chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                pos = max(0, e.start - pending)
                return offset + pos, line + chunk.count(b"\n", 0, pos)
            offset += len(chunk)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return offset, line
    return None


def _has_no_rows(path: str, fmt: str) -> bool:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows == 0
        with open(path, "rb") as f:
            lines = [ln for ln in f.read(1 << 20).splitlines() if ln.strip()]
        return len(lines) <= (0 if fmt == "json" else 1)
    except Exception:  # unreadable in another way: the reader's own message is reported
        return False


def _cache_dir() -> str:
    """The folder of load_table's `datasets` cache (the token cache's default sits beside it, data/cache.py):
    $MMBERT_DATASETS_CACHE when set; else the first writable of ~/.cache/mmbert/datasets ($XDG_CACHE_HOME
    for ~/.cache), $HF_DATASETS_CACHE/mmbert/datasets and $HF_HOME/datasets/mmbert/datasets (the caches the
    user set for HF datasets); else a temporary folder, with one warning. A private cache, so that a
    read-only or shared HF cache never breaks loading a local file; never a dead end under a read-only HOME."""
    env = os.environ
    if env.get("MMBERT_DATASETS_CACHE"):
        return _first_writable((env["MMBERT_DATASETS_CACHE"],))
    home_cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    hf = [env.get("HF_DATASETS_CACHE"), env.get("HF_HOME") and os.path.join(env["HF_HOME"], "datasets")]
    return _first_writable((os.path.join(home_cache, "mmbert", "datasets"),
                            *(os.path.join(d, "mmbert", "datasets") for d in hf if d)))


CACHE_VARIABLES = "MMBERT_DATASETS_CACHE, HF_DATASETS_CACHE, HF_HOME or XDG_CACHE_HOME"


def writable_dir(path: str) -> bool:
    """The folder exists or could be made, and files can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


@functools.lru_cache(maxsize=None)
def _first_writable(candidates: tuple[str, ...]) -> str:
    """The first writable candidate; else this user's folder in the temporary directory (the same on every
    rank of a node, so the token cache its ranks share is found), warned about once per process."""
    for path in candidates:
        if writable_dir(path):
            return path
    fallback = os.path.join(_private_temp_dir(), "datasets")
    os.makedirs(fallback, exist_ok=True)
    log.warning("cache folder %s cannot be written (a read-only HOME?): caching in %s instead; set %s "
                "(and data.cache_dir for the token cache) to choose the folder",
                candidates[0], fallback, CACHE_VARIABLES)
    return fallback


def _private_temp_dir() -> str:
    """$TMPDIR/mmbert-cache-UID, refused (for a new mkdtemp folder) when it is a link or another user's."""
    path = os.path.join(tempfile.gettempdir(), f"mmbert-cache-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return path
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="mmbert-cache-")


def read_indices(path: str, n_rows: int, data_path: str) -> list[int]:
    if not os.path.isfile(path):
        raise DataError(f"split index file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            try:
                i = int(s)
            except ValueError:
                raise DataError(f"split index file {path}, line {lineno}: '{s}' is not an integer row index") from None
            if not 0 <= i < n_rows:
                raise DataError(f"split index file {path}, line {lineno}: row {i} is outside {data_path} ({n_rows} rows)")
            out.append(i)
    if len(set(out)) != len(out):
        raise DataError(f"split index file {path} lists a row more than once")
    return out
