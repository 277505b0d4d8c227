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
   and once with 3 distractor facts of the same kind about other keys. Then plain facts the same way
   ("The billing job runs every 45 minutes."), in wordings training never uses, at the first two lengths.
3. Code questions on held-out code folders at --code-lengths (default 8k, 32k): which file defines X,
   what a setting or argument defaults to, where the function that does Z is (task_samples.py), with
   the names and literals asked about made up for the sample, so that only the folder can answer
   (--original-names: the files as they are).
4. Two-turn follow-ups (a question, the model's own reply kept in the state, then a question about
   that answer), and README's two questions on `kimi-desk open README.md`'s document.
--copy-code-spans answers as the app answers with the embedded model: what a reply writes between
backticks held to the document's text and the questions (engine/code_spans.py).
Writes eval.json, eval.md (the tables for the model card) and replies.jsonl (every trial's replies) in
--out, after each table. --quick shrinks every table for a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from corpus_tokens import tokenize_split
from prepare_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from retrieval_samples import FACT_KINDS
from task_samples import TaskSampleBuilder, is_correct

from kimi_desk.engine import load_model
from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT, document_prompt, stop_token_ids
from kimi_desk.engine.code_spans import CodeSpanCopy
from kimi_desk.engine.generate import GREEDY, generate, prefill
from kimi_desk.engine.ingest import load_path
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


def heldout_perplexity(model, stream: torch.Tensor, tokens: int, context: int, chunk: int, token_by_token: int) -> dict:
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
        "tokens": int(nll.numel()),
        "context": context,
        "prefill_chunk": chunk,
        "ppl_chunked_prefill": math.exp(float(nll.mean())),
        "token_by_token_tokens": int(stepwise.numel()),
        "ppl_chunked_prefill_on_those": ppl_chunked,
        "ppl_token_by_token": ppl_stepwise,
        "max_abs_nll_difference": float((chunked - stepwise).abs().max()),
        "paths_agree": abs(ppl_chunked / ppl_stepwise - 1) < tolerance,
        "agreement_tolerance": tolerance,
    }


@dataclass
class Asker:
    """How every table asks: the model and its tokenizer, the tokens per prefill call, the longest reply,
    and with `copies_code_spans` code spans held to the document as the app holds them."""

    model: object
    tokenizer: object
    chunk: int
    max_new_tokens: int
    copies_code_spans: bool = False

    def __post_init__(self):
        self.stops = stop_token_ids(self.tokenizer, self.model.config)

    def copy(self, document: str) -> CodeSpanCopy | None:
        """What the replies' code spans are held to, as the app holds them: the document, joined by each
        turn with the questions asked so far."""
        return CodeSpanCopy(self.tokenizer, document) if self.copies_code_spans else None

    def reply(self, ids, state, copy: CodeSpanCopy | None = None) -> str:
        """The text the model generates greedily after `ids`, fed on top of `state` (which keeps the ids
        and the reply), until a stop token or max_new_tokens."""
        result = generate(
            self.model,
            ids,
            state,
            max_new_tokens=self.max_new_tokens,
            sampling=GREEDY,
            stop_token_ids=self.stops,
            prefill_chunk_size=self.chunk,
            span_rewriter=copy,
        )
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True)


@torch.no_grad()
def run_conversation(asker: Asker, sample) -> dict:
    """Read the sample's document as a session does (prefill, state kept), then each turn: feed the
    question (after the first, the previous reply's <|im_end|> and the new user turn, as
    next_turn_token_ids), generate greedily until <|im_end|>; the model's own replies stay in the state."""
    ids = sample.input_ids
    state = asker.model.new_state(1)
    began = time.perf_counter()
    prefill(asker.model, ids[: sample.document_end], state, chunk_size=asker.chunk)
    document = asker.copy(asker.tokenizer.decode(list(ids[: sample.document_end]))) if asker.copies_code_spans else None
    turns = []
    for index, (turn, (start, end)) in enumerate(zip(sample.turns, sample.feeds)):
        copy = document and document.joined("\n".join(t.question for t in sample.turns[: index + 1]))
        reply = asker.reply(ids[start:end], state, copy)
        turns.append(
            {
                "question": turn.question,
                "reference": turn.answer,
                "expected": list(turn.expected),
                "any_of": list(turn.any_of),
                "reply": reply,
                "correct": is_correct(turn, reply),
                "spans_rewritten": copy.rewritten if copy else [],
            }
        )
    return {
        "task": sample.task,
        "length": sample.answer_spans[0][0],
        "depth": None if sample.depth is None else round(sample.depth, 3),
        **sample.detail,
        "turns": turns,
        "correct": turns[-1]["correct"],
        "seconds": round(time.perf_counter() - began, 2),
    }


def _row(name: str, length: int, outcomes: list[dict], log, **extra) -> dict:
    correct = sum(o["correct"] for o in outcomes)
    log(
        f"{name} at {length} tokens{''.join(f', {k} {v}' for k, v in extra.items())}: {correct}/{len(outcomes)} "
        f"({sum(o['seconds'] for o in outcomes):.0f} s)"
    )
    return {
        "length": length,
        **extra,
        "trials": len(outcomes),
        "correct": correct,
        "accuracy": correct / max(1, len(outcomes)),
        "outcomes": outcomes,
    }


def _wrong_kinds(row: dict | None) -> tuple[int, int]:
    """Of a needle row's wrong replies: (those naming a distractor's value: the keys confused, the others:
    a value made up)."""
    wrong = [o for o in (row or {}).get("outcomes", []) if not o["correct"]]
    confused = sum(any(v in o["turns"][0]["reply"] for v in o.get("distractor_values", [])) for o in wrong)
    return confused, len(wrong) - confused


def needle_table(
    asker: Asker, builder, lengths: list[int], trials: int, seed: int, log=print, kinds=FACT_KINDS, name="needle"
) -> list[dict]:
    """A fact of `kinds` (the first card's) at `trials` evenly spread depths, alone and with 3 distractors."""
    rows = []
    for length in lengths:
        for distractors in (0, 3):
            rng = random.Random(f"{seed}-{length}-{distractors}" + ("" if name == "needle" else f"-{name}"))
            outcomes = [
                run_conversation(
                    asker,
                    builder.needle(
                        length,
                        rng,
                        depth=(t + 0.5) / trials,
                        distractors=distractors,
                        kind=rng.choice(kinds),
                        reverse_share=0,  # the card's needles, asked by key as they always were
                    ),
                )
                for t in range(trials)
            ]
            rows.append(_row(name, length, outcomes, log, distractors=distractors))
    return rows


def task_table(
    asker: Asker, builder, tasks: list[str], lengths: list[int], trials: int, seed: int, log=print
) -> list[dict]:
    """`trials` conversations of each task at each length, on held-out folders."""
    rows = []
    for task in tasks:
        for length in lengths:
            rng = random.Random(f"{seed}-{task}-{length}")
            outcomes = []
            for _ in range(3 * trials):
                if len(outcomes) == trials:
                    break
                sample = builder.build(task, length, rng)
                # A folder with nothing to ask falls back to a needle: drawn again, not counted.
                if sample.task == task:
                    outcomes.append(run_conversation(asker, sample))
            rows.append(_row(task, length, outcomes, log, task=task))
    return rows


# README's answers: `kimi-desk sessions [list]` (a bare `kimi-desk sessions` lists too), so the command
# counts with or without "list", but not as the start of another subcommand or a longer name.
README_QUESTIONS = (
    (
        "Which command lists the saved sessions?",
        "kimi-desk sessions list",
        r"kimi-desk sessions(?: list)?(?![\w-])(?! (?:show|rm|export|import|export-thread)\b)",
    ),
    ("Which variable forces the PyTorch kernels?", "KIMI_DESK_KERNELS", r"KIMI_DESK_KERNELS(?!\w)"),
)


@torch.no_grad()
def readme_table(asker: Asker, readme: Path, log=print) -> dict:
    """README's run command (`kimi-desk open README.md`), asked the issue's two questions: the document as
    the engine loads it, each question from the document's state as `ask` does it."""
    document = load_path(readme).text
    copy = asker.copy(document)
    outcomes = []
    for question, expected, right in README_QUESTIONS:
        prompt = document_prompt(asker.tokenizer, document, question, DEFAULT_SYSTEM_PROMPT)
        state = asker.model.new_state(1)
        began = time.perf_counter()
        prefill(asker.model, prompt.prefix_ids, state, chunk_size=asker.chunk)
        asked = copy and copy.joined(question)
        reply = asker.reply(prompt.suffix_ids, state, asked)
        outcomes.append(
            {
                "question": question,
                "expected": expected,
                "reply": reply,
                "spans_rewritten": asked.rewritten if asked else [],
                "correct": re.search(right, reply) is not None,
                "length": len(prompt.token_ids),
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
    correct = sum(o["correct"] for o in outcomes)
    log(f"README questions: {correct}/{len(outcomes)}")
    return {"path": str(readme), "correct": correct, "trials": len(outcomes), "outcomes": outcomes}


def _cell(row: dict | None) -> str:
    return "" if row is None else f"{row['correct']}/{row['trials']} ({100 * row['accuracy']:.0f}%)"


def _needle_lines(rows: list[dict]) -> list[str]:
    """A needle table (fact alone, with 3 distractors, the wrong replies' kinds), one line per length."""
    lines = [
        "| context | fact alone | with 3 distractor facts | wrong with distractors: a distractor's value / other |",
        "|---:|---:|---:|---:|",
    ]
    by_length: dict[int, dict[int, dict]] = {}
    for row in rows:
        by_length.setdefault(row["length"], {})[row["distractors"]] = row
    for length, row in sorted(by_length.items()):
        confused, invented = _wrong_kinds(row.get(3))
        lines.append(f"| {length:,} | {_cell(row.get(0))} | {_cell(row.get(3))} | {confused} / {invented} |")
    return lines


def markdown(results: dict) -> str:
    ppl = results["perplexity"]
    lines = [
        f"## Evaluation of `{results['model']}`",
        "",
        f"Device {results['device']}, dtype {results['dtype']}, through `kimi_desk.engine.load_model`"
        f"{' (--quick: fewer and shorter trials)' if results.get('quick') else ''}"
        f"{', code spans copied from the document' if results['args'].get('copy_code_spans') else ''}. "
        "Every reply is in "
        "`replies.jsonl` beside this file.",
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
        "asked for after the document in the chat format; greedy reply, correct when it contains the value. "
        "Distractors: 3 facts of the same kind about other keys, with other values.",
        "",
    ]
    lines += _needle_lines(results["needle"])
    if results.get("plain"):
        lines += [
            "",
            "### Plain facts, in wordings never trained on",
            "",
            "A sentence of everyday words about a named subject (\"The billing job runs every 45 minutes.\", "
            "\"The search bucket keeps files for 450 days.\"), planted and asked as the needles are, in wordings "
            "no training sample uses (training plants other relations, said and asked otherwise).",
            "",
        ]
        lines += _needle_lines(results["plain"])
    if results.get("code"):
        lengths = sorted({r["length"] for r in results["code"]})
        lines += [
            "",
            "### Code questions on held-out code folders",
            "",
            "\"Which file defines X\" (X defined once in the folder; right when the reply holds the path), "
            "\"what does the setting/argument default to\" (the literal), \"where is the function that ...\" "
            "(from its docstring; right when the reply names the function).",
            "",
            "| question | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for task in dict.fromkeys(r["task"] for r in results["code"]):
            cells = {r["length"]: r for r in results["code"] if r["task"] == task}
            lines.append(f"| {task} | " + " | ".join(_cell(cells.get(n)) for n in lengths) + " |")
    if results.get("followup"):
        lines += [
            "",
            "### Two-turn follow-ups",
            "",
            "A needle, \"which file defines\" or default question, then a second turn that refers to the "
            "answer (\"Which file says so?\", \"What else does that file define?\", \"What must be done to "
            "that service after every deploy?\"); the model's own first "
            "reply stays in the state; counted when the second reply is right (first reply right too in "
            "brackets).",
            "",
            "| context | second reply right | first reply right |",
            "|---:|---:|---:|",
        ]
        for row in results["followup"]:
            first = sum(o["turns"][0]["correct"] for o in row["outcomes"])
            lines.append(f"| {row['length']:,} | {_cell(row)} | {first}/{row['trials']} |")
    if results.get("readme"):
        lines += ["", "### README's run command", "", "| question | expected | reply | right |", "|---|---|---|---|"]
        for o in results["readme"]["outcomes"]:
            reply = o["reply"].replace("|", "\\|").replace("\n", " ")[:80]
            lines.append(f"| {o['question']} | `{o['expected']}` | {reply} | {'yes' if o['correct'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_replies(results: dict, path: Path) -> None:
    """Every trial's conversation and replies, one JSON line each."""
    with path.open("w", encoding="utf-8") as out:
        for table in ("needle", "plain", "code", "followup"):
            for row in results.get(table, []):
                for outcome in row["outcomes"]:
                    out.write(json.dumps({"table": table, **outcome}) + "\n")
        for outcome in results.get("readme", {}).get("outcomes", []):
            out.write(json.dumps({"table": "readme", **outcome}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=None, help="default: <model>/../eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="default: the checkpoint's on CUDA, float32 on the CPU",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer and shorter trials, for a 2-core CPU (about 10 minutes there): 3 trials, needles "
        "at 4k and 16k, code questions at 8k, 4 follow-ups, 8k tokens of perplexity",
    )
    parser.add_argument("--ppl-tokens", type=int, default=None, help="default 65536 (--quick: 8192)")
    parser.add_argument("--ppl-context", type=int, default=4096)
    parser.add_argument(
        "--ppl-chunk",
        type=int,
        default=1024,
        help="tokens per model call for perplexity (several per sequence, so the state is handed on)",
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=4096, help="tokens per model call for the needles (a session's default)"
    )
    parser.add_argument("--token-by-token", type=int, default=None, help="default 512 (--quick: 128)")
    parser.add_argument(
        "--lengths", default=None, help="needle lengths (default 4096,32768,131072; --quick 4096,16384)"
    )
    parser.add_argument("--code-lengths", default=None, help="default 8192,32768 (--quick 8192)")
    parser.add_argument("--code-tasks", default="which_file,setting_default,where_function")
    parser.add_argument("--followup-length", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=None, help="default 10 (--quick: 3)")
    parser.add_argument("--followup-trials", type=int, default=None, help="default 10 (--quick: 4)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument(
        "--original-names",
        action="store_true",
        help="ask the code questions about the held-out files as they are, without fresh names, literals and paths",
    )
    parser.add_argument(
        "--token-cache",
        type=Path,
        default=None,
        help="where the held-out split's ids are cached (default: <corpus>/tokens)",
    )
    parser.add_argument(
        "--copy-code-spans",
        action="store_true",
        help="hold what replies write between backticks to the document, as the app does for the embedded model",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(
        ppl_tokens=(8192, 65536),
        token_by_token=(128, 512),
        lengths=("4096,16384", "4096,32768,131072"),
        code_lengths=("8192", "8192,32768"),
        trials=(3, 10),
        followup_trials=(4, 10),
    )
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    out = args.out or args.model.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else None)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, dtype_name) if dtype_name else None)
    tokenizer = load_tokenizer(args.model)
    asker = Asker(model, tokenizer, args.prefill_chunk, args.max_new_tokens, args.copy_code_spans)
    heldout = tokenize_split(args.corpus, tokenizer, "heldout", cache_dir=args.token_cache)
    stream = heldout.lm_stream(tokenizer.special_tokens["[EOS]"])
    began = time.perf_counter()
    results = {
        "model": str(args.model),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quick": quick,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }

    def save() -> None:
        # After every table: a run cut short (a GPU call's time limit) keeps what it measured.
        results["seconds"] = round(time.perf_counter() - began, 1)
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        write_replies(results, out / "replies.jsonl")
        if "needle" in results:
            (out / "eval.md").write_text(markdown(results), encoding="utf-8")

    results["perplexity"] = heldout_perplexity(
        model, stream, args.ppl_tokens, args.ppl_context, args.ppl_chunk, args.token_by_token
    )
    print(json.dumps(results["perplexity"], indent=2))
    save()
    builder = TaskSampleBuilder(heldout, tokenizer, fresh_names=not args.original_names)
    if args.readme.is_file():
        results["readme"] = readme_table(asker, args.readme)
    lengths = [int(n) for n in args.lengths.split(",")]
    results["needle"] = needle_table(asker, builder, lengths[:1], args.trials, args.seed)
    save()
    results["plain"] = needle_table(
        asker, builder, lengths[:2], args.trials, args.seed, kinds=("plain_held_out",), name="plain"
    )
    save()
    code_lengths = [int(n) for n in args.code_lengths.split(",")]
    results["code"] = task_table(asker, builder, args.code_tasks.split(","), code_lengths, args.trials, args.seed)
    save()
    results["followup"] = task_table(
        asker, builder, ["followup"], [args.followup_length], args.followup_trials, args.seed
    )
    save()
    # The long needles last: the slowest trials, so a time limit costs the fewest tables.
    for length in lengths[1:]:
        results["needle"] += needle_table(asker, builder, [length], args.trials, args.seed)
        save()
    print(markdown(results))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'replies.jsonl'}")


if __name__ == "__main__":
    main()
