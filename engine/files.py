"""Reading files that come from outside (a model folder, a snapshot, an imported session): JSON bounded
in size and depth, file names that must stay inside their folder, and values shown briefly in messages.

Whatever such a file holds, reading it ends in a value or in one short line saying what is wrong; a
size, a name or a value from it never makes the reader allocate, print or reach further than it should.
"""

from __future__ import annotations

import json
from pathlib import Path

from kimi_desk.engine.errors import CheckpointError, UserError

# A checkpoint's index lists every tensor once: about 20k lines (1.5 MB) for the 48B model, ten times
# that for the largest open models.
INDEX_MAX_BYTES = 64 << 20


class BadJSON(UserError):
    """A file that is not JSON read_json accepts; the message is the reason only (the caller names the file)."""


def read_json(path: Path, max_bytes: int):
    """The JSON value in `path`, refused when the file is larger than `max_bytes`, not UTF-8, not JSON,
    or nested too deeply to parse. FileNotFoundError passes through (callers say "missing" their way)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BadJSON(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > max_bytes:
        raise BadJSON(f"larger than {max_bytes:,} bytes, more than such a file ever needs")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BadJSON("not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadJSON(f"not valid JSON ({first_line(exc)})") from None


def first_line(exc: BaseException, limit: int = 120) -> str:
    """An exception's message as one line of at most `limit` characters (its type when it has none)."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief(value, limit: int = 60) -> str:
    """A value from a file, for a message: a scalar's repr cut to `limit` characters, a list's or an
    object's kind and size. It never walks into the value, so a huge or deeply nested one costs nothing."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return f"an object of {len(value)} key{'' if len(value) == 1 else 's'}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_name(name: str, limit: int = 120) -> str:
    """A name from a file (a tensor's, a file's) for a message: as it is when short and printable, else
    its repr cut to `limit` characters (a name can hold newlines, or be megabytes long)."""
    return name if len(name) <= limit and name.isprintable() else brief(name, limit)


def some(items, limit: int = 8) -> str:
    """A list for a message: its first `limit` items, and how many there are when that is not all."""
    items = list(items)
    shown = ", ".join(brief(item) for item in items[:limit])
    return f"[{shown}]" if len(items) <= limit else f"[{shown}, ... ({len(items)} in all)]"


def is_count(value) -> bool:
    """A non-negative JSON integer (JSON's true and false are not numbers)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_file_name(name) -> bool:
    """A file directly inside a folder: a string with no separator, no drive, not hidden, not '.' or '..'."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and not name.startswith(".")
        and not any(c in name for c in "/\\:\0")
    )


def index_shards(index: Path) -> list[str]:
    """The shard names a model.safetensors.index.json lists (the values of its weight_map), sorted. The
    index comes with the checkpoint, so each must be a .safetensors file in the checkpoint's own folder:
    a name like ../x or /x never makes us read or fetch a file elsewhere."""
    try:
        raw = read_json(index, INDEX_MAX_BYTES)
    except BadJSON as exc:
        raise CheckpointError(f"{index}: {exc}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a valid safetensors index (it needs a weight_map object)")
    shards = set()
    for name in weight_map.values():
        if not (is_plain_file_name(name) and name.endswith(".safetensors")):
            raise CheckpointError(f"{index}: the index names {brief(name)}, not a .safetensors file in its folder")
        shards.add(name)
    return sorted(shards)
