"""The .gitignore matcher against git itself: the same tree, walked by us and listed by git."""

from __future__ import annotations

import shutil

import pytest
from ingest_documents import git, write_files

from kimi_desk.engine.ingest.gitignore import is_ignored, parse_gitignore, parse_gitignore_line
from kimi_desk.engine.ingest.listing import list_with_gitignore

requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

ROOT_GITIGNORE = "\n".join(
    [
        "# a comment, then a blank line",
        "",
        "*.log",
        "!keep.log",
        "/build/",
        "docs/*.tmp",
        "**/cache/",
        "deep/**/target.txt",
        "everything/**",
        "[ab].txt",
        "[!x]y.md",
        "file[0-9].c",
        "name?.h",
        r"\#hash",
        r"\!bang",
        "trailing-space   ",
        r"escaped-space\ ",
        "onlydir/",
        "**/vendor/",
        "ab**cd",
        "unclosed[bracket",
        "ends-with-backslash\\",
        "/anchored.txt",
        "mid/slash.txt",
        "crlf.txt\r",
        "[[:digit:]]digits.txt",
        "*.swp",
        "!important/",
    ]
)

NESTED_GITIGNORES = {
    # A deeper .gitignore overrides a shallower one: logs here are kept again.
    "sub/.gitignore": "!*.log\nlocal-only.txt\n/anchored-here.txt\n",
    # Re-including a folder that a parent .gitignore excluded with **/vendor/.
    "a/.gitignore": "!vendor\n",
    # Negating a file inside an excluded folder has no effect: git never looks inside it.
    "build-like/.gitignore": "out/\n!out/wanted.txt\n",
}

FILES = [
    "README.md",
    "app.log",
    "keep.log",
    "sub/app.log",
    "sub/deeper/x.log",
    "build/a.txt",
    "src/build/b.txt",
    "docs/x.tmp",
    "docs/nested/y.tmp",
    "z/cache/c.txt",
    "cache/d.txt",
    "deep/target.txt",
    "deep/1/2/target.txt",
    "deep/1/other.txt",
    "everything/a/b.txt",
    "a.txt",
    "b.txt",
    "c.txt",
    "ay.md",
    "xy.md",
    "file1.c",
    "filex.c",
    "name1.h",
    "name12.h",
    "#hash",
    "!bang",
    "trailing-space",
    "escaped-space ",
    "escaped-space",
    "onlydir/f.txt",
    "sub/onlydir",
    "vendor/v.txt",
    "a/vendor/keep.txt",
    "b/vendor/drop.txt",
    "abXcd",
    "ab/cd",
    "unclosed[bracket",
    "ends-with-backslash",
    "anchored.txt",
    "sub/anchored.txt",
    "mid/slash.txt",
    "x/mid/slash.txt",
    "crlf.txt",
    "7digits.txt",
    "xdigits.txt",
    "sub/local-only.txt",
    "local-only.txt",
    "sub/anchored-here.txt",
    "sub/deeper/anchored-here.txt",
    "build-like/out/wanted.txt",
    "build-like/other.txt",
    "important/notes.swp",
    "important/a.log",
]


@requires_git
def test_walk_keeps_exactly_what_git_keeps(tmp_path):
    write_files(tmp_path, {path: f"content of {path}\n" for path in FILES})
    write_files(tmp_path, {".gitignore": ROOT_GITIGNORE, **NESTED_GITIGNORES})

    ours, skipped = list_with_gitignore(tmp_path)

    git(tmp_path, "init", "--quiet")
    gits = git(tmp_path, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
    assert sorted(ours) == sorted(path for path in gits if path)
    assert skipped == []


@requires_git
def test_folder_rules_match_git_for_file_and_folder_names(tmp_path):
    # "logs" as a file at one level and a folder at another; "tmp/" only matches the folder.
    write_files(
        tmp_path,
        {
            ".gitignore": "logs\ntmp/\n",
            "a/logs": "a file called logs\n",
            "b/logs/x.txt": "inside a folder called logs\n",
            "c/tmp": "a file called tmp\n",
            "d/tmp/y.txt": "inside a folder called tmp\n",
        },
    )
    ours, _ = list_with_gitignore(tmp_path)
    git(tmp_path, "init", "--quiet")
    gits = git(tmp_path, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
    assert sorted(ours) == sorted(path for path in gits if path) == [".gitignore", "c/tmp"]


def test_invalid_patterns_match_nothing():
    assert parse_gitignore_line("oops\\", "") is None
    assert parse_gitignore_line("bad[range", "") is None
    assert parse_gitignore_line("   ", "") is None
    assert parse_gitignore_line("# comment", "") is None


def test_double_star_between_slashes_spans_folders_elsewhere_it_is_one_star():
    patterns = parse_gitignore("a/**/b\nx**y\n", "")
    assert is_ignored(patterns, "a/b", is_directory=False)
    assert is_ignored(patterns, "a/1/2/b", is_directory=False)
    assert is_ignored(patterns, "xzzy", is_directory=False)
    assert not is_ignored(patterns, "x/y", is_directory=False)


def test_patterns_of_a_nested_gitignore_apply_below_its_folder_only():
    patterns = parse_gitignore("/top.txt\nany.txt\n", "sub")
    assert is_ignored(patterns, "sub/top.txt", is_directory=False)
    assert not is_ignored(patterns, "sub/deeper/top.txt", is_directory=False)
    assert is_ignored(patterns, "sub/deeper/any.txt", is_directory=False)


def test_brackets_never_match_a_slash():
    patterns = parse_gitignore("a[/]b\na[!x]b\n", "")
    assert not is_ignored(patterns, "a/b", is_directory=False)
    assert is_ignored(patterns, "acb", is_directory=False)
