"""Writing a file so that a crash at any moment leaves either the old file or the new one, whole."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kimi_desk.engine.errors import writing


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside `path`, fsync, rename it over `path`, fsync the folder. The
    folder must exist: a write never recreates a folder that was removed (a deleted session stays
    deleted). A full or read-only disk is a StorageError, with the old file intact."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
