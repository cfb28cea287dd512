"""User-facing errors: one clear line, no traceback (unless --debug)."""
from __future__ import annotations

import errno
import functools
import os
import sys
import traceback


class MMBertError(Exception):
    """An error caused by the user's input (data, config, artifacts), reported as one line."""


class ConfigError(MMBertError):
    pass


class DataError(MMBertError):
    pass


class ArtifactError(MMBertError):
    pass


def missing_columns_error(file: str, missing: list, columns, what: str = "configured column") -> DataError:
    """One bounded line for columns a table lacks, however wide it is: the missing ones (the first 5), the
    closest names the table has for each (difflib: a typo, a case or space difference), and the table's columns
    only when they are few."""
    import difflib

    columns = [str(c) for c in columns]
    lowered = {c.strip().lower(): c for c in columns}

    def cut(name: str) -> str:
        return repr(name if len(name) <= 60 else name[:57] + "...")

    def closest(name: str) -> list[str]:
        exact = lowered.get(name.strip().lower())
        near = difflib.get_close_matches(name, columns, n=3, cutoff=0.6)
        return list(dict.fromkeys([exact, *near] if exact else near))

    missing = [str(c) for c in missing]
    named = ", ".join(map(cut, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hints = [(cut(name) + " -> " if len(missing) > 1 else "") + " or ".join(map(cut, near))
             for name, near in ((name, closest(name)) for name in missing[:5]) if near]
    listed = (f"columns: {', '.join(map(cut, columns))}" if len(columns) <= 12
              else f"{len(columns)} columns, from {', '.join(map(cut, columns[:3]))} to {cut(columns[-1])}")
    closest_part = f"closest: {', '.join(hints)}; " if hints else ""
    plural = len(missing) > 1
    return DataError(f"{file}: {what}{'s' if plural else ''} {named} {'are' if plural else 'is'} missing "
                     f"({closest_part}the table has {listed})")


def read_json_object(path: str, missing: str) -> dict:
    """A JSON object from a file a user may have damaged: ArtifactError naming the file (`missing` when it is
    absent), never a JSON or Unicode traceback."""
    import json

    if not os.path.isfile(path):
        raise ArtifactError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} is corrupted: not a JSON object")
    return raw


def say_line(line: str):
    """One line on stderr in one write: the ranks of a job share the stream, and print()'s separate newline
    would let another rank's line land in the middle (two errors glued on one line of a SLURM .out file)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_main(main):
    """Wrap an entry point: MMBertError -> one line on stderr, exit 2; --debug shows tracebacks."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get("MMBERT_DEBUG") == "1"
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
        def stop(message: str):
            if debug:
                traceback.print_exc()
            say_line(f"{prefix}error: {message}")
            sys.exit(2)

        try:
            return main(argv)
        except MMBertError as e:
            stop(str(e))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            stop(f"no space left on device writing {e.filename or 'a file'}")
        except KeyboardInterrupt:
            say_line(f"{prefix}interrupted")
            sys.exit(130)

    return wrapper
