"""EPUBs through zipfile and ElementTree: spine order, chapter headers, refused paths, damage, DRM."""

from __future__ import annotations

import pytest
from ingest_documents import epub_bytes, opf_xml, xhtml

from kimi_desk.engine.ingest import IngestError, LoaderLimits, SourceKind, load_path

XHTML = "application/xhtml+xml"


def write_epub(tmp_path, data: bytes, name: str = "book.epub"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def three_chapter_book() -> bytes:
    # The manifest lists the chapters backwards; the spine gives the reading order.
    manifest = [
        ("nav", "nav.xhtml", XHTML),
        ("c3", "text/three.xhtml", XHTML),
        ("c2", "text/chapter%202.xhtml", XHTML),
        ("c1", "text/one.xhtml", XHTML),
        ("css", "style.css", "text/css"),
    ]
    return epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("A Small Book", "Ann Author", manifest, ["c1", "c2", "c3"]),
            "OEBPS/nav.xhtml": xhtml("Contents", "<nav><ol><li>One</li></ol></nav>"),
            "OEBPS/text/one.xhtml": xhtml(
                "Book", "<h1>The Beginning</h1><p>It was a dark&nbsp;night &mdash; really.</p>"
            ),
            "OEBPS/text/chapter 2.xhtml": xhtml("Book", "<h2>The Middle</h2><ul><li>first</li><li>second</li></ul>"),
            "OEBPS/text/three.xhtml": xhtml("The End", "<p>No heading here.</p><pre>  keep   this</pre>"),
            "OEBPS/style.css": "p { margin: 0 }",
        }
    )


def test_chapters_come_in_spine_order_with_headers(tmp_path):
    document = load_path(write_epub(tmp_path, three_chapter_book()))
    record = document.files[0]
    assert record.kind is SourceKind.EPUB
    assert record.warnings == ()
    assert record.text == (
        "Title: A Small Book\nAuthor: Ann Author\n\n"
        "[chapter 1: The Beginning]\n# The Beginning\n\nIt was a dark\u00a0night \u2014 really.\n\n"
        "[chapter 2: The Middle]\n## The Middle\n\n- first\n- second\n\n"
        "[chapter 3: The End]\nNo heading here.\n\n  keep   this\n"
    )
    assert "Contents" not in document.text
    assert "margin" not in document.text


def test_member_paths_that_escape_the_archive_are_refused(tmp_path):
    manifest = [("good", "good.xhtml", XHTML), ("evil", "../evil.xhtml", XHTML), ("abs", "/etc/passwd", XHTML)]
    data = epub_bytes(
        {
            "content.opf": opf_xml("Book", "A", manifest, ["good", "evil", "abs"]),
            "good.xhtml": xhtml("Good", "<p>Safe text.</p>"),
            "../evil.xhtml": xhtml("Evil", "<p>EVIL TEXT</p>"),
        },
        opf_path="content.opf",
    )
    record = load_path(write_epub(tmp_path, data)).files[0]
    assert "Safe text." in record.text
    assert "EVIL TEXT" not in record.text
    assert record.warnings == (
        "spine item 2 refused: '../evil.xhtml' points outside the archive",
        "spine item 3 refused: '/etc/passwd' points outside the archive",
    )


def test_parent_references_that_stay_inside_the_archive_are_read(tmp_path):
    # OEBPS/../shared/common.xhtml is shared/common.xhtml: inside the archive, so legitimate.
    manifest = [("shared", "../shared/common.xhtml", XHTML)]
    data = epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("Book", "A", manifest, ["shared"]),
            "shared/common.xhtml": xhtml("Shared", "<p>Shared chapter.</p>"),
        }
    )
    assert "Shared chapter." in load_path(write_epub(tmp_path, data)).text


def test_package_path_outside_the_archive_is_refused(tmp_path):
    data = epub_bytes({"x.opf": "<package/>"}, opf_path="../x.opf")
    with pytest.raises(IngestError, match=r"^book\.epub: refused, its package file path '\.\./x\.opf' points outside"):
        load_path(write_epub(tmp_path, data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x03\x04 not really a zip", "damaged or not an EPUB"),
        (b"", "damaged or not an EPUB"),
    ],
)
def test_not_a_zip_archive(tmp_path, data, message):
    with pytest.raises(IngestError, match=message):
        load_path(write_epub(tmp_path, data))


def test_missing_container_and_broken_package_are_reported(tmp_path):
    import io
    import zipfile

    output = io.BytesIO()
    with zipfile.ZipFile(output, "w") as archive:
        archive.writestr("mimetype", "application/epub+zip")
    with pytest.raises(IngestError, match="META-INF/container.xml is missing"):
        load_path(write_epub(tmp_path, output.getvalue()))

    broken = epub_bytes({"OEBPS/content.opf": "<package><manifest>"})
    with pytest.raises(IngestError, match="content.opf is not well-formed XML"):
        load_path(write_epub(tmp_path, broken, name="broken.epub"))


def test_drm_protected_book_is_refused_but_obfuscated_fonts_are_fine(tmp_path):
    manifest = [("c1", "c1.xhtml", XHTML), ("font", "font.otf", "font/otf")]
    members = {
        "OEBPS/content.opf": opf_xml("Book", "A", manifest, ["c1"]),
        "OEBPS/c1.xhtml": xhtml("C", "<p>Readable.</p>"),
        "OEBPS/font.otf": b"\x00font",
    }

    def encryption_xml(uri: str, algorithm: str) -> str:
        return (
            '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
            'xmlns:enc="http://www.w3.org/2001/04/xmlenc#">'
            f'<enc:EncryptedData><enc:EncryptionMethod Algorithm="{algorithm}"/>'
            f'<enc:CipherData><enc:CipherReference URI="{uri}"/></enc:CipherData></enc:EncryptedData></encryption>'
        )

    fonts_only = epub_bytes(
        {**members, "META-INF/encryption.xml": encryption_xml("OEBPS/font.otf", "http://www.idpf.org/2008/embedding")}
    )
    assert "Readable." in load_path(write_epub(tmp_path, fonts_only)).text

    protected = epub_bytes(
        {
            **members,
            "META-INF/encryption.xml": encryption_xml("OEBPS/c1.xhtml", "http://www.w3.org/2001/04/xmlenc#aes128-cbc"),
        }
    )
    with pytest.raises(IngestError, match="DRM-protected"):
        load_path(write_epub(tmp_path, protected, name="protected.epub"))


def test_book_without_text_is_refused(tmp_path):
    data = epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("Pictures", "A", [("c1", "c1.xhtml", XHTML)], ["c1"]),
            "OEBPS/c1.xhtml": xhtml("Cover", '<div><img src="cover.jpg"/></div>'),
        }
    )
    with pytest.raises(IngestError, match="no readable text in the EPUB's 1 spine items"):
        load_path(write_epub(tmp_path, data))


def test_member_that_decompresses_past_the_limit_is_refused(tmp_path):
    # Zeros compress a thousandfold: a small archive that would unpack to far more than the limit.
    data = epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("Bomb", "A", [("c1", "c1.xhtml", XHTML)], ["c1"]),
            "OEBPS/c1.xhtml": xhtml("Big", "<p>" + "0" * 200_000 + "</p>"),
        }
    )
    assert len(data) < 10_000
    with pytest.raises(IngestError, match="decompresses to more than 50000 bytes"):
        load_path(write_epub(tmp_path, data), LoaderLimits(max_total_bytes=50_000))


def test_chapter_in_a_declared_legacy_encoding_is_decoded(tmp_path):
    chapter = '<?xml version="1.0" encoding="windows-1252"?><html><body><p>caf\u00e9 \u2014 ok</p></body></html>'
    data = epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("Old", "A", [("c1", "c1.xhtml", XHTML)], ["c1"]),
            "OEBPS/c1.xhtml": chapter.encode("cp1252"),
        }
    )
    assert "caf\u00e9 \u2014 ok" in load_path(write_epub(tmp_path, data)).text


def test_spine_items_without_text_get_no_chapter_number(tmp_path):
    manifest = [("cover", "cover.xhtml", XHTML), ("c1", "c1.xhtml", ""), ("img", "pic.png", "image/png")]
    data = epub_bytes(
        {
            "OEBPS/content.opf": opf_xml("Book", "A", manifest, ["cover", "img", "c1", "missing"]),
            "OEBPS/cover.xhtml": xhtml("Cover", '<img src="cover.jpg"/>'),
            "OEBPS/c1.xhtml": xhtml("", "<p>First words.</p>"),
        }
    )
    record = load_path(write_epub(tmp_path, data)).files[0]
    assert record.text == "Title: Book\nAuthor: A\n\n[chapter 1]\nFirst words.\n"
    assert record.warnings == ("spine item 4 ('missing') is not in the manifest",)
