"""The errors a user can cause: bad input, a model that does not fit, an unusable disk. Each derives
from UserError and carries one line that names the file, field or tensor and says what is wrong; the
command line prints it as it is (exit 2) and the app shows it with advice. Any other exception is a bug
and is reported as one. This module imports nothing heavy, so the app can tell errors apart by type
before torch is loaded."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Something the user can fix (their input, their machine); the message is one line."""


class ConfigError(UserError):
    """A config.json that cannot describe a Kimi Linear model."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded."""


class IngestError(UserError):
    """Nothing could be read from what the user opened; the message is one line, ready to show.

    `skipped` carries the per-file reasons when a whole folder came to nothing, so the UI can say why.
    """

    def __init__(self, message: str, skipped: tuple = ()) -> None:
        super().__init__(message)
        self.skipped = skipped


class SessionError(UserError):
    """A session that cannot be read, found or used; one line, says what to do."""


class GpuMemoryError(UserError):
    """The GPU ran out of memory in the middle of reading or answering (another program took memory, or
    the plan's margin was too small). What was read and said up to then is kept."""

    def __init__(self, doing: str) -> None:
        super().__init__(
            f"the GPU ran out of memory while {doing}; what was done so far is kept. Free memory "
            f"on the card, or load with a lower --gpu-memory (more of the model in RAM) or "
            f"--quantize int4"
        )


class StorageError(UserError):
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
        raise StorageError(
            f"cannot write {path}: {reason}; nothing was changed "
            "(free some space, or set KIMI_DESK_HOME to a writable folder)"
        ) from None
