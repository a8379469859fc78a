"""Atomic file writes: a reader (or a crash) never sees half a file.

Written to a temporary file in the same directory, flushed and fsync'ed, then moved over the
target with ``os.replace`` — the POSIX-atomic way; no library does this for both text and bytes.
Temporary names carry the writer's PID, so what a killed writer (kill -9, OOM) left is recognised
and removed by the next write of the same target; a live writer's is never touched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a fresh directory beside ``out`` to fill; on success it replaces ``out`` (an existing one only once
    the new one is complete), on failure it is removed and ``out`` is left as it was.

    On Linux the two directories are swapped in one atomic step (``renameat2`` with ``RENAME_EXCHANGE``).
    Elsewhere, or where the file system cannot, the old one is renamed aside, the new one renamed in, then
    the old one deleted, so a crash between the two renames leaves ``.NAME.old-PID`` holding it.
    What a killed process left (its temporary directory, which after a swap holds the old one; an old one,
    once ``out`` exists again) is removed by the next write of ``out``: the names carry the writer's PID, and
    only those of dead processes are touched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if out.exists() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old one
        elif out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, name: str):
    """Yield a fresh hidden directory ``parent/.NAME.PID.RANDOM.tmp`` to write complete files in before the caller
    moves them into place (``os.replace``, same file system); it is removed afterwards, with whatever was not moved.

    For artifacts whose files cannot move as one directory (an embeddings shard among others). Staging
    directories of ``name`` that a killed process left are removed first, as :func:`atomic_dir` does.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent / name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_killed_temps(path: Path) -> None:
    """Remove temporary files of ``path`` that a killed :func:`atomic_write` left (``.NAME.PID.RANDOM.tmp``)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.fullmatch(tmp.name)
        if m and not _alive(int(m.group(1))) and tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _remove_leftovers(out: Path) -> None:
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        parts = path.name[len(out.name) + 2:].split(".")  # "PID.RANDOM.tmp" or "old-PID"
        pid = parts[0].removeprefix("old-")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if parts[0].startswith("old-") and not out.exists():
            continue  # the old artifact itself, when the swap was killed before the new one moved in
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
