"""Evaluate a trained demo model through the engine's own inference path, for the model card.

    python packaging/demo_model/evaluate.py --model build/demo_model/run/model --out build/demo_model/run/eval

1. Held-out perplexity: the held-out documents (never trained on) in sequences of --ppl-context
   tokens, each read from an empty state by `model(ids, state)` in --ppl-chunk pieces (chunked
   prefill as a session does it, every position's logits kept); and the first --token-by-token
   tokens fed one at a time. Both must give the same perplexity on the tokens they share (the
   engine's contract: any split of a sequence gives the same logits).
2. Needle in a haystack at --lengths tokens (default 4k, 32k, 128k): a fact planted at evenly spread
   depths of a folder of held-out files rendered as kimi-desk renders a folder, inside the chat format
   (`document_head_ids`, the document, `question_ids`), read by chunked prefill, then greedy decoding
   until <|im_end|>; a trial counts when the reply contains the fact's value. Once with the fact alone
   and once with 3 distractor facts of the same kind about other keys.
Writes eval.json and eval.md (the tables for the model card) in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from corpus_tokens import tokenize_split
from prepare_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from retrieval_samples import RetrievalSampleBuilder

from kimi_desk.engine import load_model
from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT, stop_token_ids
from kimi_desk.engine.generate import GREEDY, generate, prefill
from kimi_desk.engine.tokenizer import load_tokenizer

DEFAULT_MODEL = DEFAULT_CORPUS.parent / "run" / "model"


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token negative log-likelihoods of ids[1:] given what precedes, ids fed `chunk` at a time
    from an empty state. chunk=1 is token-by-token decoding."""
    state = model.new_state(1)
    losses, previous = [], None
    for start in range(0, ids.numel(), chunk):
        piece = ids[start : start + chunk].to(model.device)
        logits = model(piece[None], state)[0].float()  # [n, vocab]
        if previous is not None:
            losses.append(torch.nn.functional.cross_entropy(previous[None], piece[:1]))
        if piece.numel() > 1:
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], piece[1:], reduction="none"))
        previous = logits[-1]
    return torch.cat([loss.reshape(-1) for loss in losses]).cpu()


def heldout_perplexity(model, stream: torch.Tensor, tokens: int, context: int, chunk: int,
                       token_by_token: int) -> dict:
    tokens = min(tokens, stream.numel())
    nll = []
    for start in range(0, tokens - 1, context):
        sequence = stream[start : min(start + context, tokens)]
        if sequence.numel() > 1:
            nll.append(sequence_nll(model, sequence, chunk))
    nll = torch.cat(nll)
    first = stream[: min(token_by_token, context, tokens)]
    chunked = sequence_nll(model, first, chunk)
    stepwise = sequence_nll(model, first, 1)
    ppl_chunked, ppl_stepwise = math.exp(float(chunked.mean())), math.exp(float(stepwise.mean()))
    # The paths round differently in half precision (other kernels, other accumulation orders).
    tolerance = 1e-3 if model.dtype == torch.float32 else 2e-2
    return {
        "tokens": int(nll.numel()), "context": context, "prefill_chunk": chunk,
        "ppl_chunked_prefill": math.exp(float(nll.mean())),
        "token_by_token_tokens": int(stepwise.numel()),
        "ppl_chunked_prefill_on_those": ppl_chunked,
        "ppl_token_by_token": ppl_stepwise,
        "max_abs_nll_difference": float((chunked - stepwise).abs().max()),
        "paths_agree": abs(ppl_chunked / ppl_stepwise - 1) < tolerance,
        "agreement_tolerance": tolerance,
    }


@torch.no_grad()
def needle_trial(model, tokenizer, builder, length: int, depth: float, distractors: int, rng: random.Random,
                 stops, chunk: int, max_new_tokens: int) -> dict:
    sample = builder.build(length, rng, depth=depth, num_distractors=distractors, system=DEFAULT_SYSTEM_PROMPT)
    prompt = sample.prompt_ids
    state = model.new_state(1)
    began = time.perf_counter()
    # The document, then the question: what a session does (it keeps the state after the document).
    prefill(model, prompt[: sample.document_end], state, chunk_size=chunk)
    result = generate(model, prompt[sample.document_end :], state, max_new_tokens=max_new_tokens, sampling=GREEDY,
                      stop_token_ids=stops, prefill_chunk_size=chunk)
    reply = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"length": len(prompt), "depth": round(sample.depth, 3), "kind": sample.fact.kind,
            "distractors": distractors, "value": sample.fact.value, "reply": reply,
            "correct": sample.fact.value in reply, "seconds": round(time.perf_counter() - began, 2)}


def needle_table(model, tokenizer, builder, lengths: list[int], trials: int, seed: int, chunk: int,
                 max_new_tokens: int, log=print) -> list[dict]:
    stops = stop_token_ids(tokenizer, model.config)
    rows = []
    for length in lengths:
        for distractors in (0, 3):
            rng = random.Random(f"{seed}-{length}-{distractors}")
            outcomes = []
            for trial in range(trials):
                depth = (trial + 0.5) / trials
                outcomes.append(needle_trial(model, tokenizer, builder, length, depth, distractors, rng, stops,
                                             chunk, max_new_tokens))
            correct = sum(o["correct"] for o in outcomes)
            rows.append({"length": length, "distractors": distractors, "trials": trials, "correct": correct,
                         "accuracy": correct / trials, "outcomes": outcomes})
            log(f"needle at {length} tokens, {distractors} distractors: {correct}/{trials} "
                f"({sum(o['seconds'] for o in outcomes):.0f} s)")
    return rows


def markdown(results: dict) -> str:
    ppl = results["perplexity"]
    lines = [
        f"## Evaluation of `{results['model']}`",
        "",
        f"Device {results['device']}, dtype {results['dtype']}, through `kimi_desk.engine.load_model`.",
        "",
        "### Held-out perplexity",
        "",
        "| measure | tokens | perplexity |",
        "|---|---:|---:|",
        f"| chunked prefill ({ppl['prefill_chunk']}-token chunks, {ppl['context']}-token sequences) | "
        f"{ppl['tokens']:,} | {ppl['ppl_chunked_prefill']:.3f} |",
        f"| chunked prefill, first tokens | {ppl['token_by_token_tokens']:,} | {ppl['ppl_chunked_prefill_on_those']:.4f} |",
        f"| token by token, same tokens | {ppl['token_by_token_tokens']:,} | {ppl['ppl_token_by_token']:.4f} |",
        "",
        f"Largest per-token difference between the two paths: {ppl['max_abs_nll_difference']:.2e} nats "
        f"({'within' if ppl['paths_agree'] else 'OUTSIDE'} the {ppl['agreement_tolerance']:g} relative tolerance "
        f"for {results['dtype']}).",
        "",
        "### Needle in a haystack",
        "",
        "A fact planted at evenly spread depths of a folder of held-out source files and manual pages, "
        "asked for after the document in the chat format; greedy reply, correct when it contains the value.",
        "",
        "| context | fact alone | with 3 distractor facts |",
        "|---:|---:|---:|",
    ]
    by_length: dict[int, dict[int, dict]] = {}
    for row in results["needle"]:
        by_length.setdefault(row["length"], {})[row["distractors"]] = row
    for length, row in sorted(by_length.items()):
        cells = [f"{r['correct']}/{r['trials']} ({100 * r['accuracy']:.0f}%)" for r in (row.get(0), row.get(3)) if r]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=None, help="default: <model>/../eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: the checkpoint's on CUDA, float32 on the CPU")
    parser.add_argument("--ppl-tokens", type=int, default=65536)
    parser.add_argument("--ppl-context", type=int, default=4096)
    parser.add_argument("--ppl-chunk", type=int, default=1024,
                        help="tokens per model call for perplexity (several per sequence, so the state is handed on)")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per model call for the needles "
                        "(a session's default)")
    parser.add_argument("--token-by-token", type=int, default=512)
    parser.add_argument("--lengths", default="4096,32768,131072")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or args.model.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else None)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, dtype_name) if dtype_name else None)
    tokenizer = load_tokenizer(args.model)
    heldout = tokenize_split(args.corpus, tokenizer, "heldout")
    stream = heldout.lm_stream(tokenizer.special_tokens["[EOS]"])
    began = time.perf_counter()
    results = {"model": str(args.model), "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
               "dtype": str(model.dtype).removeprefix("torch.")}
    results["perplexity"] = heldout_perplexity(model, stream, args.ppl_tokens, args.ppl_context, args.ppl_chunk,
                                               args.token_by_token)
    print(json.dumps(results["perplexity"], indent=2))
    builder = RetrievalSampleBuilder(heldout, tokenizer)
    lengths = [int(n) for n in args.lengths.split(",")]
    results["needle"] = needle_table(model, tokenizer, builder, lengths, args.trials, args.seed, args.prefill_chunk,
                                     args.max_new_tokens)
    results["seconds"] = round(time.perf_counter() - began, 1)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")


if __name__ == "__main__":
    main()
