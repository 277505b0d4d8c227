"""The Kimi tokenizer on the `tokenizers` library (kimi-linear-spec.md §7.1, §7.2).

A checkpoint folder ships either a `tokenizer.json`, loaded as it is, or the official `tiktoken.model`
(lines of `base64(token bytes) rank`), which is converted once into an equivalent byte-level BPE
`tokenizer.json` and cached. The conversion is exact, not approximate:

* Merges. tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank. A
  piece that tiktoken forms inside a longer word is always formed exactly as BPE on that piece's own
  bytes would form it (pairs crossing its edges are never merged, and pairs elsewhere do not touch its
  inside), so every piece ever formed comes from one split: the last merge of BPE run on the token's
  own bytes. One merge per token, ordered by the token's rank, therefore makes the `tokenizers` BPE
  pick the same pair as tiktoken at every step. A token that BPE on its own bytes cannot form is only
  ever produced by whole-piece lookup, which `ignore_merges` reproduces.
* Pre-tokenizer. The official pattern uses `[...&&[^\\p{Han}]]` class intersection. It is rewritten as
  `(?:(?!\\p{Han})[...])`, a per-character lookahead that any backtracking engine reads the same way;
  tests/engine/test_tokenizer.py checks it against the original on every assigned code point.
* Chunking. The official `encode` cuts text into 400 000-character pieces and cuts runs of more than
  25 000 whitespace or non-whitespace characters before encoding each piece separately; `encode` here
  does the same, so long inputs give the official ids too.

`tiktoken` is never imported here: it is a test oracle only.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _BackendTokenizer

from kimi_desk.engine.atomic import atomic_write
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.files import BadJSON, first_line, read_json


class TokenizerError(UserError):
    """A tokenizer file that cannot be read or converted; the message names the file."""


# The pattern exactly as the official TikTokenTokenizer passes it to tiktoken (spec §7.1). Kept for
# reference and tests; it needs an engine with `&&` class intersection.
TIKTOKEN_KIMI_PATTERN = "|".join(
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

# The same pattern without class intersection: each `[X&&[^\p{Han}]]` becomes `(?:(?!\p{Han})[X])`,
# "one character of X that is not Han". Used in the converted tokenizer.json.
_UPPER_NOT_HAN = r"(?:(?!\p{Han})[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}])"
_LOWER_NOT_HAN = r"(?:(?!\p{Han})[\p{Ll}\p{Lm}\p{Lo}\p{M}])"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_SPLIT_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER_NOT_HAN}*{_LOWER_NOT_HAN}+{_CONTRACTION}""",
        rf"""[^\r\n\p{{L}}\p{{N}}]?{_UPPER_NOT_HAN}+{_LOWER_NOT_HAN}*{_CONTRACTION}""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The official class reserves 256 special ids plus two after the base vocabulary (spec §7.1).
NUM_SPECIAL_TOKENS = 256 + 2

# Names of Kimi's special ids (spec §7.2), used when tokenizer_config.json does not name them. They are
# absolute ids, so they apply only to a base vocabulary of the official size.
KIMI_NUM_BASE_TOKENS = 163584
KIMI_SPECIAL_TOKEN_NAMES = {
    163584: "[BOS]",
    163585: "[EOS]",
    163586: "<|im_end|>",
    163587: "<|im_user|>",
    163588: "<|im_assistant|>",
    163590: "<|start_header_id|>",
    163591: "<|end_header_id|>",
    163593: "[EOT]",
    163594: "<|im_system|>",
    163595: "<|tool_calls_section_begin|>",
    163596: "<|tool_calls_section_end|>",
    163597: "<|tool_call_begin|>",
    163598: "<|tool_call_argument_begin|>",
    163599: "<|tool_call_end|>",
    163601: "<|im_middle|>",
    163838: "[UNK]",
    163839: "[PAD]",
}

# The official encode's limits (spec §7.1): characters per tiktoken call, and the longest run of
# whitespace or of non-whitespace characters passed at once.
OFFICIAL_MAX_ENCODE_CHARS = 400_000
OFFICIAL_MAX_RUN_CHARS = 25_000

# Bumped whenever the converter's output changes, so that stale cached conversions are not reused.
_CONVERTER_VERSION = "1"


# -- byte-level alphabet ---------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def bytes_to_token_string(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _token_string_to_bytes(token: str) -> bytes | None:
    """None when the string is not in the byte-level alphabet (a non-byte-level vocabulary)."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


# -- tiktoken ranks -> BPE --------------------------------------------------------------------------


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken rank file -> {token bytes: rank}, checked to be the complete base vocabulary."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{number}: expected 'base64token rank'") from None
    check_ranks(ranks, str(path))
    return ranks


def check_ranks(ranks: dict[bytes, int], source: str = "ranks") -> None:
    """Special ids follow the base vocabulary, so ranks must be exactly 0 .. n-1; and any text must be
    encodable, so every single byte needs a token."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{source}: ranks must be 0 .. {len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: single-byte token {missing[0]:#04x} missing (every byte needs a token)")


def train_ranks(texts: Iterable[str], vocab_size: int, pattern: str = KIMI_SPLIT_PATTERN) -> dict[bytes, int]:
    """A small byte-level BPE vocabulary trained on `texts`, as tiktoken ranks (the order of the
    merges). For tests and tiny models; the real vocabulary comes with the checkpoint."""
    from tokenizers import Regex, models, pre_tokenizers, trainers

    trainee = _BackendTokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainee.train_from_iterator(texts, trainer)
    # The trainer numbers the alphabet first, then each merge's result in the order it was learnt.
    ranks = {_token_string_to_bytes(token): token_id for token, token_id in trainee.get_vocab().items()}
    check_ranks(ranks, "trained vocabulary")
    return ranks


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Run tiktoken's BPE on `token`'s own bytes; the pair joined last, or None if it never forms `token`.

    tiktoken joins the adjacent pair of lowest concatenated rank, the leftmost on ties.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    joined = None
    while len(parts) > 1:
        best_rank, best_index = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_rank is None:
            return None
        joined = (parts[best_index], parts[best_index + 1])
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return joined


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token that BPE can form, in the order of the tokens' ranks."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            pair = last_merge(token, ranks)
            if pair is not None:
                merges.append(pair)
    return merges


def special_token_names(num_base_tokens: int, added_tokens_decoder: dict[int, str] | None = None) -> list[str]:
    """Names of the ids num_base_tokens .. num_base_tokens + 257, as the official class assigns them:
    tokenizer_config.json's names, else Kimi's known table (spec §7.2), else `<|reserved_token_{id}|>`."""
    named = dict(added_tokens_decoder or {})
    known = KIMI_SPECIAL_TOKEN_NAMES if num_base_tokens == KIMI_NUM_BASE_TOKENS else {}
    return [
        named.get(i) or known.get(i) or f"<|reserved_token_{i}|>"
        for i in range(num_base_tokens, num_base_tokens + NUM_SPECIAL_TOKENS)
    ]


def kimi_added_tokens(num_base_tokens: int) -> dict[int, str]:
    """Kimi's special names at Kimi's offsets after any base vocabulary: a small test vocabulary gets
    `<|im_end|>` at num_base_tokens + 2 as the real one has it at 163584 + 2."""
    return {num_base_tokens + i - KIMI_NUM_BASE_TOKENS: name for i, name in KIMI_SPECIAL_TOKEN_NAMES.items()}


def tiktoken_to_tokenizer_json(
    ranks: dict[bytes, int], special_names: list[str], pattern: str = KIMI_SPLIT_PATTERN
) -> dict:
    """The `tokenizers` serialisation of a tiktoken encoding, written out here rather than by the
    library, so that its bytes (and so the fingerprint) do not change with the library's version."""
    vocab = {bytes_to_token_string(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    merges = [[bytes_to_token_string(left), bytes_to_token_string(right)] for left, right in derive_merges(ranks)]
    added_tokens = [
        {
            "id": len(ranks) + i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in enumerate(special_names)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # A piece that is itself a token is emitted whole, as tiktoken does, even if no merge path forms it.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def canonical_json(data: dict) -> str:
    """One text per JSON value: sorted keys, no spaces, non-ASCII kept as it is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def default_cache_dir() -> Path:
    """Converted tokenizers live beside the Hugging Face cache (~/.cache/kimi-desk/tokenizers on
    Linux): a hub snapshot folder is not ours to write into."""
    from platformdirs import user_cache_path

    return user_cache_path("kimi-desk") / "tokenizers"


def converted_tokenizer_json(rank_file: Path, special_names: list[str], cache_dir: str | Path | None = None) -> str:
    """The canonical tokenizer.json text for a tiktoken rank file: read from the cache when present,
    else converted and cached. The cache key covers the rank file's bytes, the special names, the
    pattern and the converter version."""
    key_source = canonical_json(
        {
            "ranks_sha256": hashlib.sha256(rank_file.read_bytes()).hexdigest(),
            "special_names": special_names,
            "pattern": KIMI_SPLIT_PATTERN,
            "converter": _CONVERTER_VERSION,
        }
    )
    key = hashlib.sha256(key_source.encode("utf-8")).hexdigest()[:32]
    cached = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cached / key / "tokenizer.json"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = canonical_json(tiktoken_to_tokenizer_json(read_tiktoken_ranks(rank_file), special_names))
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, text)
    return text


# -- the official encode's chunking ----------------------------------------------------------------

# A whole run longer than the limit. Python's `\s` on str is exactly str.isspace, which the official
# splitter uses. The lookbehinds let a match start only where a run starts: without them every position
# inside a long-but-allowed run would rescan the rest of it, quadratic in the run's length.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (OFFICIAL_MAX_RUN_CHARS + 1, OFFICIAL_MAX_RUN_CHARS + 1))


def split_like_official(text: str) -> list[str]:
    """The pieces the official encode passes to tiktoken one by one: 400 000-character slices, each
    cut after every 25 000 characters of a longer whitespace or non-whitespace run."""
    pieces = []
    for start in range(0, len(text), OFFICIAL_MAX_ENCODE_CHARS):
        chunk = text[start : start + OFFICIAL_MAX_ENCODE_CHARS]
        cuts = [0]
        for run in _LONG_RUN.finditer(chunk):
            cuts.extend(range(run.start() + OFFICIAL_MAX_RUN_CHARS, run.end(), OFFICIAL_MAX_RUN_CHARS))
        cuts.append(len(chunk))
        pieces.extend(chunk[a:b] for a, b in zip(cuts, cuts[1:]))
    return pieces


# -- the tokenizer -------------------------------------------------------------------------------


def _token_name(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class SpecialTokenNames:
    """Which special tokens play the bos/eos/pad/unk roles (tokenizer_config.json's `*_token`);
    the defaults are the official class's."""

    bos: str | None = "[BOS]"
    eos: str | None = "[EOS]"
    pad: str | None = "[PAD]"
    unk: str | None = "[UNK]"

    @classmethod
    def from_config(cls, config: dict) -> "SpecialTokenNames":
        defaults = cls()
        return cls(
            **{
                role: _token_name(config.get(f"{role}_token")) or getattr(defaults, role)
                for role in ("bos", "eos", "pad", "unk")
            }
        )


class Tokenizer:
    """Text <-> token ids, identical to the official Kimi tokenizer.

    `vocab_size` counts the base tokens and the special ids after them. Special token names decode to
    their text, as the official decode does.
    """

    def __init__(self, tokenizer_json: str, special_names: SpecialTokenNames | None = None):
        try:
            self._backend = _BackendTokenizer.from_str(tokenizer_json)
            # The same tokenizer that reads special-token text as plain text (allow_special=False).
            self._backend_plain = _BackendTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"not a valid tokenizer.json ({exc})") from None
        self._backend_plain.encode_special_tokens = True
        data = json.loads(tokenizer_json)
        self.fingerprint = hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()
        added_tokens = data.get("added_tokens") or []
        self.special_tokens: dict[str, int] = {
            entry["content"]: entry["id"] for entry in added_tokens if entry.get("special")
        }
        self._special_ids = frozenset(self.special_tokens.values())
        self._id_to_bytes = self._byte_table({entry["content"] for entry in added_tokens})
        names = special_names or SpecialTokenNames()
        self.bos_token_id = self.special_tokens.get(names.bos) if names.bos else None
        self.eos_token_id = self.special_tokens.get(names.eos) if names.eos else None
        self.pad_token_id = self.special_tokens.get(names.pad) if names.pad else None
        self.unk_token_id = self.special_tokens.get(names.unk) if names.unk else None

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_tiktoken_file(
        cls,
        rank_file: str | Path,
        added_tokens_decoder: dict[int, str] | None = None,
        cache_dir: str | Path | None = None,
        special_names: SpecialTokenNames | None = None,
    ) -> "Tokenizer":
        rank_file = Path(rank_file)
        num_base_tokens = _count_rank_lines(rank_file)
        names = special_token_names(num_base_tokens, added_tokens_decoder)
        return cls(converted_tokenizer_json(rank_file, names, cache_dir), special_names)

    @classmethod
    def from_ranks(
        cls,
        ranks: dict[bytes, int],
        added_tokens_decoder: dict[int, str] | None = None,
        special_names: SpecialTokenNames | None = None,
    ) -> "Tokenizer":
        """From in-memory tiktoken ranks, converted without caching: small vocabularies in tests and tools."""
        check_ranks(ranks)
        names = special_token_names(len(ranks), added_tokens_decoder)
        return cls(canonical_json(tiktoken_to_tokenizer_json(ranks, names)), special_names)

    @classmethod
    def from_tokenizer_json_file(cls, path: str | Path, special_names: SpecialTokenNames | None = None) -> "Tokenizer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: cannot read ({exc})") from None
        try:
            return cls(text, special_names)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from None

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With allow_special, special-token text such as `<|im_end|>` becomes its id
        (the official default); without, it is encoded as ordinary text."""
        backend = self._backend if allow_special else self._backend_plain
        pieces = split_like_official(text)
        if len(pieces) == 1:
            return backend.encode(pieces[0], add_special_tokens=False).ids
        return [i for encoding in backend.encode_batch(pieces, add_special_tokens=False) for i in encoding.ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD, as in the official decode."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        skipped = self._special_ids if skip_special_tokens else frozenset()
        return b"".join(self.id_to_bytes(i) for i in ids if i not in skipped)

    def id_to_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._id_to_bytes) or self._id_to_bytes[token_id] is None:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return self._id_to_bytes[token_id]

    def token_to_id(self, token: str) -> int | None:
        """A vocabulary entry (byte-level form, e.g. 'Ġthe') or a special name -> its id."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- internals ----------------------------------------------------------------------------------

    def _byte_table(self, added_tokens: set[str]) -> list[bytes | None]:
        """The bytes of every id, so that decoding (and streaming) works on bytes, as tiktoken does.
        Added tokens are their text; vocabulary entries are byte-level strings."""
        table: list[bytes | None] = [None] * self.vocab_size
        for token, token_id in self._backend.get_vocab(with_added_tokens=True).items():
            if token in added_tokens:
                raw = token.encode("utf-8")
            else:
                raw = _token_string_to_bytes(token)
                if raw is None:
                    raw = self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
            if token_id >= len(table):
                table.extend([None] * (token_id + 1 - len(table)))
            table[token_id] = raw
        return table


def _count_rank_lines(rank_file: Path) -> int:
    try:
        with rank_file.open("rb") as lines:
            return sum(1 for line in lines if line.strip())
    except OSError as exc:
        raise TokenizerError(f"{rank_file}: cannot read ({exc.strerror})") from None


def load_tokenizer(folder: str | Path, cache_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder: its tokenizer.json if it has one, else its tiktoken.model
    converted (and cached under `cache_dir`, default `default_cache_dir()`)."""
    folder = Path(folder)
    config = _read_tokenizer_config(folder / "tokenizer_config.json")
    special_names = SpecialTokenNames.from_config(config)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_tokenizer_json_file(folder / "tokenizer.json", special_names)
    if (folder / "tiktoken.model").is_file():
        added = _named_ids(config.get("added_tokens_decoder") or {}, folder / "tokenizer_config.json")
        return Tokenizer.from_tiktoken_file(folder / "tiktoken.model", added, cache_dir, special_names)
    raise TokenizerError(f"{folder}: no tokenizer.json or tiktoken.model")


def _named_ids(added_tokens_decoder: dict, source: Path) -> dict[int, str]:
    """tokenizer_config.json's added_tokens_decoder ({"163584": {"content": "[BOS]", ...}}) -> {id: name}."""
    try:
        return {
            int(token_id): _token_name(entry) for token_id, entry in added_tokens_decoder.items() if _token_name(entry)
        }
    except (AttributeError, ValueError):
        raise TokenizerError(f"{source}: added_tokens_decoder must map token ids to tokens") from None


# Its chat template and added tokens take tens of KB; a file this large is not one.
TOKENIZER_CONFIG_MAX_BYTES = 16 << 20


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = read_json(path, TOKENIZER_CONFIG_MAX_BYTES)
    except (OSError, BadJSON) as exc:
        raise TokenizerError(f"{path}: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: must hold a JSON object")
    return config


class StreamDecoder:
    """Token ids in, text deltas out, never half a UTF-8 character: the bytes of a character split
    across tokens are held back until it is complete. The concatenated deltas plus `flush()` equal
    `tokenizer.decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: int | Iterable[int]) -> str:
        """The text that became complete with these ids (possibly empty)."""
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        raw = self._tokenizer.decode_bytes(token_ids, self._skip_special_tokens)
        return self._utf8.decode(raw)

    def flush(self) -> str:
        """The rest: an incomplete character at the end becomes U+FFFD. The decoder can then be reused."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
