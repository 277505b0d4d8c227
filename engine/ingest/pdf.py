"""PDF to text through pypdf, one "[page N]" marker before each page's text.

pypdf does no OCR: pages that are only images yield no text. A PDF with no text at all is an error;
one with some empty pages is read with a warning that says how many. The bytes are parsed from
memory (the caller has read and hashed them already), so the file is read once.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from pypdf import PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

from kimi_desk.engine.ingest.records import ExtractedText, IngestError


def extract_pdf_text(
    data: bytes, password: str = "", on_page: Callable[[int, int], None] | None = None
) -> ExtractedText:
    """The text of a PDF with page markers; IngestError when none can be had.

    Error messages are one line and do not name the file: the caller, who knows its path, does.

    `on_page(done, total)` is called after each page, for progress; it may raise to cancel.
    """
    reader = _open_reader(data, password)
    page_count = _page_count(reader)
    if page_count == 0:
        raise IngestError("the PDF has no pages")
    pages = []
    pages_without_text = 0
    for page_number in range(1, page_count + 1):
        page_text = _page_text(reader, page_number)
        if not page_text.strip():
            pages_without_text += 1
        pages.append(f"[page {page_number}]\n{page_text}".rstrip() + "\n")
        if on_page is not None:
            on_page(page_number, page_count)
    if pages_without_text == page_count:
        raise IngestError(f"no extractable text in its {page_count} pages (scanned images? kimi-desk does not do OCR)")
    warnings = ()
    if pages_without_text:
        warnings = (f"{pages_without_text} of {page_count} pages have no text layer (scanned images?)",)
    return ExtractedText(text="\n".join(pages), warnings=warnings)


def _open_reader(data: bytes, password: str) -> PdfReader:
    # pypdf raises many exception types on malformed input, not only its own (ValueError,
    # KeyError, TypeError, ...): any failure to parse the file means it is damaged.
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except Exception as error:
        raise IngestError(f"damaged or not a PDF ({_describe(error)})") from error
    if reader.is_encrypted:
        _decrypt(reader, password)
    return reader


def _decrypt(reader: PdfReader, password: str) -> None:
    """Open an encrypted PDF with `password` ("" = the empty user password many PDFs use)."""
    try:
        opened = reader.decrypt(password)
    except DependencyError as error:
        raise IngestError("the PDF is AES-encrypted; reading it needs the 'cryptography' package") from error
    except Exception as error:
        raise IngestError(f"damaged encryption data ({_describe(error)})") from error
    if not opened:
        raise IngestError("the PDF is password-protected; remove the password and open it again")


def _page_count(reader: PdfReader) -> int:
    try:
        return len(reader.pages)
    except FileNotDecryptedError as error:
        raise IngestError("the PDF is password-protected; remove the password and open it again") from error
    except Exception as error:
        raise IngestError(f"damaged PDF, its page list cannot be read ({_describe(error)})") from error


def _page_text(reader: PdfReader, page_number: int) -> str:
    """One page's text; a page pypdf cannot parse counts as a page without text."""
    try:
        text = reader.pages[page_number - 1].extract_text()
    except (DependencyError, FileNotDecryptedError) as error:
        raise IngestError(_describe(error)) from error
    except Exception:
        # A broken content stream on one page should not lose the rest of the book.
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def _describe(error: BaseException) -> str:
    """An exception as one short line for a message."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, PyPdfError):
        return text[:200]
    return f"{type(error).__name__}: {text}"[:200]
