"""Opening a path: a folder becomes its files in reading order, a file becomes itself.

Every file goes through the same steps: name rules (folders only), where it really is (symbolic
links are read only when they point to a file inside the folder), what it is (regular files only,
so a FIFO or a device is never opened for reading), its size, its bytes (read once, hashed once),
then the reader for its kind. In a folder a file that fails a step is skipped with a reason; a file
opened by itself that fails raises IngestError instead, since nothing else is left to read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kimi_desk.engine.ingest.decoding import decode_text, longest_line_length
from kimi_desk.engine.ingest.epub import extract_epub_text
from kimi_desk.engine.ingest.file_rules import has_binary_extension, is_generated_name, is_lock_file, kind_for_name
from kimi_desk.engine.ingest.html_text import html_to_text
from kimi_desk.engine.ingest.listing import list_folder, reading_order_key
from kimi_desk.engine.ingest.pdf import extract_pdf_text
from kimi_desk.engine.ingest.records import (
    DEFAULT_LIMITS,
    ExtractedText,
    IngestError,
    LimitNotice,
    LoadedDocument,
    LoaderLimits,
    LoadProgress,
    ProgressCallback,
    SkipCategory,
    SkippedFile,
    SourceFile,
    SourceKind,
)
from kimi_desk.engine.ingest.render import display_path, render_file_block, render_folder_preamble

_BOOK_KINDS = (SourceKind.PDF, SourceKind.EPUB)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class _Skip(Exception):
    """A step found the file cannot be read; carries the category, reason and limit for SkippedFile."""

    def __init__(self, category: SkipCategory, reason: str, limit: str | None = None) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.limit = limit


class _SizeLimit(NamedTuple):
    """The most bytes a file may have, and the LoaderLimits field that says so."""

    field: str
    max_bytes: int


@dataclass(frozen=True)
class _Candidate:
    """A file to read: its name in the document, where its bytes are, and how it is read."""

    relative_path: str
    absolute_path: Path
    real_path: Path
    kind: SourceKind
    inside_folder: bool


def load_path(
    path: str | os.PathLike[str],
    limits: LoaderLimits = DEFAULT_LIMITS,
    on_progress: ProgressCallback | None = None,
) -> LoadedDocument:
    """Read a folder or a single file (PDF, EPUB, HTML, Markdown, any text) into a document.

    Raises IngestError (one line) when the path cannot be opened or nothing in it can be read.
    `on_progress` is called after each file of a folder and each page of a PDF; it may raise to
    cancel (the exception propagates).
    """
    opened = Path(path).expanduser()
    if _resolve_opened_path(opened).is_dir():
        return load_folder(opened, limits, on_progress)
    return load_file(opened, limits, on_progress)


def load_folder(
    folder: Path, limits: LoaderLimits = DEFAULT_LIMITS, on_progress: ProgressCallback | None = None
) -> LoadedDocument:
    """Read the files of a folder that git (or its .gitignore files) keeps, in reading order."""
    folder = _resolve_opened_path(folder)
    if not folder.is_dir():
        raise IngestError(f"{display_path(str(folder))}: not a folder")
    listing = list_folder(folder)
    if not listing.paths and not listing.skipped:
        raise IngestError(f"{display_path(str(folder))}: nothing to read (empty, or everything in it is ignored)")
    files, skipped = _read_listed_files(folder, listing.paths, limits, on_progress)
    skipped = sorted([*listing.skipped, *skipped], key=lambda entry: reading_order_key(entry.relative_path))
    if not files:
        message = f"{display_path(folder.name)}/: nothing readable ({_summarise(skipped)})"
        raise IngestError(message, skipped=tuple(skipped))
    return _folder_document(folder, listing.source, files, skipped, _limit_notices(skipped, limits))


def load_file(
    file: Path, limits: LoaderLimits = DEFAULT_LIMITS, on_progress: ProgressCallback | None = None
) -> LoadedDocument:
    """Read one file the user opened by name (a link keeps its own name); IngestError when it cannot be read."""
    file = Path(file).expanduser().absolute()
    name = display_path(file.name)
    real_path = _resolve_opened_path(file)
    kind = kind_for_name(real_path.name, inside_folder=False)
    candidate = _Candidate(file.name, file, real_path, kind, inside_folder=False)
    try:
        source = _read_candidate(candidate, limits, on_progress)
    except _Skip as skip:
        raise IngestError(f"{name}: {skip.reason}") from None
    if not source.text.strip():
        raise IngestError(f"{name}: the file has no text")
    text_bytes = _text_bytes(source)
    if text_bytes > limits.max_total_bytes:
        limit = _size(limits.max_total_bytes)
        raise IngestError(f"{name}: its text ({_size(text_bytes)}) is over the total limit of {limit}")
    block = render_file_block(source.relative_path, source.text)
    return LoadedDocument(
        root=real_path,
        is_folder=False,
        listing_source="file",
        files=(source,),
        skipped=(),
        preamble="",
        text=block,
        file_offsets=(0,),
    )


def _read_listed_files(
    folder: Path, relative_paths: tuple[str, ...], limits: LoaderLimits, on_progress: ProgressCallback | None
) -> tuple[list[SourceFile], list[SkippedFile]]:
    """Read the listed files in order until a limit is reached; every later file is skipped.

    At the total limit reading stops rather than picking smaller files further on: the document
    stays a prefix of the reading order, which is what resuming from a file boundary needs.
    """
    files: list[SourceFile] = []
    skipped: list[SkippedFile] = []
    total_text_bytes = 0
    # Once a limit is reached: the LoaderLimits field, and the reason every later file gets.
    reached: tuple[str, str] | None = None
    for position, relative_path in enumerate(relative_paths, start=1):
        if reached is None and len(files) >= limits.max_files:
            reached = _limit_reached("max_files", limits)
        # Past a limit, files that the name rules skip anyway are not counted as the limit's.
        outcome = _read_folder_file(folder, relative_path, limits, names_only=reached is not None)
        if isinstance(outcome, SourceFile) and total_text_bytes + _text_bytes(outcome) > limits.max_total_bytes:
            reached = _limit_reached("max_total_bytes", limits)
            outcome = None
        if outcome is None and reached is not None:
            skipped.append(SkippedFile(relative_path, SkipCategory.LIMIT_REACHED, reached[1], limit=reached[0]))
        elif isinstance(outcome, SkippedFile):
            skipped.append(outcome)
        else:
            files.append(outcome)
            total_text_bytes += _text_bytes(outcome)
        if on_progress is not None:
            on_progress(LoadProgress(done=position, total=len(relative_paths), unit="file", path=relative_path))
    return files, skipped


def _resolve_opened_path(path: Path) -> Path:
    """The real path of what the user opened; IngestError when it does not exist or cannot be reached."""
    try:
        return path.resolve(strict=True)
    except RuntimeError:
        # Python before 3.13 reports a symbolic link loop this way.
        raise IngestError(f"{display_path(str(path))}: symbolic link loop") from None
    except OSError as error:
        raise IngestError(f"{display_path(str(path))}: {_os_error_reason(error)}") from None


def _read_folder_file(
    folder: Path, relative_path: str, limits: LoaderLimits, names_only: bool = False
) -> SourceFile | SkippedFile | None:
    """The file read, or why it is skipped; with `names_only`, only the name rules are applied (None
    when they pass)."""
    name = relative_path.rsplit("/", 1)[-1]
    try:
        _apply_name_rules(name)
        if names_only:
            return None
        candidate = _locate_in_folder(folder, relative_path)
        return _read_candidate(candidate, limits, on_progress=None)
    except _Skip as skip:
        return SkippedFile(relative_path, skip.category, skip.reason, skip.limit)


def _apply_name_rules(name: str) -> None:
    if is_lock_file(name):
        raise _Skip(SkipCategory.LOCK_FILE, "dependency lock file")
    if is_generated_name(name):
        raise _Skip(SkipCategory.GENERATED, "minified or generated file")
    if has_binary_extension(name):
        raise _Skip(SkipCategory.BINARY, "binary file (by its extension)")


def _locate_in_folder(folder: Path, relative_path: str) -> _Candidate:
    """Where a listed file's bytes really are; only inside `folder` (already a real path)."""
    absolute_path = folder / relative_path
    is_link = absolute_path.is_symlink()
    try:
        real_path = absolute_path.resolve(strict=True)
    except RuntimeError:
        raise _Skip(SkipCategory.SYMLINK, "symbolic link loop") from None
    except FileNotFoundError:
        if is_link:
            raise _Skip(SkipCategory.SYMLINK, "broken symbolic link") from None
        raise _Skip(SkipCategory.UNREADABLE, "missing (deleted or moved since the folder was listed)") from None
    except OSError as error:
        category = SkipCategory.SYMLINK if error.errno == errno.ELOOP else SkipCategory.UNREADABLE
        raise _Skip(category, _os_error_reason(error)) from None
    if not real_path.is_relative_to(folder):
        raise _Skip(SkipCategory.SYMLINK, "symbolic link to outside the folder")
    if real_path.is_dir():
        if is_link:
            raise _Skip(SkipCategory.SYMLINK, "symbolic link to a folder (links are not followed)")
        raise _Skip(SkipCategory.NOT_A_REGULAR_FILE, "a folder git lists as one entry (submodule or nested repository)")
    kind = kind_for_name(real_path.name, inside_folder=True)
    return _Candidate(relative_path, absolute_path, real_path, kind, inside_folder=True)


def _read_candidate(candidate: _Candidate, limits: LoaderLimits, on_progress: ProgressCallback | None) -> SourceFile:
    data = _read_bytes(candidate.real_path, _size_limit(candidate, limits))
    extracted = _extract(candidate, data, limits, on_progress)
    return SourceFile(
        relative_path=candidate.relative_path,
        absolute_path=candidate.absolute_path,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        kind=candidate.kind,
        text=extracted.text,
        warnings=extracted.warnings,
    )


def _size_limit(candidate: _Candidate, limits: LoaderLimits) -> _SizeLimit:
    """Books are bounded by `max_book_bytes`; a text file in a folder by `max_file_bytes`; a text
    file opened by itself (a novel in .txt) by the total, as it is the whole document."""
    if candidate.kind in _BOOK_KINDS:
        return _SizeLimit("max_book_bytes", limits.max_book_bytes)
    if candidate.inside_folder:
        return _SizeLimit("max_file_bytes", limits.max_file_bytes)
    return _SizeLimit("max_total_bytes", limits.max_total_bytes)


def _read_bytes(path: Path, limit: _SizeLimit) -> bytes:
    """All the bytes of a regular file of at most `limit.max_bytes`."""
    # stat before open: opening a FIFO waits for a writer and opening some devices acts on them.
    try:
        status = os.stat(path)
    except OSError as error:
        raise _Skip(SkipCategory.UNREADABLE, _os_error_reason(error)) from None
    _require_regular_file(status)
    _require_size_within(status.st_size, limit)
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise _Skip(SkipCategory.UNREADABLE, _os_error_reason(error)) from None
    with os.fdopen(descriptor, "rb") as stream:
        # The file may have been swapped between stat and open; check what was opened.
        _require_regular_file(os.fstat(stream.fileno()))
        try:
            data = stream.read(limit.max_bytes + 1)
        except OSError as error:
            raise _Skip(SkipCategory.UNREADABLE, _os_error_reason(error)) from None
    _require_size_within(len(data), limit)
    return data


def _require_regular_file(status: os.stat_result) -> None:
    if stat.S_ISREG(status.st_mode):
        return
    if stat.S_ISFIFO(status.st_mode):
        what = "a named pipe (FIFO)"
    elif stat.S_ISSOCK(status.st_mode):
        what = "a socket"
    elif stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode):
        what = "a device"
    else:
        what = "not a regular file"
    raise _Skip(SkipCategory.NOT_A_REGULAR_FILE, f"{what}, not read")


def _require_size_within(size: int, limit: _SizeLimit) -> None:
    if size > limit.max_bytes:
        raise _Skip(
            SkipCategory.TOO_LARGE, f"too large ({_size(size)}, the limit is {_size(limit.max_bytes)})", limit.field
        )


def _extract(
    candidate: _Candidate, data: bytes, limits: LoaderLimits, on_progress: ProgressCallback | None
) -> ExtractedText:
    try:
        if candidate.kind is SourceKind.PDF:
            return extract_pdf_text(data, on_page=_page_reporter(candidate, on_progress))
        if candidate.kind is SourceKind.EPUB:
            return extract_epub_text(data, max_text_bytes=limits.max_total_bytes)
    except IngestError as error:
        raise _Skip(SkipCategory.EXTRACTION_FAILED, str(error)) from None
    return _extract_text(candidate, data, limits)


def _extract_text(candidate: _Candidate, data: bytes, limits: LoaderLimits) -> ExtractedText:
    decoded = decode_text(data)
    if decoded is None:
        reason = "contains NUL bytes" if b"\x00" in data else "not UTF-8 or Windows-1252 text"
        raise _Skip(SkipCategory.BINARY, f"binary file ({reason})")
    warnings = () if decoded.encoding.startswith("utf") else (f"read as {decoded.encoding} (not valid UTF-8)",)
    if candidate.kind is SourceKind.HTML:
        text = html_to_text(decoded.text)
        if not text.strip():
            raise _Skip(SkipCategory.EXTRACTION_FAILED, "the HTML has no readable text")
        return ExtractedText(text=text + "\n", warnings=warnings)
    if candidate.inside_folder and longest_line_length(decoded.text) > limits.max_line_chars:
        reason = f"a line longer than {limits.max_line_chars} characters (minified or generated?)"
        raise _Skip(SkipCategory.GENERATED, reason)
    return ExtractedText(text=decoded.text, warnings=warnings)


def _page_reporter(candidate: _Candidate, on_progress: ProgressCallback | None) -> Callable[[int, int], None] | None:
    if on_progress is None:
        return None

    def report(done: int, total: int) -> None:
        on_progress(LoadProgress(done=done, total=total, unit="page", path=candidate.relative_path))

    return report


def _folder_document(
    folder: Path,
    listing_source: str,
    files: list[SourceFile],
    skipped: list[SkippedFile],
    limit_notices: tuple[LimitNotice, ...],
) -> LoadedDocument:
    preamble = render_folder_preamble(folder.name, [file.relative_path for file in files])
    pieces = [preamble]
    offsets = []
    position = len(preamble)
    for file in files:
        block = render_file_block(file.relative_path, file.text)
        offsets.append(position)
        pieces.append(block)
        position += len(block)
    return LoadedDocument(
        root=folder,
        is_folder=True,
        listing_source=listing_source,
        files=tuple(files),
        skipped=tuple(skipped),
        preamble=preamble,
        text="".join(pieces),
        file_offsets=tuple(offsets),
        limit_notices=limit_notices,
    )


# The LoaderLimits fields that can leave files out, in the order their notices are given.
_FILE_LIMITS = ("max_files", "max_total_bytes", "max_file_bytes", "max_book_bytes")


def _limit_notices(skipped: list[SkippedFile], limits: LoaderLimits) -> tuple[LimitNotice, ...]:
    """One notice per limit that left files out: how many, and why, in a line."""
    notices = []
    for field in _FILE_LIMITS:
        count = sum(1 for entry in skipped if entry.limit == field)
        if count:
            value = getattr(limits, field)
            message = f"{count:,} {'file' if count == 1 else 'files'} not read: {_limit_reason(field, value)}"
            notices.append(LimitNotice(field, value, count, message))
    return tuple(notices)


def _limit_reached(field: str, limits: LoaderLimits) -> tuple[str, str]:
    """For a limit that stops the reading: its field, and the reason every later file is given."""
    return field, f"not read: {_limit_reason(field, getattr(limits, field))}"


def _limit_reason(field: str, value: int) -> str:
    """Why the limit `field` (of value `value`) left a file out, in words."""
    if field == "max_files":
        return f"the limit of {value:,} {'file' if value == 1 else 'files'} was reached"
    if field == "max_total_bytes":
        return f"the total text limit of {_size(value)} was reached"
    what = "file" if field == "max_file_bytes" else "PDF or EPUB"
    return f"larger than the limit of {_size(value)} per {what}"


def _text_bytes(source: SourceFile) -> int:
    return len(source.text.encode("utf-8"))


def _summarise(skipped: list[SkippedFile]) -> str:
    """Why a folder gave nothing, in a few words: the one reason, or counts per category
    ("3 skipped: 2 binary, 1 lock-file")."""
    if len(skipped) == 1:
        return f"{display_path(skipped[0].relative_path)}: {skipped[0].reason}"
    counts: dict[str, int] = {}
    for entry in skipped:
        counts[entry.category.value] = counts.get(entry.category.value, 0) + 1
    by_frequency = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    details = ", ".join(f"{count} {category}" for category, count in by_frequency)
    return f"{len(skipped)} skipped: {details}"


def _os_error_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "no such file or folder"
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    return (error.strerror or str(error)).lower()


def _size(byte_count: int) -> str:
    """A byte count for people: 2.0 MiB, 512 KiB, 300 B."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if byte_count >= scale:
            return f"{byte_count / scale:.1f} {unit}"
    return f"{byte_count} B"
