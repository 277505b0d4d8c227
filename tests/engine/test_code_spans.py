"""Code spans held to the document (engine/code_spans.py): the nearest piece of whole words against a
brute-force scan of every piece of a fresh random document, the rewrite of a reply with the embedded
model's real tokenizer, and the assistant that turns it on for the embedded model only. The decode
loop's part (holding a span back, going back and feeding the new ids) is tested in test_generate.py."""

from __future__ import annotations

import random
import re
import string

import pytest

from kimi_desk.engine.code_spans import CodeSpanCopy, edit_distance
from kimi_desk.engine.loading import DEMO_MODEL
from kimi_desk.engine.tokenizer import load_tokenizer

TEXT = (
    "==> README.md <==\n# harbor\n\n`harbor ships list` lists the saved ships.\n"
    "Environment: `HARBOR_BACKEND=torch` forces the PyTorch kernels.\n"
    "==> src/harbor/berths.py <==\ndef free_berths(port):\n    return [b for b in port.berths if not b.ship]\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_MODEL)


def whole_word_pieces(text: str) -> set[str]:
    """Every piece of `text` within a line and outside backticks that begins where a word begins (or with a non-word
    character) and ends where one ends (or with one), by a regular expression at every place."""
    pieces = set()
    for start in range(len(text)):
        for end in range(start + 1, min(len(text), start + 40) + 1):
            piece = text[start:end]
            if "\n" in piece or "`" in piece:
                break
            before = r"(?<!\w)" if re.match(r"\w", piece[0]) else ""
            after = r"(?!\w)" if re.match(r"\w", piece[-1]) else ""
            if re.compile(before + re.escape(piece) + after).match(text, start):
                pieces.add(piece)
    return pieces


def test_edit_distance_against_the_recursive_definition():
    rng = random.Random()

    def reference(a, b):
        if not a or not b:
            return len(a) + len(b)
        return min(reference(a[1:], b) + 1, reference(a, b[1:]) + 1, reference(a[1:], b[1:]) + (a[0] != b[0]))

    for _ in range(50):
        a, b = ("".join(rng.choice("abc") for _ in range(rng.randint(0, 6))) for _ in range(2))
        assert edit_distance(a, b) == reference(a, b)


def test_a_span_the_document_holds_as_whole_words_stays():
    copy = CodeSpanCopy(None, TEXT)
    for span in ("HARBOR_BACKEND=torch", "harbor ships list", "src/harbor/berths.py", "free_berths"):
        assert copy.holds(span) and copy.nearest(span) is None
    # Inside a longer word is not a name of the document: `ment` of "Environment", `ARBOR`.
    assert not copy.holds("ment") and not copy.holds("ARBOR_BACKEND")


@pytest.mark.parametrize(
    "garbled, meant",
    [
        ("LOBOR_BACKEND=torch", "HARBOR_BACKEND=torch"),
        ("VEXOR_BACKEND", "HARBOR_BACKEND"),
        ("src/harbor/berth.py", "src/harbor/berths.py"),
        ("free_berth", "free_berths"),
        ("harbor ships db", "harbor ships list"),  # not across the backtick before "lists the saved ships"
    ],
)
def test_a_garbled_name_becomes_the_one_read(garbled, meant):
    assert CodeSpanCopy(None, TEXT).nearest(garbled) == meant


def test_a_garbled_path_becomes_the_whole_path_read():
    """Cut before its extension, or its start left out, a path stands for the file the text names: the
    nearest piece of whole words would stop at the dot ("berths" of "berths.py")."""
    copy = CodeSpanCopy(None, TEXT + "See tirobyel/raveskwyn/names/test/test_examples.py.\n")
    assert copy.nearest("src/harbor/berthz") == "src/harbor/berths.py"
    assert copy.nearest("tirobyel/raveskwyn/names/test/test_exampl") == "tirobyel/raveskwyn/names/test/test_examples.py"
    assert copy.nearest("raveskwyn/names/test/test_examples.p") == "tirobyel/raveskwyn/names/test/test_examples.py"
    # Too far from the whole path to widen at the start: the end still takes the extension.
    assert copy.nearest("names/test/test_exampl") == "names/test/test_examples.py"


@pytest.mark.parametrize("span", ["P", "kubernetes", "a whole sentence the document never said", ""])
def test_a_span_far_from_every_name_stays(span):
    assert CodeSpanCopy(None, TEXT).nearest(span) is None


def test_the_nearest_piece_in_a_random_document_is_the_closest_whole_word_piece():
    """A fresh random document of random identifiers and punctuation; a piece of it garbled by one or two
    edits: the rewrite is a piece of whole words, within a third of the span's length, and no piece of
    the document (every one scanned) is nearer."""
    rng = random.Random()
    alphabet = string.ascii_letters + string.digits + "_"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(6, 12))) for _ in range(60)]
    document = "".join(rng.choice(words) + rng.choice([" ", "=", "/", ".", "\n", " = ", "`"]) for _ in range(300))
    pieces = whole_word_pieces(document)
    copy = CodeSpanCopy(None, document)
    for _ in range(40):
        start = rng.randrange(len(document) - 30)
        while not re.match(r"\w", document[start]) or (start and re.match(r"\w", document[start - 1])):
            start += 1
        meant = re.match(r"\w+(?:[=.]\w+)?", document[start:]).group(0)  # paths: the test after this one
        garbled = list(meant)
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(garbled))
            garbled[at : at + 1] = rng.choice([[], [rng.choice(alphabet)], [garbled[at], rng.choice(alphabet)]])
        garbled = "".join(garbled)
        result = copy.nearest(garbled)
        if garbled in pieces:
            assert result is None
            continue
        best = min(edit_distance(garbled, piece) for piece in pieces if abs(len(piece) - len(garbled)) <= 4)
        if best > len(garbled) // 3:
            assert result is None, (garbled, result)
        else:
            assert result in pieces and edit_distance(garbled, result) == best, (garbled, meant, result)


def test_a_path_cut_short_in_a_random_document_becomes_the_whole_path():
    """Fresh random paths in a random listing; one cut before its extension, and garbled by an edit as
    well: the rewrite is that whole path."""
    rng = random.Random()
    alphabet = string.ascii_lowercase + string.digits + "_"

    def word():
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 10)))

    paths = [
        "/".join(word() for _ in range(rng.randint(2, 4))) + rng.choice([".py", ".md", ".tar.gz"]) for _ in range(80)
    ]
    copy = CodeSpanCopy(
        None, "".join(f"{rng.choice(['==> ', 'see ', ''])}{path}{rng.choice(['.', ' <==', ''])}\n" for path in paths)
    )
    for path in rng.sample(paths, 30):
        cut = path[: path.index(".")]
        assert copy.nearest(cut) == path  # held as whole words, but only as the start of this file
        at = rng.choice([i for i, char in enumerate(cut) if char != "/"])
        assert copy.nearest(cut[:at] + "Q" + cut[at + 1 :]) == path
    # A directory, a path that stands on its own: kept.
    assert copy.nearest(paths[0][: paths[0].rindex("/")]) is None
    assert CodeSpanCopy(None, "see harbor/berths and harbor/berths.py\n").nearest("harbor/berths") is None


def test_rewrite_puts_the_name_read_in_the_reply(tokenizer):
    copy = CodeSpanCopy(tokenizer, TEXT).joined("Which variable forces the PyTorch kernels?")
    reply = tokenizer.encode("Set `LOBOR_BACKEND=torch` to force them.", allow_special=False)
    opened_at = next(i for i in range(len(reply)) if copy.is_open(reply[: i + 1]))
    new = copy.rewrite(reply, opened_at)
    assert tokenizer.decode(reply[:opened_at] + new) == "Set `HARBOR_BACKEND=torch` to force them."
    assert copy.rewritten == [("LOBOR_BACKEND=torch", "HARBOR_BACKEND=torch")]  # kept for a look at what was written
    # Left open at the end of the reply: closed here.
    unclosed = tokenizer.encode("Set `LOBOR_BACKEND", allow_special=False)
    assert tokenizer.decode(unclosed[:opened_at] + copy.rewrite(unclosed, opened_at)) == "Set `HARBOR_BACKEND`"
    kept = tokenizer.encode("Set `HARBOR_BACKEND=torch`.", allow_special=False)
    assert copy.rewrite(kept, opened_at) is None and not copy.is_open(kept)


TABLE = (
    "| variable | effect |\n|---|---|\n| `HARBOR_HOME` | one folder for the data |\n"
    "| `HARBOR_DEBUG=1` | prints tracebacks |\n| `HARBOR_KERNELS=torch` | forces the PyTorch kernels |\n"
    "| `HARBOR_PDL=0` | launches without PDL |\n| `harbor ships` | lists the ships |\n"
)


def test_the_candidates_are_the_nearest_piece_then_the_code_spans_of_its_family():
    """A garbled name stands for the nearest piece of whole words or for any of the document's code spans
    that begin as it begins ("HARBOR"), nearest first; a name the document holds has none."""
    copy = CodeSpanCopy(None, TABLE)
    assert copy.candidates("HARBOR_DEBG=1") == ["HARBOR_DEBUG=1", "HARBOR_PDL=0", "HARBOR_HOME", "HARBOR_KERNELS=torch"]
    # Too far from every piece for the edit distance alone: the family still stands.
    assert copy.nearest("HARBOR_X") is None
    assert copy.candidates("HARBOR_X") == ["HARBOR_HOME", "HARBOR_PDL=0", "HARBOR_DEBUG=1", "HARBOR_KERNELS=torch"]
    assert copy.candidates("HARBOR_KERNELS=torch") == [] and copy.candidates("kubernetes") == []


def test_rewrite_takes_the_candidate_the_model_rates_highest(tokenizer):
    """The likelihoods get each candidate's ids for the reply from the span on; the highest wins, the
    first (nearest) on a tie. Without likelihoods only the nearest piece stands."""
    copy = CodeSpanCopy(tokenizer, TABLE)
    reply = tokenizer.encode("Set `HARBOR_DEBG=1` for that.", allow_special=False)
    opened_at = next(i for i in range(len(reply)) if copy.is_open(reply[: i + 1]))
    head = tokenizer.decode(reply[:opened_at])
    asked = []

    def prefer_kernels(candidates):
        asked.extend(tokenizer.decode(ids) for ids in candidates)
        return [1.0 if "KERNELS" in text else 0.0 for text in asked[-len(candidates) :]]

    new = copy.rewrite(reply, opened_at, prefer_kernels)
    assert head + tokenizer.decode(new) == "Set `HARBOR_KERNELS=torch` for that."
    assert asked[0] == " `HARBOR_DEBUG=1` for that." and len(asked) == 4
    assert (
        head + tokenizer.decode(copy.rewrite(reply, opened_at, lambda c: [0.0] * len(c)))
        == "Set `HARBOR_DEBUG=1` for that."
    )
    assert head + tokenizer.decode(copy.rewrite(reply, opened_at)) == "Set `HARBOR_DEBUG=1` for that."


def test_the_embedded_model_copies_code_spans_and_another_does_not(tmp_path):
    """The rule follows where the model was loaded from: the same weights in another folder stand for
    a model the user chose."""
    import shutil

    from kimi_desk.engine.session import Assistant

    assert Assistant.load(DEMO_MODEL).copies_code_spans
    elsewhere = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, elsewhere)
    assert not Assistant.load(elsewhere).copies_code_spans
