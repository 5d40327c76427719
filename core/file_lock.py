"""An exclusive advisory lock on a file (``flock``), shared by every writer that must not interleave with another
process: a trainer publishing a persona, servers changing ``DISABLED.json``, the first build of the offline base
and a router saved by the CLI while a server fits one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Without ``wait`` a lock held elsewhere raises ``BlockingIOError`` at once; with it the caller blocks, and
    ``waiting`` (if given) is logged first so that a long wait is explained. Locks belong to the open file, so
    two opens in one process exclude each other as two processes do.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
