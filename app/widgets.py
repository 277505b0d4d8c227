"""Widgets the screens share: the status line, the context gauge, one question-and-answer turn with the
places it cites, the list of a session's threads and the source pane."""

from __future__ import annotations

from rich.syntax import Syntax
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.widgets import Label, Markdown, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

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
    """How much of the model's context the document and the thread take, and what their state costs in
    memory: the KDA layers' fixed-size state and the MLA layers' growing cache (the document's, shared
    by every thread, and the thread's own rows)."""

    def __init__(
        self, document_tokens: int, max_tokens: int, kda_nbytes: int, mla_nbytes: int, thread_tokens: int = 0, **kwargs
    ):
        super().__init__(**kwargs)
        self.document_tokens = document_tokens
        self.thread_tokens = thread_tokens
        self.max_tokens = max_tokens
        self.kda_nbytes = kda_nbytes
        self.mla_nbytes = mla_nbytes

    @property
    def tokens_used(self) -> int:
        return self.document_tokens + self.thread_tokens

    @property
    def fraction(self) -> float:
        return self.tokens_used / self.max_tokens if self.max_tokens else 0.0

    def compose(self) -> ComposeResult:
        with Horizontal(classes="gauge-row"):
            yield Label("Context", classes="gauge-label")
            yield ProgressBar(total=max(self.max_tokens, 1), show_eta=False, show_percentage=True, id="gauge-bar")
            yield Label("", id="gauge-tokens")
        yield Label("", id="gauge-state")

    def on_mount(self) -> None:
        self.show_thread(self.thread_tokens)

    def show_thread(self, thread_tokens: int) -> None:
        """The thread in the chat now has `thread_tokens` (0: a new thread)."""
        self.thread_tokens = thread_tokens
        bar = self.query_one("#gauge-bar", ProgressBar)
        bar.progress = min(self.tokens_used, self.max_tokens)
        bar.set_class(self.fraction >= GAUGE_FULL, "-full")
        bar.set_class(GAUGE_WARN <= self.fraction < GAUGE_FULL, "-warn")
        self.query_one("#gauge-tokens", Label).update(
            f"{formatting.tokens(self.tokens_used)} / {formatting.tokens(self.max_tokens)} tokens"
        )
        # The cache grows by the thread's rows at the document's bytes per token.
        per_token = self.mla_nbytes / self.document_tokens if self.document_tokens else 0
        cache = self.mla_nbytes + round(per_token * thread_tokens)
        self.query_one("#gauge-state", Label).update(
            f"document {formatting.tokens(self.document_tokens)} + thread {formatting.tokens(thread_tokens)} · "
            f"KDA state {formatting.nbytes(self.kda_nbytes)} · MLA cache {formatting.nbytes(cache)}"
        )


class TurnView(Vertical, can_focus=True):
    """A question and its answer. The answer is Markdown, streamed in batches while it is written.
    Focusable, so that ctrl+y can copy the answer under the cursor."""

    def __init__(self, question: str, answer: str = "", meta: str = "", **kwargs):
        super().__init__(**kwargs)
        self.question = question
        # The answer as written so far (the Markdown widget holds it parsed); what ctrl+y copies.
        self.answer_text = answer
        # Whether the thread holds this turn (so that regenerating replaces it there).
        self.recorded = True
        # The places the answer cites (engine/citations.py Citation), once they are resolved.
        self.citations: list = []
        self._meta = meta

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("› ", "bold"), self.question), classes="question")
        yield Markdown(self.answer_text, classes="answer")
        yield Static(Text(self._meta), classes="meta")
        yield Static("", classes="sources")

    @property
    def markdown(self) -> Markdown:
        return self.query_one(".answer", Markdown)

    def set_meta(self, meta: str) -> None:
        self.query_one(".meta", Static).update(Text(meta))

    def set_citations(self, citations: list) -> None:
        """Show the places the answer cites, each a link that opens it in the source pane (found or not:
        one not found says why)."""
        unique, seen = [], set()
        for citation in citations:  # a file named twice, or by a line and by a definition on it, once
            if (citation.label, citation.found) not in seen:
                seen.add((citation.label, citation.found))
                unique.append(citation)
        self.citations = unique
        self.query_one(".sources", Static).update(citation_links(self.citations, self.id or ""))
        self.set_class(bool(self.citations), "-cites")


def citation_links(citations: list, turn_id: str) -> Content:
    """`Cites: file.py:12 · ✗ lib/x.py:4 (not found)`, each place clickable."""
    parts = [Content.styled("Cites: ", "bold")]
    for index, citation in enumerate(citations):
        if index:
            parts.append(Content(" · "))
        action = f"screen.open_citation('{turn_id}', {index})"
        if citation.found:
            parts.append(Content.from_markup(f"[@click={action}]$label[/]", label=citation.label))
        else:
            parts.append(
                Content.from_markup(f"[$text-error @click={action}]✗ $label (not found)[/]", label=citation.text)
            )
    return Content.assemble(*parts)


class ThreadList(OptionList):
    """The session's threads, most recent first, after an entry that starts a new one."""

    NEW = "new-thread"

    def show(self, threads: list, current: str | None) -> None:
        self.clear_options()
        self.add_option(Option(Text("+ New thread", style="bold"), id=self.NEW))
        for thread in sorted(threads, key=lambda t: t.last_used, reverse=True):
            turns = len(thread.turns)
            label = Text(formatting.printable(thread.title, 60))
            label.append(
                f"\n{turns} turn{'' if turns == 1 else 's'} · {formatting.tokens(thread.tokens)} tokens", style="dim"
            )
            self.add_option(Option(label, id=thread.id))
        self.highlighted = self.get_option_index(current or self.NEW)


class SourcePane(Vertical, can_focus=True):
    """A file as the session read it, syntax highlighted, scrolled to the cited lines, which are marked;
    or, for a place the document does not have, why it was not found."""

    BINDINGS = [
        Binding("escape", "close", "Close", tooltip="Close the source pane", id="source.close"),
        Binding("n", "step(1)", "Next", tooltip="The next place the answer cites", id="source.next"),
        Binding(
            "p", "step(-1)", "Previous", tooltip="The previous place the answer cites", id="source.previous", show=False
        ),
    ]

    # Lines shown before and after the cited ones; a long file is not highlighted whole.
    CONTEXT_LINES = 400

    def compose(self) -> ComposeResult:
        yield Static("", id="source-title")
        with VerticalScroll(id="source-scroll"):
            yield Static("", id="source-text")

    def show(self, citation, text: str | None, position: str, theme_dark: bool = True) -> None:
        """Show `citation` (engine/citations.py) with `text`, its file as read (None: not kept);
        `position` says which of the answer's citations this is ("2 of 3")."""
        title = Content.from_markup(
            "[b]$label[/b]  [dim]$position · n next · p previous · Escape closes[/]",
            label=citation.label if citation.found else citation.text,
            position=position,
        )
        self.query_one("#source-title", Static).update(title)
        body = self.query_one("#source-text", Static)
        scroll = self.query_one("#source-scroll", VerticalScroll)
        if not citation.found:
            body.update(
                Content.from_markup("[$text-error]Not found in the document:[/] $reason", reason=citation.reason)
            )
            scroll.scroll_home(animate=False)
            return
        if text is None:
            body.update(Text(f"The text of {citation.path} as read is not kept, and the file changed since."))
            return
        lines = text.splitlines()
        first = citation.line or 1
        last = citation.end_line or first if citation.line else first
        start = max(1, first - self.CONTEXT_LINES)
        window = "\n".join(lines[start - 1 : last + self.CONTEXT_LINES])
        syntax = Syntax(
            window,
            Syntax.guess_lexer(citation.path, window),
            line_numbers=True,
            start_line=start,
            highlight_lines=set(range(first, last + 1)) if citation.line else set(),
            theme="monokai" if theme_dark else "default",
            word_wrap=False,
            indent_guides=False,
        )
        body.update(syntax)
        # The cited lines a few lines below the top, once the text is laid out.
        self.call_after_refresh(scroll.scroll_to, y=max(0, first - start - 2), animate=False)

    def action_close(self) -> None:
        self.screen.close_source()

    def action_step(self, step: int) -> None:
        self.screen.step_citation(step)


def turn_meta(tokens: int, seconds: float, finish_reason: str) -> str:
    """The line under an answer: its length, its time, and why it ended when that is news."""
    rate = f" · {tokens / seconds:,.1f} tokens/s" if seconds > 0 and tokens else ""
    ending = {
        "stop": "",
        "length": " · cut at the token limit (settings: max_new_tokens)",
        "repetition": " · ended: it was repeating itself",
        "cancelled": " · stopped",
    }.get(finish_reason, f" · {finish_reason}")
    return f"{formatting.tokens(tokens)} tokens · {seconds:.1f} s{rate}{ending}"
