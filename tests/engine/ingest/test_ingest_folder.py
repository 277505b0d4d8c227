"""Reading folders: git's view or .gitignore files, skip rules, limits, links, order and rendering."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from ingest_documents import epub_bytes, git, opf_xml, pdf_bytes, write_files, xhtml

from kimi_desk.engine.ingest import IngestError, LoaderLimits, SkipCategory, SourceKind, load_path
from kimi_desk.engine.ingest.listing import reading_order_key

requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def paths_read(document) -> list[str]:
    return [file.relative_path for file in document.files]


def skip_categories(document) -> dict[str, SkipCategory]:
    return {entry.relative_path: entry.category for entry in document.skipped}


@requires_git
def test_git_work_tree_uses_tracked_and_untracked_files_that_are_not_ignored(tmp_path):
    write_files(
        tmp_path,
        {
            "README.md": "# Project\n",
            "setup.cfg": "[metadata]\n",
            "src/main.py": "print('hi')\n",
            ".gitignore": "*.log\nbuild/\n",
            "tracked.log": "tracked although ignored\n",
        },
    )
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "add", "-f", "README.md", "setup.cfg", "src/main.py", ".gitignore", "tracked.log")
    git(tmp_path, "commit", "--quiet", "-m", "initial")
    write_files(tmp_path, {"notes.txt": "untracked, kept\n", "debug.log": "ignored\n", "build/out.txt": "ignored\n"})

    document = load_path(tmp_path)

    assert document.listing_source == "git"
    assert paths_read(document) == ["README.md", ".gitignore", "notes.txt", "setup.cfg", "tracked.log", "src/main.py"]
    assert all(not path.startswith(".git/") for path in paths_read(document))


@requires_git
def test_git_lists_a_subfolder_relative_to_itself(tmp_path):
    write_files(tmp_path, {"top.txt": "top\n", "pkg/inner.py": "x = 1\n", "pkg/sub/deep.py": "y = 2\n"})
    git(tmp_path, "init", "--quiet")
    document = load_path(tmp_path / "pkg")
    assert document.listing_source == "git"
    assert paths_read(document) == ["inner.py", "sub/deep.py"]


@requires_git
def test_git_tracked_file_deleted_from_the_work_tree_is_reported(tmp_path):
    write_files(tmp_path, {"kept.py": "a = 1\n", "gone.py": "b = 2\n"})
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "--quiet", "-m", "initial")
    (tmp_path / "gone.py").unlink()

    document = load_path(tmp_path)

    assert paths_read(document) == ["kept.py"]
    assert skip_categories(document) == {"gone.py": SkipCategory.UNREADABLE}


@requires_git
def test_nested_repository_inside_a_work_tree_is_not_read(tmp_path):
    write_files(tmp_path, {"main.py": "a = 1\n", "inner/lib.py": "b = 2\n"})
    git(tmp_path / "inner", "init", "--quiet")
    git(tmp_path, "init", "--quiet")

    document = load_path(tmp_path)

    assert paths_read(document) == ["main.py"]
    assert [entry.relative_path for entry in document.skipped] == ["inner/"]


def test_outside_git_nested_gitignore_files_are_honoured(tmp_path):
    write_files(
        tmp_path,
        {
            ".gitignore": "*.tmp\nsecret/\n",
            "a.py": "a = 1\n",
            "scratch.tmp": "x\n",
            "secret/key.txt": "k\n",
            "lib/.gitignore": "!keep.tmp\ngenerated.py\n",
            "lib/keep.tmp": "kept by the nested negation\n",
            "lib/other.tmp": "dropped\n",
            "lib/generated.py": "dropped\n",
            "lib/real.py": "b = 2\n",
        },
    )
    document = load_path(tmp_path)
    assert document.listing_source == "gitignore"
    assert paths_read(document) == [".gitignore", "a.py", "lib/.gitignore", "lib/keep.tmp", "lib/real.py"]


def test_binaries_lock_files_and_generated_files_are_skipped_with_reasons(tmp_path):
    write_files(
        tmp_path,
        {
            "main.py": "print('kept')\n",
            "logo.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
            "blob": b"header\x00\x01\x02 binary with NUL bytes",
            "noise.dat": bytes([0x81, 0x8D, 0x01, 0x02, 0x90]) * 20,
            "package-lock.json": "{}\n",
            "Cargo.lock": "# lock\n",
            "yarn.lock": "# lock\n",
            "poetry.lock": "# lock\n",
            "uv.lock": "# lock\n",
            "web/pnpm-lock.yaml": "lockfileVersion: 9\n",
            "composer.lock": "{}\n",
            "Gemfile.lock": "GEM\n",
            "web/app.min.js": "var a=1;\n",
            "web/app.js.map": "{}\n",
            "web/bundle.js": "var x=1;" * 3000 + "\n",
        },
    )
    document = load_path(tmp_path)
    assert paths_read(document) == ["main.py"]
    assert skip_categories(document) == {
        "blob": SkipCategory.BINARY,
        "logo.png": SkipCategory.BINARY,
        "noise.dat": SkipCategory.BINARY,
        "Cargo.lock": SkipCategory.LOCK_FILE,
        "composer.lock": SkipCategory.LOCK_FILE,
        "Gemfile.lock": SkipCategory.LOCK_FILE,
        "package-lock.json": SkipCategory.LOCK_FILE,
        "poetry.lock": SkipCategory.LOCK_FILE,
        "uv.lock": SkipCategory.LOCK_FILE,
        "yarn.lock": SkipCategory.LOCK_FILE,
        "web/pnpm-lock.yaml": SkipCategory.LOCK_FILE,
        "web/app.js.map": SkipCategory.GENERATED,
        "web/app.min.js": SkipCategory.GENERATED,
        "web/bundle.js": SkipCategory.GENERATED,
    }
    reasons = {entry.relative_path: entry.reason for entry in document.skipped}
    assert "NUL" in reasons["blob"]
    assert "10000 characters" in reasons["web/bundle.js"]


def test_legacy_8_bit_text_is_read_with_a_warning(tmp_path):
    write_files(tmp_path, {"old.txt": "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9\n".encode("cp1252")})
    document = load_path(tmp_path)
    assert document.files[0].text == "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9\n"
    assert document.files[0].warnings == ("read as cp1252 (not valid UTF-8)",)


def test_dependency_and_cache_folders_are_skipped_once_each(tmp_path):
    write_files(
        tmp_path,
        {
            "index.js": "module.exports = 1;\n",
            "node_modules/left-pad/index.js": "x\n",
            "node_modules/other/index.js": "y\n",
            "pkg/__pycache__/m.cpython-311.pyc": b"\x00\x01",
            "env/pyvenv.cfg": "home = /usr/bin\n",
            "env/lib/site.py": "z\n",
        },
    )
    document = load_path(tmp_path)
    assert paths_read(document) == ["index.js"]
    assert skip_categories(document) == {
        "env/": SkipCategory.IGNORED_FOLDER,
        "node_modules/": SkipCategory.IGNORED_FOLDER,
        "pkg/__pycache__/": SkipCategory.IGNORED_FOLDER,
    }


@requires_git
def test_dependency_folders_are_skipped_even_when_git_tracks_them(tmp_path):
    write_files(tmp_path, {"index.js": "1\n", "node_modules/a/index.js": "2\n", "node_modules/b/index.js": "3\n"})
    git(tmp_path, "init", "--quiet")
    document = load_path(tmp_path)
    assert paths_read(document) == ["index.js"]
    assert [entry.relative_path for entry in document.skipped] == ["node_modules/"]


def test_file_over_the_size_limit_is_skipped(tmp_path):
    write_files(tmp_path, {"small.txt": "ok\n", "big.txt": "x" * 2000 + "\n"})
    document = load_path(tmp_path, LoaderLimits(max_file_bytes=1000))
    assert paths_read(document) == ["small.txt"]
    big = document.skipped[0]
    assert (big.relative_path, big.category) == ("big.txt", SkipCategory.TOO_LARGE)
    assert "limit is 1000 B" in big.reason


def test_file_count_limit_keeps_the_first_files_in_reading_order(tmp_path):
    write_files(tmp_path, {name: f"{name}\n" for name in ["a.txt", "b.txt", "c.txt", "d.txt"]})
    document = load_path(tmp_path, LoaderLimits(max_files=2))
    assert paths_read(document) == ["a.txt", "b.txt"]
    assert skip_categories(document) == {"c.txt": SkipCategory.LIMIT_REACHED, "d.txt": SkipCategory.LIMIT_REACHED}


def test_total_limit_stops_reading_at_the_first_file_that_does_not_fit(tmp_path):
    # c.txt would not fit, and d.txt, small enough, is not read either: the text stays a prefix.
    write_files(tmp_path, {"a.txt": "a" * 40, "b.txt": "b" * 40, "c.txt": "c" * 40, "d.txt": "d"})
    document = load_path(tmp_path, LoaderLimits(max_total_bytes=100))
    assert paths_read(document) == ["a.txt", "b.txt"]
    assert skip_categories(document) == {"c.txt": SkipCategory.LIMIT_REACHED, "d.txt": SkipCategory.LIMIT_REACHED}


def test_symbolic_links_loops_and_links_outside_are_skipped_without_hanging(tmp_path):
    outside = tmp_path / "outside"
    folder = tmp_path / "project"
    write_files(outside, {"secret.txt": "not part of the project\n"})
    write_files(folder, {"real.txt": "real\n", "sub/inner.txt": "inner\n"})
    os.symlink("real.txt", folder / "alias.txt")
    os.symlink("loop_b", folder / "loop_a")
    os.symlink("loop_a", folder / "loop_b")
    os.symlink(".", folder / "sub" / "self")
    os.symlink("..", folder / "sub" / "parent")
    os.symlink(outside / "secret.txt", folder / "leak.txt")
    os.symlink(outside, folder / "leak_dir")
    os.symlink("missing.txt", folder / "broken.txt")

    document = load_path(folder)

    assert paths_read(document) == ["alias.txt", "real.txt", "sub/inner.txt"]
    assert document.files[0].text == "real\n"
    assert skip_categories(document) == {
        "broken.txt": SkipCategory.SYMLINK,
        "leak.txt": SkipCategory.SYMLINK,
        "leak_dir": SkipCategory.SYMLINK,
        "loop_a": SkipCategory.SYMLINK,
        "loop_b": SkipCategory.SYMLINK,
        "sub/parent": SkipCategory.SYMLINK,
        "sub/self": SkipCategory.SYMLINK,
    }
    reasons = {entry.relative_path: entry.reason for entry in document.skipped}
    assert reasons["loop_a"] == "symbolic link loop"
    assert reasons["leak.txt"] == "symbolic link to outside the folder"
    assert "not followed" in reasons["sub/self"]
    assert "not part of the project" not in document.text


@requires_git
def test_symbolic_links_in_a_git_work_tree_follow_the_same_rules(tmp_path):
    outside = tmp_path / "outside"
    folder = tmp_path / "project"
    write_files(outside, {"secret.txt": "not part of the project\n"})
    write_files(folder, {"real.txt": "real\n"})
    os.symlink("real.txt", folder / "alias.txt")
    os.symlink(outside / "secret.txt", folder / "leak.txt")
    os.symlink(".", folder / "self")
    git(folder, "init", "--quiet")

    document = load_path(folder)

    assert paths_read(document) == ["alias.txt", "real.txt"]
    assert skip_categories(document) == {"leak.txt": SkipCategory.SYMLINK, "self": SkipCategory.SYMLINK}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_named_pipe_is_skipped_not_opened(tmp_path):
    # Opening a FIFO for reading would wait for a writer forever.
    write_files(tmp_path, {"a.txt": "a\n"})
    os.mkfifo(tmp_path / "pipe")
    document = load_path(tmp_path)
    assert paths_read(document) == ["a.txt"]
    assert skip_categories(document) == {"pipe": SkipCategory.NOT_A_REGULAR_FILE}


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(IngestError, match="nothing to read"):
        load_path(tmp_path)


def test_folder_of_binaries_only_is_an_error_listing_why(tmp_path):
    write_files(tmp_path, {"a.bin": b"\x00" * 10, "b": b"\x00\x01", "c.png": b"\x89PNG"})
    with pytest.raises(IngestError, match=r"nothing readable \(3 skipped: 3 binary\)") as raised:
        load_path(tmp_path)
    assert len(raised.value.skipped) == 3
    assert "\n" not in str(raised.value)


def test_books_in_a_folder_are_extracted_and_broken_ones_skipped(tmp_path):
    write_files(
        tmp_path,
        {
            "paper.pdf": pdf_bytes(["Results of the experiment"]),
            "broken.pdf": b"%PDF-1.7\nthis is not really a pdf",
            "novel.epub": epub_bytes(
                {
                    "OEBPS/content.opf": opf_xml(
                        "Novel", "Ann Author", [("c1", "c1.xhtml", "application/xhtml+xml")], ["c1"]
                    ),
                    "OEBPS/c1.xhtml": xhtml("One", "<h1>Chapter One</h1><p>It began.</p>"),
                }
            ),
            "page.html": "<html><body><p>kept as markup</p></body></html>\n",
        },
    )
    document = load_path(tmp_path)
    kinds = {file.relative_path: file.kind for file in document.files}
    assert kinds == {"novel.epub": SourceKind.EPUB, "page.html": SourceKind.TEXT, "paper.pdf": SourceKind.PDF}
    assert "[page 1]\nResults of the experiment" in document.text
    assert "[chapter 1: Chapter One]" in document.text
    assert "<p>kept as markup</p>" in document.text
    assert skip_categories(document) == {"broken.pdf": SkipCategory.EXTRACTION_FAILED}
    assert document.skipped[0].reason.startswith("damaged or not a PDF")


def test_reading_order_puts_readme_and_files_before_subfolders():
    paths = ["src/z.py", "b.py", "docs/x.md", "README.md", "A.txt", "src/README", "src/a/deep.py", "a.py", "Z/y.py"]
    assert sorted(paths, key=reading_order_key) == [
        "README.md",
        "a.py",
        "A.txt",
        "b.py",
        "docs/x.md",
        "src/README",
        "src/z.py",
        "src/a/deep.py",
        "Z/y.py",
    ]


@requires_git
def test_git_and_walk_listings_give_the_same_order(tmp_path):
    write_files(
        tmp_path,
        {
            "b.py": "b\n",
            "README.md": "r\n",
            "a.txt": "t\n",
            "src/a.py": "a\n",
            "src/README.txt": "r\n",
            "Docs/intro.md": "i\n",
        },
    )
    walked = paths_read(load_path(tmp_path))
    git(tmp_path, "init", "--quiet")
    listed_by_git = load_path(tmp_path)
    assert listed_by_git.listing_source == "git"
    assert paths_read(listed_by_git) == walked


def test_rendered_text_is_tree_then_one_block_per_file(tmp_path):
    write_files(tmp_path, {"README.md": "# Title\n", "src/main.py": "print(1)", "src/util/helpers.py": "x = 2\n"})
    document = load_path(tmp_path)
    name = tmp_path.name
    assert document.preamble == (
        f"==> {name}/ (folder tree, 3 files) <==\n"
        f"{name}/\n"
        "├── README.md\n"
        "└── src/\n"
        "    ├── main.py\n"
        "    └── util/\n"
        "        └── helpers.py\n"
        "\n"
    )
    assert document.text == document.preamble + (
        "==> README.md <==\n# Title\n\n==> src/main.py <==\nprint(1)\n\n==> src/util/helpers.py <==\nx = 2\n\n"
    )
    segments = document.segments()
    assert "".join(segments) == document.text
    assert segments[2] == "==> src/main.py <==\nprint(1)\n\n"
    assert [document.text[offset:].split("\n", 1)[0] for offset in document.file_offsets] == [
        "==> README.md <==",
        "==> src/main.py <==",
        "==> src/util/helpers.py <==",
    ]


def test_source_file_records_describe_the_bytes_on_disk(tmp_path):
    content = b"line one\r\nline two\r\n"
    write_files(tmp_path, {"crlf.txt": content})
    record = load_path(tmp_path).files[0]
    assert record.relative_path == "crlf.txt"
    assert record.absolute_path == tmp_path.resolve() / "crlf.txt"
    assert record.size == len(content)
    assert record.sha256 == hashlib.sha256(content).hexdigest()
    assert record.kind is SourceKind.TEXT
    assert record.text == "line one\nline two\n"


def test_file_names_that_could_forge_a_header_are_escaped(tmp_path):
    write_files(tmp_path, {"evil\n==> fake <==": "x\n"})
    document = load_path(tmp_path)
    assert "==> evil\\u000a==> fake <== <==\n" in document.text
    assert document.files[0].relative_path == "evil\n==> fake <=="


def test_progress_is_reported_for_every_listed_file(tmp_path):
    write_files(tmp_path, {"a.txt": "a\n", "b.bin": b"\x00", "c.txt": "c\n"})
    reports = []
    load_path(tmp_path, on_progress=reports.append)
    assert [(report.done, report.total, report.unit, report.path) for report in reports] == [
        (1, 3, "file", "a.txt"),
        (2, 3, "file", "b.bin"),
        (3, 3, "file", "c.txt"),
    ]


@requires_git
def test_a_folder_git_ignores_is_read_with_its_own_gitignore_files(tmp_path):
    # Opening build/ on purpose: git would list nothing there, so the walk decides.
    write_files(
        tmp_path,
        {
            ".gitignore": "build/\n",
            "src.py": "a\n",
            "build/report.txt": "r\n",
            "build/.gitignore": "*.o\n",
            "build/x.o": "o",
        },
    )
    git(tmp_path, "init", "--quiet")
    document = load_path(tmp_path / "build")
    assert document.listing_source == "gitignore"
    assert paths_read(document) == [".gitignore", "report.txt"]


@requires_git
def test_git_listing_keeps_unusual_file_names_intact(tmp_path):
    names = ["dir with space/ünïcödé.txt", "quote\"d.txt", "tab\there.txt", "new\nline.txt"]
    write_files(tmp_path, {name: f"{name}\n" for name in names})
    git(tmp_path, "init", "--quiet")
    document = load_path(tmp_path)
    assert document.listing_source == "git"
    assert sorted(paths_read(document)) == sorted(names)
    assert all(file.text == f"{file.relative_path}\n" for file in document.files)
