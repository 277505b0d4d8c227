"""Advisory locks between processes: the app and the command line use one data folder at the same time.

A lock is an open file descriptor with `flock` (POSIX) or `msvcrt.locking` (Windows) on a lock file
that is never deleted, so every process that opens the same path locks the same file. The operating
system releases it when the holder closes it or dies, so a crash never leaves a session locked.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockBusy(Exception):
    """Another process holds the lock (raised only when not waiting for it)."""


@contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block. With `wait=False` a
    lock held elsewhere raises LockBusy at once instead of waiting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, 0o644)
    try:
        _acquire(descriptor, wait)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _acquire(descriptor: int, wait: bool) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(descriptor, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        except OSError:
            raise LockBusy() from None
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockBusy() from None
        raise
