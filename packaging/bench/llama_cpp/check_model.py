"""Is the GGUF the same model? llama.cpp against kimi-desk's engine on the same token ids.

    python packaging/bench/llama_cpp/check_model.py CHECKPOINT_DIR MODEL.gguf [MODEL.gguf ...]
        [--llama-cpp DIR] [--text FILE] [--ctx 512] [--chunks 8] [--threads 2] [--out check.json]

For a text (default: difflib.py and textwrap.py of the running Python's standard library):
1. Tokenization: our tokenizer (kimi_desk.engine.tokenizer) against llama-tokenize on the GGUF. llama.cpp's
   tools turn escape sequences in a -f file into characters (so "\\n" in Python source would become a
   newline), so both llama-tokenize and llama-perplexity get --no-escape.
2. Logits: kimi-logits (build.sh's dumper) on the first --ctx token ids, once in batches (llama.cpp's
   chunked delta-rule path) and once with the second half fed one token per call (its recurrent path),
   against our engine in float32 on the same ids: largest and mean |logit difference|, top-1 agreement,
   mean KL(ours || llama.cpp), and each side's perplexity over those positions.
3. Perplexity as llama-perplexity computes it: --chunks chunks of --ctx tokens, each from an empty state,
   the second half of each chunk scored. llama-perplexity's "Final estimate" against our engine's figure
   for the same chunks of llama.cpp's own token ids.
With --ours-bf16, also our engine in bfloat16 against itself in float32, for the scale of the bf16 GGUF's
differences (llama.cpp's CPU matmuls on bf16 weights round their activations to bf16 too).
Prints a JSON document (and writes --out).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
DEFAULT_LLAMA_CPP = REPO / ".bench" / "llama-cpu"


def default_text() -> tuple[str, list[str]]:
    """Two modules of the running Python's standard library: the kind of text the demo model was
    trained on (CPython 3.11's standard library is in its corpus), so its perplexity is a sane figure."""
    import difflib
    import textwrap

    files = [Path(difflib.__file__), Path(textwrap.__file__)]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files), [str(f) for f in files]


def llama_tokenize(llama_cpp: Path, gguf: Path, text_file: Path) -> list[int]:
    out = subprocess.run(
        [
            str(llama_cpp / "bin" / "llama-tokenize"),
            "-m",
            str(gguf),
            "-f",
            str(text_file),
            "--ids",
            "--no-escape",
            "--log-disable",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_logits(llama_cpp: Path, gguf: Path, ids: list[int], threads: int, prefill: int | None = None) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        tok, out = Path(tmp) / "ids.i32", Path(tmp) / "logits.f32"
        np.asarray(ids, dtype="<i4").tofile(tok)
        cmd = [str(llama_cpp / "bin" / "kimi-logits"), str(gguf), str(tok), str(out), "--threads", str(threads)]
        if prefill is not None:
            cmd += ["--prefill", str(prefill)]
        subprocess.run(cmd, check=True, capture_output=True)
        return np.fromfile(out, dtype="<f4").reshape(len(ids), -1)


def llama_perplexity(llama_cpp: Path, gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> dict:
    proc = subprocess.run(
        [
            str(llama_cpp / "bin" / "llama-perplexity"),
            "-m",
            str(gguf),
            "-f",
            str(text_file),
            "-c",
            str(ctx),
            "-b",
            str(ctx),
            "--chunks",
            str(chunks),
            "-t",
            str(threads),
            "--no-escape",
        ],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"llama-perplexity failed on {gguf}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {"ppl": float(found.group(1)), "ppl_err": float(found.group(2))}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ours: np.ndarray, theirs: np.ndarray, ids: list[int]) -> dict:
    """Logits [T, V] of both sides on ids -> agreement figures (positions 0..T-2 predict ids 1..T-1)."""
    lp_o, lp_t = log_softmax(ours[:-1]), log_softmax(theirs[:-1])
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    nll_o, nll_t = -lp_o[rows, nxt], -lp_t[rows, nxt]
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    return {
        "positions": len(nxt),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_std": float(ours.std()),
        "top1_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "mean_kl": float((np.exp(lp_o) * (lp_o - lp_t)).sum(-1).mean()),
        "max_abs_nll_diff": float(np.abs(nll_o - nll_t).max()),
        "ppl_ours": float(math.exp(nll_o.mean())),
        "ppl_llama": float(math.exp(nll_t.mean())),
    }


class Ours:
    def __init__(self, checkpoint: Path, dtype: str = "float32"):
        import torch

        from kimi_desk.engine.weights import load_model

        self.torch = torch
        self.model = load_model(checkpoint, dtype=getattr(torch, dtype))

    def logits(self, ids: list[int]) -> np.ndarray:
        state = self.model.new_state(1)
        x = self.torch.tensor([ids], dtype=self.torch.long)
        return self.model(x, state)[0].float().numpy()

    def perplexity(self, ids: list[int], ctx: int, chunks: int) -> float:
        """llama-perplexity's figure: each chunk from an empty state, its second half scored."""
        first, nll, count = ctx // 2, 0.0, 0
        for c in range(chunks):
            chunk = ids[c * ctx : (c + 1) * ctx]
            lp = log_softmax(self.logits(chunk)[first : ctx - 1])
            nxt = np.asarray(chunk[first + 1 : ctx])
            nll -= lp[np.arange(len(nxt)), nxt].sum()
            count += len(nxt)
        return math.exp(nll / count)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("gguf", type=Path, nargs="+")
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_LLAMA_CPP)
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: difflib.py + textwrap.py)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ours-bf16",
        action="store_true",
        help="also our engine in bfloat16 against itself in float32: the scale of bf16 rounding",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from kimi_desk.engine.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.text:
            text, sources = args.text.read_text(encoding="utf-8"), [str(args.text)]
        else:
            text, sources = default_text()
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        ids_ours = load_tokenizer(args.checkpoint).encode(text)
        need = args.ctx * args.chunks
        if len(ids_ours) < need:
            raise SystemExit(f"the text has {len(ids_ours)} tokens, --ctx x --chunks needs {need}")
        ours = Ours(args.checkpoint)
        ref_first = ours.logits(ids_ours[: args.ctx])
        result = {
            "checkpoint": str(args.checkpoint),
            "text": sources,
            "text_tokens": len(ids_ours),
            "ctx": args.ctx,
            "chunks": args.chunks,
            "threads": args.threads,
            "models": [],
        }
        if args.ours_bf16:
            ours_bf16 = Ours(args.checkpoint, "bfloat16")
            result["ours_bfloat16"] = {
                "logits_vs_ours_float32": compare(
                    ref_first, ours_bf16.logits(ids_ours[: args.ctx]), ids_ours[: args.ctx]
                ),
                "perplexity": ours_bf16.perplexity(ids_ours, args.ctx, args.chunks),
            }
            print(json.dumps(result["ours_bfloat16"]), file=sys.stderr)
        ppl_cache: dict[tuple, float] = {}
        for gguf in args.gguf:
            ids_llama = llama_tokenize(args.llama_cpp, gguf, text_file)
            same = ids_llama == ids_ours
            first_diff = next(
                (i for i, (a, b) in enumerate(zip(ids_llama, ids_ours)) if a != b),
                None if len(ids_llama) == len(ids_ours) else min(len(ids_llama), len(ids_ours)),
            )
            entry = {
                "gguf": str(gguf),
                "tokenization_identical": same,
                "llama_tokens": len(ids_llama),
                "first_token_difference": first_diff,
            }
            half = args.ctx // 2
            entry["logits_batched"] = compare(
                ref_first, llama_logits(args.llama_cpp, gguf, ids_ours[: args.ctx], args.threads), ids_ours[: args.ctx]
            )
            entry["logits_token_by_token_second_half"] = compare(
                ref_first[half:],
                llama_logits(args.llama_cpp, gguf, ids_ours[: args.ctx], args.threads, half)[half:],
                ids_ours[half : args.ctx],
            )
            key = tuple(ids_llama[:need])
            if key not in ppl_cache:
                ppl_cache[key] = ours.perplexity(ids_llama, args.ctx, args.chunks)
            entry["perplexity"] = {
                "llama_cpp": llama_perplexity(args.llama_cpp, gguf, text_file, args.ctx, args.chunks, args.threads),
                "ours_float32": ppl_cache[key],
            }
            result["models"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
    text_out = json.dumps(result, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
