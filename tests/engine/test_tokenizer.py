"""The converted tokenizer against tiktoken, the official tokenizer's engine (a test oracle only).

The official rank file cannot be downloaded here, so the tests train a byte-level BPE vocabulary on
a varied corpus, write it in tiktoken's format and compare our conversion of that file with
`tiktoken.Encoding(pat_str=<the official Kimi pattern>)` on more than a megabyte of text: many
scripts, code, whitespace runs, emoji, digits, contractions and every assigned code point.
"""

from __future__ import annotations

import base64
import random
import subprocess
import sys
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from kimi_desk.engine import tokenizer as tokenizer_module
from kimi_desk.engine.tokenizer import (
    KIMI_SPLIT_PATTERN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    kimi_added_tokens,
    load_tokenizer,
    special_token_names,
    train_ranks,
)

tiktoken = pytest.importorskip("tiktoken")

# The official pattern, copied from kimi-linear-spec.md §7.1 (not from the module under test).
OFFICIAL_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# -- corpus ------------------------------------------------------------------------------------------

PHRASES = [
    "The quick brown fox jumps over the lazy dog. I'm sure it's fine; they'll say we'd've known.",
    "DON'T SHOUT, I'LL HEAR YOU. She'S here, WE'RE there, You'Ve Been warned, he'D go.",
    "Voix ambiguë d'un cœur qui, au zéphyr, préfère les jattes de kiwis. L'été à Paris, c'est très beau.",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. Straße, Maß, Fußgängerübergänge.",
    "El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío, añoraba a su querido cachorro.",
    "À noite, vovô Kowalsky vê o ímã cair no pé do pinguim queixoso e vovó põe açúcar no chá de tâmaras.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Широкая электрификация южных губерний.",
    "Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Τάχιστη αλώπηξ βαφής ψημένη γη, δρασκελίζει υπέρ νωθρού κυνός.",
    "صِف خَلقَ خَودِ كَمِثلِ الشَمسِ إِذ بَزَغَت — يَحظى الضَجيعُ بِها نَجلاءَ مِعطارِ. العدد ١٢٣٤٥ و 2024.",
    "דג סקרן שט בים מאוכזב ולפתע מצא חברה. שלום עולם!",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम।",
    "আমি বাংলায় গান গাই। কত অজানারে জানাইলে তুমি।",
    "யாமறிந்த மொழிகளிலே தமிழ்மொழி போல் இனிதாவது எங்கும் காணோம்.",
    "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน",
    "Tiếng Việt có dấu: Trăm năm trong cõi người ta, chữ tài chữ mệnh khéo là ghét nhau.",
    "我能吞下玻璃而不伤身体。天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。中华人民共和国成立于1949年。",
    "我們的資料庫裡有繁體字：臺灣、電腦、語言模型與長文件。",
    "いろはにほへと　ちりぬるを　わかよたれそ。私はガラスを食べられます。東京タワーは333メートルです。",
    "カタカナとひらがな、漢字が混ざった文章：日本語のテキストを正しく分割する。々〆〇ヶ",
    "키스의 고유조건은 입술끼리 만나야 하고 특별한 기술은 필요치 않다. 다람쥐 헌 쳇바퀴에 타고파.",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig. Zażółć gęślą jaźń.",
    "Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul'da ıhlamur içtik.",
    "ქართული ენა ძალიან ლამაზია. Հայերենը հնդեվրոպական լեզու է։ ሰላም ለዓለም።",
    "Emoji: 🙂😀🎉👍🏽👩‍💻👨‍👩‍👧‍👦🏳️‍🌈🇯🇵🇫🇷 ❤️ ✔︎ ☕ and flags 🇺🇸🇩🇪 with skin tones 👋🏻👋🏿.",
    "Combining: e\u0301 a\u0308 n\u0303 A\u030a Z\u0335\u0336 q\u0327\u0301\u0302 ﬁ ﬂ ﬀ Ⅻ ① ½ ² ³ ℃ ™ Å K ſ 'ſ 'K 'S 'Ll",
    "Numbers 0 1 12 123 1234 12345 123456 3.14159 -42 1e-9 0xFF 1_000_000 ٣٤٥ ४५६ 七八九 ⅔ ⑦",
    "Mixed CamelCaseWords HTTPServer getHTTPResponseCode XMLHttpRequest iPhone eBay McDonald's O'Neill",
    "Whitespace:\t\ttabs  two   three    four\u00a0nbsp\u2009thin\u3000ideographic\u2028line\u2029para\x0bvt\x0cff\x85nel",
    "Windows\r\nline\r\n\r\nendings and\rcarriage returns\n\n\nblank lines   \n  \n",
    "Punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} <<< >>> ||| \\\\ // ;; ::",
    "Quotes “curly” ‘single’ «guillemets» „German“ 「Japanese」『double』 — en–dash … ellipsis",
    "Math ∀x∈ℝ: x²≥0, ∑ᵢ aᵢ = ∫₀^∞ f(x)dx ≈ 3.14 ≠ ∞; α+β=γ; √2; ∂/∂x; ⊕ ⊗ ⇒ ⇔",
    "Odd \ue000\ue001 \ufffd \ufeff a\u200db a\u200cb \u202eabc\u202c soft\u00adhyphen \x00\x01\x1f\x7f",
]

CODE = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "const x = await fetch(`https://example.com/api?q=${encodeURIComponent(query)}&n=10`);\n",
    "SELECT id, name FROM users WHERE created_at >= '2024-01-01' AND status <> 'deleted';\n",
    "    \n        \n\t\n",
    "fn main() { let v: Vec<u8> = vec![0xde, 0xad, 0xbe, 0xef]; println!(\"{:?}\", v); }\n",
    "<div class=\"a\">&nbsp;&lt;tag&gt;</div>\n<!-- comment -->\n",
    '{"key": [1, 2.5, null, true], "nested": {"ключ": "значение", "键": "值"}}\n',
]

SEPARATORS = [" ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "", "    ", "\u3000", "\u00a0"]


def generated_text(size_bytes: int, seed: int, specials: list[str] = ()) -> str:
    """Random slices of the phrases and code above, in random case, glued by assorted whitespace."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size_bytes:
        draw = rng.random()
        if draw < 0.6:
            words = rng.choice(PHRASES).split(" ")
            start = rng.randrange(len(words))
            piece = " ".join(words[start : rng.randrange(start, len(words)) + 1])
            piece = rng.choice([piece, piece, piece, piece.upper(), piece.lower(), piece.title()])
        elif draw < 0.8:
            piece = rng.choice(CODE)
        elif draw < 0.9:
            piece = str(rng.randrange(10 ** rng.randrange(1, 12)))
        elif draw < 0.98 or not specials:
            piece = " " * rng.randrange(1, 40) + rng.choice(["x", "\n", "", "'s", "中", "\t"])
        else:
            piece = rng.choice(specials)
        piece += rng.choice(SEPARATORS)
        parts.append(piece)
        total += len(piece.encode("utf-8"))
    return "".join(parts)


def assigned_code_points() -> list[str]:
    """Every code point assigned in this Python's Unicode version, except surrogates and the
    supplementary private-use planes (130 000 characters that all behave alike)."""
    out = []
    for cp in range(0x110000):
        category = unicodedata.category(chr(cp))
        if category in ("Cn", "Cs") or (category == "Co" and cp > 0xFFFF):
            continue
        out.append(chr(cp))
    return out


def code_point_sweep() -> str:
    """Each assigned character once, in one of several contexts (after letters, Han, digits, space,
    before a contraction...), so that every character class of the pattern meets its neighbours."""
    contexts = ["{c}", "a{c}b", "A{c}", "{c}{c} ", " {c}'s", "中{c}", "1{c}2", "\n{c}", "{c}\u3000"]
    return "".join(contexts[i % len(contexts)].format(c=c) for i, c in enumerate(assigned_code_points()))


def stdlib_text(size_bytes: int) -> str:
    """Python's own sources, and its CJK test texts when the test package is installed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / "test" / "cjkencodings").glob("*-utf8.txt")) + sorted(root.glob("*.py"))
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text.encode("utf-8"))
        if total >= size_bytes:
            break
    return "".join(parts)


# -- fixtures ------------------------------------------------------------------------------------------


def write_rank_file(ranks: dict[bytes, int], path: Path) -> Path:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def oracle(ranks: dict[bytes, int], added: dict[int, str]):
    """tiktoken configured as the official TikTokenTokenizer configures it."""
    n = len(ranks)
    special_tokens = {added.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + 256 + 2)}
    return tiktoken.Encoding(
        "kimi-test", pat_str=OFFICIAL_PATTERN, mergeable_ranks=ranks, special_tokens=special_tokens
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6 000-token vocabulary trained on part of the corpus, its rank file, the converted tokenizer
    and the tiktoken oracle."""
    folder = tmp_path_factory.mktemp("tokenizer")
    training = generated_text(300_000, seed=1) + stdlib_text(300_000)
    ranks = train_ranks((training[i : i + 4000] for i in range(0, len(training), 4000)), vocab_size=6000)
    added = kimi_added_tokens(len(ranks))
    rank_file = write_rank_file(ranks, folder / "tiktoken.model")
    ours = Tokenizer.from_tiktoken_file(rank_file, added, cache_dir=folder / "cache")
    return dict(ranks=ranks, added=added, rank_file=rank_file, ours=ours, oracle=oracle(ranks, added), folder=folder)


def documents(specials: list[str]) -> list[str]:
    """Over a megabyte of varied text, as documents shorter than the official 400 000-character slice
    (slicing is tested on its own below)."""
    docs = [
        generated_text(300_000, seed=2, specials=specials),
        generated_text(300_000, seed=3),
        code_point_sweep(),
        stdlib_text(900_000)[-250_000:],
    ]
    assert all(len(doc) < 400_000 for doc in docs)
    return docs


# -- the pre-tokenizer pattern ------------------------------------------------------------------------


def test_translated_pattern_splits_like_the_official_one_on_every_code_point():
    """The pattern without `&&` splits exactly like the official one, as read by `regex` (V1 mode has
    class intersection) and by `tokenizers`' own engine."""
    regex = pytest.importorskip("regex")
    from tokenizers import Regex, pre_tokenizers

    text = code_point_sweep() + generated_text(100_000, seed=4)

    def split_with_tokenizers(pattern: str) -> list[str]:
        return [piece for piece, _ in pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]

    ours = split_with_tokenizers(KIMI_SPLIT_PATTERN)
    assert "".join(ours) == text
    assert ours == regex.findall("(?V1)" + OFFICIAL_PATTERN, text)
    assert ours == split_with_tokenizers(OFFICIAL_PATTERN)
    assert "&&" not in KIMI_SPLIT_PATTERN


def test_python_whitespace_class_is_str_isspace():
    """split_like_official finds long runs with Python's `\\s`; the official code tests str.isspace()."""
    import re

    assert all((re.fullmatch(r"\s", chr(cp)) is not None) == chr(cp).isspace() for cp in range(0x110000))


# -- ids against tiktoken ----------------------------------------------------------------------------------


def test_ids_equal_tiktoken_on_a_varied_megabyte(trained):
    ours, reference = trained["ours"], trained["oracle"]
    specials = ["<|im_end|>", "[EOS]", "<|im_user|>", f"<|reserved_token_{len(trained['ranks']) + 100}|>"]
    docs = documents(specials)
    assert sum(len(doc.encode("utf-8")) for doc in docs) >= 1_000_000
    for doc in docs:
        expected = reference.encode(doc, allowed_special="all")
        got = ours.encode(doc)
        assert got == expected, _first_difference(expected, got, reference)
        assert ours.decode(got) == doc


def test_special_token_text_is_plain_text_when_not_allowed(trained):
    ours, reference = trained["ours"], trained["oracle"]
    text = generated_text(30_000, seed=5, specials=["<|im_end|>", "[EOS]", "[BOS]", "<|im_middle|>"])
    assert ours.encode(text, allow_special=False) == reference.encode(text, disallowed_special=())
    assert ours.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")
    assert ours.special_tokens["<|im_end|>"] not in ours.encode(text, allow_special=False)


def test_arbitrary_ranks_convert_exactly(tmp_path, trained):
    """The conversion holds for any rank order, not only for a vocabulary BPE training produced:
    shuffle the ranks of the multi-byte tokens (many tokens then form only as whole pieces)."""
    rng = random.Random(0)
    ranks = dict(trained["ranks"])
    multi_byte = [token for token in ranks if len(token) > 1]
    shuffled = [ranks[token] for token in multi_byte]
    rng.shuffle(shuffled)
    ranks.update(zip(multi_byte, shuffled))
    ours = Tokenizer.from_ranks(ranks, trained["added"])
    reference = oracle(ranks, trained["added"])
    text = generated_text(150_000, seed=6) + code_point_sweep()[:100_000]
    expected = reference.encode(text, allowed_special="all")
    assert ours.encode(text) == expected, _first_difference(expected, ours.encode(text), reference)


def official_pieces(text: str) -> list[str]:
    """The official TikTokenTokenizer.encode's slicing, written out independently (spec §7.1)."""
    pieces = []
    for start in range(0, len(text), 400_000):
        chunk = text[start : start + 400_000]
        run_length, run_is_space, piece_start = 0, chunk[0].isspace(), 0
        for i, char in enumerate(chunk):
            if char.isspace() != run_is_space:
                run_length, run_is_space = 1, char.isspace()
            else:
                run_length += 1
                if run_length > 25_000:
                    pieces.append(chunk[piece_start:i])
                    piece_start, run_length = i, 1
        pieces.append(chunk[piece_start:])
    return pieces


def test_long_inputs_are_sliced_like_the_official_encode(trained):
    ours, reference = trained["ours"], trained["oracle"]
    rng = random.Random(7)
    # The first long run crosses the first 400 000-character slice boundary, where run counting restarts.
    text = (
        generated_text(600_000, seed=8)[:390_000]
        + " " * 60_003
        + "x" * 52_001
        + "\n" * 25_000
        + "y" * 25_001
        + generated_text(300_000, seed=9)
        + "".join(rng.choice("ab \n") for _ in range(1000))
    )
    assert len(text) > 400_000
    expected = [i for piece in official_pieces(text) for i in reference.encode(piece, allowed_special="all")]
    assert ours.encode(text) == expected
    assert tokenizer_module.split_like_official(text) == official_pieces(text)
    assert ours.encode("") == []


def _first_difference(expected: list[int], got: list[int], reference) -> str:
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (
        f"first difference at token {index}: expected {expected[index : index + 5]}, got {got[index : index + 5]}, "
        f"around {reference.decode(expected[max(0, index - 5) : index + 5])!r}"
    )


# -- special tokens, loading, caching ---------------------------------------------------------------------------


def test_special_token_names_follow_the_official_rules():
    names = special_token_names(163584, {163586: "<|im_end|>", 163700: "<|custom|>"})
    assert len(names) == 258
    assert names[0] == "[BOS]" and names[2] == "<|im_end|>" and names[163700 - 163584] == "<|custom|>"
    assert names[163593 - 163584] == "[EOT]" and names[163601 - 163584] == "<|im_middle|>"
    assert names[163839 - 163584] == "[PAD]" and names[163589 - 163584] == "<|reserved_token_163589|>"
    assert names[-1] == "<|reserved_token_163841|>"
    # The known table holds absolute ids, so another vocabulary size gets only reserved names.
    assert special_token_names(1000)[0] == "<|reserved_token_1000|>"


def test_load_tokenizer_converts_once_and_caches_atomically(tmp_path, trained, monkeypatch):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "tiktoken.model").write_bytes(trained["rank_file"].read_bytes())
    n = len(trained["ranks"])
    (folder / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"%d": {"content": "[BOS]", "special": true}, "%d": {"content": "<|im_end|>"}},'
        ' "bos_token": "[BOS]", "eos_token": {"content": "<|im_end|>"}}' % (n, n + 2)
    )
    cache = tmp_path / "cache"
    first = load_tokenizer(folder, cache_dir=cache)
    assert first.bos_token_id == n and first.eos_token_id == n + 2
    assert first.id_to_token(n + 1) == f"<|reserved_token_{n + 1}|>"
    cached = list(cache.rglob("*"))
    assert [p.name for p in cached if p.is_file()] == ["tokenizer.json"]

    # A second load reads the cache: converting again would fail.
    monkeypatch.setattr(tokenizer_module, "derive_merges", lambda ranks: pytest.fail("converted twice"))
    second = load_tokenizer(folder, cache_dir=cache)
    assert second.fingerprint == first.fingerprint

    # The cached file, shipped as a checkpoint's tokenizer.json, is the same tokenizer.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "tokenizer.json").write_bytes(next(p for p in cached if p.is_file()).read_bytes())
    from_json = load_tokenizer(shipped)
    assert from_json.fingerprint == first.fingerprint
    text = generated_text(20_000, seed=10, specials=["<|im_end|>"])
    assert from_json.encode(text) == first.encode(text) == trained["oracle"].encode(text, allowed_special="all")


def test_fingerprint_follows_the_vocabulary(trained):
    ranks = trained["ranks"]
    same = Tokenizer.from_ranks(dict(ranks), trained["added"])
    assert same.fingerprint == trained["ours"].fingerprint
    assert len(same.fingerprint) == 64
    renamed = Tokenizer.from_ranks(dict(ranks), {**trained["added"], len(ranks) + 5: "<|other|>"})
    assert renamed.fingerprint != same.fingerprint


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tiktoken.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_text("not-base64!! 0\n")
    with pytest.raises(TokenizerError, match="tiktoken.model:1"):
        load_tokenizer(tmp_path, cache_dir=tmp_path / "cache")
    partial = {bytes([b]): b for b in range(255)}
    with pytest.raises(TokenizerError, match="0xff missing"):
        Tokenizer.from_ranks(partial)


def test_vocabulary_lookups(trained):
    ours = trained["ours"]
    n = len(trained["ranks"])
    assert ours.vocab_size == n + 258
    assert ours.token_to_id("<|im_end|>") == n + 2 and ours.id_to_token(n + 2) == "<|im_end|>"
    space_a = ours.encode(" a")
    assert len(space_a) == 1 and ours.id_to_token(space_a[0]) == "Ġa" and ours.id_to_bytes(space_a[0]) == b" a"
    assert ours.is_special(n) and not ours.is_special(space_a[0])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        ours.decode([ours.vocab_size])
    assert ours.decode([n + 2, *space_a], skip_special_tokens=True) == " a"


def test_decode_replaces_invalid_utf8_like_tiktoken(trained):
    ours, reference = trained["ours"], trained["oracle"]
    rng = random.Random(11)
    for _ in range(200):
        ids = [rng.randrange(len(trained["ranks"])) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == reference.decode(ids)


# -- streaming -------------------------------------------------------------------------------------------------


def test_stream_decoder_never_splits_a_character():
    """With bytes-only tokens every non-ASCII character arrives in pieces."""
    byte_tokenizer = Tokenizer.from_ranks({bytes([b]): b for b in range(256)})
    text = "naïve 中文 🙂👩‍💻 e\u0301 ελληνικά"
    ids = byte_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    stream = StreamDecoder(byte_tokenizer)
    deltas = [stream.push(token_id) for token_id in ids]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in delta for delta in deltas)
    assert sum(1 for delta in deltas if delta) == len(text)


def test_stream_decoder_equals_whole_decode_on_random_ids(trained):
    """Random ids make broken and truncated UTF-8 as well: the deltas still add up to decode()."""
    ours = trained["ours"]
    rng = random.Random(12)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(0, 60))]
        stream, streamed, start = StreamDecoder(ours), "", 0
        while start < len(ids):
            size = rng.randrange(1, 4)
            streamed += stream.push(ids[start : start + size])
            start += size
        assert streamed + stream.flush() == ours.decode(ids)


def test_kimi_desk_never_imports_tiktoken():
    code = (
        "import sys, kimi_desk.engine.tokenizer, kimi_desk.engine.chat, kimi_desk.engine.generate; "
        "assert 'tiktoken' not in sys.modules, 'tiktoken imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
