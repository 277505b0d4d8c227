"""Re-reading a changed folder: how much of the previous reading is still valid.

A file's block in the document depends only on its path and its bytes (see render.py), so the
document is unchanged up to the first file whose path or sha256 differs, or that was added or
removed. The engine resumes from its checkpoint at that file boundary.

The folder's tree comes before every file and lists the paths read: when a file is added, removed
or renamed the tree changes too and the whole document must be read again. `unchanged_segments`
accounts for that; `first_changed_index` looks at the files alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kimi_desk.engine.ingest.records import LoadedDocument
from kimi_desk.engine.ingest.render import RENDER_FORMAT_VERSION


class Fingerprinted(Protocol):
    """Anything with a path and a content hash: a SourceFile, or a FileFingerprint from a session."""

    @property
    def relative_path(self) -> str: ...

    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class FileFingerprint:
    """What a session keeps of a file read, to compare on the next opening."""

    relative_path: str
    sha256: str


@dataclass(frozen=True)
class DocumentFingerprint:
    """What a session keeps of a whole document: enough to decide where re-reading starts."""

    render_format_version: int
    preamble_sha256: str
    files: tuple[FileFingerprint, ...]


def fingerprint_document(document: LoadedDocument) -> DocumentFingerprint:
    return DocumentFingerprint(
        render_format_version=RENDER_FORMAT_VERSION,
        preamble_sha256=hashlib.sha256(document.preamble.encode("utf-8")).hexdigest(),
        files=tuple(FileFingerprint(file.relative_path, file.sha256) for file in document.files),
    )


def first_changed_index(previous: Sequence[Fingerprinted], current: Sequence[Fingerprinted]) -> int:
    """Index of the first file that differs (changed, added, removed, renamed or moved).

    Files [0, index) are the same in both lists, in the same order. When nothing differs the
    result is len(current) (== len(previous)); when one list extends the other it is the shorter
    list's length.
    """
    for index, (old, new) in enumerate(zip(previous, current, strict=False)):
        if old.relative_path != new.relative_path or old.sha256 != new.sha256:
            return index
    return min(len(previous), len(current))


def unchanged_segments(previous: DocumentFingerprint, current: DocumentFingerprint) -> int:
    """How many leading segments of `LoadedDocument.segments()` ([preamble, file 0, file 1, ...])
    can be kept: 0 means read everything again; 1 + len(files) means nothing changed."""
    if previous.render_format_version != current.render_format_version:
        return 0
    if previous.preamble_sha256 != current.preamble_sha256:
        return 0
    return 1 + first_changed_index(previous.files, current.files)
