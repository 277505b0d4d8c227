"""Bytes to text, or the verdict that the bytes are not text.

UTF-8 first (with or without a BOM), UTF-16/32 when a BOM says so, then Windows-1252 for the old
8-bit text files that books and legacy code still come in, but only when the result has no control
characters, which is what compressed or binary data would show. Line ends become "\\n".
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# Longest BOMs first: the UTF-32 LE BOM starts with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# C0 controls other than tab, line feed, form feed and carriage return, plus DEL: plain text has
# none of them (escape sequences in logs are the rare exception, and are worth leaving out too).
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class DecodedText:
    text: str
    encoding: str


def decode_text(data: bytes) -> DecodedText | None:
    """The text in `data`, or None when it is binary or in no encoding we can tell."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode_strict(data[len(bom) :], encoding)
    if b"\x00" in data:
        return None
    decoded = _decode_strict(data, "utf-8")
    if decoded is not None:
        return decoded
    fallback = _decode_strict(data, "cp1252")
    if fallback is None or _CONTROL_CHARACTERS.search(fallback.text):
        return None
    return fallback


def longest_line_length(text: str) -> int:
    return max((len(line) for line in text.split("\n")), default=0)


def _decode_strict(data: bytes, encoding: str) -> DecodedText | None:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return DecodedText(text=_normalise_line_ends(text), encoding=encoding)


def _normalise_line_ends(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")
