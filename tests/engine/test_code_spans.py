"""Code spans held to the document (engine/code_spans.py), with the embedded model's real tokenizer:
the allowed tokens against a brute-force scan of the whole vocabulary, the decode loop's restriction,
and the assistant that turns it on for the embedded model only."""

from __future__ import annotations

import random

import pytest
import torch

from kimi_desk.engine.code_spans import CodeSpanCopy, SpanVocabulary
from kimi_desk.engine.loading import DEMO_MODEL
from kimi_desk.engine.tokenizer import load_tokenizer

TEXT = (
    "==> README.md <==\n# harbor\n\n`harbor ships list` lists the saved ships.\n"
    "Environment: `HARBOR_BACKEND=torch` forces the PyTorch kernels.\n"
    "==> src/harbor/berths.py <==\ndef free_berths(port):\n    return [b for b in port.berths if not b.ship]\n"
)
STOPS = [7, 11]


@pytest.fixture(scope="module")
def vocabulary():
    return SpanVocabulary(load_tokenizer(DEMO_MODEL), STOPS)


def token_texts(tokenizer) -> dict[int, str]:
    texts = {t: tokenizer.decode([t], skip_special_tokens=True) for t in range(tokenizer.vocab_size)}
    return {t: text for t, text in texts.items() if text and "\ufffd" not in text}


def brute_force(vocabulary, span: str) -> list[int]:
    """Inside a span: every token of at most one backtick whose text before it keeps `span` a piece of
    TEXT, or (when the span is not empty) that closes it at once; and the stops."""
    allowed = []
    for token, text in token_texts(vocabulary.tokenizer).items():
        head = text.split("`", 1)[0]
        if text.count("`") <= 1 and ((head and span + head in TEXT) or (not head and "`" in text and span)):
            allowed.append(token)
    return sorted(allowed + STOPS)


def test_outside_a_span_only_openers_of_text_elsewhere_are_barred(vocabulary):
    tokenizer = vocabulary.tokenizer
    copy = CodeSpanCopy(vocabulary, TEXT)
    barred = {
        t
        for t, text in token_texts(tokenizer).items()
        if text.count("`") % 2 and text.rsplit("`", 1)[1] and text.rsplit("`", 1)[1] not in TEXT
    }
    assert barred, "the vocabulary has tokens that open a span with text"
    for reply in ([], tokenizer.encode("Run `harbor ships list` to see them.")):
        assert set(range(tokenizer.vocab_size)) - set(copy.allowed(reply)) == barred


@pytest.mark.parametrize("reply", ["The variable is `", "`HAR", "`harbor ships", "Set `src/harbor/b", "`free_"])
def test_inside_a_span_the_tokens_keep_it_in_the_document(vocabulary, reply):
    copy = CodeSpanCopy(vocabulary, TEXT)
    span = reply[reply.rindex("`") + 1 :]
    assert sorted(copy.allowed(vocabulary.tokenizer.encode(reply))) == brute_force(vocabulary, span)


def test_a_span_opened_in_a_random_document_starts_with_any_piece_of_it(vocabulary):
    """The first token of a span, on a fresh document of random pieces of the vocabulary's own texts (long
    heads among them): every token whose text before a backtick occurs in the document."""
    rng = random.Random()
    texts = list(token_texts(vocabulary.tokenizer).values())
    document = "".join(rng.choice(texts) + rng.choice(["", " ", "\n", "_"]) for _ in range(3000))
    document = document.replace("`", "'")
    heads = {t: text.split("`", 1)[0] for t, text in token_texts(vocabulary.tokenizer).items() if text.count("`") <= 1}
    expected = sorted([t for t, head in heads.items() if head and head in document] + STOPS)
    copy = CodeSpanCopy(vocabulary, document)
    assert sorted(copy.allowed(vocabulary.tokenizer.encode("`"))) == expected
    assert any(len(heads[t]) > 4 for t in expected), "long heads are checked against the whole text"


def test_a_span_the_document_does_not_continue_can_only_close(vocabulary):
    """A span already off the document (opened before the restriction, or copied from a question that
    is not joined) can only be closed."""
    copy = CodeSpanCopy(vocabulary, TEXT)
    assert copy.allowed(vocabulary.tokenizer.encode("`LOBOR")) == vocabulary.closing + STOPS


def test_a_joined_question_adds_its_names(vocabulary):
    question = "What does `zorbdello` do?"
    document = CodeSpanCopy(vocabulary, TEXT)
    copy = document.joined(question)
    allowed = copy.allowed(vocabulary.tokenizer.encode("`zorb"))
    tokenizer = vocabulary.tokenizer
    assert any(tokenizer.decode([t]).startswith("d") for t in allowed)
    # A span's first token: the document's starts (found once, kept) and the question's.
    heads = {t: text.split("`", 1)[0] for t, text in token_texts(tokenizer).items() if text.count("`") <= 1}
    joined = f"{TEXT}\n{question}"
    expected = sorted([t for t, head in heads.items() if head and head in joined] + STOPS)
    assert sorted(copy.allowed(tokenizer.encode("`"))) == expected
    assert document._starts is not None and copy.joined("And?")._base is copy


def test_greedy_replies_with_a_restriction_take_only_allowed_tokens(tmp_path):
    """stream_tokens' allowed_tokens, on a random tiny model (eager path): every token is one the
    callback allowed for the reply so far, and the callback sees the reply grow token by token."""
    from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint
    from kimi_desk.engine import load_model
    from kimi_desk.engine.generate import Sampling, generate

    model = load_model(write_random_checkpoint(tiny_config(), tmp_path, seed=3), device="cpu", dtype=torch.float32)
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    seen_replies, choices = [], {}

    def allowed(reply):
        seen_replies.append(list(reply))
        if len(reply) % 2:
            return None
        choices[len(reply)] = rng.sample(range(model.config.vocab_size), 3)
        return choices[len(reply)]

    prompt = [rng.randrange(model.config.vocab_size) for _ in range(12)]
    for sampling in (Sampling(0.0), Sampling(0.9, seed=1)):
        seen_replies.clear()
        result = generate(
            model,
            prompt,
            model.new_state(1),
            max_new_tokens=9,
            stop_token_ids=[],
            sampling=sampling,
            allowed_tokens=allowed,
        )
        assert len(result.token_ids) == 9
        # (the step after the last also asks: the next token is chosen with the last one fed)
        assert seen_replies[:9] == [result.token_ids[:n] for n in range(9)]
        for n, token in enumerate(result.token_ids):
            if n % 2 == 0:
                assert token in choices[n]


def test_the_embedded_model_copies_code_spans_and_another_does_not(tmp_path):
    """The rule follows where the model was loaded from: the same weights in another folder stand for
    a model the user chose."""
    import shutil

    from kimi_desk.engine.session import Assistant

    assert Assistant.load(DEMO_MODEL).copies_code_spans
    elsewhere = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, elsewhere)
    assert not Assistant.load(elsewhere).copies_code_spans
