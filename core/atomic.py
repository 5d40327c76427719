"""Write folders and files atomically: build under a temp name beside the target, then rename.

A crash leaves at most a ``.tmp-*`` folder that the next writer removes, never a half-written target. Readers
that watch such a file compare ``file_stamp``s: every rename into place gives it a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success rename it to ``target``. On error, remove it.

    With ``replace`` an existing target is swapped out (moved aside, then deleted), else it is an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f"{TMP_PREFIX}{target.name}-old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic replace. The file keeps
    the mode it had (a new one gets 0644): a temp file is private (0600), and a server running as another
    user must still read the pack, LATEST or a manifest after an edit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: Path, *, only: str = TMP_PREFIX, keep: str | None = None) -> None:
    """Remove temp files and folders left by a crashed writer: names starting with ``only`` (by default every
    temp), except those starting with ``keep`` (another writer's, which may be in progress)."""
    if not only.startswith(TMP_PREFIX):
        raise ValueError(f"only={only!r} must start with {TMP_PREFIX!r}: nothing else is a temp")
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name.startswith(only) and not (keep and child.name.startswith(keep)):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk: done before a rename publishes them, so that after a power
    loss the new name never points at files the disk did not get."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """A cheap summary that changes whenever ``path`` is replaced or rewritten (inode, size, mtime); None when
    it cannot be read (absent)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
