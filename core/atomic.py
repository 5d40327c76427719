"""Write folders and files atomically: build under a temp name beside the target, then rename.

A crash leaves at most a ``.tmp-*`` folder that the next writer removes, never a half-written target. Readers
that watch such a file compare ``file_stamp``s: every rename into place gives it a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# What renameat2 answers where the kernel or the file system cannot exchange: then two renames do.
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM})


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success rename it to ``target``. On error, remove it.

    With ``replace`` an existing target is swapped out, then deleted, else it is an error. The swap is one
    atomic exchange where the system has one (Linux ``renameat2``), so a reader finds the old folder or the new
    one, never no folder; elsewhere it is two renames, with a moment between them when the target is missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        share_tree(tmp)
        fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            _remove(_swap_in(tmp, target))
        else:
            tmp.rename(target)
    except BaseException:
        _remove(tmp)
        raise


def make_temp_dir(parent: Path, stem: str) -> Path:
    """A new private folder ``.tmp-<stem>-<8 hex digits>`` in ``parent``.

    The fixed shape lets ``remove_stale_temps(of=stem)`` tell this target's temps from those of a target whose
    name merely starts the same (pack ``demo`` and pack ``demo-v2``).
    """
    while True:
        path = _temp_name(parent, stem)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            return path


def _temp_name(parent: Path, stem: str) -> Path:
    return parent / f"{TMP_PREFIX}{stem}-{secrets.token_hex(4)}"


def is_temp_of(name: str, stem: str) -> bool:
    """Whether ``name`` is a temp that ``make_temp_dir(..., stem)`` (or a swap for target ``stem``) made."""
    return re.fullmatch(re.escape(f"{TMP_PREFIX}{stem}-") + "[0-9a-f]{8}", name) is not None


def _swap_in(new: Path, target: Path) -> Path:
    """Put ``new`` in ``target``'s place; return where the old target now is (to be removed)."""
    if exchange_paths(new, target):
        return new  # the exchange left the old target under the temp's name
    old = _temp_name(target.parent, target.name)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the C library, the kernel or the file system has no exchange.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.4+
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only be read by
    setting it, which for a moment changes what other threads create)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(*, folder: bool) -> int:
    """The mode a plain ``open`` or ``mkdir`` would give (0644 / 0755 under the usual umask 022)."""
    return (0o777 if folder else 0o666) & ~_umask()


def share_tree(root: Path) -> None:
    """Give every folder and file under ``root`` the mode a plain ``mkdir``/``open`` would have: temp folders
    (``mkdtemp``, 0700) and files written through temp files (safetensors, 0600) are private, and a server or
    vLLM running as another user must read what is published."""
    os.chmod(root, default_mode(folder=True))
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), default_mode(folder=True))
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, default_mode(folder=False))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and an atomic replace. The file keeps
    the mode it had (a new one gets the umask's, ``default_mode``): a temp file is private (0600), and a server
    running as another user must still read the pack, LATEST or a manifest after an edit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = default_mode(folder=False)
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


def remove_stale_temps(folder: Path, *, only: str = TMP_PREFIX, keep: str | None = None, of: str | None = None) -> None:
    """Remove temp files and folders left by a crashed writer: names starting with ``only`` (by default every
    temp), except those starting with ``keep`` (another writer's, which may be in progress). With ``of``, only
    the temps that ``atomic_dir`` made for the target named ``of`` (``is_temp_of``), and none of another target
    whose name starts the same."""
    if not only.startswith(TMP_PREFIX):
        raise ValueError(f"only={only!r} must start with {TMP_PREFIX!r}: nothing else is a temp")
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if of is not None and not is_temp_of(child.name, of):
            continue
        if child.name.startswith(only) and not (keep and child.name.startswith(keep)):
            _remove(child)


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
