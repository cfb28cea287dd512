"""Load a table (CSV, TSV, Parquet, JSON lines, or a folder of shards) with HF `datasets`."""
from __future__ import annotations

import glob
import os

import pandas as pd

from ..errors import DataError

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


def load_table(path: str) -> pd.DataFrame:
    """Rows in file order (shards sorted by name). Raises DataError with the file name on any problem."""
    files, fmt, ext = _files_and_format(path)
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"data file {f} is empty")
    import datasets

    datasets.disable_progress_bars()
    kwargs = {}
    if fmt == "csv":
        kwargs["sep"] = "\t" if ext == ".tsv" else ","
        # keep text as text: no "NA" -> NaN guessing beyond empty cells
        kwargs["keep_default_na"] = False
        kwargs["na_values"] = [""]
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=_cache_dir(), **kwargs)
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not valid UTF-8 (byte offset {e.start}): re-encode it as UTF-8") from None
    except Exception as e:  # datasets wraps parser errors in many types; report them with the file
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"data file {path} is not valid UTF-8: re-encode it as UTF-8") from None
        if cause is not None and str(cause).strip():
            msg = str(cause).strip().splitlines()[-1]
        raise DataError(f"cannot read data file {path}: {msg}") from None
    df = ds.to_pandas()
    if len(df.columns) == 0:
        raise DataError(f"data file {path} has no columns")
    if len(df) == 0:
        raise DataError(f"data file {path} has a header but no rows")
    return df.reset_index(drop=True)


def _cache_dir() -> str:
    # A private cache so a read-only or shared HF cache never breaks loading a local file.
    return os.environ.get("MMBERT_DATASETS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmbert", "datasets"))


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
