"""What an answer cites, checked against what the session read.

    index = SourceIndex(session)
    for citation in index.cite(answer_text):
        citation.path, citation.line, citation.found, citation.reason

An answer names files (`src/config.py`), places (`src/config.py:42`, `config.py:40-52`,
`src/config.py#L42`) and definitions (`parse_config`, `Config.load()` in backticks). Each is resolved
against the files the session read, at the version read (their texts kept in the session's
sources/, engine/sources.py; a session read before texts were kept falls back to the file on disk while
its bytes are unchanged):

- a path is the file of that relative path, or the one file whose path ends with it;
- a line must lie inside that file's text as read;
- a name is found where a line of a file read defines it (def, class, function, fn, struct, ...).

What looks like a place in a file and does not resolve is marked not found, with the reason: a path
with a folder or a line number, or a file name whose extension is one the document's files have. A
word that only might be a file name (`e.g`) or a name no file defines (`len`) is not a citation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from kimi_desk.engine.sources import SourceTexts

# A path (with or without folders; the last part has an extension or the path has a folder), then
# optionally :line, :line-line, :line:column or #Lline(-Lline). Not inside a URL or a longer word.
_PLACE = re.compile(
    r"(?<![\w/.:@-])"
    r"(?P<path>(?:\.{1,2}/)?(?:[\w@+-]+(?:\.[\w@+-]+)*/)*[\w@+-]+(?:\.[\w@+-]+)*)"
    r"(?::(?P<line>\d{1,7})(?:(?:-|–|:)(?P<end>\d{1,7}))?|#L(?P<hline>\d{1,7})(?:-L?(?P<hend>\d{1,7}))?)?"
    r"(?![\w/])"
)
# A name in backticks: `name`, `name()`, `Class.method`, `module::name`.
_SYMBOL = re.compile(r"`(?P<name>[A-Za-z_][\w]*(?:(?:\.|::)[A-Za-z_]\w*)*)(?:\(\))?`")
# A line that defines a name, in the languages people most often read with kimi-desk.
_DEFINITION = re.compile(
    r"^\s*(?:(?:export|pub(?:\([\w:]+\))?|public|private|protected|static|async|default|abstract|final|inline)\s+)*"
    r"(?:def|class|function|fn|func|struct|enum|trait|interface|type|impl|module|object|record|macro_rules!)\s+"
    r"(?:\([^)]*\)\s*)?(?P<name>[A-Za-z_]\w*)"
    r"|^\s*(?:export\s+)?(?:const|let|var)\s+(?P<bound>[A-Za-z_]\w*)\s*=\s*(?:async\s*)?(?:function|\()"
)
_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.I)


@dataclass(frozen=True)
class Citation:
    """One place an answer names. `start`/`end` are its characters in the answer; `line`/`end_line`
    the cited lines (1-based, inclusive; None for a whole file); `found` whether the document has it,
    `reason` why not."""

    text: str
    start: int
    end: int
    path: str | None
    line: int | None = None
    end_line: int | None = None
    symbol: str | None = None
    found: bool = True
    reason: str = ""

    @property
    def label(self) -> str:
        """Where it points, as `path:line` or `path:first-last`."""
        if self.path is None:
            return self.text
        if self.line is None:
            return self.path
        return f"{self.path}:{self.line}" + (
            f"-{self.end_line}" if self.end_line and self.end_line != self.line else ""
        )

    def to_json(self) -> dict:
        return asdict(self)


class SourceIndex:
    """The files a session read, their texts as read, and the definitions in them."""

    def __init__(self, session):
        self.session = session
        self.files = {f["path"]: f for f in session.files}
        self._texts = SourceTexts(session.folder)
        self._cache: dict[str, str | None] = {}
        self._definitions: dict[str, list[tuple[str, int]]] | None = None
        self._extensions = {Path(p).suffix.lower() for p in self.files if Path(p).suffix}

    def text(self, path: str) -> str | None:
        """The file's text as the session read it, or None when it is not kept (and the file on disk
        is no longer the one read)."""
        if path not in self._cache:
            self._cache[path] = self._load(self.files[path]) if path in self.files else None
        return self._cache[path]

    def _load(self, entry: dict) -> str | None:
        text = self._texts.get(entry.get("text_sha256", ""))
        if text is not None:
            return text
        # Read before texts were kept: the file on disk, while its bytes are those read.
        source = Path(self.session.source)
        path = source / entry["path"] if source.is_dir() else source
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def lines(self, path: str) -> list[str] | None:
        text = self.text(path)
        return None if text is None else text.splitlines()

    def resolve_path(self, written: str) -> str | None:
        """The file read that `written` names: the same relative path, or the only one ending with it."""
        written = written.removeprefix("./")
        if written in self.files:
            return written
        root = Path(self.session.source).name
        if written.startswith(root + "/") and written[len(root) + 1 :] in self.files:
            return written[len(root) + 1 :]
        matches = [p for p in self.files if p.endswith("/" + written)]
        return matches[0] if len(matches) == 1 else None

    def definitions(self) -> dict[str, list[tuple[str, int]]]:
        """name -> [(path, line)] of every line that defines it, in reading order."""
        if self._definitions is None:
            found: dict[str, list[tuple[str, int]]] = {}
            for path in self.files:
                for number, line in enumerate(self.lines(path) or [], 1):
                    match = _DEFINITION.match(line)
                    if match:
                        found.setdefault(match.group("name") or match.group("bound"), []).append((path, number))
            self._definitions = found
        return self._definitions

    def cite(self, answer: str) -> list[Citation]:
        """Every place `answer` names, in order (see the module doc)."""
        urls = [m.span() for m in _URL.finditer(answer)]
        citations = []
        for match in _PLACE.finditer(answer):
            if any(a <= match.start() < b for a, b in urls):
                continue
            citation = self._place(match)
            if citation is not None:
                citations.append(citation)
        taken = [(c.start, c.end) for c in citations]
        for match in _SYMBOL.finditer(answer):
            start, end = match.span("name")
            if any(a < end and start < b for a, b in taken):
                continue
            citation = self._symbol(match.group("name"), start, end)
            if citation is not None:
                citations.append(citation)
        return sorted(citations, key=lambda c: c.start)

    def _place(self, match: re.Match) -> Citation | None:
        written = match.group("path")
        line = match.group("line") or match.group("hline")
        end = match.group("end") or match.group("hend")
        has_folder = "/" in written.strip("./")
        suffix = Path(written).suffix.lower()
        if not (has_folder or line or suffix):
            return None
        text = match.group(0)
        path = self.resolve_path(written)
        if path is None:
            # Only what clearly means a file of this document is said to be missing from it.
            if has_folder and (suffix or line) or line and suffix or suffix in self._extensions:
                return Citation(
                    text, match.start(), match.end(), None, found=False, reason=f"{written} is not among the files read"
                )
            return None
        if line is None:
            return Citation(text, match.start(), match.end(), path)
        first = int(line)
        last = max(first, int(end)) if end and int(end) >= first else first
        lines = self.lines(path)
        if lines is not None and 1 <= first <= len(lines):
            return Citation(text, match.start(), match.end(), path, first, min(last, len(lines)))
        if lines is None:
            reason = f"the text of {path} as read is not kept and the file changed since"
        else:
            reason = f"{path} has {len(lines):,} line{'s' if len(lines) != 1 else ''}, no line {first:,}"
        return Citation(text, match.start(), match.end(), path, first, last, found=False, reason=reason)

    def _symbol(self, name: str, start: int, end: int) -> Citation | None:
        last = re.split(r"\.|::", name)[-1]
        places = self.definitions().get(last)
        if not places:
            return None
        path, line = places[0]
        return Citation(name, start, end, path, line, line, symbol=name)


def cite(session, answer: str) -> list[Citation]:
    return SourceIndex(session).cite(answer)
