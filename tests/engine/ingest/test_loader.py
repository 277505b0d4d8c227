"""What the loader's limits leave out is counted per limit, so that the user can be told: files past
the file-count limit, past the total-text limit, and files too large, each in one LimitNotice."""

from __future__ import annotations

from ingest_documents import pdf_bytes, write_files

from kimi_desk.engine.ingest import LimitNotice, LoaderLimits, SkipCategory, load_path


def test_files_past_the_file_count_limit_are_counted_in_one_notice(tmp_path):
    write_files(tmp_path, {f"file_{i:02d}.txt": f"{i}\n" for i in range(12)})
    document = load_path(tmp_path, LoaderLimits(max_files=5))
    assert len(document.files) == 5
    assert document.limit_notices == (
        LimitNotice("max_files", 5, 7, "7 files not read: the limit of 5 files was reached"),
    )
    assert {entry.limit for entry in document.skipped} == {"max_files"}


def test_total_limit_and_too_large_files_each_get_a_notice(tmp_path):
    write_files(
        tmp_path,
        {
            "a.txt": "a" * 400,
            "b.txt": "b" * 3000,
            "c.txt": "c" * 400,
            "d.txt": "d" * 400,
            "e.txt": "e",
            "book.pdf": pdf_bytes(["a page"]),
            "tiny.bin": b"\x00",
        },
    )
    limits = LoaderLimits(max_file_bytes=2048, max_total_bytes=1000, max_book_bytes=100)
    document = load_path(tmp_path, limits)
    assert [file.relative_path for file in document.files] == ["a.txt", "c.txt"]
    assert document.limit_notices == (
        LimitNotice("max_total_bytes", 1000, 2, "2 files not read: the total text limit of 1000 B was reached"),
        LimitNotice("max_file_bytes", 2048, 1, "1 file not read: larger than the limit of 2.0 KiB per file"),
        LimitNotice("max_book_bytes", 100, 1, "1 file not read: larger than the limit of 100 B per PDF or EPUB"),
    )
    # Skips that are no limit's doing (a binary file) are not counted.
    binary = next(entry for entry in document.skipped if entry.relative_path == "tiny.bin")
    assert (binary.category, binary.limit) == (SkipCategory.BINARY, None)


def test_nothing_left_out_no_notice(tmp_path):
    write_files(tmp_path, {"a.txt": "a\n", "b.bin": b"\x00"})
    assert load_path(tmp_path).limit_notices == ()
    assert load_path(tmp_path / "a.txt").limit_notices == ()


def test_counts_are_written_with_thousands_separators(tmp_path):
    write_files(tmp_path, {f"f{i:04d}.txt": "x" for i in range(1_205)})
    document = load_path(tmp_path, LoaderLimits(max_files=1))
    assert [notice.message for notice in document.limit_notices] == [
        "1,204 files not read: the limit of 1 file was reached"
    ]
