"""Widgets the screens share: the status line, the context gauge and one question-and-answer turn."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, Markdown, ProgressBar, Static

from kimi_desk.app import formatting

# Thresholds at which the context gauge turns to a warning and then an error colour.
GAUGE_WARN = 0.75
GAUGE_FULL = 0.90


class StatusLine(Static):
    """One line above the key bar: the model, the device and what the engine is doing. Mirrors the
    app's `status` reactive, so every screen shows the same line."""

    def on_mount(self) -> None:
        self.watch(self.app, "status", self._show, init=True)

    def _show(self, status: str) -> None:
        self.update(Text(status))


class ContextGauge(Vertical):
    """How much of the model's context the document takes, and what its state costs in memory:
    the KDA layers' fixed-size state and the MLA layers' growing cache."""

    def __init__(self, tokens_read: int, max_tokens: int, kda_nbytes: int, mla_nbytes: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens_read = tokens_read
        self.max_tokens = max_tokens
        self.kda_nbytes = kda_nbytes
        self.mla_nbytes = mla_nbytes

    @property
    def fraction(self) -> float:
        return self.tokens_read / self.max_tokens if self.max_tokens else 0.0

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gauge-row"):
            yield Label("Context", classes="gauge-label")
            bar = ProgressBar(total=max(self.max_tokens, 1), show_eta=False, show_percentage=True,
                              id="gauge-bar")
            bar.progress = self.tokens_read
            if self.fraction >= GAUGE_FULL:
                bar.add_class("-full")
            elif self.fraction >= GAUGE_WARN:
                bar.add_class("-warn")
            yield bar
            yield Label(f"{formatting.tokens(self.tokens_read)} / {formatting.tokens(self.max_tokens)} tokens",
                        id="gauge-tokens")
        yield Label(f"KDA state {formatting.nbytes(self.kda_nbytes)} · MLA cache {formatting.nbytes(self.mla_nbytes)}",
                    id="gauge-state")


class TurnView(Vertical, can_focus=True):
    """A question and its answer. The answer is Markdown, streamed in batches while it is written.
    Focusable, so that ctrl+y can copy the answer under the cursor."""

    def __init__(self, question: str, answer: str = "", meta: str = "", **kwargs):
        super().__init__(**kwargs)
        self.question = question
        # The answer as written so far (the Markdown widget holds it parsed); what ctrl+y copies.
        self.answer_text = answer
        # Whether the session's transcript holds this turn (so that regenerating replaces it there).
        self.recorded = True
        self._meta = meta

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("› ", "bold"), self.question), classes="question")
        yield Markdown(self.answer_text, classes="answer")
        yield Static(Text(self._meta), classes="meta")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(".answer", Markdown)

    def set_meta(self, meta: str) -> None:
        self.query_one(".meta", Static).update(Text(meta))


def turn_meta(tokens: int, seconds: float, finish_reason: str) -> str:
    """The line under an answer: its length, its time, and why it ended when that is news."""
    rate = f" · {tokens / seconds:,.1f} tokens/s" if seconds > 0 and tokens else ""
    ending = {"stop": "", "length": " · cut at the token limit (settings: max_new_tokens)",
              "cancelled": " · stopped"}.get(finish_reason, f" · {finish_reason}")
    return f"{formatting.tokens(tokens)} tokens · {seconds:.1f} s{rate}{ending}"
