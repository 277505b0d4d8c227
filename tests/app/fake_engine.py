"""A fake engine for the UI tests: the methods of engine.session.Assistant the app calls (read, ask,
document_state, thread_state, reading_rate), with the same callbacks, cancellation and records, but no model. It
writes real sessions into a real SessionStore, so that rename, delete, export and import are the real
thing. Small sleeps make reading and answering take long enough to be stopped; `hold` freezes reading
at a chosen point so a snapshot can catch it mid-way. Timings it reports are fixed numbers."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from kimi_desk.engine.ingest import IngestError
from kimi_desk.engine.session import Answer, ReadCancelled, ReadProgress, Segment, SessionError, Turn
from kimi_desk.engine.snapshot import Identity
from kimi_desk.engine.sources import SourceTexts

FROZEN_TIME = "2026-11-27T12:00:00+00:00"
IDENTITY = Identity("fake-model-fingerprint", "fake-tokenizer-fingerprint")
# It cites a line of a file the fake reads, a definition, and a file no folder of the tests has.
ANSWER = (
    "The **helper** in `file_2.py:1` returns a number:\n\n"
    "- it adds `14` to the length of a short string\n"
    "- `helper_2` is defined three times; lib/other.py:4 reads none of them\n\n"
    "```python\ndef helper_2():\n    return 14 + len('xx')\n```\n"
)


def answer_pieces(question: str) -> list[str]:
    """The answer the fake gives, in token-sized pieces (words with their spaces)."""
    text = ANSWER + f"\nYou asked: {question}"
    pieces, word = [], ""
    for char in text:
        word += char
        if char in " \n":
            pieces.append(word)
            word = ""
    return pieces + ([word] if word else [])


class FakeAssistant:
    def __init__(
        self,
        *,
        chunk_tokens: int = 40,
        read_sleep: float = 0.002,
        token_sleep: float = 0.002,
        max_length: int = 8192,
        hold_at: int | None = None,
        limit_notices: tuple = (),
    ):
        self.model = SimpleNamespace(config=SimpleNamespace(model_max_length=max_length), device="cpu")
        self.model_source = "fake-model"
        self.chunk_tokens = chunk_tokens
        self.read_sleep = read_sleep
        self.token_sleep = token_sleep
        # Reading pauses when it reaches `hold_at` tokens, until `release` is set.
        self.hold_at = hold_at
        # What the fake says the loader's limits left out (engine/ingest LimitNotice records).
        self.limit_notices = limit_notices
        self.holding = threading.Event()
        self.release = threading.Event()
        # Answering pauses after `answer_hold_after` pieces until `answer_release` is set.
        self.answer_hold_after: int | None = None
        self.answering = threading.Event()
        self.answer_release = threading.Event()
        self.asked: list[str] = []
        # (thread, index) of each question: None for a new thread.
        self.asked_in: list[tuple] = []
        self.samplings: list = []

    def reading_rate(self, tokens: int = 0, start: int = 0) -> float:
        return 1500.0

    def read(self, store, path, *, on_progress=None, cancel=None, on_plan=None, **_):
        source = Path(path).expanduser().resolve()
        if not source.exists():
            raise IngestError(f"{source}: no such file or folder")
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        try:
            texts = [(f, f.read_text(encoding="utf-8")) for f in files]
        except (OSError, UnicodeDecodeError) as exc:
            raise IngestError(f"{source}: cannot read ({exc})") from None
        segments, position = [], 0
        for f, text in texts:
            label = f.relative_to(source).as_posix() if source.is_dir() else f.name
            segments.append(Segment(label, hashlib.sha256(text.encode()).hexdigest(), position, len(text) // 2 + 8))
            position += segments[-1].tokens
        session = store.find_or_create(str(source), source.name, IDENTITY, None)
        unchanged = [s.sha256 for s in session.segments] == [s.sha256 for s in segments]
        kept = SourceTexts(session.folder)  # the texts read, as the engine keeps them for citations
        session.update(
            segments=segments,
            read_position=session.read_position if unchanged else 0,
            files=[
                {
                    "path": s.label,
                    "size": 1,
                    "sha256": s.sha256,
                    "start": s.start,
                    "end": s.end,
                    "text_sha256": kept.put(text),
                }
                for s, (_, text) in zip(segments, texts)
            ],
            created=FROZEN_TIME,
            last_used=FROZEN_TIME,
            model_source=self.model_source,
        )
        total = segments[-1].end if segments else 0
        if on_plan:
            on_plan(session, total - session.read_position, self.limit_notices)
        while session.read_position < total:
            if cancel is not None and cancel.is_set():
                session.update(read_position=session.read_position)
                raise ReadCancelled(f"stopped after {session.read_position:,} of {total:,} tokens")
            if self.hold_at is not None and session.read_position >= self.hold_at and not self.release.is_set():
                if not self.holding.is_set() and on_progress:
                    # Report where reading holds once the app's 10-per-second throttle lets it through,
                    # so that a snapshot shows exactly this point.
                    time.sleep(0.15)
                    on_progress(self._progress(session.read_position, segments))
                self.holding.set()
                # Held until released, or until the app stops the reading (then the loop raises).
                while not self.release.is_set() and not (cancel is not None and cancel.is_set()):
                    time.sleep(0.005)
                continue
            time.sleep(self.read_sleep)
            session.read_position = min(total, session.read_position + self.chunk_tokens)
            if on_progress:
                on_progress(self._progress(session.read_position, segments))
        session.update(read_position=session.read_position)
        return session

    @staticmethod
    def _progress(done: int, segments) -> ReadProgress:
        total = segments[-1].end
        index = next(i for i, s in enumerate(segments) if s.end >= done)
        return ReadProgress(done, total, index, len(segments), 1234.0, (total - done) / 1234.0, segments[index].label)

    def document_state(self, session):
        if not session.complete:
            raise SessionError(
                f"session {session.id} has read {session.read_position:,} of "
                f"{session.document_tokens:,} tokens; open it again to finish reading"
            )
        if session.identity != IDENTITY:
            raise SessionError(f"session {session.id} was read with another model or tokenizer")
        return SimpleNamespace(
            kda_nbytes=4 * 1024 * 1024, mla_nbytes=576 * 4 * session.document_tokens, position=session.document_tokens
        )

    def thread_state(self, session, thread, notice=None):
        """What the UI reads of a thread's state: its position (document and thread tokens)."""
        self.document_state(session)
        return SimpleNamespace(
            kda_nbytes=4 * 1024 * 1024,
            mla_nbytes=576 * 4 * session.document_tokens,
            position=session.document_tokens + session.thread(thread).tokens,
        )

    def ask(
        self, session, question, *, thread=None, index=None, sampling=None, max_new_tokens=512, cancel=None, notice=None
    ):
        self.document_state(session)
        session.refresh()
        seen = list(session.thread(thread).turns) if thread is not None else []
        index = len(seen) if index is None else index
        self.asked.append(question)
        self.asked_in.append((thread, index))
        self.samplings.append((sampling, max_new_tokens))
        pieces, ids, finish = [], [], "cancelled"
        try:
            for position, piece in enumerate(answer_pieces(question)):
                if cancel is not None and cancel.is_set():
                    break
                if position >= max_new_tokens:
                    finish = "length"
                    break
                if self.answer_hold_after is not None and position == self.answer_hold_after:
                    self.answering.set()
                    while not self.answer_release.is_set() and not (cancel is not None and cancel.is_set()):
                        time.sleep(0.005)
                    if cancel is not None and cancel.is_set():
                        break
                time.sleep(self.token_sleep)
                pieces.append(piece)
                ids.append(position)
                yield Answer(piece, [position], 0.01)
            else:
                finish = "stop"
        finally:
            turn = Turn(
                question,
                "".join(pieces),
                ids,
                finish,
                round(0.01 * len(ids), 3),
                FROZEN_TIME,
                tokens=len(question.split()) + 8 + len(ids),
            )
            landed, forked = session.record_turn(turn, thread, seen, index)
            if forked and notice is not None:
                notice(f"thread {thread} changed meanwhile: this answer starts thread {landed}")
        yield Answer("", [], 0.0, finish, thread=landed)


def make_folder(root: Path, n_files: int = 6) -> Path:
    root.mkdir(parents=True)
    for i in range(n_files):
        (root / f"file_{i}.py").write_text(f"def helper_{i}():\n    return {i * 7} + len('{'x' * i}')\n" * 3)
    return root
