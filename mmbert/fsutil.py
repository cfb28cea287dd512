"""Files of artifacts: written with the user's umask, read only inside their folder, tied together by digests.

* `mkdtemp` / `mkstemp` / `follow_umask`: tempfile's (and safetensors') private 0700 / 0600 modes replaced by
  the modes every other file of the run gets (0777 / 0666 less the umask), so a second user or a serving
  process under another uid can read what a run wrote, exactly as far as the umask allows.
* `inside` / `part_files`: nothing is read through a symbolic link that leaves the folder (one ArtifactError
  naming the link); `copy_part` copies a folder's part without dereferencing links.
* `part_digests` / `combine` / `first_difference`: a folder's parts (files or sub-folders) hashed once when it is
  written, recorded beside them, and compared when it is read, so a folder mixing parts of different runs or
  exports is refused in one line naming the part that differs.
* `read_error`: an OSError reading an artifact as one line; a permission problem is called one, not corruption.

Imports no torch (serving uses it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from typing import Optional

from .errors import ArtifactError

# ----------------------------------------------------------------------------- modes that follow the umask

def umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc: thread-safe), else set and
    restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: str):
    """Give `path` the mode a plain open()/mkdir() would have given it (tempfile and safetensors use
    0600/0700)."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~umask())


def mkdtemp(**kwargs) -> str:
    """tempfile.mkdtemp whose folder follows the umask (a staging folder renamed into place keeps its mode)."""
    path = tempfile.mkdtemp(**kwargs)
    follow_umask(path)
    return path


def mkstemp(**kwargs) -> tuple[int, str]:
    """tempfile.mkstemp whose file follows the umask."""
    fd, path = tempfile.mkstemp(**kwargs)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, path


def read_error(path: str, e: OSError, what: str = "") -> ArtifactError:
    """One line for an OSError reading `path`: a permission problem names the owner and mode, so it is not
    mistaken for a damaged file."""
    if isinstance(e, PermissionError):
        try:
            st = os.stat(path)
            owner = (f" (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}; this process runs as uid "
                     f"{os.getuid()})")
        except OSError:
            owner = ""
        return ArtifactError(f"cannot read {path}: permission denied{owner}: ask its owner to make it readable "
                             f"(chmod a+r), or copy the folder")
    return ArtifactError(f"cannot read {path}{what}: {e.strerror or e}")


# ----------------------------------------------------------------------------- links stay inside the folder

def _escaping_link(folder: str, path: str) -> Optional[str]:
    """The first symbolic link on the way from `folder` to `path` that resolves outside `folder` (None when
    every component stays inside)."""
    root = os.path.realpath(folder)
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    cur = os.path.abspath(folder)
    for comp in rel.split(os.sep):
        cur = os.path.join(cur, comp)
        if os.path.islink(cur):
            target = os.path.realpath(cur)
            if os.path.commonpath([root, target]) != root:
                return cur
    return None


def inside(folder: str, path: str):
    """Refuse `path` (in `folder`) when reading it would go through a link that leaves the folder."""
    link = _escaping_link(folder, path)
    if link is not None:
        raise ArtifactError(f"{link} is a symbolic link to {os.readlink(link)}, outside {folder}: refused (an "
                            f"artifact folder is read only inside itself; copy the file in instead)")


def part_files(folder: str, name: str) -> list[tuple[str, str]]:
    """(name relative to the folder, path) of every file of the part `name` (a file, or a folder walked
    recursively), in sorted order; [] when absent. Links leaving the folder are refused, not followed."""
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        return []
    inside(folder, path)
    if not os.path.isdir(path):
        return [(name, path)]
    out = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            inside(folder, os.path.join(dirpath, d))  # os.walk lists a linked folder but does not enter it
            filenames.append(d)
        for fn in filenames:
            full = os.path.join(dirpath, fn)
            inside(folder, full)
            out.append((os.path.relpath(full, folder), full))
    return sorted(out)


def copy_part(src_folder: str, name: str, dst_folder: str):
    """Copy the part `name` without dereferencing links (a link is copied as a link; the source folder's
    links were checked to stay inside it)."""
    src, dst = os.path.join(src_folder, name), os.path.join(dst_folder, name)
    part_files(src_folder, name)  # refuses a link out of the folder before anything is copied
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)


# ----------------------------------------------------------------------------- digests of a folder's parts

def sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise read_error(path, e) from None
    return h.hexdigest()


def part_digest(folder: str, name: str) -> Optional[str]:
    """sha256 of a part: a file's bytes; a folder's file names and bytes; None when absent."""
    files = part_files(folder, name)
    if not files:
        return None
    if files == [(name, os.path.join(folder, name))] and not os.path.isdir(files[0][1]):
        return sha256(files[0][1])
    h = hashlib.sha256()
    for rel, path in files:
        if os.path.islink(path):  # an inside link: what it names, and the bytes there (which may lie outside this part)
            target = sha256(path) if os.path.isfile(path) else ""
            h.update(f"{rel}\0-> {os.readlink(path)} {target}\n".encode())
        else:
            h.update(f"{rel}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def part_digests(folder: str, names: Iterable[str]) -> dict[str, Optional[str]]:
    return {name: part_digest(folder, name) for name in names}


def combine(parts: dict[str, Optional[str]]) -> str:
    """The folder's one digest: every part's name and digest (absent parts too: adding one changes it)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(f"{name}\0{parts[name] or '-'}\n".encode())
    return h.hexdigest()


def first_difference(recorded: dict, current: dict[str, Optional[str]]) -> Optional[str]:
    """The first part (in `current`'s order) whose digest is not the recorded one; None when all match."""
    for name, digest in current.items():
        if recorded.get(name) != digest:
            return name
    return None


def recorded_parts(raw: dict, path: str) -> dict:
    """The {part: digest} a record (integrity.json, onnx_manifest.json) holds, checked to add up to its
    'digest' (a hand-edited record is refused, not trusted)."""
    parts = raw.get("parts")
    if not (isinstance(parts, dict) and isinstance(raw.get("digest"), str) and combine(parts) == raw["digest"]):
        raise ArtifactError(f"{path} is corrupted: its 'parts' do not add up to its 'digest'")
    return parts


_unverified: set[str] = set()  # folders already warned about: one warning per folder and process


def warn_unverified(folder: str, why: str):
    """A folder written before digests is still served (existing users are not broken), with one warning."""
    key = os.path.realpath(folder)
    if key not in _unverified:
        _unverified.add(key)
        logging.getLogger("mmbert").warning("%s %s: it cannot be verified that its parts belong together; save "
                                            "or export it again to add a digest", folder, why)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
