"""Sessions: a document read once into the model's state, conversations over that state, all of it
kept on disk and resumed in another process.

    assistant = Assistant.load(model_path)              # model + tokenizer, loaded once
    store = SessionStore()                              # KIMI_DESK_HOME or the platform's data folder
    session = assistant.read(store, "repo/", on_progress=show, cancel=event)   # new, resumed or refreshed
    for event in assistant.ask(session, "Where is the config parsed?"):        # Answer events; a new thread
        ...
    thread = event.thread                               # the last event names the thread
    for event in assistant.ask(session, "And where is it called?", thread=thread):   # continues it
        ...

A session folder holds `session.json` (checked JSON: sources, token spans, threads), `snapshots/`
(engine/snapshot.py), `threads/<id>/` (what each thread adds to the document's state) and `sources/`
(the texts read, engine/sources.py). Reading is chunked prefill with checkpoints of the constant-size
state at file boundaries, so that a changed folder is re-read from its first changed file, and an
interrupted reading resumes where it stopped.

Threads. A thread's state is the document's, then every earlier question and answer of the thread. It
continues the document's state in place (engine/state.py `continuation`): the KDA part is copied (42 MB
at the 48B shapes), the MLA caches read the document's rows where they are and append the thread's
after them, into spare rows (THREAD_ROOM) reserved when the document's state is made. So a question
costs the thread's own tokens and a fixed working set, never a copy of the document's cache. One
thread per session is live at a time: it owns the rows after the document; asking in another thread
restores that one from its snapshot (`threads/<id>/`: its KDA state at its end and before its last
turn, and its own MLA rows), or, when none fits, re-reads its transcript after the document and says
so in one line. A thread's checkpoints are keyed by a digest of the document and every token of the
thread before them, so a checkpoint is only used for the conversation it was taken in.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_desk import environment
from kimi_desk.engine import chat
from kimi_desk.engine.cpu_threads import use_idle_cores
from kimi_desk.engine.errors import GpuMemoryError, StorageError, writing
from kimi_desk.engine.file_lock import LockBusy, file_lock
from kimi_desk.engine.files import first_line
from kimi_desk.engine.generate import Cancel, Sampling, is_cancelled, prefill, stream_tokens
from kimi_desk.engine.loading import DEMO_MODEL
from kimi_desk.engine.reading_time import ReadingCost, measure_reading_cost
from kimi_desk.engine.session_archive import export_session, import_session
from kimi_desk.engine.session_record import (
    LOCKS_FOLDER,
    STORE_LOCK,
    THREADS,
    THREADS_LOCK,
    Segment,
    Session,
    SessionError,
    Thread,
    Turn,
)
from kimi_desk.engine.snapshot import Identity, SnapshotError, SnapshotStore
from kimi_desk.engine.sources import SourceTexts
from kimi_desk.engine.state import ModelState
from kimi_desk.engine.usage import ExpertUsage, add_usage

__all__ = [
    "Answer",
    "Assistant",
    "ReadCancelled",
    "ReadProgress",
    "Segment",
    "Session",
    "SessionError",
    "SessionStore",
    "Thread",
    "Turn",
    "UnreadableSession",
    "data_home",
]

# Tokens kept free after the document for a question and its answer.
ANSWER_RESERVE = 1024
# Cache rows reserved after the document for the live thread (see the module doc): 129 MB at the 48B
# shapes. A longer thread grows its cache by its own rows, which moves the document's rows once per
# doubling of the thread (still one buffer: the document's cache follows).
THREAD_ROOM = 16384
# A thread keeps its state at its end and before its last turn: regenerating that turn is instant;
# editing an earlier one re-reads the thread's tokens up to it.
THREAD_CHECKPOINTS = 2
# Inside the sessions folder, per session: held by the process reading it (engine/file_lock.py).
READING_LOCK = "{}.reading.lock"


class ReadCancelled(Exception):
    """Reading stopped on request; what was read so far is checkpointed and resumes next time."""


def data_home() -> Path:
    """Where sessions live: $KIMI_DESK_HOME, else the platform's user data folder."""
    override = environment.home()
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("kimi-desk", appauthor=False))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the folder of sessions -------------------------------------------------------------------------


@dataclass(frozen=True)
class UnreadableSession:
    """A session folder whose record cannot be read: listed so the user knows, never silently hidden."""

    id: str
    reason: str


class SessionStore:
    """The sessions folder. Safe to use from several processes at once: records change under a lock
    (engine/session_record.py), a session being read is locked by its reader, and a removed session
    is moved aside in one rename before it is deleted, so it never comes back half there."""

    def __init__(self, home: Path | None = None):
        self.home = home or data_home()  # the data folder: sessions, and the models' expert usage
        self.root = self.home / "sessions"

    def _folder(self, session_id: str) -> Path:
        if (
            not isinstance(session_id, str)
            or not session_id
            or len(session_id) > 64
            or not all(c.isascii() and (c.isalnum() or c in "-_") for c in session_id)
        ):
            raise SessionError(f"{str(session_id)[:64]!r} is not a session id")
        return self.root / session_id

    def _session_folders(self) -> list[Path]:
        # Names starting with '.' are the store's own: locks, imports being staged, removals under way.
        return sorted(p for p in self.root.iterdir() if not p.name.startswith(".")) if self.root.is_dir() else []

    def list(self) -> list[Session]:
        """Every readable session, most recently used first; `unreadable()` lists the others."""
        sessions = []
        for folder in self._session_folders():
            try:
                sessions.append(self.get(folder.name))
            except (SessionError, SnapshotError):
                continue
        return sorted(sessions, key=lambda s: s.last_used, reverse=True)

    def unreadable(self) -> list[UnreadableSession]:
        """Session folders whose record is missing or damaged, with the reason: what `list` leaves out."""
        found = []
        for folder in self._session_folders():
            try:
                self.get(folder.name)
            except (SessionError, SnapshotError) as exc:
                found.append(UnreadableSession(folder.name, str(exc)))
        return found

    def get(self, session_id: str) -> Session:
        folder = self._folder(session_id)
        if not folder.is_dir():
            raise SessionError(f"no session {session_id!r} (see 'kimi-desk sessions list')")
        return Session.read(folder)

    def find_by_source(self, source: str, identity: Identity) -> Session | None:
        matches = [s for s in self.list() if s.source == source and s.identity == identity]
        return matches[0] if matches else None

    def create(self, source: str, name: str, identity: Identity, system: str | None) -> Session:
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                session_id = secrets.token_hex(4)
                try:
                    (self.root / session_id).mkdir()
                    break
                except FileExistsError:
                    continue
        now = _now()
        session = Session(
            id=session_id,
            folder=self.root / session_id,
            name=name,
            source=source,
            created=now,
            last_used=now,
            model_fingerprint=identity.model_fingerprint,
            tokenizer_fingerprint=identity.tokenizer_fingerprint,
            system=system,
        )
        session.write_new()
        return session

    def rename(self, session_id: str, name: str) -> Session:
        name = name.strip()
        if not name:
            raise SessionError("a session name cannot be empty")
        session = self.get(session_id)
        session.update(name=name)
        return session

    def find_or_create(self, source: str, name: str, identity: Identity, system: str | None) -> Session:
        """The session of `source` read with `identity` and `system`, else a new one; under the store's
        lock, so two processes opening one new folder at once get one session."""
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            with file_lock(self.root / LOCKS_FOLDER / STORE_LOCK):
                session = self.find_by_source(source, identity)
                if session is None or session.system != system:
                    session = self.create(source, name, identity, system)
                return session

    @contextmanager
    def reading(self, session_id: str, doing: str = "reading it"):
        """Hold the session's reading lock for the block: one process at a time reads a session, and
        nobody removes or exports it meanwhile. SessionError at once when another process holds it."""
        try:
            with writing(self.root), file_lock(self.root / LOCKS_FOLDER / READING_LOCK.format(session_id), wait=False):
                yield
        except LockBusy:
            raise SessionError(
                f"session {session_id} is being read by another kimi-desk; wait for it to finish "
                f"(or stop it) before {doing}"
            ) from None

    def remove(self, session_id: str) -> None:
        folder = self._folder(session_id)
        if not folder.is_dir():
            raise SessionError(f"no session {session_id!r} (see 'kimi-desk sessions list')")
        with self.reading(session_id, "removing it"), writing(folder):
            # One rename takes it out of every listing; the slow delete follows.
            doomed = self.root / f".removed-{session_id}-{secrets.token_hex(3)}"
            with file_lock(self.root / LOCKS_FOLDER / STORE_LOCK):
                os.rename(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def export(self, session_id: str, archive: Path) -> Path:
        """One zip file with the session and its snapshots; never overwrites an existing file."""
        session = self.get(session_id)
        with self.reading(session_id, "exporting it"):
            return export_session(session, Path(archive))

    def import_(self, archive: Path) -> Session:
        """A session exported elsewhere, checked completely before it is added (engine/session_archive.py)."""
        return self.get(import_session(Path(archive), self.root))


# -- reading and asking -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadProgress:
    tokens_done: int
    tokens_total: int
    files_done: int
    files_total: int
    tokens_per_second: float
    seconds_left: float | None
    path: str


@dataclass(frozen=True)
class Answer:
    """A piece of a streamed answer: new text, the token ids behind it, and timing. The last event of an
    answer has `finish_reason` set ("stop", "length", "repetition" or "cancelled") and names the `thread` the turn
    was recorded in."""

    text: str
    token_ids: list[int]
    seconds: float
    finish_reason: str | None = None
    thread: str | None = None


def default_checkpoint_interval(config, dtype: torch.dtype) -> int:
    """Tokens between the reading's checkpoints: 8192, or more where the constant-size state is large
    beside what each token adds to the snapshot, so that checkpoints add at most about an eighth to it.
    The 48B model: 42 MB of KDA state against 8 KB of MLA cache a token, a checkpoint every 42k tokens
    (at 8192 a 1M-token folder of small files would leave 5 GB of checkpoints beside an 8 GB cache)."""
    kinds = config.layer_kinds
    kda_bytes = kinds.count("kda") * config.kda_num_heads * config.kda_head_dim**2 * 4
    cache_bytes_per_token = max(1, kinds.count("mla") * config.mla_latent_size * dtype.itemsize)
    return max(8192, -(-8 * kda_bytes // cache_bytes_per_token))  # rounded up


class Assistant:
    """The model and its tokenizer, loaded once; reads documents into sessions and answers from them."""

    def __init__(self, model, tokenizer, *, prefill_chunk: int | None = None, checkpoint_interval: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        # Tokens per prefill call. A GPU takes 8192: every call expands the MLA layers' cached keys once
        # more (kernels/mla), so fewer, larger chunks read a long document faster; the CPU's 2048 keep
        # each call short enough to notice a cancellation quickly.
        self.prefill_chunk = prefill_chunk or (8192 if model.device.type == "cuda" else 2048)
        self.checkpoint_interval = checkpoint_interval or default_checkpoint_interval(
            model.config, model.latent_cache_dtype
        )
        self.identity = Identity(model.fingerprint, tokenizer.fingerprint)
        self.stop_ids = chat.stop_token_ids(tokenizer, model.config)
        self.model_source = ""  # where the model was loaded from; sessions remember it
        # Code spans in answers held to the text read (engine/code_spans.py): for the embedded model,
        # which can garble a name it copies; the last session asked, its document's text as the copy knows it.
        self.copies_code_spans = False
        self._span_copy: tuple[tuple, object] | None = None
        # Where one-line notices of the engine's own go (the loader's, a usage file not saved).
        self.notice: Callable[[str], None] = lambda line: None
        # Count which routed experts each reading chooses, kept per model in the data folder
        # (engine/usage.py): the next load on a GPU too small for the model keeps the most used there.
        self.count_usage = True
        self._document_states: dict[str, ModelState] = {}
        # Per session, the live thread: the key of its tokens (see the module doc) and its state.
        self._live: dict[str, tuple[str, ModelState]] = {}
        self._cost: ReadingCost | None = None
        # One model, one queue: a reading in one session and an answer in another run in turns, a
        # prefill chunk or a generated token at a time, each holding this lock.
        self.model_lock = threading.RLock()

    @classmethod
    def load(
        cls,
        model_path: Path,
        device="cpu",
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        notice: Callable[[str], None] = lambda line: None,
        placement=None,
        **options,
    ) -> "Assistant":
        from kimi_desk.engine.fuse import fuse_projections
        from kimi_desk.engine.quantize import prepare_for_cpu
        from kimi_desk.engine.tokenizer import load_tokenizer
        from kimi_desk.engine.weights import load_model

        if torch.device(device).type == "cpu":
            use_idle_cores()
        model = fuse_projections(
            load_model(model_path, device=device, dtype=dtype, quantize=quantize, notice=notice, placement=placement)
        )
        prepare_for_cpu(model)
        assistant = cls(model, load_tokenizer(model_path), **options)
        assistant.model_source = str(Path(model_path).expanduser().resolve())
        assistant.copies_code_spans = Path(assistant.model_source) == DEMO_MODEL.resolve()
        assistant.notice = notice
        return assistant

    def _code_span_copy(self, session: Session):
        """The session's files as read, with their paths, for holding code spans to them (kept for the
        session last asked while its files are the same: one document's text in memory, not every one's)."""
        from kimi_desk.engine.citations import SourceIndex
        from kimi_desk.engine.code_spans import CodeSpanCopy

        key = (session.id, *((f["path"], f.get("text_sha256") or f["sha256"]) for f in session.files))
        kept = self._span_copy
        if kept is None or kept[0] != key:
            index = SourceIndex(session)
            root = Path(session.source).name
            parts = [f"{root}/{path}\n{path}\n{index.text(path) or ''}" for path in index.files]
            kept = self._span_copy = (key, CodeSpanCopy(self.tokenizer, "\n".join(parts)))
        return kept[1]

    def reading_rate(self, tokens: int = 0, start: int = 0) -> float:
        """Tokens per second of reading on this device: the average over reading `tokens` tokens after
        `start` already read (what the app quotes before reading), or the rate at `start` when tokens is
        0. Measured once (engine/reading_time.py: a chunk at an empty state and the cost each cached
        token adds, which makes long documents read ever slower)."""
        return self.reading_cost().rate(tokens, start)

    def reading_cost(self) -> ReadingCost:
        if self._cost is None:
            with self.model_lock:
                self._cost = measure_reading_cost(self.model, self.prefill_chunk)
        return self._cost

    def _seconds_left(self, position: int, total: int, start: int, elapsed: float, rate: float) -> float | None:
        """The time left to read to `total`: the measured cost model (when the rate was asked before
        reading) scaled by how this reading's time so far compares with its prediction, else the rate
        so far."""
        if self._cost is not None and elapsed > 0:
            predicted = self._cost.seconds(position - start, start)
            if predicted > 0:
                return self._cost.seconds(total - position, position) * elapsed / predicted
        return (total - position) / rate if rate > 0 else None

    # -- reading ----------------------------------------------------------------------------------

    def plan(self, document, system: str | None) -> tuple[list[Segment], list[list[int]]]:
        """The document's token ids, segment by segment: the head (system turn and user header), then
        every segment of the loaded document. Segments end with a newline and the next starts with a
        non-space, so their ids concatenate to those of the whole text."""
        from kimi_desk.engine.token_budget import encode_within

        texts = document.segments()
        texts[-1] = chat.document_text(texts[-1])
        units = [chat.document_head_ids(self.tokenizer, system)]
        # DocumentTooLong as soon as the count passes the context: a huge text is never encoded whole.
        budget = self.model.config.model_max_length - ANSWER_RESERVE - len(units[0])
        units += encode_within(self.tokenizer, texts, budget, document.root.name)
        labels = ["(conversation head)", "(folder tree)" if document.is_folder else "(preamble)"]
        labels += [f.relative_path for f in document.files]
        segments, position = [], 0
        for label, text, ids in zip(labels, [chat.document_head_text(system), *texts], units, strict=True):
            segments.append(Segment(label, _sha256(text), position, len(ids)))
            position += len(ids)
        return segments, units

    def read(
        self,
        store: SessionStore,
        path,
        *,
        name: str | None = None,
        system: str | None = chat.DEFAULT_SYSTEM_PROMPT,
        limits=None,
        on_progress: Callable[[ReadProgress], None] | None = None,
        cancel: Cancel = None,
        on_plan: Callable[[Session, int, tuple], None] | None = None,
    ) -> Session:
        """Read `path` into a session: a new one, or the existing session of the same source and model,
        continued from its last checkpoint that the changes leave valid. Raises ReadCancelled.
        `on_plan(session, tokens_to_read, limit_notices)` comes before reading starts; the notices
        (engine/ingest LimitNotice) say what the loader's limits left out, for the user to be told."""
        from kimi_desk.engine.ingest import LoaderLimits, load_path

        source = str(Path(path).expanduser().resolve())
        document = load_path(source, limits or LoaderLimits())
        segments, units = self.plan(document, system)  # DocumentTooLong past the model's context
        session = store.find_or_create(source, name or Path(source).name, self.identity, system)
        with store.reading(session.id):
            try:
                self._read_session(session, segments, units, document, name, on_plan, on_progress, cancel, store)
            except torch.OutOfMemoryError as exc:  # its checkpoints so far are kept: the next read resumes
                raise GpuMemoryError("reading") from exc
        return session

    def cache_capacity(self, tokens: int) -> int:
        """Cache rows for a document of `tokens`: itself and the live thread's room."""
        return min(self.model.config.model_max_length, tokens + THREAD_ROOM)

    def hold_document_state(self, session: Session, state: ModelState) -> None:
        """Use `state` as `session`'s document state (benchmarks build one without reading)."""
        self._live.pop(session.id, None)
        self._document_states[session.id] = state

    def forget(self, session_id: str) -> None:
        """Free the states held for a session (its snapshots keep them)."""
        self._live.pop(session_id, None)
        self._document_states.pop(session_id, None)

    def _read_session(self, session, segments, units, document, name, on_plan, on_progress, cancel, store) -> None:
        session.refresh()  # as the last reader left it, now that this process holds the reading lock
        total = segments[-1].end
        snapshots = _usable_snapshots(session)
        kept = _unchanged_prefix(session.segments, segments, session.read_position)
        resume_at = snapshots.latest_at_or_before(kept) or 0
        # The cache is sized once for the document and a thread: no geometric growth (up to twice the
        # cache) while reading, and no copy when the first question comes.
        state = self.model.new_state(1)
        if resume_at:
            try:
                state = snapshots.restore(resume_at, state, capacity=self.cache_capacity(total))
            except SnapshotError:
                # A damaged checkpoint costs a re-read, never the session: start again from the beginning.
                resume_at = 0
        state.reserve(self.cache_capacity(total))
        snapshots.truncate_after(resume_at)
        self._live.pop(session.id, None)
        texts = SourceTexts(session.folder)
        files = [
            {
                "path": f.relative_path,
                "size": f.size,
                "sha256": f.sha256,
                "start": seg.start,
                "end": seg.end,
                "text_sha256": texts.put(f.text),
            }
            for f, seg in zip(document.files, segments[2:], strict=True)
        ]
        texts.keep_only({f["text_sha256"] for f in files})
        session.update(
            segments=segments,
            read_position=resume_at,
            model_source=self.model_source,
            files=files,
            last_used=_now(),
            **({"name": name} if name else {}),
        )
        if on_plan is not None:
            on_plan(session, total - resume_at, document.limit_notices)
        usage = ExpertUsage.for_model(self.model) if self.count_usage else None
        try:
            self._read_from(session, snapshots, segments, units, state, on_progress, cancel, len(document.files), usage)
        finally:  # what a cancelled reading counted is kept too
            if usage is not None:
                self._keep_usage(store.home, usage)
        self._document_states[session.id] = state

    def _keep_usage(self, home: Path, usage: ExpertUsage) -> None:
        """Add a reading's expert usage to the model's file; a disk that refuses it costs only the hint
        (one notice line: the reading itself is kept)."""
        try:
            with self.model_lock:  # the counts are complete once the model's queued work is
                usage.tokens = usage.counted_tokens(self.model.config.num_experts_per_token)
            add_usage(home, self.model.fingerprint, usage, self.notice)
        except (StorageError, OSError) as error:
            self.notice(f"expert usage of this reading not kept ({first_line(error)}); the reading itself is saved")

    def _read_from(self, session, snapshots, segments, units, state, on_progress, cancel, files_total, usage=None):
        """Prefill the document from `state.position` to its end. Calls take `prefill_chunk` tokens
        across file boundaries (a folder of small files would otherwise cost a call per file, each
        paying the per-call costs, the MLA layers' expansion of every cached key among them), and end
        where a checkpoint is due: at the first file boundary `checkpoint_interval` tokens or more after
        the last checkpoint, inside a long file every 4 intervals, and at the end. `usage`, when given,
        counts the experts the chunks choose (engine/usage.py)."""
        total = segments[-1].end
        ends = [segment.end for segment in segments]
        boundaries = set(ends)
        started, start_position = time.perf_counter(), state.position
        # The first chunk pays one-time costs (kernels compiled, memory first touched): the rate and the
        # time left are measured from its end, and no time left is said before (it would swing wildly:
        # minutes for a 15 s read).
        first_chunk = True
        last_checkpoint = state.position
        while state.position < total:
            if is_cancelled(cancel):
                if state.position > last_checkpoint:
                    snapshots.save(state)
                session.update(read_position=state.position)
                raise ReadCancelled(f"stopped after {state.position:,} of {total:,} tokens")
            position = state.position
            stop = min(total, position + self.prefill_chunk)
            boundary = next(
                (
                    end
                    for end in ends[bisect.bisect_right(ends, position) :]
                    if end >= last_checkpoint + self.checkpoint_interval or end >= stop
                ),
                stop,
            )
            stop = min(stop, boundary)
            chunk = torch.tensor([_token_slice(segments, units, position, stop)], device=self.model.device)
            with self.model_lock, usage.counting(self.model) if usage is not None else nullcontext():
                self.model(chunk, state, last_only=True)
            at_boundary = stop == boundary and stop in boundaries
            if stop == total or (at_boundary and stop - last_checkpoint >= self.checkpoint_interval):
                # Checkpoints sit at file boundaries, where a changed folder resumes.
                snapshots.save(state)
                last_checkpoint = stop
                session.update(read_position=stop)
            elif stop - last_checkpoint >= 4 * self.checkpoint_interval:
                # And inside a long file too, so that an interruption loses little.
                snapshots.save(state)
                last_checkpoint = stop
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                rate = (stop - start_position) / elapsed if elapsed > 0 else 0.0
                left = None if first_chunk else self._seconds_left(stop, total, start_position, elapsed, rate)
                # Files read to their end (the first two segments are the head and the tree), and the
                # segment holding the last token read.
                files_done = max(0, bisect.bisect_right(ends, stop) - 2)
                label = segments[bisect.bisect_right(ends, stop - 1)].label
                on_progress(ReadProgress(stop, total, files_done, files_total, rate, left, label))
            if first_chunk:
                started, start_position, first_chunk = time.perf_counter(), stop, False

    def document_state(self, session: Session):
        """The state after the whole document, from memory or from the session's snapshot."""
        if not session.complete:
            raise SessionError(
                f"session {session.id} has read {session.read_position:,} of "
                f"{session.document_tokens:,} tokens; open it again to finish reading"
            )
        state = self._document_states.get(session.id)
        if state is None or state.position != session.document_tokens:
            if session.identity != self.identity:
                raise SessionError(f"session {session.id} was read with another model or tokenizer")
            try:
                state = session.snapshots().restore(
                    session.document_tokens,
                    self.model.new_state(1),
                    capacity=self.cache_capacity(session.document_tokens),
                )
            except SnapshotError as exc:
                raise SessionError(
                    f"session {session.id}: {exc}; 'kimi-desk ingest {session.source}' reads the "
                    "document again (the transcript is kept)"
                ) from None
            self._document_states[session.id] = state
        return state

    # -- asking ---------------------------------------------------------------------------------

    def ask(
        self,
        session: Session,
        question: str,
        *,
        thread: str | None = None,
        index: int | None = None,
        sampling: Sampling = Sampling(temperature=0.0),
        max_new_tokens: int = 512,
        cancel: Cancel = None,
        notice: Callable[[str], None] | None = None,
    ) -> Iterator[Answer]:
        """Stream the answer to `question` in `thread` (None: a new thread, from the document), after
        its first `index` turns (default: all of them; the index of a turn regenerates or edits it,
        engine/session_record.py `record_turn`). The finished turn is recorded and the last event
        names its thread. `notice` hears one line when the thread's state had to be rebuilt from its
        transcript, or its turn went to a new thread. A question that cannot be asked raises before
        any turn is recorded."""
        from kimi_desk.engine.tokenizer import StreamDecoder

        if type(max_new_tokens) is not int or max_new_tokens < 1:
            raise SessionError(f"the answer's length must be at least 1 token, got {max_new_tokens!r}")
        session.refresh()
        seen = list(session.thread(thread).turns) if thread is not None else []
        index = len(seen) if index is None else index
        if type(index) is not int or not 0 <= index <= len(seen):
            # Turns are numbered from 1 where people see them (sessions show, --turn, the app).
            number = index + 1 if type(index) is int else repr(index)
            raise SessionError(
                f"thread {thread} has {len(seen)} turn{'' if len(seen) == 1 else 's'}; there is no "
                f"turn {number} to ask at (1 to {len(seen) + 1})"
            )
        prompt = self._prompt_ids(question, first=index == 0)
        keys, _ = self._thread_keys(session, seen[:index])
        state = self._thread_state(session, thread, seen[:index], notice)
        start = state.position
        room = self.model.config.model_max_length - start - len(prompt)
        if room < 1:
            self._live[session.id] = (keys[-1], state)
            what = "the document and this thread" if index else "the document and the question"
            raise SessionError(
                f"no room for an answer: {what} take {start + len(prompt):,} of the model's "
                f"{self.model.config.model_max_length:,} tokens; "
                f"{'start a new thread' if index else 'ask a shorter question'}"
            )
        copy = None
        if self.copies_code_spans:
            asked = [turn.question for turn in seen[:index]] + [question]
            copy = self._code_span_copy(session).joined("\n".join(asked))
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True)
        ids: list[int] = []
        text: list[str] = []
        seconds, finish, failed = 0.0, "cancelled", False
        steps = stream_tokens(
            self.model,
            prompt,
            state,
            max_new_tokens=min(max_new_tokens, room),
            sampling=sampling,
            stop_token_ids=self.stop_ids,
            cancel=cancel,
            prefill_chunk_size=self.prefill_chunk,
            vocab_size=self.tokenizer.vocab_size,
            span_rewriter=copy,
        )
        try:
            while True:
                with self.model_lock:  # a token at a time: a reading elsewhere goes on between them
                    step = next(steps, None)
                if step is None:
                    break
                seconds += step.seconds
                if step.finish_reason == "stop":  # the stop token itself is not part of the answer
                    finish = "stop"
                    break
                ids.append(step.token_id)
                text.append(decoder.push(step.token_id))
                yield Answer(text[-1], [step.token_id], step.seconds)
                if step.finish_reason == "length":
                    finish = "length"
                    break
            if finish == "cancelled" and not is_cancelled(cancel):
                finish = "length"  # the stream ended without a last step: no room or budget left
        except BaseException as exc:
            # A dropped stream (a stop in the UI) leaves a consistent state; an error inside the model
            # does not, and the thread is then rebuilt from its transcript when next used.
            failed = not isinstance(exc, GeneratorExit)
            if isinstance(exc, torch.OutOfMemoryError):
                raise GpuMemoryError("answering") from exc
            raise
        finally:
            # Also when the caller drops the stream: the turn is kept as far as it got.
            text.append(decoder.flush())
            if not failed and state.position < start + len(prompt):
                # Stopped while reading the question: the rest of it is read, so that the thread's
                # state holds exactly what its transcript says.
                with self.model_lock:
                    prefill(self.model, prompt[state.position - start :], state, self.prefill_chunk)
            turn = Turn(question, "".join(text), ids, finish, round(seconds, 3), _now(), tokens=len(prompt) + len(ids))
            landed, forked = session.record_turn(turn, thread, seen, index)
            if forked and notice is not None:
                notice(
                    f"thread {thread} changed meanwhile (in another kimi-desk?) or an earlier turn was asked "
                    f"again: this answer starts thread {landed}"
                )
            if not failed:
                key = _chain(keys[-1], prompt + ids)
                self._live[session.id] = (key, state)
                self._save_thread(session, landed, state, keys + [key], notice)
        yield Answer(text[-1], [], 0.0, finish, thread=landed)

    def _prompt_ids(self, question: str, first: bool) -> list[int]:
        """A turn's tokens before its answer: the question closing the document's user turn (the first
        turn), or a user turn of its own after the previous answer."""
        try:
            return (
                chat.question_ids(self.tokenizer, question) if first else chat.follow_up_ids(self.tokenizer, question)
            )
        except chat.ChatFormatError as exc:
            raise SessionError(str(exc)) from None

    def _thread_keys(self, session: Session, turns: list[Turn]) -> tuple[list[str], list[list[int]]]:
        """The key after the document and after each turn, and each turn's tokens."""
        keys, units = [session.document_key], []
        for i, turn in enumerate(turns):
            units.append(self._prompt_ids(turn.question, first=i == 0) + turn.answer_token_ids)
            keys.append(_chain(keys[-1], units[-1]))
        return keys, units

    def thread_state(self, session: Session, thread: str, notice: Callable[[str], None] | None = None) -> ModelState:
        """The state after every turn of `thread`, which becomes the session's live thread: what the
        next question in it continues (the UI asks for it to show the context gauge)."""
        turns = list(session.thread(thread).turns)
        keys, _ = self._thread_keys(session, turns)
        state = self._thread_state(session, thread, turns, notice)
        self._live[session.id] = (keys[-1], state)
        return state

    def _thread_state(
        self, session: Session, thread: str | None, turns: list[Turn], notice: Callable[[str], None] | None
    ) -> ModelState:
        """The state after `turns` of `thread`: the live one if it is that, else restored from the
        thread's snapshot as far as it fits, and the rest re-read from the transcript. It continues the
        document's state (see the module doc), so the live thread is given up here."""
        document = self.document_state(session)
        keys, units = self._thread_keys(session, turns)
        live = self._live.pop(session.id, None)
        if live is not None and live[0] == keys[-1]:
            return live[1]
        if not turns:
            return document.continuation()
        state, done, problem = None, 0, "it has no saved state"
        folder = session.folder / THREADS / thread
        if folder.is_dir():
            try:
                with self._threads_lock(session):
                    store = SnapshotStore(folder, self.identity, base=session.document_tokens)
                    done = next((j for j in range(len(turns), 0, -1) if store.position_of(keys[j]) is not None), 0)
                    if done:
                        state = store.restore(store.position_of(keys[done]), document)
                        if state.position != session.document_tokens + sum(map(len, units[:done])):
                            raise SnapshotError("its checkpoint is at the wrong position")
                    else:
                        problem = "its saved state is of other turns (or of the document before it was re-read)"
            except SnapshotError as exc:
                state, done, problem = None, 0, f"its saved state cannot be used ({exc})"
        if state is None:
            state = document.continuation()
        rest = [token for unit in units[done:] for token in unit]
        if rest:
            with self.model_lock:
                prefill(self.model, rest, state, self.prefill_chunk)
            if notice is not None:
                what = (
                    f"turns {done + 1}-{len(turns)}"
                    if done
                    else f"its {len(turns)} turn{'s' if len(turns) > 1 else ''}"
                )
                notice(
                    f"thread {thread}: {problem if not done else 'its last turns were not saved'}; "
                    f"rebuilt from {what} ({len(rest):,} tokens)"
                )
        return state

    def _threads_lock(self, session: Session):
        return file_lock(session.folder.parent / LOCKS_FOLDER / THREADS_LOCK.format(session.id))

    def _save_thread(
        self, session: Session, thread: str, state: ModelState, keys: list[str], notice: Callable[[str], None] | None
    ) -> None:
        """Keep what `thread` adds to the document: its state at its end (keyed by keys[-1]), beside
        the checkpoint before its last turn, and its MLA rows. Stored rows of another history (an edited
        turn, a re-read document) are dropped first. A failure costs a rebuild later, never the answer."""
        folder = session.folder / THREADS / thread
        base = session.document_tokens
        try:
            with self._threads_lock(session), writing(session.folder):
                (session.folder / THREADS).mkdir(exist_ok=True)  # FileNotFoundError: the session was removed
                try:
                    store = SnapshotStore(folder, self.identity, base=base)
                except SnapshotError:
                    shutil.rmtree(folder, ignore_errors=True)
                    store = SnapshotStore(folder, self.identity, base=base)
                if store.position_of(keys[-1]) is not None:
                    return
                kept = next(
                    (store.position_of(k) for k in reversed(keys[:-1]) if store.position_of(k) is not None), base
                )
                store.truncate_after(kept)
                store.save(state, key=keys[-1])
                if len(store.positions) > THREAD_CHECKPOINTS:
                    store.forget_checkpoints_before(store.positions[-THREAD_CHECKPOINTS])
        except FileNotFoundError:
            return
        except (StorageError, SnapshotError, OSError) as exc:
            if notice is not None:
                notice(
                    f"thread {thread}: its state was not saved ({str(exc).splitlines()[0]}); it is rebuilt "
                    "from its transcript when next used"
                )


def _chain(key: str, ids: list[int]) -> str:
    """The key after `ids` follow the tokens that `key` names."""
    return hashlib.sha256(f"{key}:{','.join(map(str, ids))}".encode()).hexdigest()


def _token_slice(segments: list[Segment], units: list[list[int]], start: int, stop: int) -> list[int]:
    """The document's token ids from position `start` to `stop`, across segments."""
    ids: list[int] = []
    index = bisect.bisect_right([segment.start for segment in segments], start) - 1
    while start < stop:
        segment, unit = segments[index], units[index]
        take = min(stop, segment.end)
        ids += unit[start - segment.start : take - segment.start]
        start, index = take, index + 1
    return ids


def _usable_snapshots(session: Session) -> SnapshotStore:
    """The session's snapshot store; one whose manifest is damaged is moved aside (kept, never deleted)
    and a new one started."""
    try:
        return session.snapshots()
    except SnapshotError:
        folder = session.folder / "snapshots"
        folder.rename(session.folder / f"snapshots.damaged-{secrets.token_hex(3)}")
        return session.snapshots()


def _unchanged_prefix(old: list[Segment], new: list[Segment], read_position: int) -> int:
    """The position up to which the earlier reading still holds: the end of the last segment that is
    the same (same text, same place) in both and was read completely."""
    kept = 0
    for a, b in zip(old, new):
        if a.sha256 != b.sha256 or a.start != b.start or a.tokens != b.tokens or a.end > read_position:
            break
        kept = a.end
    # A reading interrupted inside a segment that did not change can resume inside it.
    if len(old) > 0 and read_position > kept:
        index = next((i for i, s in enumerate(old) if s.end > kept), None)
        if (
            index is not None
            and index < len(new)
            and old[index].sha256 == new[index].sha256
            and old[index].start == new[index].start
        ):
            kept = min(read_position, old[index].end)
    return kept
