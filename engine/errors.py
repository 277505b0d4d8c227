"""Errors the engine raises for bad input or an unusable disk. Each message is one line that names the
file, field or tensor and says what is wrong; the command line prints it as it is."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that cannot describe a Kimi Linear model."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded."""


class StorageError(ValueError):
    """A file kimi-desk must write cannot be written: disk full, read-only, no permission. Whatever was
    there before is left as it was (every write goes to a temporary file renamed into place)."""


# errno -> what the user is told. Anything else is not a property of the disk and passes through.
_STORAGE_REASONS = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file would be larger than this disk or process allows",
}


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a disk's refusal inside the block into a one-line StorageError naming `path`."""
    try:
        yield
    except OSError as error:
        reason = _STORAGE_REASONS.get(error.errno)
        if reason is None:
            raise
        raise StorageError(f"cannot write {path}: {reason}; nothing was changed "
                           "(free some space, or set KIMI_DESK_HOME to a writable folder)") from None
