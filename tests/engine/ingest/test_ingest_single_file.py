"""Opening one file by name: text, Markdown, HTML, and every way it can fail."""

from __future__ import annotations

import os

import pytest
from ingest_documents import write_files

from kimi_desk.engine.ingest import IngestError, LoaderLimits, SourceKind, load_path


def test_markdown_file_is_read_as_it_is(tmp_path):
    write_files(tmp_path, {"notes.md": "# Notes\n\n- one\n"})
    document = load_path(tmp_path / "notes.md")
    assert (document.is_folder, document.listing_source, document.preamble) == (False, "file", "")
    assert document.files[0].kind is SourceKind.MARKDOWN
    assert document.text == "==> notes.md <==\n# Notes\n\n- one\n\n"
    assert document.segments() == ["", document.text]


def test_html_file_opened_by_itself_becomes_readable_text(tmp_path):
    html = "<html><head><title>T</title></head><body><h2>Hello</h2><p>World</p></body></html>"
    write_files(tmp_path, {"page.html": html})
    document = load_path(tmp_path / "page.html")
    assert document.files[0].kind is SourceKind.HTML
    assert document.text == "==> page.html <==\n## Hello\n\nWorld\n\n"


def test_names_that_folders_skip_are_read_when_opened_by_name(tmp_path):
    write_files(tmp_path, {"Cargo.lock": "# a lock file\n", "app.min.js": "var a=1;" * 5000})
    assert "a lock file" in load_path(tmp_path / "Cargo.lock").text
    assert load_path(tmp_path / "app.min.js").files[0].size == 40_000


def test_text_file_larger_than_the_per_file_limit_is_read_when_opened_by_name(tmp_path):
    # A novel in .txt is the whole document: only the total limit applies.
    write_files(tmp_path, {"novel.txt": "word " * 1000})
    limits = LoaderLimits(max_file_bytes=100, max_total_bytes=10_000)
    assert load_path(tmp_path / "novel.txt", limits).files[0].size == 5000
    with pytest.raises(IngestError, match=r"^novel\.txt: too large \(4\.9 KiB, the limit is 1000 B\)$"):
        load_path(tmp_path / "novel.txt", LoaderLimits(max_total_bytes=1000))


def test_missing_path(tmp_path):
    with pytest.raises(IngestError, match="no such file or folder"):
        load_path(tmp_path / "nowhere")


def test_symbolic_link_loop_opened_by_name(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(IngestError, match="symbolic link loop"):
        load_path(tmp_path / "a")


def test_binary_empty_and_non_regular_files_opened_by_name(tmp_path):
    write_files(tmp_path, {"image.jpg": b"\xff\xd8\xff\x00\x10JFIF", "empty.txt": ""})
    with pytest.raises(IngestError, match=r"^image\.jpg: binary file \(contains NUL bytes\)$"):
        load_path(tmp_path / "image.jpg")
    with pytest.raises(IngestError, match=r"^empty\.txt: the file has no text$"):
        load_path(tmp_path / "empty.txt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(IngestError, match=r"^pipe: a named pipe \(FIFO\), not read$"):
            load_path(tmp_path / "pipe")
