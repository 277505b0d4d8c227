"""Real documents for the ingestion tests, built on the spot: PDFs, EPUBs and git repositories.

PDFs are written with pypdf itself (a page whose content stream draws text in Helvetica, or only a
rectangle), so the tests need no PDF-writing dependency.
"""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from pathlib import Path

from pypdf import PdfReader, PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

# Used where a test needs a page that draws but writes nothing (a scanned page has no text either).
RECTANGLE_ONLY = None


def pdf_bytes(pages: list[str | None]) -> bytes:
    """A PDF with one page per entry: the text drawn on it, or RECTANGLE_ONLY for a text-less page."""
    writer = PdfWriter()
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    font_reference = writer._add_object(font)
    for text in pages:
        page = writer.add_blank_page(612, 792)
        content = DecodedStreamObject()
        content.set_data(_page_content(text))
        page[NameObject("/Contents")] = writer._add_object(content)
        page[NameObject("/Resources")] = DictionaryObject(
            {
                NameObject("/Font"): DictionaryObject({NameObject("/F1"): font_reference}),
            }
        )
    output = io.BytesIO()
    writer.write(output)
    return output.getvalue()


def encrypted_pdf_bytes(pages: list[str | None], user_password: str, owner_password: str) -> bytes:
    """The same PDF encrypted with RC4-128, which pypdf handles without extra packages."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes(pages))))
    writer.encrypt(user_password, owner_password=owner_password, algorithm="RC4-128")
    output = io.BytesIO()
    writer.write(output)
    return output.getvalue()


def _page_content(text: str | None) -> bytes:
    if text is None:
        return b"0 0 1 rg 100 100 200 150 re f"
    lines = []
    for number, line in enumerate(text.split("\n")):
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        lines.append(f"BT /F1 12 Tf 72 {720 - 16 * number} Td ({escaped}) Tj ET")
    return "\n".join(lines).encode("latin-1")


def container_xml(opf_path: str) -> str:
    return (
        '<?xml version="1.0"?>\n'
        '<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
        f'<rootfiles><rootfile full-path="{opf_path}" media-type="application/oebps-package+xml"/></rootfiles>'
        "</container>"
    )


def opf_xml(title: str, author: str, manifest: list[tuple[str, str, str]], spine: list[str]) -> str:
    """An OPF package: manifest entries are (id, href, media type); spine lists ids in reading order."""
    items = "".join(f'<item id="{item_id}" href="{href}" media-type="{media}"/>' for item_id, href, media in manifest)
    itemrefs = "".join(f'<itemref idref="{idref}"/>' for idref in spine)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">'
        '<metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
        '<dc:identifier id="id">test-book</dc:identifier>'
        f"<dc:title>{title}</dc:title><dc:creator>{author}</dc:creator>"
        "</metadata>"
        f"<manifest>{items}</manifest><spine>{itemrefs}</spine></package>"
    )


def xhtml(title: str, body: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<html xmlns="http://www.w3.org/1999/xhtml"><head><title>'
        f"{title}</title><style>p {{ color: red; }}</style></head><body>{body}</body></html>"
    )


def epub_bytes(members: dict[str, str | bytes], opf_path: str = "OEBPS/content.opf") -> bytes:
    """An EPUB archive: mimetype first and stored, container.xml pointing at `opf_path`, then `members`."""
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        archive.writestr("META-INF/container.xml", container_xml(opf_path))
        for name, content in members.items():
            archive.writestr(name, content)
    return output.getvalue()


def git_environment() -> dict[str, str]:
    """The environment for test git commands: no user or system configuration, a fixed identity."""
    return {
        **os.environ,
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def git(repository: Path, *arguments: str) -> str:
    completed = subprocess.run(
        ["git", *arguments], cwd=repository, env=git_environment(), capture_output=True, text=True, check=True
    )
    return completed.stdout


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    """Create each file (and its folders) under root."""
    for relative_path, content in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
