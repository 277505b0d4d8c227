"""Random mutations of valid files, for the fuzz tests of the readers of files that come from outside
(config.json, safetensors headers, snapshots).

Each case is drawn from its own seed, so a failure names the seed that reproduces it. Mutations:
- of bytes: bit flips, truncation, insertion of random or repeated bytes, deletion of a run, a run
  overwritten by 0x00 / 0xFF;
- of JSON: a value anywhere in the document swapped for another type, a huge or non-finite number, a
  hostile string (a path out of the folder, megabytes), deep nesting; a key duplicated with another value;
  a key deleted.

`check_case` runs one case under a time bound and says what it ended in: a valid result, or the one-line
error of the module's error class; anything else fails the test with the seed.
"""

from __future__ import annotations

import json
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

# Values a JSON value is swapped for: every JSON type, the edges of the integers and floats, numbers too
# large for any size, strings that name paths out of a folder.
HOSTILE_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    10**30,
    10**400,
    0.5,
    -0.0,
    1e308,
    1e-308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "0",
    "1",
    "x" * 5000,
    "../../outside.safetensors",
    "/etc/passwd",
    "a/b.safetensors",
    "..",
    "\u0000",
    "\U0001f600",
    [],
    [0],
    [1, "a"],
    [None] * 300,
    {},
    {"a": 1},
    {"dtype": "F32", "shape": [], "data_offsets": [0, 0]},
]
DEEP = "\u0000deep\u0000"  # stands for nesting too deep to build as a Python value
DUPLICATE = "\u0000dup\u0000"  # a key suffix; the serialized key loses it, so the key appears twice


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random byte-level mutation of `data`, and a description of it."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))), "random bytes"
    at = rng.randrange(len(data))
    run = rng.randrange(1, 64)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "repeat", "delete", "zeros", "ones"])
    if kind == "flip":
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(len(data))
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
        return data, "bit flips"
    if kind == "truncate":
        return data[:at], f"truncated to {at}"
    if kind == "insert":
        return data[:at] + bytes(rng.randrange(256) for _ in range(run)) + data[at:], f"{run} bytes inserted at {at}"
    if kind == "repeat":
        return data[:at] + data[at : at + run] * rng.randrange(2, 50) + data[at:], f"bytes at {at} repeated"
    if kind == "delete":
        return data[:at] + data[at + run :], f"{run} bytes deleted at {at}"
    fill = b"\x00" if kind == "zeros" else b"\xff"
    return data[:at] + fill * run + data[at + run :], f"{run} bytes at {at} set to {fill!r}"


def _nodes(value, path=()):
    """Every (path, value) in a JSON document, the root included."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, path + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _nodes(child, path + (i,))


def _replace(document, path, new):
    if not path:
        return new
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return document


def mutate_json(document, rng: random.Random) -> tuple[str, str]:
    """One random mutation of a JSON document (a parsed value, not changed), as JSON text, and a
    description of it."""
    document = json.loads(json.dumps(document))
    path, node = rng.choice(list(_nodes(document)))
    kind = rng.choice(["swap", "swap", "swap", "deep", "duplicate", "delete"])
    if kind in ("duplicate", "delete"):
        objects = [(p, n) for p, n in _nodes(document) if isinstance(n, dict) and n]
        if not objects:
            kind = "swap"
        else:
            path, node = rng.choice(objects)
            key = rng.choice(list(node))
            if kind == "delete":
                del node[key]
                return json.dumps(document), f"{'.'.join(map(str, path + (key,)))} deleted"
            node[key + DUPLICATE] = rng.choice(HOSTILE_VALUES)
            text = json.dumps(document).replace(json.dumps(key + DUPLICATE), json.dumps(key))
            return text, f"{'.'.join(map(str, path + (key,)))} duplicated"
    where = ".".join(map(str, path)) or "the root"
    if kind == "deep":
        depth = rng.choice([100, 990, 5000, 200_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        text = json.dumps(_replace(document, path, DEEP)).replace(
            json.dumps(DEEP), opener * depth + "1" + closer * depth
        )
        return text, f"{where} nested {depth} deep"
    new = rng.choice(HOSTILE_VALUES)
    return json.dumps(_replace(document, path, new)), f"{where} set to {str(new)[:40]!r}"


class CaseTimedOut(Exception):
    pass


@contextmanager
def time_bound(seconds: float):
    """Fail a case that runs longer than `seconds` (a hang, or a loop over a size from the file)."""

    def expire(*_):
        raise CaseTimedOut(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_case(run, error: type[Exception], seed: int, what: str, max_message: int = 400, seconds: float = 10.0) -> str:
    """Run one case: 'ok' when it returned, 'refused' when it raised `error` with a one-line message of
    at most `max_message` characters; anything else (another exception, a long or multi-line message,
    running past `seconds`) fails the test, naming the seed and the mutation."""
    started = time.monotonic()
    try:
        with time_bound(seconds):
            run()
    except error as exc:
        text = str(exc)
        assert "\n" not in text and len(text) <= max_message, f"seed {seed} ({what}): message {text[:300]!r}..."
        return "refused"
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        raise AssertionError(
            f"seed {seed} ({what}): {type(exc).__name__}: {str(exc)[:300]} after {time.monotonic() - started:.1f} s"
        ) from exc
    return "ok"


def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `root` except those under `skip`: compared before and after a
    case, it shows any write or deletion outside the folder the case may touch."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and (skip is None or skip not in p.parents)
    }
