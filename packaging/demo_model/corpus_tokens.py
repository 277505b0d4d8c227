"""The corpus as token ids, cut where a kimi-desk session cuts a document (folder tree, then one block
per file), cached in safetensors beside the corpus.

Each segment is encoded on its own with special-token text read as plain text, exactly as
`Session.plan` encodes a document it reads; since segments end with a newline and the next starts
with "==>", the ids of a document are the concatenation of its segments' ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from prepare_corpus import document_segments, read_documents, read_manifest
from safetensors.torch import load_file, save_file

CACHE_VERSION = "1"


@dataclass
class TokenizedSplit:
    tokens: torch.Tensor  # [N] uint16 (or int32 for vocabularies past 65536): every segment, concatenated
    segment_offsets: torch.Tensor  # [S + 1] int64: segment s is tokens[offsets[s]:offsets[s + 1]]
    document_offsets: torch.Tensor  # [D + 1] int64, in segments; a document's first segment is its folder tree
    segment_paths: list[str]  # per segment: the file's path, "" for a folder tree
    document_roots: list[str]  # per document: the folder name its tree is drawn under
    document_sources: list[str]  # per document: the corpus source it came from

    @property
    def num_documents(self) -> int:
        return len(self.document_roots)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def segment_ids(self, index: int) -> torch.Tensor:
        return self.tokens[self.segment_offsets[index] : self.segment_offsets[index + 1]].to(torch.int64)

    def segment_length(self, index: int) -> int:
        return int(self.segment_offsets[index + 1] - self.segment_offsets[index])

    def document_segment_range(self, document: int) -> range:
        return range(int(self.document_offsets[document]), int(self.document_offsets[document + 1]))

    def document_ids(self, document: int) -> torch.Tensor:
        segments = self.document_segment_range(document)
        start, end = self.segment_offsets[segments.start], self.segment_offsets[segments.stop]
        return self.tokens[start:end].to(torch.int64)

    def lm_stream(self, separator_id: int) -> torch.Tensor:
        """Every document followed by `separator_id`, as one int64 stream for language-model windows."""
        pieces = []
        separator = torch.tensor([separator_id], dtype=torch.int64)
        for document in range(self.num_documents):
            pieces += [self.document_ids(document), separator]
        return torch.cat(pieces)


def _cache_key(corpus: Path, split: str, tokenizer) -> str:
    manifest = read_manifest(corpus)
    shards = [shard.get("sha256", shard["name"]) for shard in manifest["splits"][split]["shards"]]
    source = json.dumps({"version": CACHE_VERSION, "shards": shards, "tokenizer": tokenizer.fingerprint})
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:20]


_WORKER_TOKENIZER = None


def _encode_document(doc: dict) -> list[array]:
    return [array("i", _WORKER_TOKENIZER.encode(text, allow_special=False)) for text in document_segments(doc)]


def _encode_documents(tokenizer, documents: list[dict], workers: int):
    """Each document's segments as ids, in order; in `workers` forked processes when more than one.
    Why: on the GPU machine the corpus comes as text (its ids do not fit the files a call may carry)
    and one process took minutes of the training budget to encode it; 16 cores take seconds."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    if workers <= 1 or len(documents) < 2:
        return map(_encode_document, documents)
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        return pool.map(_encode_document, documents, chunksize=1)
    finally:
        pool.close()


def tokenize_split(
    corpus: Path, tokenizer, split: str, cache_dir: Path | None = None, log=print, workers: int | None = None
) -> TokenizedSplit:
    """The split's documents as ids, from the cache when it holds this corpus and tokenizer; encoded
    in `workers` processes (default: one per core, at most 16) when the cache lacks them."""
    workers = min(16, os.cpu_count() or 1) if workers is None else workers
    corpus = Path(corpus)
    cache_dir = Path(cache_dir) if cache_dir is not None else corpus / "tokens"
    key = _cache_key(corpus, split, tokenizer)
    tensors_path, index_path = cache_dir / f"{split}-{key}.safetensors", cache_dir / f"{split}-{key}.json"
    if tensors_path.is_file() and index_path.is_file():
        tensors = load_file(tensors_path)
        index = json.loads(index_path.read_text(encoding="utf-8"))
        return TokenizedSplit(
            tensors["tokens"],
            tensors["segment_offsets"],
            tensors["document_offsets"],
            index["segment_paths"],
            index["document_roots"],
            index["document_sources"],
        )

    flat = array("i")
    segment_offsets, document_offsets = [0], [0]
    segment_paths, roots, sources = [], [], []
    documents = list(read_documents(corpus, split))
    for doc, pieces in zip(documents, _encode_documents(tokenizer, documents, workers), strict=True):
        paths = ["", *(f["path"] for f in doc["files"])]
        for path, ids in zip(paths, pieces, strict=True):
            flat.extend(ids)
            segment_offsets.append(segment_offsets[-1] + len(ids))
            segment_paths.append(path)
        document_offsets.append(len(segment_paths))
        roots.append(doc["root"])
        sources.append(doc["source"])
    dtype = torch.uint16 if tokenizer.vocab_size <= 1 << 16 else torch.int32
    tokens = torch.frombuffer(flat, dtype=torch.int32).clone().to(dtype) if flat else torch.zeros(0, dtype=dtype)
    split_tokens = TokenizedSplit(
        tokens,
        torch.tensor(segment_offsets, dtype=torch.int64),
        torch.tensor(document_offsets, dtype=torch.int64),
        segment_paths,
        roots,
        sources,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Caches of an earlier corpus or tokenizer would only take space (and transfer time) from now on.
    for stale in cache_dir.glob(f"{split}-*"):
        stale.unlink()
    save_file(
        {
            "tokens": split_tokens.tokens,
            "segment_offsets": split_tokens.segment_offsets,
            "document_offsets": split_tokens.document_offsets,
        },
        tensors_path,
    )
    index_path.write_text(
        json.dumps({"segment_paths": segment_paths, "document_roots": roots, "document_sources": sources}),
        encoding="utf-8",
    )
    log(f"tokenized the {split} split: {split_tokens.num_tokens:,} tokens in {split_tokens.num_documents} documents")
    return split_tokens
