"""Ingestion: a folder, a book or a text file turned into the ordered text the model reads.

Pure Python, no model involved:

    document = load_path("repo/")        # or "book.pdf", "book.epub", "notes.md", "page.html"
    document.text                        # what the model reads: folder tree, then one block per file
    document.files                       # SourceFile records in reading order (path, size, sha256, ...)
    document.skipped                     # SkippedFile records: what was left out, and why
    document.limit_notices               # LimitNotice records: how many files each limit left out

IngestError (one-line message) when nothing can be read. `first_changed_index` and
`unchanged_segments` tell where a re-reading of a changed folder has to start.
"""

from kimi_desk.engine.ingest.html_text import html_to_text
from kimi_desk.engine.ingest.incremental import (
    DocumentFingerprint,
    FileFingerprint,
    fingerprint_document,
    first_changed_index,
    unchanged_segments,
)
from kimi_desk.engine.ingest.loader import load_file, load_folder, load_path
from kimi_desk.engine.ingest.records import (
    IngestError,
    LimitNotice,
    LoadedDocument,
    LoaderLimits,
    LoadProgress,
    SkipCategory,
    SkippedFile,
    SourceFile,
    SourceKind,
)

__all__ = [
    "load_path",
    "load_folder",
    "load_file",
    "html_to_text",
    "first_changed_index",
    "unchanged_segments",
    "fingerprint_document",
    "FileFingerprint",
    "DocumentFingerprint",
    "IngestError",
    "LimitNotice",
    "LoadedDocument",
    "LoaderLimits",
    "LoadProgress",
    "SkipCategory",
    "SkippedFile",
    "SourceFile",
    "SourceKind",
]
