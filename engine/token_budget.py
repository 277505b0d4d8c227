"""Tokenizing a document no further than the model can read it.

A document's text can be far larger than the model's context: raising `--max-total-bytes` lets a
200 MB file through the loader, and encoding it whole holds all its tokens, with the tokenizer's
per-token bookkeeping, in memory (14 GB in the report that found it) only to learn that it does
not fit. Its size cannot settle it beforehand: a token is at least one byte, so the size bounds
the token count from above, never from below. So the text is encoded a slice at a time and the
count checked after each slice; the first slice that takes the total past the limit ends the
encoding with one line that names the document, its size and the limit.

The slices are the ones engine/tokenizer.py cuts any text into before encoding it
(`split_like_official`: 400,000-character pieces encoded independently), so encoding slice by
slice gives exactly the ids of encoding the text whole.
"""

from __future__ import annotations

from kimi_desk.engine.errors import UserError
from kimi_desk.engine.ingest.render import display_path
from kimi_desk.engine.tokenizer import OFFICIAL_MAX_ENCODE_CHARS

# Characters encoded at once: at most one slice's tokens are held beyond the limit.
SLICE_CHARS = OFFICIAL_MAX_ENCODE_CHARS


class DocumentTooLong(UserError):
    """The document has more tokens than the model reads before a question; the message is one line."""


def encode_within(tokenizer, texts: list[str], max_tokens: int, name: str) -> list[list[int]]:
    """The ids of each text (`tokenizer.encode(text, allow_special=False)`), or DocumentTooLong as soon
    as their running total passes `max_tokens`; `name` is the document's, for the message."""
    units: list[list[int]] = []
    total = 0
    for index, text in enumerate(texts):
        ids: list[int] = []
        for start in range(0, len(text), SLICE_CHARS):
            ids += tokenizer.encode(text[start : start + SLICE_CHARS], allow_special=False)
            if total + len(ids) > max_tokens:
                read = sum(len(earlier) for earlier in texts[:index]) + min(start + SLICE_CHARS, len(text))
                raise DocumentTooLong(_too_long(name, texts, read, total + len(ids), max_tokens))
        units.append(ids)
        total += len(ids)
    return units


def _too_long(name: str, texts: list[str], read: int, tokens: int, max_tokens: int) -> str:
    """One line: the document, how much of it made how many tokens, and the limit."""
    size = sum(len(text) for text in texts)
    if read == size:
        counted = f"its {size:,} characters are"
    else:
        counted = f"its first {read:,} characters (of {size:,}) are already"
    return (
        f"{display_path(name)} is too long for this model: {counted} {tokens:,} tokens, and it reads at most "
        f"{max_tokens:,} before a question"
    )
