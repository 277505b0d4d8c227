"""Ingestion: a folder, a book or a text file turned into the ordered text the model reads.

Pure Python, no model involved:

    document = load_path("repo/")        # or "book.pdf", "book.epub", "notes.md", "page.html"
    document.text                        # what the model reads: folder tree, then one block per file
    document.files                       # SourceFile records in reading order (path, size, sha256, ...)
    document.skipped                     # SkippedFile records: what was left out, and why
    document.limit_notices               # LimitNotice records: how many files each limit left out

IngestError (one-line message) when nothing can be read. Where a re-reading of a changed folder has
to start is the session's business (engine/session.py): the reading manifest's segments say it.
"""

from kimi_desk.engine.ingest.html_text import html_to_text
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
