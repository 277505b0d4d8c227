"""Messages that worker threads post to the UI. Workers never touch widgets; they post one of these
(post_message is thread-safe) and a handler on the UI thread updates the screen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message as _TextualMessage


class Message(_TextualMessage):
    """Each message here is meant for the one screen (or the app) that started the worker: it does not
    bubble up to the app, where a second handler could act on it again."""

    def __init_subclass__(cls, bubble: bool = False, **options):
        super().__init_subclass__(bubble=bubble, **options)


class StoreReady(Message):
    def __init__(self, store: Any):
        super().__init__()
        self.store = store


class ModelReady(Message):
    def __init__(self, assistant: Any, device: str):
        super().__init__()
        self.assistant = assistant
        self.device = device


@dataclass
class Problem:
    """What went wrong (one line) and what the user can do about it."""

    message: str
    advice: str


class ModelFailed(Message):
    def __init__(self, problem: Problem):
        super().__init__()
        self.problem = problem


class ReadingMessage(Message):
    """A message of one reading (app/screens.py ReadingJob), which goes on while the user is elsewhere:
    posted to the app, which shows it on the reading's screen if that is on view. `job` is set by the
    worker before posting."""

    job: Any = None


class ReadPlanned(ReadingMessage):
    """How much is left to read; `tokens_to_read` 0 means the session resumed at once."""

    def __init__(
        self,
        name: str,
        source: str,
        tokens_to_read: int,
        tokens_total: int,
        files_total: int,
        tokens_per_second: float | None,
    ):
        super().__init__()
        self.name = name
        self.source = source
        self.tokens_to_read = tokens_to_read
        self.tokens_total = tokens_total
        self.files_total = files_total
        self.tokens_per_second = tokens_per_second


class ReadProgressed(ReadingMessage):
    def __init__(self, progress: Any):
        super().__init__()
        self.progress = progress


class ReadStopped(ReadingMessage):
    def __init__(self, message: str):
        super().__init__()
        self.message = message


class ReadFailed(ReadingMessage):
    def __init__(self, problem: Problem):
        super().__init__()
        self.problem = problem


class DocumentReady(ReadingMessage):
    """The whole document is in the model's state: the chat can start. `left_out` says, a line each,
    what the loader's limits left out of the document (the engine's LimitNotice messages)."""

    def __init__(self, session: Any, kda_nbytes: int, mla_nbytes: int, note: str, left_out: tuple[str, ...] = ()):
        super().__init__()
        self.session = session
        self.kda_nbytes = kda_nbytes
        self.mla_nbytes = mla_nbytes
        self.note = note
        self.left_out = left_out


class AnswerText(Message):
    """More text of the answer being streamed, batched (at most ~10 of these a second)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


class AnswerFinished(Message):
    """The answer is complete and recorded in `thread` (a new thread's id for the first question, or
    another thread than asked for when the engine branched); `citations` are the places it cites."""

    def __init__(
        self,
        text: str,
        finish_reason: str,
        tokens: int,
        seconds: float,
        thread: str | None = None,
        citations: list | None = None,
    ):
        super().__init__()
        self.text = text
        self.finish_reason = finish_reason
        self.tokens = tokens
        self.seconds = seconds
        self.thread = thread
        self.citations = citations or []


class EngineNotice(Message):
    """A line the engine had for the user (the format a load chose, a thread rebuilt from its transcript),
    shown by whoever it was posted to: the app (loading) or the chat (answering)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text


class CitationsFound(Message):
    """The places the answers of a thread cite, resolved off the UI thread: turn widget id -> citations."""

    def __init__(self, found: dict):
        super().__init__()
        self.found = found


class SourceLoaded(Message):
    """A cited file's text as the session read it (None when it is not kept), for the source pane."""

    def __init__(self, turn_id: str, index: int, text: str | None):
        super().__init__()
        self.turn_id = turn_id
        self.index = index
        self.text = text


class AnswerFailed(Message):
    """The answer failed; `recorded` says whether the session's last turn is this one (a partial
    answer the engine kept, or the earlier answer a failed regeneration leaves in place)."""

    def __init__(self, problem: Problem, recorded: bool):
        super().__init__()
        self.problem = problem
        self.recorded = recorded


class SessionsListed(Message):
    """The saved sessions, most recent first, each with its size on disk; and the session folders that
    cannot be read (id and reason), which the list cannot show but the user must hear about."""

    def __init__(self, rows: list[tuple[Any, int]], unreadable: list[Any]):
        super().__init__()
        self.rows = rows
        self.unreadable = unreadable


class StoreChanged(Message):
    def __init__(self, message: str):
        super().__init__()
        self.message = message


class StoreFailed(Message):
    def __init__(self, problem: Problem):
        super().__init__()
        self.problem = problem
