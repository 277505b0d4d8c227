"""Tokenizing no further than the model reads: the embedded tokenizer on generated text of several MB,
counting what reaches it."""

from __future__ import annotations

import random

import pytest

from kimi_desk.assets import ASSETS_DIR
from kimi_desk.engine.token_budget import SLICE_CHARS, DocumentTooLong, encode_within
from kimi_desk.engine.tokenizer import load_tokenizer

WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "def", "return", "(x)", "0x1f", "数据", "naïve", "\t", "{}", "::"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS_DIR / "model")


class CountingTokenizer:
    """The tokenizer, noting how many characters each encode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        self.calls.append(len(text))
        return self.tokenizer.encode(text, allow_special=allow_special)


def generated_text(characters: int, seed: int = 0) -> str:
    """Lines of random words, code-like punctuation and some non-ASCII, `characters` long."""
    generator = random.Random(seed)
    pieces, length = [], 0
    while length < characters:
        line = " ".join(generator.choice(WORDS) for _ in range(generator.randint(1, 14))) + "\n"
        pieces.append(line)
        length += len(line)
    return "".join(pieces)[:characters]


def test_a_text_of_megabytes_stops_after_the_slice_that_passes_the_limit(tokenizer):
    huge = generated_text(6_000_000)
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DocumentTooLong) as raised:
        encode_within(counting, ["(tree)\n", huge], max_tokens=50_000, name="huge.txt")
    # The limit is passed inside the first slice of the big text: nothing after it is encoded.
    assert counting.calls == [7, SLICE_CHARS]
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(
        "huge.txt is too long for this model: its first 400,007 characters (of 6,000,007) are already "
    )
    assert message.endswith(" tokens, and it reads at most 50,000 before a question")


def test_texts_after_the_one_that_passes_the_limit_are_never_encoded(tokenizer):
    counting = CountingTokenizer(tokenizer)
    texts = [generated_text(20_000, seed) for seed in range(5)]
    fits = sum(len(tokenizer.encode(text, allow_special=False)) for text in texts[:2])
    with pytest.raises(DocumentTooLong):
        encode_within(counting, texts, max_tokens=fits + 10, name="folder")
    assert counting.calls == [20_000, 20_000, 20_000]


def test_ids_are_those_of_each_text_encoded_whole(tokenizer):
    # Three slices, the middle one cut inside a word and inside a run of spaces.
    text = generated_text(SLICE_CHARS - 3) + "wordsplit" + " " * 40 + generated_text(SLICE_CHARS + 500, seed=1)
    texts = ["", "==> a.py <==\nx = 1\n\n", text]
    units = encode_within(tokenizer, texts, max_tokens=10_000_000, name="doc")
    assert units == [tokenizer.encode(text, allow_special=False) for text in texts]


def test_exactly_at_the_limit_fits(tokenizer):
    text = generated_text(5_000)
    count = len(tokenizer.encode(text, allow_special=False))
    assert encode_within(tokenizer, [text], max_tokens=count, name="doc") == [
        tokenizer.encode(text, allow_special=False)
    ]
    with pytest.raises(
        DocumentTooLong, match=f"its 5,000 characters are {count:,} tokens, and it reads at most {count - 1:,} before"
    ):
        encode_within(tokenizer, [text], max_tokens=count - 1, name="doc")


def test_a_control_character_in_the_name_is_escaped(tokenizer):
    with pytest.raises(DocumentTooLong, match=r"^evil\\u001b\[31m\.txt is too long"):
        encode_within(tokenizer, ["some words"], max_tokens=1, name="evil\x1b[31m.txt")
