"""Modal screens: a one-line text prompt, a yes/no confirmation, a problem report, the key help and
the settings form. Each dismisses with its result; the caller's callback acts on it."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from kimi_desk.app.messages import Problem
from kimi_desk.app.settings import DEVICES, QUANTIZE, Settings, SettingsError


class TextPrompt(ModalScreen[str | None]):
    """Asks for one line of text (a path, a name); Enter accepts, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, title: str, prompt: str, value: str = "", placeholder: str = "", accept: str = "OK"):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.prompt = prompt
        self.value = value
        self.placeholder = placeholder
        self.accept = accept

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.prompt), classes="dialog-text")
            yield Input(self.value, placeholder=self.placeholder, id="prompt-input")
            yield Static("", id="prompt-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.accept, variant="primary", id="accept")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._accept()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "accept":
            self._accept()
        else:
            self.dismiss(None)

    def _accept(self) -> None:
        value = self.query_one("#prompt-input", Input).value.strip()
        if not value:
            self.query_one("#prompt-error", Static).update("Type something, or press Escape to cancel.")
            return
        self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    """A yes/no question for something that cannot be undone; the safe answer has the focus."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, title: str, question: str, confirm: str = "Delete"):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.question = question
        self.confirm = confirm

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.question), classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.confirm, variant="error", id="confirm")
                yield Button("Keep", variant="primary", id="keep")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm")

    def action_cancel(self) -> None:
        self.dismiss(False)


class ProblemDialog(ModalScreen[None]):
    """Something went wrong: what, and what to do next. The app carries on behind it."""

    BINDINGS = [Binding("escape,enter", "close", "Close", id="dialog.close")]

    def __init__(self, title: str, problem: Problem):
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.problem = problem

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog problem-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.problem.message), classes="dialog-error")
            yield Static(Text(self.problem.advice), classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every key, by screen, read from the bindings themselves so that it cannot go stale."""

    BINDINGS = [Binding("escape,f1,q", "close", "Close", id="help.close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str]]]]):
        super().__init__(classes="dialog-screen")
        self.sections = sections

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for index, (section, keys) in enumerate(self.sections):
            if index:
                table.add_row("", "")
            table.add_row(Text(section, style="italic"), "")
            for key, description in keys:
                table.add_row(key, description)
        with Vertical(classes="dialog help"):
            yield Label("Keys", classes="dialog-title")
            with VerticalScroll(id="help-keys"):
                yield Static(table)
            yield Static("ctrl+p opens the command palette: every action by name.", classes="dialog-text")

    def action_close(self) -> None:
        self.dismiss(None)


class SettingsScreen(ModalScreen[Settings | None]):
    """The settings form. Sampling changes apply to the next answer; the model, device and weights'
    format to the next load of the model: when the next session is opened, or at once when none is
    open (a loaded model is not swapped under an open session)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="dialog.cancel")]

    def __init__(self, settings: Settings):
        super().__init__(classes="dialog-screen")
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog settings"):
            yield Label("Settings", classes="dialog-title")
            with VerticalScroll(id="settings-form"):
                with Grid(id="settings-grid"):
                    yield Label("Model")
                    yield Input(s.model, placeholder="embedded demo model", id="model")
                    yield Label("Device")
                    yield Select([(d, d) for d in DEVICES], value=s.device, allow_blank=False, id="device")
                    yield Label("Weights")
                    yield Select([(q, q) for q in QUANTIZE], value=s.quantize, allow_blank=False, id="quantize")
                    yield Label("GPU memory")
                    yield Input(s.gpu_memory, placeholder="free less a margin", id="gpu_memory")
                    yield Label("RAM")
                    yield Input(s.cpu_memory, placeholder="available less a margin", id="cpu_memory")
                    yield Label("Temperature")
                    yield Input(repr(s.temperature), type="number", id="temperature")
                    yield Label("Top-p")
                    yield Input(repr(s.top_p), type="number", id="top_p")
                    yield Label("Max new tokens")
                    yield Input(str(s.max_new_tokens), type="integer", id="max_new_tokens")
                    yield Label("Seed")
                    yield Input("" if s.seed is None else str(s.seed), type="integer", placeholder="random", id="seed")
            yield Static(
                "Model, device, weights and memory apply to the next session opened (at once when none "
                "is open); sampling, to the next answer.",
                classes="dialog-text",
            )
            yield Static("", id="settings-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _value(self, widget_id: str) -> str:
        return self.query_one(f"#{widget_id}", Input).value.strip()

    def read_form(self) -> Settings:
        """The settings the form describes; SettingsError naming the field that is wrong."""

        def number(widget_id: str, kind):
            text = self._value(widget_id)
            try:
                return kind(text)
            except ValueError:
                raise SettingsError(
                    f"{widget_id} must be {'an integer' if kind is int else 'a number'}, not {text!r}"
                ) from None

        seed = self._value("seed")
        return self.settings.replace(
            model=self._value("model"),
            device=str(self.query_one("#device", Select).value),
            quantize=str(self.query_one("#quantize", Select).value),
            gpu_memory=self._value("gpu_memory"),
            cpu_memory=self._value("cpu_memory"),
            temperature=number("temperature", float),
            top_p=number("top_p", float),
            max_new_tokens=number("max_new_tokens", int),
            seed=number("seed", int) if seed else None,
        )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        try:
            settings = self.read_form()
        except SettingsError as exc:
            self.query_one("#settings-error", Static).update(Text(str(exc)))
            return
        self.dismiss(settings)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one("#save", Button).press()

    def action_cancel(self) -> None:
        self.dismiss(None)
