"""The Textual app: `kimi-desk open PATH|SESSION_ID|ARCHIVE.zip`.

    app = create_app("repo/", model="path/to/model", device="cpu")
    app.run()

`create_app` is the one factory the command line and the tests share; the tests hand it a fake
engine. At start the first screen paints at once; a worker thread then imports the engine (torch),
opens the session store and loads the model, and posts what it got. Nothing here imports torch at
module level.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.reactive import reactive

from kimi_desk.app import backend, formatting
from kimi_desk.app.backend import EngineFactory, ModelChoice, StoreFactory
from kimi_desk.app.dialogs import HelpScreen, ProblemDialog, SettingsScreen, TextPrompt
from kimi_desk.app.messages import (
    DocumentReady,
    EngineNotice,
    ModelFailed,
    ModelReady,
    Problem,
    ReadFailed,
    ReadPlanned,
    ReadProgressed,
    ReadStopped,
    StoreChanged,
    StoreFailed,
    StoreReady,
)
from kimi_desk.app.screens import (
    MODEL_LOADING,
    ChatScreen,
    ReadingJob,
    ReadingScreen,
    SessionsScreen,
    describe_problem,
    read_in_background,
)
from kimi_desk.app.settings import Settings, SettingsError, load_settings, save_settings, settings_path
from kimi_desk.app.widgets import SourcePane


class KimiDeskCommands(Provider):
    """The command palette's entries: the app's actions, plus those of the screen it was opened on."""

    def _commands(self):
        return self.app.palette_commands(self.screen)

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)


# The settings the model is loaded with: a change to any of them loads it again (_engine_choice_changed).
ENGINE_SETTINGS = ("model", "device", "quantize", "gpu_memory", "cpu_memory")


class KimiDeskApp(App):
    CSS_PATH = "kimi_desk.tcss"
    TITLE = "kimi-desk"
    COMMANDS = App.COMMANDS | {KimiDeskCommands}
    BINDINGS = [
        Binding("f1", "help", "Help", id="app.help"),
        Binding("f2", "sessions", "Sessions", id="app.sessions"),
        # Shown in the help and the palette; the key bar has no room for them at 80 columns.
        Binding("f3", "settings", "Settings", show=False, id="app.settings"),
        Binding("ctrl+n", "open_new", "Open", show=False, id="app.open"),
    ]

    # loading, ready or failed; screens watch these to start work or explain why they cannot.
    engine_status: reactive[str] = reactive("loading")
    store_status: reactive[str] = reactive("loading")
    # The line every screen shows above the key bar: model, device, engine state.
    status: reactive[str] = reactive("")

    def __init__(
        self,
        target: str | None,
        *,
        model_choice: ModelChoice | None,
        model_problem: Problem | None,
        device: str,
        settings: Settings,
        settings_file: Path,
        engine_factory: EngineFactory | None,
        store_factory: StoreFactory,
        clock: Callable[[], datetime.datetime],
        settings_problem: Problem | None = None,
        quantize: str | None = None,
        gpu_memory: str | None = None,
        cpu_memory: str | None = None,
    ):
        super().__init__()
        self.target = target
        self.model_choice = model_choice
        self.model_problem = model_problem
        self.device = device
        # The weights' format the next load asks for (--quantize, else the settings').
        self.quantize = quantize or settings.quantize
        # The memory budgets the next load plans with (--gpu-memory and --cpu-memory, else the settings';
        # None: what the machine has free, less a margin).
        self.gpu_memory = gpu_memory or settings.gpu_memory or None
        self.cpu_memory = cpu_memory or settings.cpu_memory or None
        # Model, device or format changed in Settings since the model in hand was loaded: the next
        # session opened loads them first.
        self.engine_stale = False
        self.settings = settings
        self.settings_file = settings_file
        self.settings_problem = settings_problem
        # None: the real engine, loaded with this app's model, device and format at the time of the load.
        self.engine_factory = engine_factory or (
            lambda model, device: backend.load_assistant(
                model,
                device,
                self.quantize,
                gpu_memory=self.gpu_memory,
                cpu_memory=self.cpu_memory,
                notice=lambda line: self.post_message(EngineNotice(line)),
            )
        )
        self.store_factory = store_factory
        self.clock = clock
        self.assistant = None
        self.store = None
        self.store_problem: Problem | None = None
        # The session shown in the chat, to come back to from the sessions list: (session, kda, mla).
        self.current_chat: tuple | None = None
        # Readings by target: each goes on while the user is elsewhere (ReadingJob).
        self.readings: dict[str, ReadingJob] = {}
        # The status line without what background readings add to it.
        self._engine_line = ""

    @property
    def model_label(self) -> str:
        if self.model_choice is None:
            return "no model"
        if self.model_choice.origin == "demo":
            return "demo model"
        return formatting.model_label(self.model_choice.model)

    def on_mount(self) -> None:
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        self._set_engine_line(f"model {self.model_label} · loading on {self.device}…")
        self.push_screen(ReadingScreen(self.target) if self.target else SessionsScreen())
        if self.settings_problem is not None:
            self.show_problem("Settings not read", self.settings_problem)
        # After the first paint: importing torch holds the interpreter for a second or more, and the
        # first screen should be on the terminal before that starts.
        self.call_after_refresh(self.load_engine)

    # -- the engine -------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def load_engine(self, store: bool = True) -> None:
        if store:
            try:
                self.post_message(StoreReady(self.store_factory()))
            except Exception as exc:  # noqa: BLE001
                self.post_message(StoreFailed(describe_problem(exc, "opening the session store")))
        if self.model_choice is None:
            self.post_message(ModelFailed(self.model_problem or Problem(backend.NO_MODEL_MESSAGE, "")))
            return
        try:
            assistant = self.engine_factory(self.model_choice.model, self.device)
            device = str(getattr(assistant.model, "device", self.device))
            self.post_message(ModelReady(assistant, device))
        except Exception as exc:  # noqa: BLE001 - a model that does not load is reported, not fatal
            self.post_message(ModelFailed(describe_problem(exc, MODEL_LOADING)))

    def on_engine_notice(self, event: EngineNotice) -> None:
        """The engine's own notices (the format and placement a load chose, a usage file not kept)."""
        self.notify(event.text, timeout=10)

    def on_store_ready(self, event: StoreReady) -> None:
        self.store = event.store
        self.store_status = "ready"

    def on_store_failed(self, event: StoreFailed) -> None:
        self.store_problem = event.problem
        self.store_status = "failed"

    def on_model_ready(self, event: ModelReady) -> None:
        self.assistant = event.assistant
        self._set_engine_line(f"model {self.model_label} · {event.device}")
        self.engine_status = "ready"

    def on_model_failed(self, event: ModelFailed) -> None:
        self.model_problem = event.problem
        self._set_engine_line(f"model {self.model_label} · not loaded")
        self.engine_status = "failed"
        self.show_problem("The model did not load", event.problem)

    def on_store_changed(self, event: StoreChanged) -> None:
        if event.message:
            self.notify(event.message)

    # -- readings ---------------------------------------------------------------------------------

    def on_unmount(self) -> None:
        # Quitting stops every reading after its current chunk: what was read is kept, and opening the
        # same target again resumes it.
        for job in self.readings.values():
            job.cancel.set()

    def start_reading(self, target: str) -> ReadingJob:
        """Read `target` in a worker that outlives the screen showing it."""
        job = ReadingJob(target)
        self.readings[target] = job
        self.run_worker(
            lambda: read_in_background(self, job), thread=True, group=f"reading {target}", exit_on_error=False
        )
        return job

    def _reading_screen(self, job: ReadingJob) -> ReadingScreen | None:
        screen = self.screen_stack[1] if len(self.screen_stack) > 1 else None
        return screen if isinstance(screen, ReadingScreen) and screen.target == job.target else None

    def on_read_planned(self, event: ReadPlanned) -> None:
        event.job.planned, event.job.name = event, event.name
        if (screen := self._reading_screen(event.job)) is not None:
            screen.show_planned(event)
        self._show_background_readings()

    def on_read_progressed(self, event: ReadProgressed) -> None:
        event.job.progress = event
        if (screen := self._reading_screen(event.job)) is not None:
            screen.show_progress(event)
        self._show_background_readings()

    def on_read_stopped(self, event: ReadStopped) -> None:
        self._reading_ended(
            event,
            "stopped",
            lambda screen: screen.show_stopped(event),
            f"Reading {event.job.name or event.job.target} {event.message}; opening it resumes.",
        )

    def on_read_failed(self, event: ReadFailed) -> None:
        self._reading_ended(
            event,
            "failed",
            lambda screen: screen.show_failed(event),
            f"Reading {event.job.name or event.job.target} failed: {event.problem.message}",
        )

    def on_document_ready(self, event: DocumentReady) -> None:
        self._reading_ended(
            event,
            "done",
            lambda screen: screen.show_ready(event),
            f"'{event.session.name}' is read ({formatting.tokens(event.session.document_tokens)} "
            "tokens): open it from Sessions (F2).",
        )

    def _reading_ended(self, event, phase: str, show, background_note: str) -> None:
        job = event.job
        job.phase = phase
        if self.readings.get(job.target) is job:
            del self.readings[job.target]
        screen = self._reading_screen(job)
        if screen is not None:
            show(screen)
        else:
            self.notify(background_note, severity="error" if phase == "failed" else "information", timeout=10)
            if isinstance(self.screen, SessionsScreen):
                self.screen.list_sessions()
        self._show_background_readings()

    def _show_background_readings(self) -> None:
        """The status line names the readings going on off screen."""
        shown = self.screen_stack[1] if len(self.screen_stack) > 1 else None
        away = [
            job
            for job in self.readings.values()
            if job.running and not (isinstance(shown, ReadingScreen) and shown.target == job.target)
        ]
        parts = []
        for job in away[:2]:
            p = job.progress.progress if job.progress else None
            done = f" {p.tokens_done / max(p.tokens_total, 1):.0%}" if p else ""
            parts.append(f"reading {job.name or job.target}{done}")
        more = f" (+{len(away) - 2})" if len(away) > 2 else ""
        self.status = self._engine_line + (" · " + ", ".join(parts) + more if parts else "")

    def _set_engine_line(self, line: str) -> None:
        self._engine_line = line
        self._show_background_readings()

    # -- navigation -------------------------------------------------------------------------------

    def _show_main(self, screen) -> None:
        """Replace the main screen (reading, chat or sessions) under any open dialog."""
        while len(self.screen_stack) > 2 and self.screen.is_modal:
            self.pop_screen()
        if len(self.screen_stack) > 1:
            self.switch_screen(screen)
        else:
            self.push_screen(screen)
        self.call_after_refresh(self._show_background_readings)

    def open_target(self, target: str) -> None:
        if self.engine_stale:
            self.reload_engine()
        self._show_main(ReadingScreen(target))

    def reload_engine(self) -> None:
        """Load the model, device and format the settings now name (off the UI thread); screens waiting
        for the engine start when it is ready, as at start-up."""
        self.engine_stale = False
        self.assistant = None
        self.current_chat = None  # the chat in hand was read with the model given up
        self.engine_status = "loading"
        self._set_engine_line(f"model {self.model_label} · loading on {self.device}…")
        self.load_engine(store=False)

    def show_chat(
        self, session, kda_nbytes: int, mla_nbytes: int, note: str = "", left_out: tuple[str, ...] = ()
    ) -> None:
        self.current_chat = (session, kda_nbytes, mla_nbytes)
        self._show_main(ChatScreen(session, kda_nbytes, mla_nbytes, note, left_out))

    def back_to_chat(self) -> None:
        if self.current_chat is not None:
            self._show_main(ChatScreen(*self.current_chat))

    def forget_session(self, session_id: str) -> None:
        """A deleted session can no longer be the one to go back to."""
        if self.current_chat is not None and self.current_chat[0].id == session_id:
            self.current_chat = None

    def show_problem(self, title: str, problem: Problem) -> None:
        self.push_screen(ProblemDialog(title, problem))

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "sessions":
            # Hidden where it would lead nowhere: on the sessions screen itself.
            return not isinstance(self.screen, SessionsScreen)
        return True

    def action_sessions(self) -> None:
        if not isinstance(self.screen, SessionsScreen):
            self._show_main(SessionsScreen())

    def action_open_new(self) -> None:
        self.push_screen(
            TextPrompt(
                "Open",
                "A folder or a file (PDF, EPUB, text, Markdown, HTML), a session id, or an exported .zip archive:",
                placeholder="~/code/project",
                accept="Open",
            ),
            lambda target: target and self.open_target(target),
        )

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.key_help()))

    def action_settings(self) -> None:
        if not isinstance(self.screen, SettingsScreen):
            self.push_screen(SettingsScreen(self.settings), self._settings_chosen)

    def _settings_chosen(self, settings: Settings | None) -> None:
        if settings is None or settings == self.settings:
            return
        changed = any(getattr(settings, name) != getattr(self.settings, name) for name in ENGINE_SETTINGS)
        self.settings = settings
        self.save_settings(settings)
        if changed:
            self._engine_choice_changed(settings)

    def _engine_choice_changed(self, settings: Settings) -> None:
        """The settings name another model, device, format or memory budget: the model is loaded with them
        at once when no session is in hand (or the model in hand failed), else when the next session is
        opened."""
        try:
            self.model_choice, self.model_problem = backend.choose_model(None, settings.model), None
        except backend.ModelNotFound as exc:
            self.model_choice, self.model_problem = None, Problem(str(exc), "Set another model in Settings (F3).")
        self.device, self.quantize = settings.device, settings.quantize
        self.gpu_memory, self.cpu_memory = settings.gpu_memory or None, settings.cpu_memory or None
        busy = isinstance(
            self.screen_stack[1] if len(self.screen_stack) > 1 else None, (ChatScreen, ReadingScreen)
        ) or any(job.running for job in self.readings.values())
        if self.engine_status == "failed" or not busy:
            self.reload_engine()
        else:
            self.engine_stale = True
            self.notify(
                f"{self.model_label} on {self.device} ({self.quantize}) loads when you next open a session "
                "(F2 or ctrl+n); this one keeps the model it was read with.",
                timeout=10,
            )

    @work(thread=True, group="settings", exit_on_error=False)
    def save_settings(self, settings: Settings) -> None:
        try:
            path = save_settings(settings, self.settings_file)
        except OSError as exc:
            self.post_message(
                StoreFailed(
                    Problem(
                        f"Settings not saved: {backend.one_line(exc)}",
                        f"Check that {self.settings_file.parent} is writable.",
                    )
                )
            )
            return
        self.post_message(StoreChanged(f"Settings saved to {formatting.short_path(str(path))}."))

    def watch_theme(self, theme: str) -> None:
        # The theme chosen in the command palette is remembered like the other settings.
        if self.is_running and theme != self.settings.theme:
            self._settings_chosen(self.settings.replace(theme=theme))

    def export_session(self, session) -> None:
        default = Path.home() / f"{_file_name(session.name)}-{session.id}.zip"

        def chosen(path: str | None) -> None:
            if path:
                self.export_to(session.id, Path(path).expanduser())

        self.push_screen(
            TextPrompt(
                "Save as an archive",
                "One .zip with the reading and the conversation; "
                "'kimi-desk open FILE.zip' restores it, here or on another computer.",
                value=formatting.short_path(str(default)),
                accept="Save",
            ),
            chosen,
        )

    @work(thread=True, group="store", exit_on_error=False)
    def export_to(self, session_id: str, path: Path) -> None:
        try:
            saved = self.store.export(session_id, path)
        except Exception as exc:  # noqa: BLE001
            self.post_message(StoreFailed(describe_problem(exc, "saving the archive")))
            return
        self.post_message(StoreChanged(f"Saved to {formatting.short_path(str(saved))}."))

    # -- help and the command palette ------------------------------------------------------------

    def key_help(self) -> list[tuple[str, list[tuple[str, str]]]]:
        def keys(bindings) -> list[tuple[str, str]]:
            rows = []
            for binding in bindings:
                if isinstance(binding, Binding) and binding.description:
                    rows.append((self.get_key_display(binding), binding.tooltip or binding.description))
            return rows

        return [
            ("Everywhere", keys(self.BINDINGS) + [("^p", "Command palette"), ("^q", "Quit")]),
            (
                "Chat",
                [("enter", "Ask the question")] + keys(ChatScreen.BINDINGS) + [("tab", "Select an answer (for ^y)")],
            ),
            ("Source pane", keys(SourcePane.BINDINGS)),
            ("Reading", keys(ReadingScreen.BINDINGS)),
            ("Sessions", keys(SessionsScreen.BINDINGS)),
        ]

    def palette_commands(self, screen) -> list[tuple[str, str, Callable]]:
        commands = list(getattr(screen, "palette_commands", lambda: [])())
        commands += [
            (
                "Open a folder, file, session or archive",
                "read something new or restore a session (ctrl+n)",
                self.action_open_new,
            ),
            ("Sessions", "every saved session: open, rename, delete (F2)", self.action_sessions),
            ("Settings", "model, device and sampling (F3)", self.action_settings),
            ("Help", "every key (F1)", self.action_help),
        ]
        return commands


def _file_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "session"


def create_app(
    target: str | None = None,
    *,
    model: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    gpu_memory: str | None = None,
    cpu_memory: str | None = None,
    settings: Settings | None = None,
    settings_file: Path | None = None,
    engine_factory: EngineFactory | None = None,
    store_factory: StoreFactory = backend.open_store,
    clock: Callable[[], datetime.datetime] | None = None,
) -> KimiDeskApp:
    """The app, for the command line and the tests alike. `model`, `device`, `quantize` and the memory
    budgets (`gpu_memory`, `cpu_memory`: sizes such as 24GiB) override the
    settings; with no model anywhere the app still opens (sessions can be listed) and says what to pass."""
    settings_file = settings_file or settings_path()
    settings_problem = None
    if settings is None:
        try:
            settings, unknown = load_settings(settings_file)
            if unknown:
                settings_problem = Problem(
                    f"{settings_file}: unknown settings {', '.join(unknown)} (ignored)",
                    "Fix or remove them; Settings (F3) rewrites the file.",
                )
        except SettingsError as exc:
            settings = Settings()
            settings_problem = Problem(str(exc), "Using the defaults; fix the file or save new settings (F3).")
    try:
        model_choice, model_problem = backend.choose_model(model, settings.model), None
    except backend.ModelNotFound as exc:
        model_choice, model_problem = None, Problem(str(exc), "Or set the model in Settings (F3) and start again.")
    return KimiDeskApp(
        target,
        model_choice=model_choice,
        model_problem=model_problem,
        device=device or settings.device,
        settings=settings,
        settings_file=settings_file,
        engine_factory=engine_factory,
        store_factory=store_factory,
        clock=clock or (lambda: datetime.datetime.now(datetime.timezone.utc)),
        settings_problem=settings_problem,
        quantize=quantize,
        gpu_memory=gpu_memory,
        cpu_memory=cpu_memory,
    )
