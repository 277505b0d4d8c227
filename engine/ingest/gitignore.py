"""A .gitignore matcher: for folders outside git work trees, and inside one for what git would list
as untracked (engine/ingest/listing.py computes git's listing without running git).

It follows gitignore(5) and git's wildmatch: `*`, `?` and brackets never match "/", `**` spans
folders only next to slashes, a pattern with a slash is anchored to its .gitignore's folder, a
trailing slash matches folders only, `!` re-includes, the last matching pattern wins and patterns of
deeper .gitignore files win over shallower ones. The tests compare it with `git ls-files` itself.

A file inside an ignored folder cannot be re-included; that rule lives in the folder walk, which
never enters an ignored folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# POSIX bracket classes that wildmatch accepts inside [...].
_BRACKET_CLASSES = {
    "alnum": "a-zA-Z0-9",
    "alpha": "a-zA-Z",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "\\x21-\\x7e",
    "lower": "a-z",
    "print": "\\x20-\\x7e",
    "punct": "!-/:-@\\[-`{-~",
    "space": " \\t\\n\\r\\f\\v",
    "upper": "A-Z",
    "xdigit": "0-9a-fA-F",
}


class _InvalidPattern(Exception):
    """A pattern git would never match with (unclosed bracket, trailing backslash)."""


@dataclass(frozen=True)
class IgnorePattern:
    """One pattern of one .gitignore, compiled; `base` is its folder relative to the root ("" = root)."""

    base: str
    regex: re.Pattern[str]
    negated: bool
    directory_only: bool

    def matches(self, relative_path: str, is_directory: bool) -> bool:
        """Whether the pattern matches `relative_path` (relative to the root, under `base`)."""
        if self.directory_only and not is_directory:
            return False
        path_under_base = relative_path[len(self.base) + 1 :] if self.base else relative_path
        return self.regex.fullmatch(path_under_base) is not None


def parse_gitignore(text: str, base: str) -> list[IgnorePattern]:
    """The patterns of one .gitignore file in order; comments, blanks and invalid lines dropped."""
    text = text.removeprefix("\ufeff")
    patterns = []
    for line in text.split("\n"):
        pattern = parse_gitignore_line(line, base)
        if pattern is not None:
            patterns.append(pattern)
    return patterns


def parse_gitignore_line(line: str, base: str) -> IgnorePattern | None:
    """One line of a .gitignore compiled, or None for a comment, a blank or a pattern git rejects."""
    line = _trim_trailing_spaces(line.removesuffix("\r"))
    if not line or line.startswith("#"):
        return None
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    directory_only = line.endswith("/")
    if directory_only:
        line = line[:-1]
    # A slash at the start or in the middle anchors the pattern to the .gitignore's folder;
    # without one the pattern may match a name at any depth below it.
    anchored = "/" in line
    line = line.removeprefix("/")
    if not line:
        return None
    try:
        body = _translate(line)
    except _InvalidPattern:
        return None
    regex = body if anchored else f"(?:.*/)?{body}"
    return IgnorePattern(base=base, regex=re.compile(regex, re.DOTALL), negated=negated, directory_only=directory_only)


def is_ignored(patterns: list[IgnorePattern], relative_path: str, is_directory: bool) -> bool:
    """Whether the last pattern matching `relative_path` excludes it (patterns ordered shallow to deep)."""
    for pattern in reversed(patterns):
        if pattern.matches(relative_path, is_directory):
            return not pattern.negated
    return False


def _trim_trailing_spaces(line: str) -> str:
    """Drop trailing spaces, except one escaped with a backslash (git's trim_trailing_spaces)."""
    stripped = line.rstrip(" ")
    if stripped != line and stripped.endswith("\\") and not _ends_with_escaping_backslash_pair(stripped):
        return stripped + " "
    return stripped


def _ends_with_escaping_backslash_pair(text: str) -> bool:
    """Whether the trailing backslashes of `text` come in pairs (so they escape each other, not a space)."""
    count = len(text) - len(text.rstrip("\\"))
    return count % 2 == 0


def _translate(pattern: str) -> str:
    """A wildmatch pattern (with WM_PATHNAME) as a Python regular expression body."""
    pieces = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            if index + 1 == len(pattern):
                raise _InvalidPattern(pattern)
            pieces.append(re.escape(pattern[index + 1]))
            index += 2
        elif char == "*":
            piece, index = _translate_stars(pattern, index)
            pieces.append(piece)
        elif char == "?":
            pieces.append("[^/]")
            index += 1
        elif char == "[":
            piece, index = _translate_bracket(pattern, index)
            pieces.append(piece)
        else:
            pieces.append(re.escape(char))
            index += 1
    return "".join(pieces)


def _translate_stars(pattern: str, index: int) -> tuple[str, int]:
    """A run of `*` starting at `index`: `**` between slashes spans folders, anything else is `*`."""
    end = index
    while end < len(pattern) and pattern[end] == "*":
        end += 1
    at_component_start = index == 0 or pattern[index - 1] == "/"
    at_component_end = end == len(pattern) or pattern[end] == "/"
    if end - index >= 2 and at_component_start and at_component_end:
        if end == len(pattern):
            return ".*", end
        # "**/" matches zero or more whole folders; the slash is consumed with it.
        return "(?:.*/)?", end + 1
    return "[^/]*", end


def _translate_bracket(pattern: str, index: int) -> tuple[str, int]:
    """A bracket expression starting at `index` ("["), as a regex class that never matches "/"."""
    position = index + 1
    negated = position < len(pattern) and pattern[position] in "!^"
    if negated:
        position += 1
    members = []
    first = True
    while True:
        if position >= len(pattern):
            raise _InvalidPattern(pattern)
        char = pattern[position]
        if char == "]" and not first:
            break
        first = False
        if char == "[" and pattern.startswith("[:", position):
            close = pattern.find(":]", position + 2)
            if close != -1:
                name = pattern[position + 2 : close]
                if name not in _BRACKET_CLASSES:
                    raise _InvalidPattern(pattern)
                members.append(_BRACKET_CLASSES[name])
                position = close + 2
                continue
        if char == "\\":
            position += 1
            if position >= len(pattern):
                raise _InvalidPattern(pattern)
            char = pattern[position]
        if position + 2 < len(pattern) and pattern[position + 1] == "-" and pattern[position + 2] != "]":
            range_end, position = _bracket_range_end(pattern, position + 2)
            # wildmatch compares start <= c <= end, so a reversed range matches nothing.
            if char <= range_end:
                members.append(f"{_escape_in_class(char)}-{_escape_in_class(range_end)}")
            continue
        members.append(_escape_in_class(char))
        position += 1
    body = "".join(members)
    if not body:
        return ("[^/]" if negated else "(?!)"), position + 1
    return (f"[^/{body}]" if negated else f"(?!/)[{body}]"), position + 1


def _bracket_range_end(pattern: str, position: int) -> tuple[str, int]:
    """The upper end of a range "a-z" at `position` (it may be escaped) and the index after it."""
    if pattern[position] == "\\":
        position += 1
        if position >= len(pattern):
            raise _InvalidPattern(pattern)
    return pattern[position], position + 1


def _escape_in_class(char: str) -> str:
    """`char` made literal inside a regex character class."""
    return "\\" + char if char in "\\]^-[" else char
