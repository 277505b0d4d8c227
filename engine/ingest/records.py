"""What ingestion produces: the files read, the files skipped and why, the limits, the one error.

Plain frozen dataclasses, so a session can store them as JSON and the UI can show them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from kimi_desk.engine.errors import IngestError  # noqa: F401 - the ingestion's error, defined with the others


class SourceKind(str, Enum):
    """How a file's text was obtained."""

    TEXT = "text"
    MARKDOWN = "markdown"
    HTML = "html"
    PDF = "pdf"
    EPUB = "epub"


class SkipCategory(str, Enum):
    """Why a file was left out; `SkippedFile.reason` says it in words."""

    IGNORED_FOLDER = "ignored-folder"
    LOCK_FILE = "lock-file"
    GENERATED = "generated"
    BINARY = "binary"
    TOO_LARGE = "too-large"
    LIMIT_REACHED = "limit-reached"
    UNREADABLE = "unreadable"
    SYMLINK = "symlink"
    NOT_A_REGULAR_FILE = "not-a-regular-file"
    EXTRACTION_FAILED = "extraction-failed"


@dataclass(frozen=True)
class LoaderLimits:
    """Bounds that keep one ingestion from reading without end. Sizes are in bytes.

    The total is counted on the extracted text (what the model will read), not on the files on
    disk: a 40 MB PDF may hold 1 MB of text. When it is reached, reading stops there and every later
    file is skipped, so the document read is always a prefix of the ordered file list.
    """

    # Per text file inside a folder: a source file this large is almost never written by hand
    # (1 MiB is ~250k tokens of code). A text file opened by itself is the whole document, so only
    # `max_total_bytes` bounds it.
    max_file_bytes: int = 2 * 1024 * 1024
    # Per PDF or EPUB file, on disk: they are mostly images and fonts, so their size says little.
    max_book_bytes: int = 256 * 1024 * 1024
    # About 4M tokens: four times the model's 1M window, so the limit only stops runaway folders;
    # fitting the window is decided later, with the real token count.
    max_total_bytes: int = 16 * 1024 * 1024
    max_files: int = 10_000
    # Minified and generated files put whole programs on one line; prose paragraphs stay far below.
    # Applied only inside folders: a file the user opened by name is read whatever its shape.
    max_line_chars: int = 10_000


DEFAULT_LIMITS = LoaderLimits()


@dataclass(frozen=True)
class SourceFile:
    """One file whose text is part of the document.

    `relative_path` is POSIX-style, relative to the folder opened (the file name for a single file);
    `size` and `sha256` describe the bytes on disk, which is what incremental re-reading compares.
    """

    relative_path: str
    absolute_path: Path
    size: int
    sha256: str
    kind: SourceKind
    text: str
    # Things the reader should know but that did not stop the file being read,
    # e.g. "4 of 120 pages have no text layer".
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtractedText:
    """What a format reader (PDF, EPUB) returns: the text, and warnings for `SourceFile.warnings`."""

    text: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedFile:
    """A file (or a whole folder, whose path then ends with "/") that was not read, and why."""

    relative_path: str
    category: SkipCategory
    reason: str
    # The LoaderLimits field that left the file out ("max_files", "max_total_bytes", "max_file_bytes",
    # "max_book_bytes"), when a limit did.
    limit: str | None = None


@dataclass(frozen=True)
class LimitNotice:
    """How many files one limit left out of a folder, in a line for the user: a document that lacks
    files must say so, or its answers look complete when they are not.

    `limit` is the LoaderLimits field and `value` its value, so a front end can name the option
    that raises it.
    """

    limit: str
    value: int
    files: int
    message: str


@dataclass(frozen=True)
class LoadProgress:
    """Reported while loading: `done` of `total` units (files of a folder, pages of a PDF)."""

    done: int
    total: int
    unit: str
    path: str


ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class LoadedDocument:
    """The result of opening a path: the files in reading order and the text the model reads.

    `text` is `preamble` followed by one block per file; `file_offsets[i]` is where the block of
    `files[i]` starts in `text`, so the engine can checkpoint at file boundaries.
    """

    root: Path
    is_folder: bool
    # "git" (what git ls-files lists, read from the index), "gitignore" (our own walk) or "file" (a single
    # file was opened).
    listing_source: str
    files: tuple[SourceFile, ...]
    skipped: tuple[SkippedFile, ...]
    preamble: str
    text: str
    file_offsets: tuple[int, ...] = field(default=())
    # What the limits left out, one notice per limit that did (a summary of `skipped`).
    limit_notices: tuple[LimitNotice, ...] = ()

    def segments(self) -> list[str]:
        """The text cut at file boundaries: [preamble, block of file 0, block of file 1, ...]."""
        bounds = [*self.file_offsets, len(self.text)]
        return [self.text[: bounds[0]]] + [self.text[start:end] for start, end in zip(bounds, bounds[1:], strict=False)]
