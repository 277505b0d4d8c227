"""Progress of a long command (reading, pulling) on stderr, the same way for each: on a terminal one
line with a bar, redrawn in place at most ten times a second and cut with "…" to the terminal's width;
piped or logged, a plain line every PLAIN_SECONDS and at the end, so that a log shows the work advance."""

from __future__ import annotations

import shutil
import sys
import time

from kimi_desk.app import formatting

BAR_WIDTH = 20


class ProgressLine:
    PLAIN_SECONDS = 5.0

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self._last_draw = 0.0
        self._last_plain = time.monotonic()

    def say(self, text: str) -> None:
        """A line of its own, above the bar on a terminal."""
        self.stream.write(f"\r\x1b[2K{text}\n" if self.enabled else f"{text}\n")
        self.stream.flush()

    def show(self, label: str, fraction: float, terminal: str, plain: str, finished: bool) -> None:
        """`label` and the fraction done, then `terminal`'s details beside the bar on a terminal, or
        `plain`'s on a plain line when one is due."""
        now = time.monotonic()
        if not self.enabled:
            if finished or now - self._last_plain >= self.PLAIN_SECONDS:
                self._last_plain = now
                self.say(f"{label} {fraction:.0%}: {plain}")
            return
        if now - self._last_draw < 0.1 and not finished:
            return
        self._last_draw = now
        filled = int(fraction * BAR_WIDTH)
        line = f"{label} {fraction:4.0%} |{'█' * filled}{' ' * (BAR_WIDTH - filled)}| {terminal}"
        self.stream.write("\r\x1b[2K" + formatting.fit(line, shutil.get_terminal_size((200, 24)).columns - 1))
        self.stream.flush()

    def done(self, message: str | None = None) -> None:
        """The bar cleared (and `message` said in its place)."""
        if self.enabled:
            self.stream.write("\r\x1b[2K" + (message + "\n" if message else ""))
            self.stream.flush()
        elif message:
            self.say(message)
