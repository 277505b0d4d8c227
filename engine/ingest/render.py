"""The document text the model reads: a folder's tree first, then each file after a header line.

    ==> repo/ (folder tree, 3 files) <==
    repo/
    ├── README.md
    └── src/
        └── main.py

    ==> README.md <==
    ...the file's text...

The "==> path <==" header is the one head(1) and tail(1) print between files: short, cheap in
tokens and unlikely to appear inside a file. A file's block depends only on its path and its text,
so an unchanged file renders to the same block wherever it sits (what resume relies on).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

# Bump when the rendering changes: saved sessions then know their text would now read differently.
RENDER_FORMAT_VERSION = 1


def render_file_block(relative_path: str, text: str) -> str:
    """One file's block: header line, the text ending with a newline, one blank line."""
    body = text if not text or text.endswith("\n") else text + "\n"
    return f"==> {display_path(relative_path)} <==\n{body}\n"


def render_folder_preamble(folder_name: str, relative_paths: list[str]) -> str:
    """The header and tree of the files read, in reading order, before the first file's block."""
    count = len(relative_paths)
    noun = "file" if count == 1 else "files"
    name = display_path(folder_name)
    return f"==> {name}/ (folder tree, {count} {noun}) <==\n{render_tree(name, relative_paths)}\n"


def render_tree(root_name: str, relative_paths: list[str]) -> str:
    """A tree(1)-style drawing of the paths, keeping their order (folders appear where first met)."""
    root: dict[str, dict] = {}
    for path in relative_paths:
        node = root
        for part in path.split("/"):
            node = node.setdefault(part, {})
    lines = [f"{root_name}/"]
    # Depth first with an explicit stack of (indent, the folder's remaining entries): a folder nested
    # deeper than Python's recursion limit draws like any other.
    pending = [("", _entries(root))]
    while pending:
        indent, entries = pending[-1]
        entry = next(entries, None)
        if entry is None:
            pending.pop()
            continue
        name, children, is_last = entry
        label = display_path(name) + ("/" if children else "")
        lines.append(f"{indent}{'└── ' if is_last else '├── '}{label}")
        if children:
            pending.append((indent + ("    " if is_last else "│   "), _entries(children)))
    return "\n".join(lines) + "\n"


def display_path(path: str) -> str:
    """A path safe to put on one line of the document: undecodable bytes and control characters
    (a newline in a file name could forge a header) are shown escaped."""
    text = path.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    return "".join(_escape_control(char) for char in text)


def _entries(node: dict[str, dict]) -> Iterator[tuple[str, dict[str, dict], bool]]:
    """A folder's entries in order, each with its children and whether it is the folder's last."""
    last = len(node) - 1
    for position, (name, children) in enumerate(node.items()):
        yield name, children, position == last


def _escape_control(char: str) -> str:
    if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
        return f"\\u{ord(char):04x}"
    return char
