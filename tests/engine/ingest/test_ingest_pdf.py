"""PDFs through pypdf: page markers, encryption, damage, pages without text. Real PDFs, built here."""

from __future__ import annotations

import pytest
from ingest_documents import RECTANGLE_ONLY, encrypted_pdf_bytes, pdf_bytes

from kimi_desk.engine.ingest import IngestError, SourceKind, load_path
from kimi_desk.engine.ingest.pdf import extract_pdf_text

THREE_PAGES = ["The first page speaks of (parentheses)", "The second page", "The third page ends it"]


def write_pdf(tmp_path, data: bytes, name: str = "book.pdf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pages_come_in_order_each_after_its_marker(tmp_path):
    document = load_path(write_pdf(tmp_path, pdf_bytes(THREE_PAGES)))
    assert document.files[0].kind is SourceKind.PDF
    assert document.files[0].warnings == ()
    assert document.text == (
        "==> book.pdf <==\n"
        "[page 1]\nThe first page speaks of (parentheses)\n\n"
        "[page 2]\nThe second page\n\n"
        "[page 3]\nThe third page ends it\n\n"
    )


def test_pdf_with_an_owner_password_only_opens_with_the_empty_password(tmp_path):
    data = encrypted_pdf_bytes(THREE_PAGES, user_password="", owner_password="owner-secret")
    document = load_path(write_pdf(tmp_path, data))
    assert "[page 3]\nThe third page ends it" in document.text


def test_pdf_that_needs_a_password_is_refused_with_a_clear_message(tmp_path):
    data = encrypted_pdf_bytes(THREE_PAGES, user_password="user-secret", owner_password="owner-secret")
    with pytest.raises(IngestError, match=r"^book\.pdf: the PDF is password-protected"):
        load_path(write_pdf(tmp_path, data))


def test_the_right_password_opens_an_encrypted_pdf():
    data = encrypted_pdf_bytes(THREE_PAGES, user_password="user-secret", owner_password="owner-secret")
    assert "[page 2]\nThe second page" in extract_pdf_text(data, password="user-secret").text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header-only"])
def test_damaged_pdf_gives_one_line(tmp_path, damage):
    whole = pdf_bytes(THREE_PAGES)
    data = {
        "truncated": whole[: len(whole) // 2],
        "garbage": b"this was never a PDF\n" * 50,
        "empty": b"",
        "header-only": b"%PDF-1.7\n",
    }[damage]
    with pytest.raises(IngestError) as raised:
        load_path(write_pdf(tmp_path, data))
    message = str(raised.value)
    assert message.startswith("book.pdf: ")
    assert "\n" not in message
    assert "damaged" in message or "no pages" in message


def test_pdf_without_any_text_layer_is_refused(tmp_path):
    data = pdf_bytes([RECTANGLE_ONLY, RECTANGLE_ONLY])
    with pytest.raises(IngestError, match=r"no extractable text in its 2 pages .*OCR"):
        load_path(write_pdf(tmp_path, data))


def test_pdf_with_some_pages_without_text_is_read_with_a_warning(tmp_path):
    document = load_path(write_pdf(tmp_path, pdf_bytes(["Only this page has words", RECTANGLE_ONLY])))
    assert document.files[0].warnings == ("1 of 2 pages have no text layer (scanned images?)",)
    assert "[page 1]\nOnly this page has words\n\n[page 2]\n" in document.text


def test_progress_is_reported_per_page(tmp_path):
    reports = []
    load_path(write_pdf(tmp_path, pdf_bytes(THREE_PAGES)), on_progress=reports.append)
    progress = [(report.done, report.total, report.unit) for report in reports]
    assert progress == [(1, 3, "page"), (2, 3, "page"), (3, 3, "page")]
