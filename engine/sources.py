"""The texts a session read, kept beside it, so that what an answer cites can be shown as the model read
it, after the files changed on disk or on another computer.

A session folder's `sources/` holds one file per text read: `<sha256>.txt`, the text in UTF-8, named
by the SHA-256 of those bytes. The name is the check: a file whose bytes do not hash to its name is
damaged (or forged) and is never shown. The session record's file entries name their text by that
digest (`text_sha256`); texts no entry names are removed when the session is read again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from kimi_desk.engine.atomic import atomic_write
from kimi_desk.engine.errors import writing

SOURCES = "sources"
# A text read is at most the loader's total (16 MiB by default, raised on request); far beyond that is
# not a text kimi-desk wrote.
MAX_SOURCE_BYTES = 1 << 30
SOURCE_FILE = re.compile(r"[0-9a-f]{64}\.txt")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class SourceTexts:
    """The `sources/` folder of one session."""

    def __init__(self, session_folder: Path):
        self.folder = Path(session_folder) / SOURCES

    def put(self, text: str) -> str:
        """Keep `text` (once, whatever the number of files holding it); returns its digest."""
        digest = text_digest(text)
        path = self.folder / f"{digest}.txt"
        if not path.is_file():
            with writing(self.folder):
                self.folder.mkdir(exist_ok=True)  # inside the session folder, never recreating it
            atomic_write(path, text.encode("utf-8", errors="surrogatepass"))
        return digest

    def get(self, digest: str) -> str | None:
        """The text of that digest, or None when it is missing or its bytes do not match the name."""
        if not isinstance(digest, str) or not SOURCE_FILE.fullmatch(f"{digest}.txt"):
            return None
        path = self.folder / f"{digest}.txt"
        try:
            if path.stat().st_size > MAX_SOURCE_BYTES:
                return None
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        return data.decode("utf-8", errors="surrogatepass")

    def names(self) -> list[str]:
        return (
            sorted(p.name for p in self.folder.glob("*.txt") if SOURCE_FILE.fullmatch(p.name))
            if self.folder.is_dir()
            else []
        )

    def keep_only(self, digests: set[str]) -> None:
        """Remove the texts no file of the session names any more."""
        for name in self.names():
            if name[:-4] not in digests:
                (self.folder / name).unlink(missing_ok=True)
