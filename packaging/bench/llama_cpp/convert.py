"""Convert a kimi-desk checkpoint folder to GGUF with llama.cpp's own converter, then quantize it.

    python packaging/bench/llama_cpp/convert.py CHECKPOINT_DIR OUT.gguf [--llama-cpp DIR]
        [--outtype bf16|f16|f32|q8_0] [--quantize Q8_0,Q4_K_M] [--threads N]

CHECKPOINT_DIR is a folder in the official Hugging Face layout (config.json, model.safetensors or shards
+ index). DIR is the output folder of build.sh (default .bench/llama-cpu): its src/llama.cpp holds the
vendored convert_hf_to_gguf.py and gguf-py, which are imported from there (sys.path), never installed.
With --quantize, each type T is written beside OUT.gguf as OUT-T.gguf by DIR/bin/llama-quantize.
Run it with the development environment (.venv: torch, transformers, numpy, pyyaml, safetensors).

The vocabulary. llama.cpp's KimiLinearModel.set_vocab (conversion/kimi_linear.py) only knows the official
tokenizer: it tries the generic `_set_vocab_gpt2` (AutoTokenizer + a hash of a test encoding that must be
in its table of known pre-tokenizers), then `AutoTokenizer(trust_remote_code=True)` for Moonshot's
tiktoken.model + tokenization_kimi.py. Our checkpoints ship a tokenizers `tokenizer.json` instead (a
byte-level BPE with Kimi's split pattern and its special tokens after the base vocabulary), whose hash
is in no table, so both paths fail. This script replaces that one method with `set_vocab_from_folder`
below, which writes the same GGUF fields the kimi-k2 path writes (tokenizer model "gpt2", pre-tokenizer
"kimi-k2", tokens, types, merges, special ids) from tokenizer.json; for a folder without tokenizer.json
(random benchmark checkpoints) it writes a placeholder vocabulary: the 256 byte tokens, then
"<|unused_i|>" up to vocab_size. An official folder (tiktoken.model + tokenization_kimi.py) keeps the
converter's own path. Everything else (hparams, tensor names, the expert stacking, the kv_b split,
-exp(A_log)) is the vendored converter's, unchanged.

Memory: the converter is lazy (tensors are read from the memory-mapped safetensors when written), except
that each MoE layer's experts are stacked into one [n_expert, rows, cols] tensor per projection as that
tensor is written; the peak resident size is printed at the end (see README.md for measured values).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_LLAMA_CPP = REPO / ".bench" / "llama-cpu"
QUANT_TYPES = ("Q8_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q2_K", "Q3_K_M", "IQ4_XS")


def byte_alphabet() -> list[str]:
    """The 256 byte-level BPE symbols in byte order (printable bytes stand for themselves, the others
    are shifted to U+0100 and up), as tokenizer.json and llama.cpp's "gpt2" vocabularies spell tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, shifted = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return [out[b] for b in range(256)]


def read_tokenizer_json(folder: Path, vocab_size: int):
    """tokenizer.json -> (tokens, token types, merges) for a vocabulary of vocab_size rows.

    Ids the file does not name (the rows between its last token and vocab_size, as in the official
    checkpoint) become "[PAD{i}]", unused; the added special tokens are control tokens. Special ids past
    vocab_size are left out."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{folder}/tokenizer.json: model type {model.get('type')!r}, expected a byte-level BPE")
    check_split_pattern(data, folder)
    names: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    special: set[int] = set()
    for added in data.get("added_tokens", []):
        names[added["id"]] = added["content"]
        if added.get("special", False):
            special.add(added["id"])
    # The last reserved special ids may lie past the embedding (the official checkpoint's 163840 and
    # 163841 do; so do our demo model's 12288 and 12289): the model can never produce them.
    beyond = sorted(i for i in names if i >= vocab_size)
    if any(i not in special for i in beyond):
        raise SystemExit(f"{folder}/tokenizer.json: ordinary token id {beyond[0]} beyond vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in names:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # gguf.TokenType.UNUSED
        else:
            tokens.append(names[i])
            types.append(3 if i in special else 1)  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def check_split_pattern(data: dict, folder: Path) -> None:
    """llama.cpp's "kimi-k2" pre-tokenizer is a hand-written version of Kimi's split pattern; say so
    loudly if this tokenizer.json splits by another pattern (llama.cpp would tokenize text differently)."""
    from kimi_desk.engine.tokenizer import KIMI_SPLIT_PATTERN

    found = json.dumps(data.get("pre_tokenizer"))
    if json.dumps(KIMI_SPLIT_PATTERN)[1:-1] not in found:
        print(
            f"convert.py: warning: {folder}/tokenizer.json does not split by Kimi's pattern; llama.cpp's "
            "kimi-k2 pre-tokenizer will tokenize text differently from it",
            file=sys.stderr,
        )


def placeholder_vocab(vocab_size: int):
    """For checkpoints without a tokenizer: the byte symbols (so that any text still tokenizes, byte by
    byte), then unused names. Enough for llama-bench, which feeds random ids."""
    if vocab_size < 256:
        raise SystemExit(f"vocab_size {vocab_size} < 256: too small for a byte-level placeholder vocabulary")
    tokens = byte_alphabet() + [f"<|unused_{i}|>" for i in range(256, vocab_size)]
    return tokens, [1] * vocab_size, []


def set_vocab_from_folder(self, original_set_vocab) -> None:
    """Replaces KimiLinearModel.set_vocab: the GGUF vocabulary fields from our tokenizer.json. An official
    folder (tiktoken.model, no tokenizer.json) keeps the converter's own path."""
    import gguf

    vocab_size = self.hparams["vocab_size"]
    if (self.dir_model / "tokenizer.json").is_file():
        tokens, types, merges = read_tokenizer_json(self.dir_model, vocab_size)
    elif (self.dir_model / "tiktoken.model").is_file():
        return original_set_vocab(self)
    else:
        print(f"convert.py: {self.dir_model} has no tokenizer.json: placeholder vocabulary", file=sys.stderr)
        tokens, types, merges = placeholder_vocab(vocab_size)
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType(t) for t in types])
    w.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        if isinstance(self.hparams.get(key), int) and self.hparams[key] < vocab_size:
            add(self.hparams[key])
    # Our engine never prepends BOS; neither must llama.cpp (llama-perplexity would put BOS first).
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def run_converter(tree: Path, checkpoint: Path, out: Path, outtype: str) -> None:
    """Runs the vendored convert_hf_to_gguf.main() in this process, with our set_vocab."""
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.kimi_linear import KimiLinearModel

    original = KimiLinearModel.set_vocab
    KimiLinearModel.set_vocab = lambda self: set_vocab_from_folder(self, original)
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outfile", str(out), "--outtype", outtype]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv


def quantize(llama_cpp: Path, src: Path, qtype: str, threads: int) -> Path:
    dst = src.with_name(f"{src.stem}-{qtype}.gguf")
    start = time.perf_counter()
    subprocess.run([str(llama_cpp / "bin" / "llama-quantize"), str(src), str(dst), qtype, str(threads)], check=True)
    print(f"convert.py: {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - start:.0f} s)")
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_LLAMA_CPP, help="build.sh's output folder")
    parser.add_argument(
        "--outtype",
        default="bf16",
        choices=["bf16", "f16", "f32", "q8_0"],
        help="type of the converted matrices (default bf16, as our checkpoints)",
    )
    parser.add_argument("--quantize", default="", help="comma-separated llama-quantize types, e.g. Q8_0,Q4_K_M")
    parser.add_argument("--threads", type=int, default=0, help="llama-quantize threads (default: all cores)")
    parser.add_argument("--skip-convert", action="store_true", help="OUT.gguf exists: only quantize it")
    args = parser.parse_args(argv)

    tree = args.llama_cpp / "src" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{tree}: no convert_hf_to_gguf.py (run build.sh {args.llama_cpp} first)")
    qtypes = [q.strip() for q in args.quantize.split(",") if q.strip()]
    for q in qtypes:
        if q not in QUANT_TYPES:
            raise SystemExit(f"--quantize {q}: not one of {', '.join(QUANT_TYPES)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_convert:
        start = time.perf_counter()
        run_converter(tree, args.checkpoint.resolve(), args.out.resolve(), args.outtype)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(
            f"convert.py: {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - start:.0f} s, converter peak RSS {peak:.2f} GiB"
        )
    for q in qtypes:
        quantize(args.llama_cpp, args.out, q, args.threads or len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
