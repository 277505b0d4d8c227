"""The three main screens: reading a document, chatting over it, and the list of saved sessions.

Model work runs in thread workers. A worker never touches a widget: it posts a message (thread-safe)
and a handler here updates the screen. Cancellation is a threading.Event handed to the engine, which
checks it between reading chunks and before every generated token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Markdown, OptionList, ProgressBar, Static

from kimi_desk.app import backend, formatting
from kimi_desk.app.dialogs import Confirm, TextPrompt
from kimi_desk.app.messages import (
    AnswerFailed,
    AnswerFinished,
    AnswerText,
    CitationsFound,
    DocumentReady,
    EngineNotice,
    Problem,
    ReadFailed,
    ReadPlanned,
    ReadProgressed,
    ReadStopped,
    SessionsListed,
    SourceLoaded,
    StoreChanged,
    StoreFailed,
)
from kimi_desk.app.widgets import ContextGauge, SourcePane, StatusLine, ThreadList, TurnView, turn_meta
from kimi_desk.engine.errors import IngestError, SessionError, UserError

# At most this many progress or answer-text messages a second reach the UI: enough to look live,
# few enough that re-rendering (Markdown above all) never falls behind the model.
UPDATES_PER_SECOND = 10
BATCH_SECONDS = 1 / UPDATES_PER_SECOND
MODEL_LOADING = "loading the model"


class Throttle:
    """True at most once per `interval` seconds; used by workers to coalesce high-rate events."""

    def __init__(self, interval: float = BATCH_SECONDS):
        self.interval = interval
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False


def describe_problem(exc: BaseException, doing: str) -> Problem:
    """An exception from the engine as the UI shows it: one line, and what to do next."""
    if backend.is_out_of_memory(exc):
        return Problem(
            f"Out of memory while {doing}.",
            "Close other programs, open a smaller folder or file, or start with --device cpu "
            "(the computer's memory is usually larger than the GPU's).",
        )
    message = backend.one_line(exc)
    if doing == MODEL_LOADING:
        return Problem(
            message,
            "Pass --model PATH (a folder with config.json, *.safetensors and tokenizer.json) "
            "or a hub id fetched with 'kimi-desk pull', or set the model in Settings (F3), "
            "and start kimi-desk again.",
        )
    if isinstance(exc, (IngestError, OSError)):
        return Problem(
            message, "Check the path and its permissions, then press r to try again, or open something else (ctrl+n)."
        )
    if isinstance(exc, SessionError):
        return Problem(message, "Pick a session from the list (F2), or open a folder or file (ctrl+n).")
    if isinstance(exc, UserError):
        return Problem(message, "Open something else (ctrl+n) or pick a session (F2).")
    return Problem(
        f"Unexpected error while {doing}: {type(exc).__name__}: {message}",
        "The app keeps running: try again, or report this with the steps that led to it.",
    )


def open_target(assistant, store, target: str, *, on_plan, on_progress, cancel) -> tuple[object, str]:
    """Turn what the user opened into a session whose document is completely read.

    A folder or file is read (or resumed: the engine reads only what changed); a session id or an
    exported .zip archive is restored, and finished reading if it had been stopped. Returns the session
    and a note on where it came from. Runs in a worker thread."""
    path = Path(target).expanduser()
    if path.suffix.lower() == ".zip" and path.is_file():
        session = store.import_(path)
        return _finish_reading(
            assistant, store, session, on_plan, on_progress, cancel
        ), f"restored '{session.name}' from {path.name}"
    if path.exists():
        return assistant.read(store, path, on_progress=on_progress, cancel=cancel, on_plan=on_plan), ""
    try:
        session = store.get(target)
    except SessionError:
        raise SessionError(f"{target}: no such file, folder or session id") from None
    return _finish_reading(assistant, store, session, on_plan, on_progress, cancel), ""


def _finish_reading(assistant, store, session, on_plan, on_progress, cancel):
    if session.complete:
        on_plan(session, 0)
        return session
    source = Path(session.source)
    if not source.exists():
        raise SessionError(
            f"session '{session.name}' stopped at {session.read_position:,} of "
            f"{session.document_tokens:,} tokens and its source {session.source} is not here"
        )
    return assistant.read(store, source, on_progress=on_progress, cancel=cancel, on_plan=on_plan)


class MainScreen(Screen):
    """What the three main screens share: the header, the status line and the key bar."""

    def compose_body(self) -> ComposeResult:
        raise NotImplementedError

    def compose(self) -> ComposeResult:
        yield Header()
        yield from self.compose_body()
        yield StatusLine(id="status-line")
        yield Footer()

    def palette_commands(self):
        """(title, help, callback) for the command palette, for this screen's actions."""
        return []


# -- reading ----------------------------------------------------------------------------------------


@dataclass
class ReadingJob:
    """One reading: it belongs to the app, not to the screen that shows it, so that it goes on while the
    user browses sessions or chats in another one (the engine runs them in turns: one model, one queue).
    The screen of its target shows what it last said when it comes back."""

    target: str
    cancel: threading.Event = field(default_factory=threading.Event)
    phase: str = "reading"  # reading, stopping, stopped, failed, done
    planned: ReadPlanned | None = None
    progress: ReadProgressed | None = None
    name: str = ""

    @property
    def running(self) -> bool:
        return self.phase in ("reading", "stopping")


def read_in_background(app, job: ReadingJob) -> None:
    """The reading itself, in a worker thread: posts the job's messages to the app."""
    from kimi_desk.engine.session import ReadCancelled

    assistant, store = app.assistant, app.store
    throttle = Throttle()
    planned = []
    left_out: list[str] = []

    def post(message) -> None:
        message.job = job
        app.post_message(message)

    def on_plan(session, tokens_to_read: int, limit_notices=()) -> None:
        planned.append(tokens_to_read)
        left_out[:] = [notice.message for notice in limit_notices]
        rate = assistant.reading_rate(tokens_to_read, session.read_position) if tokens_to_read else None
        post(
            ReadPlanned(session.name, session.source, tokens_to_read, session.document_tokens, len(session.files), rate)
        )

    def on_progress(progress) -> None:
        if throttle.ready() or progress.tokens_done == progress.tokens_total:
            post(ReadProgressed(progress))

    try:
        session, origin = open_target(
            assistant, store, job.target, on_plan=on_plan, on_progress=on_progress, cancel=job.cancel
        )
        state = assistant.document_state(session)
        read_now = planned[-1] if planned else 0
        note = "resumed: 0 tokens to read" if read_now == 0 else f"read {formatting.tokens(read_now)} tokens"
        post(
            DocumentReady(
                session, state.kda_nbytes, state.mla_nbytes, f"{origin}; {note}" if origin else note, tuple(left_out)
            )
        )
    except ReadCancelled as exc:
        post(ReadStopped(str(exc)))
    except Exception as exc:  # noqa: BLE001 - every failure is shown, and the app carries on
        post(ReadFailed(describe_problem(exc, "reading")))


class ReadingScreen(MainScreen):
    """Shows the reading of a folder, file, session or archive into the model, with progress; Escape
    stops it (what was read is kept and resumes), r resumes. Leaving the screen leaves the reading
    going (the status line follows it); opening the same target again comes back to it."""

    BINDINGS = [
        Binding("escape", "stop", "Stop reading", id="reading.stop"),
        Binding("r", "resume", "Resume", id="reading.resume"),
        Binding("r", "retry", "Try again", id="reading.retry"),
    ]

    # waiting (for the model), reading, stopping, stopped, failed, done
    phase: reactive[str] = reactive("waiting", bindings=True)

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    @property
    def job(self) -> ReadingJob | None:
        return self.app.readings.get(self.target)

    def compose_body(self) -> ComposeResult:
        with Vertical(id="reading"):
            yield Label(Text(f"Opening {self.target}"), id="reading-title")
            yield Static("Loading the model…", id="reading-estimate")
            with Horizontal(classes="progress-row"):
                yield Label("Files", classes="progress-label")
                yield ProgressBar(total=1, show_eta=False, id="files-bar")
                yield Label("", id="files-count", classes="progress-count")
            with Horizontal(classes="progress-row"):
                yield Label("Tokens", classes="progress-label")
                yield ProgressBar(total=1, show_eta=False, id="tokens-bar")
                yield Label("", id="tokens-count", classes="progress-count")
            yield Static("", id="reading-rate")
            yield Static("", id="reading-problem", classes="problem")
            yield Static("", id="reading-advice")

    def on_mount(self) -> None:
        job = self.job
        if job is not None and job.running:
            # Back to a reading that went on meanwhile: what it last said, then it carries on here.
            self.phase = job.phase
            if job.planned is not None:
                self.show_planned(job.planned)
            if job.progress is not None:
                self.show_progress(job.progress)
            return
        self.watch(self.app, "engine_status", self._engine_changed, init=True)

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.phase == "reading"
        if action == "resume":
            return self.phase == "stopped"
        if action == "retry":
            return self.phase == "failed" and self.app.engine_status == "ready"
        return True

    def palette_commands(self):
        commands = []
        if self.phase == "reading":
            commands.append(("Stop reading", "stop now; what was read is kept and resumes", self.action_stop))
        if self.phase == "stopped":
            commands.append(("Resume reading", "continue from where reading stopped", self.action_resume))
        return commands

    def _engine_changed(self, status: str) -> None:
        if status == "ready" and self.phase == "waiting":
            self._start()
        elif status == "failed" and self.phase == "waiting":
            self._show_problem(self.app.model_problem)
        elif status == "loading":
            self.query_one("#reading-estimate", Static).update(Text(f"Loading the model ({self.app.model_label})…"))

    def _start(self) -> None:
        self.phase = "reading"
        self.query_one("#reading-problem", Static).update("")
        self.query_one("#reading-advice", Static).update("")
        self.query_one("#reading-estimate", Static).update("Planning the reading…")
        self.app.start_reading(self.target)

    def show_planned(self, event: ReadPlanned) -> None:
        self.query_one("#reading").add_class("-planned")
        self.query_one("#reading-title", Label).update(
            Text(f"Reading {event.name}  ({formatting.short_path(event.source)})")
        )
        self.query_one("#reading-estimate", Static).update(
            formatting.estimate(event.tokens_to_read, event.tokens_per_second)
        )
        done = event.tokens_total - event.tokens_to_read
        self._show_counts(
            done, event.tokens_total, event.files_total if done == event.tokens_total else 0, event.files_total
        )

    def show_progress(self, event: ReadProgressed) -> None:
        if self.phase not in ("reading", "stopping"):
            return
        p = event.progress
        self._show_counts(p.tokens_done, p.tokens_total, p.files_done, p.files_total)
        left = "estimating the time left" if p.seconds_left is None else f"{formatting.duration(p.seconds_left)} left"
        self.query_one("#reading-rate", Static).update(Text(f"{p.tokens_per_second:,.0f} tokens/s · {left} · {p.path}"))

    def _show_counts(self, tokens_done: int, tokens_total: int, files_done: int, files_total: int) -> None:
        self.query_one("#tokens-bar", ProgressBar).update(total=max(tokens_total, 1), progress=tokens_done)
        self.query_one("#files-bar", ProgressBar).update(total=max(files_total, 1), progress=files_done)
        self.query_one("#tokens-count", Label).update(
            f"{formatting.tokens(tokens_done)} / {formatting.tokens(tokens_total)}"
        )
        self.query_one("#files-count", Label).update(f"{files_done:,} / {files_total:,}")

    def show_stopped(self, event: ReadStopped) -> None:
        self.phase = "stopped"
        self.query_one("#reading-rate", Static).update("")
        self.query_one("#reading-problem", Static).update(Text(f"Reading {event.message}."))
        self.query_one("#reading-advice", Static).update(
            "What was read is saved: press r to resume now, or open it again later (F2 lists sessions)."
        )

    def show_failed(self, event: ReadFailed) -> None:
        self.phase = "failed"
        self._show_problem(event.problem)

    def _show_problem(self, problem: Problem) -> None:
        self.query_one("#reading-estimate", Static).update("")
        self.query_one("#reading-rate", Static).update("")
        self.query_one("#reading-problem", Static).update(Text(problem.message))
        self.query_one("#reading-advice", Static).update(Text(problem.advice))

    def show_ready(self, event: DocumentReady) -> None:
        self.phase = "done"
        self.app.show_chat(event.session, event.kda_nbytes, event.mla_nbytes, event.note, event.left_out)

    def action_stop(self) -> None:
        if self.phase == "reading" and self.job is not None:
            self.job.cancel.set()
            self.job.phase = "stopping"
            self.phase = "stopping"
            self.query_one("#reading-rate", Static).update("Stopping after this chunk…")

    def action_resume(self) -> None:
        if self.phase == "stopped":
            self._start()

    def action_retry(self) -> None:
        if self.phase == "failed" and self.app.engine_status == "ready":
            self._start()


# -- chat -------------------------------------------------------------------------------------------


class ChatScreen(MainScreen):
    """A thread of questions and streamed answers over a session whose document is read: each question
    continues the thread (the model sees its earlier turns); the list beside it switches threads or
    starts a new one. The places an answer cites open in the source pane."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding(
            "ctrl+t", "new_thread", "New thread", tooltip="Start a new thread from the document", id="chat.new_thread"
        ),
        Binding(
            "ctrl+o", "open_source", "Source", tooltip="Open what the selected or last answer cites", id="chat.source"
        ),
        # Before the question box's own ctrl+e (end of line; End does that too).
        Binding(
            "ctrl+e",
            "edit_question",
            "Edit",
            tooltip="Edit the selected or last question, ask it again",
            id="chat.edit",
            show=False,
            priority=True,
        ),
        Binding(
            "ctrl+y", "copy_answer", "Copy", tooltip="Copy the selected or last answer", id="chat.copy", show=False
        ),
        Binding("ctrl+s", "export", "Save", tooltip="Save the session as a .zip archive", id="chat.export", show=False),
    ]
    # The source pane takes the whole width below this, half of it above.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]

    generating: reactive[bool] = reactive(False, bindings=True)

    def __init__(
        self,
        session,
        kda_nbytes: int,
        mla_nbytes: int,
        note: str = "",
        left_out: tuple[str, ...] = (),
        thread: str | None = None,
    ):
        super().__init__()
        self.session = session
        self.kda_nbytes = kda_nbytes
        self.mla_nbytes = mla_nbytes
        self.note = note
        # What the loader's limits left out of the document just read, one line each.
        self.left_out = left_out
        # The thread shown: the one asked for, else the session's most recent one (None: a new thread).
        latest = session.latest_thread()
        self.thread: str | None = thread or (latest.id if latest else None)
        self.cancel = threading.Event()
        self._stream = None
        self._answering: TurnView | None = None
        self._thinking_since = 0.0
        # The citation open in the source pane: (turn widget id, index).
        self._source: tuple[str, int] | None = None
        # The turn whose question is being edited in the input (its index in the thread), if any.
        self._editing: int | None = None

    def _turns(self) -> list:
        if self.thread is None:
            return []
        return next((t.turns for t in self.session.threads if t.id == self.thread), [])

    def _thread_tokens(self) -> int:
        return next((t.tokens for t in self.session.threads if t.id == self.thread), 0)

    def compose_body(self) -> ComposeResult:
        yield ContextGauge(
            self.session.document_tokens,
            self.app.assistant.model.config.model_max_length,
            self.kda_nbytes,
            self.mla_nbytes,
            self._thread_tokens(),
            id="gauge",
        )
        yield Static(Text(self.note), id="chat-note")
        demo = Static(
            Text(
                f"{backend.DEMO_MODEL_NOTE} {backend.DEMO_MODEL_REMEDY}set it in Settings (F3) or start with --model."
            ),
            id="chat-demo",
        )
        demo.display = self._demo_model
        yield demo
        left_out = Static(Text("\n".join(self.left_out)), id="chat-left-out")
        left_out.display = bool(self.left_out)
        yield left_out
        with Horizontal(id="chat-body"):
            yield ThreadList(id="threads")
            with Vertical(id="chat-column"):
                with VerticalScroll(id="transcript"):
                    yield from self._turn_views()
                    yield Static(self._hint(), id="chat-empty", classes="hint")
                yield Input(placeholder=f"Ask about {self.session.name}…  (Enter sends)", id="question")
            yield SourcePane(id="source-pane")

    def _turn_views(self) -> list[TurnView]:
        return [
            TurnView(
                turn.question,
                turn.answer,
                turn_meta(len(turn.answer_token_ids), turn.seconds, turn.finish_reason),
                id=f"turn-{i}",
            )
            for i, turn in enumerate(self._turns())
        ]

    @property
    def _demo_model(self) -> bool:
        choice = self.app.model_choice
        return choice is not None and choice.origin == "demo"

    def _hint(self) -> Text:
        held = "all that was read" if self.left_out else "all of it"
        if self._demo_model:
            return Text(
                f"Ask anything about {self.session.name}: the demo model has read {held} (see above for what "
                "its answers are worth), and follow-ups continue the thread."
            )
        if self.thread is None and self.session.threads:
            return Text(
                f"A new thread: ask anything about {self.session.name}; it starts from the document "
                "alone, and follow-ups continue it."
            )
        return Text(
            f"Ask anything about {self.session.name}: {held} is in the model's memory, and follow-ups "
            "continue the thread."
        )

    def on_mount(self) -> None:
        self.sub_title = self.session.name
        self._show_threads()
        self.query_one("#chat-empty").display = not self._turns()
        self.query_one("#source-pane").display = False
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
        self.query_one("#question", Input).focus()
        self.set_interval(1.0, self._tick_thinking)
        self.cite_turns(self.session, {f"turn-{i}": t.answer for i, t in enumerate(self._turns())})

    def on_unmount(self) -> None:
        self.cancel.set()

    def _show_threads(self) -> None:
        self.query_one(ThreadList).show(self.session.threads, self.thread)

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.generating or self._editing is not None
        if action == "edit_question":
            return None if self.generating or not self.query(TurnView) else True
        if action == "regenerate":
            return None if self.generating or not self.query(TurnView) else True
        if action == "new_thread":
            return None if self.generating or self.thread is None else True
        if action in ("copy_answer", "open_source"):
            return bool(self.query(TurnView))
        return True

    def palette_commands(self):
        commands = []
        if self.generating:
            commands.append(("Stop the answer", "stop generating now (Escape)", self.action_stop))
        elif self.query(TurnView):
            commands.append(
                ("Regenerate the last answer", "ask the last question again (ctrl+r)", self.action_regenerate)
            )
            commands.append(
                (
                    "Edit a question",
                    "change the selected or last question and ask it again (ctrl+e)",
                    self.action_edit_question,
                )
            )
        if not self.generating and self.thread is not None:
            commands.append(("New thread", "a conversation from the document alone (ctrl+t)", self.action_new_thread))
        if self.query(TurnView):
            commands.append(
                ("Open the cited source", "what the selected or last answer cites (ctrl+o)", self.action_open_source)
            )
            commands.append(
                ("Copy the answer", "the selected or last answer, to the clipboard (ctrl+y)", self.action_copy_answer)
            )
        commands.append(("Save the session as an archive", "a .zip to open elsewhere (ctrl+s)", self.action_export))
        return commands

    # -- threads ----------------------------------------------------------------------------------

    @on(OptionList.OptionSelected, "#threads")
    async def _thread_selected(self, event: OptionList.OptionSelected) -> None:
        chosen = None if event.option.id == ThreadList.NEW else event.option.id
        if chosen == self.thread:
            self.query_one("#question", Input).focus()
            return
        if self.generating:
            self.notify("An answer is still being written: wait, or press Escape to stop it.", severity="warning")
            self._show_threads()
            return
        await self._switch_thread(chosen)

    async def action_new_thread(self) -> None:
        if not self.generating:
            await self._switch_thread(None)

    async def _switch_thread(self, thread: str | None) -> None:
        self.thread = thread
        self.close_source()
        transcript = self.query_one("#transcript", VerticalScroll)
        await transcript.query(TurnView).remove()
        views = self._turn_views()
        if views:
            await transcript.mount_all(views, before="#chat-empty")
        self.query_one("#chat-empty", Static).update(self._hint())
        self.query_one("#chat-empty").display = not views
        self.query_one(ContextGauge).show_thread(self._thread_tokens())
        self._show_threads()
        transcript.scroll_end(animate=False)
        self.query_one("#question", Input).focus()
        self.cite_turns(self.session, {view.id: view.answer_text for view in views})

    # -- asking -----------------------------------------------------------------------------------

    @on(Input.Submitted, "#question")
    async def ask_question(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question:
            return
        if self.generating:
            self.notify("An answer is still being written: wait, or press Escape to stop it.", severity="warning")
            return
        event.input.value = ""
        index, self._editing = self._editing, None
        if index is not None:
            # The edited turn and those after it leave the view: the answer starts from the state before
            # it (an earlier turn edited goes to a new thread; the old one keeps its turns).
            event.input.border_title = None
            for view in list(self.query(TurnView))[index:]:
                await view.remove()
        self.query_one("#chat-empty").display = False
        turn = TurnView(question, meta="thinking…", id=f"turn-{len(self.query(TurnView))}")
        turn.recorded = False
        await self.query_one("#transcript", VerticalScroll).mount(turn, before="#chat-empty")
        self._begin_answer(turn, question, index=index)

    def action_edit_question(self) -> None:
        """Put the selected (or last) question in the input, to be changed and asked again."""
        turns = list(self.query(TurnView))
        if self.generating or not turns:
            return
        turn = self.focused if isinstance(self.focused, TurnView) else turns[-1]
        if not turn.recorded:
            self.notify("This question's answer failed: ask it again with ctrl+r.", severity="warning")
            return
        self._editing = turns.index(turn)
        field = self.query_one("#question", Input)
        field.value = turn.question
        field.border_title = f"Editing question {self._editing + 1}: Enter asks it again, Escape cancels"
        field.focus()
        field.cursor_position = len(field.value)
        self.refresh_bindings()

    def _begin_answer(self, turn: TurnView, question: str, index: int | None) -> None:
        self._answering = turn
        self._stream = None
        self._thinking_since = time.monotonic()
        self.generating = True
        self.cancel = threading.Event()
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)
        self.answer(question, self.thread, index, self.cancel)

    def _tick_thinking(self) -> None:
        """'thinking… 12 s' while no text has come: a long wait shows it is not stuck."""
        if (
            self._answering is not None
            and not self._answering.answer_text
            and self.generating
            and not self.cancel.is_set()
        ):
            waited = time.monotonic() - self._thinking_since
            if waited >= 1:
                self._answering.set_meta(f"thinking… {formatting.duration(waited)}")

    @work(thread=True, exclusive=True, group="answer", exit_on_error=False)
    def answer(self, question: str, thread: str | None, index: int | None, cancel: threading.Event) -> None:
        from kimi_desk.engine.citations import SourceIndex
        from kimi_desk.engine.generate import Sampling

        settings = self.app.settings
        recorded_before = self._recorded_turns(thread)
        throttle = Throttle()
        pending: list[str] = []
        finish, landed = "cancelled", thread
        try:
            sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
            events = self.app.assistant.ask(
                self.session,
                question,
                thread=thread,
                index=index,
                sampling=sampling,
                max_new_tokens=settings.max_new_tokens,
                cancel=cancel,
                notice=lambda line: self.post_message(EngineNotice(line)),
            )
            for event in events:
                pending.append(event.text)
                if event.finish_reason is not None:
                    finish, landed = event.finish_reason, event.thread
                    break
                # Text goes to the UI in batches, so Markdown is re-rendered a few times a second, not per token.
                if throttle.ready():
                    self.post_message(AnswerText("".join(pending)))
                    pending.clear()
        except Exception as exc:  # noqa: BLE001 - shown in the chat; the session stays usable
            # When nothing was recorded, a regenerated answer's earlier version stays the thread's last turn.
            recorded = self._recorded_turns(thread) != recorded_before or (index is not None and bool(recorded_before))
            self.post_message(AnswerFailed(describe_problem(exc, "answering"), recorded))
            return
        turns = self.session.thread(landed).turns if landed else []
        turn = turns[-1] if turns else None
        citations = SourceIndex(self.session).cite(turn.answer) if turn else []
        self.post_message(
            AnswerFinished(
                "".join(pending),
                finish,
                len(turn.answer_token_ids) if turn else 0,
                turn.seconds if turn else 0.0,
                landed,
                citations,
            )
        )

    def _recorded_turns(self, thread: str | None) -> tuple:
        """What identifies the session's threads and their turns, to tell whether an answer that failed
        was recorded."""
        return tuple((t.id, len(t.turns), t.turns[-1].asked if t.turns else "") for t in self.session.threads)

    async def _write(self, text: str) -> None:
        if not text or self._answering is None:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self._answering.markdown)
        transcript = self.query_one("#transcript", VerticalScroll)
        # Follow the answer only if the reader has not scrolled up to read something else.
        following = transcript.is_vertical_scroll_end or transcript.max_scroll_y == 0
        self._answering.answer_text += text
        await self._stream.write(text)
        if following:
            transcript.scroll_end(animate=False)

    async def on_answer_text(self, event: AnswerText) -> None:
        if self._answering is not None:
            self._answering.set_meta("writing…  (Escape stops)")
        await self._write(event.text)

    async def on_answer_finished(self, event: AnswerFinished) -> None:
        await self._write(event.text)
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if self._answering is not None:
            self._answering.set_meta(turn_meta(event.tokens, event.seconds, event.finish_reason))
            self._answering.recorded = True
            self._answering.set_citations(event.citations)
        self._answering = None
        self.generating = False
        if event.thread is not None and event.thread != self.thread and self.thread is not None:
            # The engine put the turn in another thread (this one changed elsewhere): show that one.
            await self._switch_thread(event.thread)
            return
        self.thread = event.thread or self.thread
        self.query_one(ContextGauge).show_thread(self._thread_tokens())
        self._show_threads()
        self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        """To the transcript's end once lines just added (the places an answer cites) are laid out."""
        transcript = self.query_one("#transcript", VerticalScroll)
        self.call_after_refresh(transcript.scroll_end, animate=False)

    async def on_answer_failed(self, event: AnswerFailed) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if self._answering is not None:
            self._answering.set_meta(f"{event.problem.message} {event.problem.advice}")
            self._answering.add_class("failed")
            self._answering.recorded = event.recorded
        self._answering = None
        self.generating = False

    def on_engine_notice(self, event: EngineNotice) -> None:
        self.notify(event.text, timeout=10)

    def action_stop(self) -> None:
        if self._editing is not None and not self.generating:
            self._editing = None
            field = self.query_one("#question", Input)
            field.value, field.border_title = "", None
            self.refresh_bindings()
            return
        if self.generating:
            # The engine checks this before every token, so the answer ends within one token.
            self.cancel.set()
            if self._answering is not None:
                self._answering.set_meta("stopping…")

    async def action_regenerate(self) -> None:
        turns = self.query(TurnView)
        if self.generating or not turns:
            return
        s = self.app.settings
        if s.temperature == 0 or s.seed is not None:
            self.notify(
                "With temperature 0 or a fixed seed (Settings, F3) the same answer comes back.", severity="warning"
            )
        turn = turns.last()
        turn.answer_text = ""
        await turn.markdown.update("")
        turn.remove_class("failed")
        turn.set_citations([])
        turn.set_meta("thinking…")
        # A question whose answer failed before the thread recorded it is simply asked again.
        self._begin_answer(turn, turn.question, index=len(turns) - 1 if turn.recorded else None)

    def action_copy_answer(self) -> None:
        turns = self.query(TurnView)
        if not turns:
            return
        turn = self.focused if isinstance(self.focused, TurnView) else turns.last()
        self.app.copy_to_clipboard(turn.answer_text)
        self.notify(f"Copied the answer ({len(turn.answer_text):,} characters).")

    def action_export(self) -> None:
        self.app.export_session(self.session)

    # -- citations and the source pane ------------------------------------------------------------

    @work(thread=True, group="citations", exit_on_error=False)
    def cite_turns(self, session, answers: dict) -> None:
        """Resolve what the thread's answers cite (reads the texts kept with the session)."""
        from kimi_desk.engine.citations import SourceIndex

        index = SourceIndex(session)
        found = {turn_id: index.cite(answer) for turn_id, answer in answers.items()}
        self.post_message(CitationsFound(found))

    def on_citations_found(self, event: CitationsFound) -> None:
        transcript = self.query_one("#transcript", VerticalScroll)
        following = transcript.is_vertical_scroll_end or transcript.max_scroll_y == 0
        for turn_id, citations in event.found.items():
            for view in self.query(f"#{turn_id}").results(TurnView):
                view.set_citations(citations)
        if following:
            self._scroll_to_end()

    def action_open_source(self) -> None:
        turns = self.query(TurnView)
        if not turns:
            return
        turn = self.focused if isinstance(self.focused, TurnView) else turns.last()
        if not turn.citations:
            self.notify("This answer cites no file, line or definition of the document.")
            return
        self.open_citation(turn.id, 0)

    def open_citation(self, turn_id: str, index: int) -> None:
        """Open citation `index` of the answer in TurnView `turn_id` in the source pane."""
        views = list(self.query(f"#{turn_id}").results(TurnView))
        if not views or not 0 <= index < len(views[0].citations):
            return
        self._source = (turn_id, index)
        self.load_source(self.session, turn_id, index, views[0].citations[index])

    @work(thread=True, exclusive=True, group="source", exit_on_error=False)
    def load_source(self, session, turn_id: str, index: int, citation) -> None:
        from kimi_desk.engine.citations import SourceIndex

        text = SourceIndex(session).text(citation.path) if citation.found and citation.path else None
        self.post_message(SourceLoaded(turn_id, index, text))

    def on_source_loaded(self, event: SourceLoaded) -> None:
        if self._source != (event.turn_id, event.index):
            return
        views = list(self.query(f"#{event.turn_id}").results(TurnView))
        if not views:
            return
        citations = views[0].citations
        pane = self.query_one(SourcePane)
        pane.display = True
        self.add_class("-source-open")
        pane.show(
            citations[event.index],
            event.text,
            f"{event.index + 1} of {len(citations)}",
            theme_dark=self.app.current_theme.dark,
        )
        pane.focus()

    def step_citation(self, step: int) -> None:
        if self._source is None:
            return
        turn_id, index = self._source
        views = list(self.query(f"#{turn_id}").results(TurnView))
        if views and views[0].citations:
            self.open_citation(turn_id, (index + step) % len(views[0].citations))

    def close_source(self) -> None:
        self._source = None
        self.query_one(SourcePane).display = False
        self.remove_class("-source-open")
        self.query_one("#question", Input).focus()


# -- sessions ---------------------------------------------------------------------------------------


# The sessions list's columns and how their cells line up.
SESSION_COLUMNS = [("Name", "left"), ("Source", "left"), ("Tokens", "right"), ("Size", "right"), ("Last used", "left")]


class SessionsScreen(MainScreen):
    """Every saved session: open, rename, delete, save as an archive, or open something new."""

    BINDINGS = [
        Binding("enter", "open", "Open", id="sessions.open"),
        Binding("n", "new", "New", id="sessions.new"),
        Binding("r", "rename", "Rename", id="sessions.rename"),
        Binding("d,delete", "delete", "Delete", id="sessions.delete"),
        Binding("e", "export", "Save", tooltip="Save the session as a .zip archive", id="sessions.export"),
        Binding("escape", "back", "Back", id="sessions.back"),
    ]

    def __init__(self):
        super().__init__()
        self.sessions: dict[str, object] = {}

    def compose_body(self) -> ComposeResult:
        with Vertical(id="sessions"):
            yield DataTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="sessions-unreadable", classes="warning")
            yield Static("Loading sessions…", id="sessions-info", classes="hint")

    def on_mount(self) -> None:
        self.sub_title = "sessions"
        self.query_one("#sessions-table", DataTable).focus()
        self.watch(self.app, "store_status", self._store_changed, init=True)

    def _store_changed(self, status: str) -> None:
        if status == "ready":
            self.list_sessions()
        elif status == "failed":
            problem = self.app.store_problem
            self.query_one("#sessions-info", Static).update(Text(f"{problem.message} {problem.advice}"))

    def check_action(self, action: str, parameters) -> bool | None:
        if action in ("open", "rename", "delete", "export"):
            return bool(self.sessions)
        if action == "back":
            return self.app.current_chat is not None
        return True

    def palette_commands(self):
        commands = [("New session", "open a folder, file, session id or .zip (n)", self.action_new)]
        if self.sessions:
            commands += [
                ("Rename the session", "the highlighted one (r)", self.action_rename),
                ("Delete the session", "the highlighted one, after a confirmation (d)", self.action_delete),
                ("Save the session as an archive", "the highlighted one, as a .zip (e)", self.action_export),
            ]
        return commands

    @work(thread=True, exclusive=True, group="sessions", exit_on_error=False)
    def list_sessions(self) -> None:
        try:
            rows = [(session, session.nbytes()) for session in self.app.store.list()]
            unreadable = self.app.store.unreadable()
        except Exception as exc:  # noqa: BLE001
            self.post_message(StoreFailed(describe_problem(exc, "listing sessions")))
            return
        self.post_message(SessionsListed(rows, unreadable))

    def on_sessions_listed(self, event: SessionsListed) -> None:
        table = self.query_one("#sessions-table", DataTable)
        keep = self._highlighted_id()
        self.sessions = {session.id: session for session, _ in event.rows}
        now = self.app.clock()
        rows = []
        for session, size in event.rows:
            tokens = formatting.tokens(session.document_tokens)
            if not session.complete:
                tokens = f"{formatting.tokens(session.read_position)} of {tokens}"
            source = _clip(formatting.short_path(session.source), 30, left=True)
            rows.append(
                (
                    session.id,
                    [
                        _clip(session.name, 24),
                        source,
                        tokens,
                        formatting.nbytes(size),
                        formatting.ago(session.last_used, now),
                    ],
                )
            )
        # Columns sized (and numbers aligned) here from the cells, rather than measured by the table
        # when it is next idle: the list is then right from its first frame, dialogs opened at once
        # included. Cells are Text, never markup: names and paths may hold '['.
        table.clear(columns=True)
        widths = []
        for index, (label, justify) in enumerate(SESSION_COLUMNS):
            widths.append(max([cell_len(label)] + [cell_len(cells[index]) for _, cells in rows]))
            table.add_column(_aligned(label, widths[-1], justify), width=widths[-1], key=label)
        for session_id, cells in rows:
            table.add_row(
                *(
                    _aligned(cell, width, justify)
                    for cell, width, (_, justify) in zip(cells, widths, SESSION_COLUMNS, strict=True)
                ),
                key=session_id,
            )
        if keep in self.sessions:
            table.move_cursor(row=table.get_row_index(keep))
        unreadable = self.query_one("#sessions-unreadable", Static)
        unreadable.display = bool(event.unreadable)
        unreadable.update(Text(formatting.unreadable_sessions(event.unreadable)))
        self._describe_highlighted()
        self.refresh_bindings()

    def on_store_changed(self, event: StoreChanged) -> None:
        if event.message:
            self.notify(event.message)
        self.list_sessions()

    def on_store_failed(self, event: StoreFailed) -> None:
        self.app.show_problem("The session store", event.problem)

    @on(DataTable.RowHighlighted)
    def _describe_highlighted(self, event=None) -> None:
        info = self.query_one("#sessions-info", Static)
        session = self.sessions.get(self._highlighted_id())
        if session is None:
            info.update("No sessions yet. Press n to open a folder, a file or an exported .zip.")
            return
        state = "read" if session.complete else "reading stopped: opening it resumes"
        files, threads, questions = len(session.files), len(session.threads), session.turns
        info.update(
            Text(
                f"{session.id} · {files:,} file{'' if files == 1 else 's'} · {threads:,} "
                f"thread{'' if threads == 1 else 's'}, {questions:,} question{'' if questions == 1 else 's'}"
                f" · {state} · enter opens it"
            )
        )

    def _highlighted_id(self) -> str | None:
        table = self.query_one("#sessions-table", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        session_id = self._highlighted_id()
        if session_id:
            self.app.open_target(session_id)

    def action_new(self) -> None:
        self.app.action_open_new()

    def action_rename(self) -> None:
        session = self.sessions.get(self._highlighted_id())
        if session is None:
            return

        def rename(name: str | None) -> None:
            if name and name != session.name:
                self.store_call(lambda store: store.rename(session.id, name), f"Renamed to '{name}'.")

        self.app.push_screen(
            TextPrompt("Rename", f"A new name for '{session.name}':", value=session.name, accept="Rename"), rename
        )

    def action_delete(self) -> None:
        session = self.sessions.get(self._highlighted_id())
        if session is None:
            return

        def delete(confirmed: bool | None) -> None:
            if confirmed:
                self.app.forget_session(session.id)
                self.store_call(lambda store: store.remove(session.id), f"Deleted '{session.name}'.")

        self.app.push_screen(
            Confirm(
                "Delete session",
                f"Delete '{session.name}'? Its reading and conversation "
                "are removed; the files it read are not touched.",
            ),
            delete,
        )

    def action_export(self) -> None:
        session = self.sessions.get(self._highlighted_id())
        if session is not None:
            self.app.export_session(session)

    def action_back(self) -> None:
        self.app.back_to_chat()

    @work(thread=True, group="store", exit_on_error=False)
    def store_call(self, change, done: str) -> None:
        try:
            change(self.app.store)
        except Exception as exc:  # noqa: BLE001
            self.post_message(StoreFailed(describe_problem(exc, "changing the session")))
            return
        self.post_message(StoreChanged(done))


def _aligned(text: str, width: int, justify: str) -> Text:
    padding = " " * max(0, width - cell_len(text))
    return Text(padding + text if justify == "right" else text + padding)


def _clip(text: str, width: int, left: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if left else text[: width - 1] + "…"
