"""Numbers, sizes, durations and dates as the UI writes them. Pure functions, tested without a UI."""

from __future__ import annotations

import datetime
import math
import unicodedata
from pathlib import Path


def tokens(n: int) -> str:
    return f"{n:,}"


def nbytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """Rounded the way a person reads a time left: "12 s", "3 min 20 s", "1 h 05 min"."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clock(seconds: float | None) -> str:
    """A time as a clock shows it: "4:05", "1:02:03" ("?" when unknown), for lines redrawn in place."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def fit(line: str, width: int) -> str:
    """`line` cut to `width` characters, ending in "…" when cut."""
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def estimate(tokens_to_read: int, tokens_per_second: float | None) -> str:
    """The line shown before reading: how long reading will take here."""
    if tokens_to_read <= 0:
        return "resumed: 0 tokens to read"
    if not tokens_per_second:
        return f"{tokens(tokens_to_read)} tokens to read"
    minutes = tokens_to_read / tokens_per_second / 60
    when = "under a minute" if minutes < 1 else f"{math.ceil(minutes):,} min"
    return (
        f"{tokens(tokens_to_read)} tokens to read: estimated {when} on this device "
        f"(about {tokens_per_second:,.0f} tokens/s)"
    )


def ago(iso_timestamp: str, now: datetime.datetime) -> str:
    """ "just now", "5 min ago", "3 h ago", "yesterday", "4 days ago", then the date."""
    try:
        then = datetime.datetime.fromisoformat(iso_timestamp)
    except ValueError:
        return iso_timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.timezone.utc)
    seconds = (now - then).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    days = int(seconds // 86400)
    if days == 1:
        return "yesterday"
    if days < 7:
        return f"{days} days ago"
    return then.date().isoformat()


def short_path(path: str) -> str:
    """A path with the home folder written as ~, as people write it."""
    try:
        return "~/" + Path(path).relative_to(Path.home()).as_posix()
    except ValueError:
        return path


def model_label(model: str) -> str:
    """A model as the status line names it: a local folder by its name, a hub id as it is."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def printable(text: str, limit: int | None = None) -> str:
    """Text that came from outside (a session's name, a path, an archive) made safe to print on a
    terminal: control and format characters (escape sequences, bidirectional overrides) shown as
    \\uXXXX, and at most `limit` characters, ending in "…" when cut."""
    safe = "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)
    return safe if limit is None or len(safe) <= limit else safe[: limit - 1] + "…"


def unreadable_sessions(unreadable) -> str:
    """One line on the session folders that cannot be read, so they are never silently missing."""
    if not unreadable:
        return ""
    count = len(unreadable)
    listed = "; ".join(f"{u.id}: {printable(u.reason, 120)}" for u in unreadable[:3])
    more = f"; and {count - 3} more" if count > 3 else ""
    noun = "session cannot" if count == 1 else "sessions cannot"
    return (
        f"{count} {noun} be read and {'is' if count == 1 else 'are'} not listed ({listed}{more}); "
        "'kimi-desk sessions rm ID' removes one."
    )
