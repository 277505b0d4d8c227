"""The document's folder tree: drawn without recursion, so no depth of folders can break it."""

from __future__ import annotations

import os

import pytest

from kimi_desk.engine.ingest import load_path
from kimi_desk.engine.ingest.render import render_tree

# Deeper than Python's default recursion limit (1,000), shallow enough for PATH_MAX (4,096) with
# one-character folder names.
DEPTH = 1_200


@pytest.fixture
def deep_folder(tmp_path):
    """tmp_path/deep/d/d/.../d/leaf.txt, DEPTH folders below deep/; removed folder by folder afterwards,
    since shutil.rmtree recurses (Python 3.11) and would fail on it."""
    root = tmp_path / "deep"
    root.mkdir()
    folders = [root]
    for _ in range(DEPTH):
        folders.append(folders[-1] / "d")
        folders[-1].mkdir()
    (folders[-1] / "leaf.txt").write_text("at the bottom\n")
    yield root
    (folders[-1] / "leaf.txt").unlink()
    for folder in reversed(folders):
        os.rmdir(folder)


def test_a_folder_1200_levels_deep_is_read_and_drawn(deep_folder):
    document = load_path(deep_folder)

    leaf = "d/" * DEPTH + "leaf.txt"
    assert [file.relative_path for file in document.files] == [leaf]
    lines = document.preamble.split("\n")
    assert lines[:3] == ["==> deep/ (folder tree, 1 file) <==", "deep/", "└── d/"]
    assert lines[DEPTH + 1] == " " * 4 * (DEPTH - 1) + "└── d/"
    assert lines[DEPTH + 2] == " " * 4 * DEPTH + "└── leaf.txt"
    assert document.text.endswith(f"==> {leaf} <==\nat the bottom\n\n")


def test_tree_keeps_order_and_draws_branches_and_continuations():
    paths = ["README.md", "src/b.py", "src/a/x.py", "src/a/y.py", "docs/guide.md", "z.txt"]
    assert render_tree("repo", paths) == (
        "repo/\n"
        "├── README.md\n"
        "├── src/\n"
        "│   ├── b.py\n"
        "│   └── a/\n"
        "│       ├── x.py\n"
        "│       └── y.py\n"
        "├── docs/\n"
        "│   └── guide.md\n"
        "└── z.txt\n"
    )


def test_tree_of_deep_paths_does_not_recurse():
    deep = "/".join(["d"] * DEPTH) + "/leaf.txt"
    lines = render_tree("root", [deep, "top.txt"]).splitlines()
    assert len(lines) == DEPTH + 3
    assert lines[1] == "├── d/"
    assert lines[-2] == "│   " + " " * 4 * (DEPTH - 1) + "└── leaf.txt"
    assert lines[-1] == "└── top.txt"
