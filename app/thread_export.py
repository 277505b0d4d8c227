"""One thread as a Markdown file (`kimi-desk sessions export-thread`): each question and its answer, and
under the answer the places it cites, with the cited lines as the session read them (or why a place
was not found), so that the file can be checked against the source without kimi-desk."""

from __future__ import annotations

from pathlib import PurePosixPath

# Lines shown around a citation that names a whole file or a definition: its first lines.
WHOLE_FILE_LINES = 12
# At most this many lines of one cited range.
MAX_QUOTED_LINES = 40

# Code fence languages by extension, for the renderers that highlight them.
FENCE_LANGUAGES = {
    ".py": "python",
    ".js": "javascript",
    ".ts": "typescript",
    ".tsx": "tsx",
    ".jsx": "jsx",
    ".rs": "rust",
    ".go": "go",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".java": "java",
    ".kt": "kotlin",
    ".rb": "ruby",
    ".sh": "bash",
    ".md": "markdown",
    ".json": "json",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".html": "html",
    ".css": "css",
    ".sql": "sql",
    ".swift": "swift",
}


def fence_language(path: str) -> str:
    return FENCE_LANGUAGES.get(PurePosixPath(path).suffix.lower(), "")


def quoted_lines(index, citation) -> tuple[int, list[str]] | None:
    """(first line number, the lines) that a found citation points to, as read."""
    lines = index.lines(citation.path)
    if lines is None:
        return None
    if citation.line is None:
        return 1, lines[:WHOLE_FILE_LINES]
    last = min(citation.end_line or citation.line, citation.line + MAX_QUOTED_LINES - 1)
    return citation.line, lines[citation.line - 1 : last]


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside `text`."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def thread_markdown(session, thread) -> str:
    from kimi_desk.engine.citations import SourceIndex

    index = SourceIndex(session)
    out = [
        f"# {session.name}: thread {thread.id}",
        "",
        f"Read from `{session.source}` ({session.document_tokens:,} tokens, {len(session.files):,} "
        f"file{'' if len(session.files) == 1 else 's'}); {len(thread.turns)} "
        f"turn{'' if len(thread.turns) == 1 else 's'}, started {thread.created}.",
        "",
    ]
    for number, turn in enumerate(thread.turns, 1):
        out += [f"## {number}. {' '.join(turn.question.split())}", "", turn.answer.rstrip(), ""]
        if turn.finish_reason != "stop":
            ending = {"cancelled": "was stopped", "repetition": "was ended: it was repeating itself"}
            out += [f"*(the answer {ending.get(turn.finish_reason, 'was cut at its length limit')})*", ""]
        citations = index.cite(turn.answer)
        if not citations:
            continue
        out += ["Cited:", ""]
        seen = set()
        for citation in citations:
            key = (citation.path, citation.line, citation.end_line, citation.found, citation.text)
            if key in seen:
                continue
            seen.add(key)
            if not citation.found:
                out += [f"- `{citation.text}`: **not found** ({citation.reason})", ""]
                continue
            name = f" (`{citation.symbol}`)" if citation.symbol else ""
            out += [f"- `{citation.label}`{name}", ""]
            quoted = quoted_lines(index, citation)
            if quoted is None:
                out += ["  (the text as read is not kept, and the file changed since)", ""]
                continue
            first, lines = quoted
            width = len(str(first + len(lines) - 1))
            body = "\n".join(f"{first + i:>{width}} | {line}" for i, line in enumerate(lines))
            fence = _fence(body)
            out += (
                [f"  {fence}{fence_language(citation.path)}"]
                + [f"  {line}" for line in body.split("\n")]
                + [f"  {fence}", ""]
            )
    return "\n".join(out).rstrip() + "\n"
