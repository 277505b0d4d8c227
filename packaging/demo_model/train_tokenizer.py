"""Train the demo model's byte-level BPE on the corpus's training split and write tokenizer.json.

    python packaging/demo_model/train_tokenizer.py --corpus build/demo_model/corpus \
        --out build/demo_model/tokenizer --base-vocab 12032

The vocabulary is trained with `kimi_desk.engine.tokenizer.train_ranks` (Kimi's pre-tokenizer pattern,
so numbers split into groups of three digits and Chinese runs stay whole, as in the real model), on
the text the model will read: each document rendered as kimi-desk renders a folder. The Kimi special
tokens follow the base vocabulary at Kimi's offsets (`kimi_added_tokens`): [BOS] = base, <|im_end|> =
base + 2, [PAD] = base + 255, so the model's vocab_size is base + 256 (the real model: 163584 + 256).
The default base of 12032 makes that 12288, a multiple of 128 for the embedding and lm_head products.

Held-out documents are never seen here; tokenizer_stats.json reports bytes per token on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prepare_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from prepare_corpus import document_segments, read_documents

from kimi_desk.engine.tokenizer import (
    NUM_SPECIAL_TOKENS,
    canonical_json,
    kimi_added_tokens,
    load_tokenizer,
    special_token_names,
    tiktoken_to_tokenizer_json,
    train_ranks,
)

DEFAULT_OUT = DEFAULT_CORPUS.parent / "tokenizer"
# Rows of the embedding the special ids take: Kimi reserves 256 + 2 ids after the base vocabulary, and
# the last two fall outside the model's vocabulary, as in the released checkpoint.
MODEL_SPECIAL_ROWS = 256


def training_texts(corpus: Path, max_chars: int | None) -> list[str]:
    """The rendered segments of the training documents, at most `max_chars` of them in all."""
    texts, total = [], 0
    for doc in read_documents(corpus, "train"):
        for segment in document_segments(doc):
            if max_chars is not None and total + len(segment) > max_chars:
                return texts
            texts.append(segment)
            total += len(segment)
    return texts


def write_tokenizer(texts: list[str], base_vocab: int, out: Path) -> Path:
    ranks = train_ranks(texts, base_vocab)
    names = special_token_names(len(ranks), kimi_added_tokens(len(ranks)))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    path.write_text(canonical_json(tiktoken_to_tokenizer_json(ranks, names)), encoding="utf-8")
    return path


def heldout_bytes_per_token(corpus: Path, folder: Path, max_chars: int = 2_000_000) -> float:
    tokenizer = load_tokenizer(folder)
    chars = tokens = utf8_bytes = 0
    for doc in read_documents(corpus, "heldout"):
        for segment in document_segments(doc):
            tokens += len(tokenizer.encode(segment, allow_special=False))
            utf8_bytes += len(segment.encode("utf-8"))
            chars += len(segment)
        if chars > max_chars:
            break
    return utf8_bytes / max(tokens, 1)


def model_vocab_size(tokenizer) -> int:
    """The config's vocab_size for a tokenizer made here: the base vocabulary plus Kimi's special rows."""
    return tokenizer.vocab_size - NUM_SPECIAL_TOKENS + MODEL_SPECIAL_ROWS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--base-vocab", type=int, default=12032)
    parser.add_argument(
        "--max-chars",
        type=int,
        default=None,
        help="train on at most this much text (default: the whole training split)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    texts = training_texts(args.corpus, args.max_chars)
    path = write_tokenizer(texts, args.base_vocab, args.out)
    tokenizer = load_tokenizer(args.out)
    stats = {
        "base_vocab": tokenizer.vocab_size - NUM_SPECIAL_TOKENS,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "model_vocab_size": model_vocab_size(tokenizer),
        "im_end_id": tokenizer.special_tokens["<|im_end|>"],
        "trained_on_chars": sum(len(t) for t in texts),
        "heldout_bytes_per_token": round(heldout_bytes_per_token(args.corpus, args.out), 3),
        "tokenizer_json_bytes": path.stat().st_size,
        "fingerprint": tokenizer.fingerprint,
    }
    (args.out / "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
