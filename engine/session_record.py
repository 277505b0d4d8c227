"""A session's record on disk: `session.json`, every field typed and bounded, changed only under a lock.

session.json may come from another machine (`sessions import`) or be damaged, so reading it checks
every field: its type, its range, and that positions agree with each other (segments follow one
another from 0; what was read lies inside the document). A record that fails is a SessionError
naming the session and the field, never a half-built Session that breaks later.

Several processes use one data folder at once (the app and the command line). Every change goes
through `Session.update` or `Session.record_turn`: under the store's lock they re-read the record
from disk, change only their fields, and write it back atomically. So no process overwrites a turn
or a rename another one made, and a session removed meanwhile is never written again: the change
fails with "was removed" instead.

The conversation is a list of threads, each a list of turns; every turn of a thread was answered
after the document and all the thread's earlier turns. A turn is recorded against the turns its
answer saw: when another process changed the thread meanwhile (added a turn, regenerated one), the
new turn goes to a new thread holding what it saw, so that every thread stays a conversation the
model really had, and nothing either process wrote is lost.

Format 1 (before threads) had one transcript of independent questions; it reads as one thread per
question, which is what each of them was.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from kimi_desk.engine import chat
from kimi_desk.engine.errors import SessionError
from kimi_desk.engine.file_lock import file_lock
from kimi_desk.engine.snapshot import (
    Identity,
    SnapshotError,
    SnapshotStore,
    read_checked_json,
    write_checked_json,
)

SESSION_FORMAT = 2
# Records this kimi-desk reads: format 1 had one transcript, no threads.
READABLE_FORMATS = (1, 2)
SESSION_FILE = "session.json"
# Inside the sessions folder: lock files (kept, never deleted; see engine/file_lock.py).
LOCKS_FOLDER = ".locks"
STORE_LOCK = "store.lock"
# Inside the sessions folder, per session: held while a thread's snapshot is written, read or exported.
THREADS_LOCK = "{}.threads.lock"
# Inside a session folder: a folder per thread with its snapshot (engine/snapshot.py, with a base).
THREADS = "threads"

# Bounds on what a record may hold: far beyond any real session, small enough that a hostile record
# cannot make a command allocate without limit.
MAX_POSITION = 1 << 32  # tokens
MAX_SEGMENTS = 1 << 20
MAX_TURNS = 1 << 16  # in all threads together
MAX_THREADS = 1 << 12
MAX_SHORT_TEXT = 1 << 16  # names, paths, labels, fingerprints (characters)
MAX_LONG_TEXT = 1 << 22  # a question, an answer, the system prompt (characters)
MAX_ANSWER_TOKENS = 1 << 20
FINISH_REASONS = ("stop", "length", "repetition", "cancelled")


def is_session_id(text: object) -> bool:
    """Ids kimi-desk makes: eight lowercase hexadecimal digits."""
    return isinstance(text, str) and len(text) == 8 and all(c in "0123456789abcdef" for c in text)


# Thread ids look like session ids; they are unique within their session.
is_thread_id = is_session_id


@dataclass
class Segment:
    """One piece of the document as read: the head (system turn and user header), the folder tree, or a
    file's block. `start` is its first token's position."""

    label: str
    sha256: str
    start: int
    tokens: int

    @property
    def end(self) -> int:
        return self.start + self.tokens


@dataclass
class Turn:
    question: str
    answer: str
    answer_token_ids: list[int]
    finish_reason: str
    seconds: float
    asked: str
    # Positions the turn took in its thread (question, markers and answer); 0 when not known (format 1).
    tokens: int = 0


@dataclass
class Thread:
    """A conversation after the document: each turn continues from the one before."""

    id: str
    created: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The first question, on one line."""
        return " ".join(self.turns[0].question.split()) if self.turns else "(empty)"

    @property
    def tokens(self) -> int:
        return sum(turn.tokens for turn in self.turns)

    @property
    def last_used(self) -> str:
        return max([self.created] + [turn.asked for turn in self.turns])

    def to_json(self) -> dict:
        return {"id": self.id, "created": self.created, "turns": [vars(t) for t in self.turns]}


@dataclass
class Session:
    id: str
    folder: Path
    name: str
    source: str
    created: str
    last_used: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    segments: list[Segment] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    read_position: int = 0
    threads: list[Thread] = field(default_factory=list)
    system: str | None = chat.DEFAULT_SYSTEM_PROMPT
    model_source: str = ""

    @property
    def document_tokens(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def complete(self) -> bool:
        return bool(self.segments) and self.read_position == self.document_tokens

    @property
    def identity(self) -> Identity:
        return Identity(self.model_fingerprint, self.tokenizer_fingerprint)

    @property
    def turns(self) -> int:
        """Questions asked, in every thread."""
        return sum(len(t.turns) for t in self.threads)

    def thread(self, thread_id: str) -> Thread:
        found = next((t for t in self.threads if t.id == thread_id), None)
        if found is None:
            raise SessionError(
                f"session {self.id} has no thread {str(thread_id)[:64]!r} (see 'kimi-desk sessions show {self.id}')"
            )
        return found

    def latest_thread(self) -> Thread | None:
        """The thread used last (asked in, or created, most recently)."""
        return max(self.threads, key=lambda t: t.last_used, default=None)

    @property
    def document_key(self) -> str:
        """A digest of the document as read (its segments' texts and places, the model and tokenizer):
        what a thread's saved state was computed after."""
        digest = hashlib.sha256(f"{self.model_fingerprint}\0{self.tokenizer_fingerprint}".encode())
        for segment in self.segments:
            digest.update(f"\0{segment.sha256}:{segment.start}:{segment.tokens}".encode())
        return digest.hexdigest()

    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(self.folder / "snapshots", self.identity)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def to_json(self) -> dict:
        return {
            "format_version": SESSION_FORMAT,
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "last_used": self.last_used,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "system": self.system,
            "segments": [vars(s) for s in self.segments],
            "files": self.files,
            "read_position": self.read_position,
            "threads": [t.to_json() for t in self.threads],
            "model_source": self.model_source,
        }

    @classmethod
    def from_json(cls, folder: Path, raw: object, *, origin: str | None = None) -> "Session":
        """The record in `raw` (session.json's payload), checked field by field; SessionError naming
        `origin` (default: the session) and the first field that is missing, of the wrong type or out
        of range."""
        try:
            return _parse(folder, raw)
        except _BadField as bad:
            raise SessionError(f"{origin or 'session ' + folder.name}: damaged session.json ({bad})") from None

    @classmethod
    def read(cls, folder: Path) -> "Session":
        """The record in `folder`; SessionError when it is missing or damaged."""
        try:
            raw = read_checked_json(folder / SESSION_FILE)
        except SnapshotError as exc:
            raise SessionError(f"session {folder.name}: {exc}") from None
        return cls.from_json(folder, raw)

    def write_new(self) -> None:
        """Write the record of a session just created in its own new folder (nobody else knows it yet)."""
        write_checked_json(self.folder / SESSION_FILE, self.to_json())

    # -- changes, safe against other processes ----------------------------------------------------

    def update(self, **fields) -> None:
        """Set `fields` in the record on disk and here, keeping everything other processes changed
        meanwhile (turns they added, a new name); SessionError if the session was removed."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)} or {"id", "folder"} & set(fields)
        if unknown:
            raise TypeError(f"cannot update {sorted(unknown)}")
        with self._store_lock():
            current = self._current()
            for name, value in fields.items():
                setattr(current, name, value)
            current.write_new()
        self._take(current)

    def refresh(self) -> None:
        """Take the record as it is on disk now; SessionError if the session was removed."""
        self._take(self._current())

    def record_turn(
        self, turn: Turn, thread_id: str | None = None, seen: list[Turn] = (), index: int | None = None
    ) -> tuple[str, bool]:
        """Record `turn`, answered after `seen[:index]` (default: all of `seen`) of thread `thread_id`,
        the thread's turns as the caller read them. With no thread it starts a new one. `index` at the
        last turn replaces it (regenerating); `index` before the last starts a new thread with
        `seen[:index]` and the turn (editing an earlier question keeps the conversation that followed
        it). Returns the thread it went to, and whether that is a new thread other than asked for:
        an earlier turn edited, or the thread changed on disk meanwhile (or is gone)."""
        seen = list(seen)
        index = len(seen) if index is None else index
        if not 0 <= index <= len(seen):
            raise ValueError(f"turn {index} of a thread of {len(seen)} turns")
        with self._store_lock():
            current = self._current()
            target = next((t for t in current.threads if t.id == thread_id), None)
            forked = thread_id is not None and (target is None or target.turns != seen or index < len(seen) - 1)
            if target is None or forked:
                target = Thread(_new_thread_id(current), turn.asked, seen[:index])
                current.threads.append(target)
            else:
                del target.turns[index:]
            target.turns.append(turn)
            current.last_used = turn.asked
            current.write_new()
        self._take(current)
        return target.id, forked

    def _store_lock(self):
        return file_lock(self.folder.parent / LOCKS_FOLDER / STORE_LOCK)

    def _current(self) -> "Session":
        if not (self.folder / SESSION_FILE).is_file():
            raise SessionError(f"session {self.id} was removed (by another kimi-desk?); this change is not saved")
        return Session.read(self.folder)

    def _take(self, other: "Session") -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("id", "folder"):
                setattr(self, f.name, getattr(other, f.name))


def _new_thread_id(session: "Session") -> str:
    taken = {t.id for t in session.threads}
    while True:
        thread_id = secrets.token_hex(4)
        if thread_id not in taken:
            return thread_id


# -- checking a record ------------------------------------------------------------------------------


class _BadField(Exception):
    """A field that is missing, of the wrong type or out of range; the message names it."""


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise _BadField(f"{where} must be an object")
    return value


def _get(raw: dict, key: str, where: str = "") -> object:
    if key not in raw:
        raise _BadField(f"{where}{key} is missing")
    return raw[key]


def _text(value: object, where: str, limit: int = MAX_SHORT_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _BadField(f"{where} must be a string of at most {limit:,} characters")
    return value


def _optional_text(value: object, where: str, limit: int = MAX_SHORT_TEXT) -> str | None:
    return None if value is None else _text(value, where, limit)


def _count(value: object, where: str, upper: int = MAX_POSITION) -> int:
    if type(value) is not int or not 0 <= value <= upper:
        raise _BadField(f"{where} must be an integer from 0 to {upper:,}")
    return value


def _list(value: object, where: str, limit: int) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise _BadField(f"{where} must be a list of at most {limit:,} entries")
    return value


def _hex(value: object, where: str, length: int) -> str:
    text = _text(value, where, length)
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise _BadField(f"{where} must be a {length}-digit lowercase hexadecimal string")
    return text


def _fingerprint(value: object, where: str) -> str:
    text = _text(value, where, 128)
    if not text or not all(c.isascii() and (c.isalnum() or c in "._-") for c in text):
        raise _BadField(f"{where} must be letters, digits, '.', '_' or '-' (at most 128)")
    return text


def _timestamp(value: object, where: str) -> str:
    text = _text(value, where, 64)
    try:
        datetime.datetime.fromisoformat(text)
    except ValueError:
        raise _BadField(f"{where} must be an ISO 8601 date and time") from None
    return text


def _segment(raw: object, where: str) -> Segment:
    raw = _object(raw, where)
    return Segment(
        label=_text(_get(raw, "label", where + "."), where + ".label"),
        sha256=_hex(_get(raw, "sha256", where + "."), where + ".sha256", 64),
        start=_count(_get(raw, "start", where + "."), where + ".start"),
        tokens=_count(_get(raw, "tokens", where + "."), where + ".tokens"),
    )


def _file(raw: object, where: str, document_tokens: int) -> dict:
    raw = _object(raw, where)
    entry = {
        "path": _text(_get(raw, "path", where + "."), where + ".path"),
        "size": _count(_get(raw, "size", where + "."), where + ".size", 1 << 50),
        "sha256": _hex(_get(raw, "sha256", where + "."), where + ".sha256", 64),
        "start": _count(_get(raw, "start", where + "."), where + ".start"),
        "end": _count(_get(raw, "end", where + "."), where + ".end"),
    }
    # The digest of the text the model read, kept in the session's sources/ (engine/sources.py).
    if "text_sha256" in raw:
        entry["text_sha256"] = _hex(raw["text_sha256"], where + ".text_sha256", 64)
    if not entry["start"] <= entry["end"] <= document_tokens:
        raise _BadField(f"{where} spans tokens {entry['start']:,}-{entry['end']:,}, outside the document")
    return entry


def _turn(raw: object, where: str) -> Turn:
    raw = _object(raw, where)
    ids = _list(_get(raw, "answer_token_ids", where + "."), where + ".answer_token_ids", MAX_ANSWER_TOKENS)
    for token in ids:
        _count(token, where + ".answer_token_ids[]", (1 << 31) - 1)
    finish = _get(raw, "finish_reason", where + ".")
    if finish not in FINISH_REASONS:
        raise _BadField(f"{where}.finish_reason must be one of {', '.join(FINISH_REASONS)}")
    seconds = _get(raw, "seconds", where + ".")
    if type(seconds) not in (int, float) or not math.isfinite(seconds) or not 0 <= seconds < 1e9:
        raise _BadField(f"{where}.seconds must be a non-negative number")
    return Turn(
        question=_text(_get(raw, "question", where + "."), where + ".question", MAX_LONG_TEXT),
        answer=_text(_get(raw, "answer", where + "."), where + ".answer", MAX_LONG_TEXT),
        answer_token_ids=list(ids),
        finish_reason=finish,
        seconds=float(seconds),
        asked=_timestamp(_get(raw, "asked", where + "."), where + ".asked"),
        tokens=_count(raw.get("tokens", 0), where + ".tokens"),
    )


def _thread(raw: object, where: str) -> Thread:
    raw = _object(raw, where)
    thread_id = _get(raw, "id", where + ".")
    if not is_thread_id(thread_id):
        raise _BadField(f"{where}.id must be 8 lowercase hexadecimal digits")
    turns = [
        _turn(t, f"{where}.turns[{i}]")
        for i, t in enumerate(_list(_get(raw, "turns", where + "."), where + ".turns", MAX_TURNS))
    ]
    return Thread(thread_id, _timestamp(_get(raw, "created", where + "."), where + ".created"), turns)


def _threads(raw: dict, version: int, session_id: object) -> list[Thread]:
    if version == 1:
        # Each question of a format-1 transcript was answered from the document alone: a thread each,
        # with ids that stay the same until the record is next written.
        turns = [
            _turn(t, f"transcript[{i}]") for i, t in enumerate(_list(_get(raw, "transcript"), "transcript", MAX_TURNS))
        ]
        return [
            Thread(hashlib.sha256(f"{session_id}:{i}".encode()).hexdigest()[:8], turn.asked, [turn])
            for i, turn in enumerate(turns)
        ]
    threads = [_thread(t, f"threads[{i}]") for i, t in enumerate(_list(_get(raw, "threads"), "threads", MAX_THREADS))]
    if len({t.id for t in threads}) != len(threads):
        raise _BadField("two threads have the same id")
    if sum(len(t.turns) for t in threads) > MAX_TURNS:
        raise _BadField(f"the threads hold more than {MAX_TURNS:,} turns")
    return threads


def _parse(folder: Path, raw: object) -> Session:
    raw = _object(raw, "the record")
    version = raw.get("format_version")
    if type(version) is not int or version not in READABLE_FORMATS:
        shown = repr(version) if isinstance(version, int) else "unknown"
        raise _BadField(f"format {shown[:20]}; this kimi-desk reads formats up to {SESSION_FORMAT}")
    segments = [
        _segment(s, f"segments[{i}]") for i, s in enumerate(_list(_get(raw, "segments"), "segments", MAX_SEGMENTS))
    ]
    position = 0
    for i, segment in enumerate(segments):
        if segment.start != position:
            raise _BadField(
                f"segments[{i}] starts at {segment.start:,}, not where the previous one ends ({position:,})"
            )
        position = segment.end
    if position > MAX_POSITION:
        raise _BadField(f"the document is {position:,} tokens, more than any model reads")
    read_position = _count(_get(raw, "read_position"), "read_position")
    if read_position > position:
        raise _BadField(f"read_position {read_position:,} is past the document's end ({position:,})")
    files = [_file(f, f"files[{i}]", position) for i, f in enumerate(_list(_get(raw, "files"), "files", MAX_SEGMENTS))]
    threads = _threads(raw, version, raw.get("id"))
    return Session(
        id=_text(_get(raw, "id"), "id", 64),
        folder=folder,
        name=_text(_get(raw, "name"), "name"),
        source=_text(_get(raw, "source"), "source"),
        created=_timestamp(_get(raw, "created"), "created"),
        last_used=_timestamp(_get(raw, "last_used"), "last_used"),
        model_fingerprint=_fingerprint(_get(raw, "model_fingerprint"), "model_fingerprint"),
        tokenizer_fingerprint=_fingerprint(_get(raw, "tokenizer_fingerprint"), "tokenizer_fingerprint"),
        segments=segments,
        files=files,
        read_position=read_position,
        threads=threads,
        system=_optional_text(raw.get("system"), "system", MAX_LONG_TEXT),
        model_source=_text(raw.get("model_source", ""), "model_source"),
    )
