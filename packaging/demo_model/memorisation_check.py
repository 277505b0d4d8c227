"""Can the task samples be answered from memory? Measured on generated samples against the training text.

    python packaging/demo_model/memorisation_check.py --samples 200 --token-cache /tmp/tokens

For `--samples` conversations per task (task_samples.py, built from --split, default the training split)
it reports, per task:

    answer_in_context   the first reply's expected strings all occur in the sample's document (the
                        question is answerable by reading)
    answer_in_corpus    ... occur somewhere in the training corpus text, the documents as the model
                        reads them in language modelling ("==> path <==" headers included)
    fact_in_corpus      the question's subject and its answer occur together in one training file: the
                        fact itself (X is defined in that file, that function's docstring says so, that
                        argument defaults to that literal) is training text, so the weights can hold it
    later_turns_in_corpus  the same as answer_in_corpus for the follow-up turns' strings

and, for the needles, how many distinct keys and values each fact kind can take (counted from the
generator's pools, and measured over --needle-draws draws). Nothing here is part of the product.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
from pathlib import Path

import retrieval_samples
from corpus_tokens import tokenize_split
from prepare_corpus import DEFAULT_OUT as DEFAULT_CORPUS
from prepare_corpus import read_documents
from retrieval_samples import ALL_FACT_KINDS, fact_keys, make_fact
from task_samples import TaskSampleBuilder

from kimi_desk.engine.ingest.render import render_file_block
from kimi_desk.engine.tokenizer import load_tokenizer

TASKS = ("which_file", "where_function", "setting_default", "followup", "needle")


class CorpusText:
    """The training documents' files as the model reads them (header and text), searchable."""

    def __init__(self, corpus: Path, split: str = "train"):
        blocks, self.paths, self.starts = [], [], []
        position = 0
        for document in read_documents(corpus, split):
            for file in document["files"]:
                block = render_file_block(file["path"], file["text"])
                self.starts.append(position)
                self.paths.append(file["path"])
                blocks.append(block)
                position += len(block) + 1
        self.blocks = blocks
        self.text = "\x00".join(blocks)

    def contains(self, needle: str) -> bool:
        return bool(needle) and needle in self.text

    def blocks_with(self, needle: str, limit: int = 50000):
        """Indices of the files holding `needle`, each once."""
        seen, start = set(), 0
        while needle and len(seen) < limit:
            at = self.text.find(needle, start)
            if at < 0:
                break
            index = bisect.bisect_right(self.starts, at) - 1
            if index not in seen:
                seen.add(index)
                yield index
            start = self.starts[index + 1] if index + 1 < len(self.starts) else len(self.text)


def _path_matches(answer_path: str, corpus_path: str) -> bool:
    return answer_path == corpus_path or answer_path.endswith("/" + corpus_path)


def fact_in_corpus(corpus: CorpusText, task: str, question: str, answer: str, expected: str) -> bool:
    """Whether the training text holds the fact the first question asks about, read off the question's
    wording (so that it works for any version of the generator)."""
    if task == "which_file":
        name = re.search(r"(?:defines |Where is |`)([A-Za-z_]\w*)", question).group(1)
        for definition in (f"def {name}", f"class {name}"):
            for index in corpus.blocks_with(definition):
                if re.search(
                    rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", corpus.blocks[index], re.M
                ) and _path_matches(expected, corpus.paths[index]):
                    return True
        return False
    if task == "where_function":
        quoted = re.search(r'"(.+)"', question)
        subject = quoted.group(1) if quoted else re.search(r"function that \w+ (.+)\?$", question).group(1)
        return any(re.search(rf"def\s+{re.escape(expected)}\b", corpus.blocks[i]) for i in corpus.blocks_with(subject))
    if task == "setting_default":
        parameter = re.search(r"the (\w+) argument of (\w+)|value of (\w+) in (\w+)", question)
        if parameter:
            name, function = [g for g in parameter.groups() if g]
            pattern = re.compile(
                rf"def\s+{re.escape(function)}\s*\([^)]*\b{re.escape(name)}\s*(?::[^=,)]*)?=\s*"
                rf"{re.escape(expected)}\s*[,)]"
            )
            return any(pattern.search(corpus.blocks[i]) for i in corpus.blocks_with(f"def {function}"))
        constant = re.search(r"What is (\w+) set to|the setting (\w+) have", question)
        name = next(g for g in constant.groups() if g)
        pattern = re.compile(rf"^{re.escape(name)}\s*=\s*{re.escape(expected)}\s*$", re.M)
        return any(pattern.search(corpus.blocks[i]) for i in corpus.blocks_with(name))
    if task == "needle":
        # The key is the fact's subject: does any training file state this key's value?
        return any(expected in corpus.blocks[i] for i in corpus.blocks_with(answer))
    raise ValueError(task)


def measure_tasks(
    builder: TaskSampleBuilder, corpus: CorpusText, tokenizer, samples: int, length: int, seed: int
) -> dict:
    results = {}
    for task in TASKS:
        rng = random.Random(f"{seed}-{task}")
        counts = dict(
            samples=0, answer_in_context=0, answer_in_corpus=0, fact_in_corpus=0, later_turns=0, later_turns_in_corpus=0
        )
        for _ in range(4 * samples):
            if counts["samples"] == samples:
                break
            sample = builder.build(task, length, rng)
            if sample.task != task:  # fell back to a needle: drawn again
                continue
            counts["samples"] += 1
            document = tokenizer.decode(sample.input_ids[sample.document_start : sample.document_end])
            first = sample.turns[0]
            counts["answer_in_context"] += all(v in document for v in first.expected)
            counts["answer_in_corpus"] += all(corpus.contains(v) for v in first.expected)
            kind = task if task != "followup" else _first_kind(first.question)
            if kind == "needle":
                key = sample.detail.get("key") or _needle_key(first.question)
                counts["fact_in_corpus"] += fact_in_corpus(corpus, "needle", first.question, key, first.expected[0])
            else:
                counts["fact_in_corpus"] += fact_in_corpus(
                    corpus, kind, first.question, first.answer, first.expected[0]
                )
            for turn in sample.turns[1:]:
                counts["later_turns"] += 1
                strings = list(turn.expected) + list(turn.any_of)
                counts["later_turns_in_corpus"] += any(corpus.contains(v) for v in strings)
        results[task] = counts
    return results


def _first_kind(question: str) -> str:
    if re.search(r"defines |Where is \w+ defined|` defined", question):
        return "which_file"
    if re.search(r"argument of|value of \w+ in|set to\?|the setting \w+ have", question) and "_limit" not in question:
        return "setting_default"
    return "needle"


def _needle_key(question: str) -> str:
    match = re.search(
        r"service (\S+)\?|the (\S+) vault|the (\S+) module|project (\S+) launch|the (\S+)_limit", question
    )
    return next((g for g in match.groups() if g), "") if match else ""


def needle_spaces(draws: int, seed: int) -> dict:
    """Distinct keys and values per fact kind: from the pools (where they multiply out) and over draws."""
    rng = random.Random(seed)
    spaces = {}
    for kind in ALL_FACT_KINDS:
        keys, values = set(), set()
        for _ in range(draws):
            key = fact_keys(kind, 1, rng)[0]
            keys.add(key)
            values.add(make_fact(kind, key, rng).value)
        spaces[kind] = {"distinct_keys_in_draws": len(keys), "distinct_values_in_draws": len(values), "draws": draws}
    for kind, count in pool_sizes().items():
        spaces[kind].update(count)
    return spaces


def pool_sizes() -> dict:
    """The number of keys and values the generator can produce per kind (values: for one key)."""
    if hasattr(retrieval_samples, "space_sizes"):
        return retrieval_samples.space_sizes()
    syllables = len(retrieval_samples._SYLLABLES)
    keys = syllables**2 + syllables**3
    return {
        "port": {"keys": keys, "values": 65535 - 1024 + 1},
        "code": {"keys": keys, "values": 24**3 * 9000},
        "maintainer": {
            "keys": keys,
            "values": len(retrieval_samples._FIRST_NAMES) * len(retrieval_samples._LAST_NAMES),
        },
        "date": {"keys": keys, "values": 12 * 28 * 15},
        "setting": {"keys": keys, "values": 98 + 9900},
        # The value is the tool, the question's noun and the action's one verb: only the tool is looked up.
        "command": {
            "keys": keys * len(retrieval_samples._ACTIONS) * len(retrieval_samples._NOUNS),
            "values": keys,
            "values_given_the_question": 1,
        },
        "variable": {
            "keys": keys * len(retrieval_samples._THINGS),
            "values": keys * len(retrieval_samples._VARIABLE_WORDS),
            "values_given_the_tool": len(retrieval_samples._VARIABLE_WORDS),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parents[2] / "assets" / "model")
    parser.add_argument(
        "--token-cache",
        type=Path,
        default=None,
        help="where the token cache is read and written (default: <corpus>/tokens)",
    )
    parser.add_argument("--split", default="train", help="the split the samples are built from")
    parser.add_argument("--samples", type=int, default=200, help="samples per task")
    parser.add_argument("--length", type=int, default=4096, help="tokens per sample")
    parser.add_argument("--needle-draws", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--original-names",
        action="store_true",
        help="build the code questions over the files as they are (no fresh names or paths)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    split = tokenize_split(args.corpus, tokenizer, args.split, cache_dir=args.token_cache, log=lambda *_: None)
    try:
        builder = TaskSampleBuilder(split, tokenizer, fresh_names=not args.original_names)
    except TypeError:  # a generator without the option
        builder = TaskSampleBuilder(split, tokenizer)
    corpus = CorpusText(args.corpus, "train")
    results = {
        "split": args.split,
        "length": args.length,
        "original_names": args.original_names,
        "tasks": measure_tasks(builder, corpus, tokenizer, args.samples, args.length, args.seed),
        "needle_spaces": needle_spaces(args.needle_draws, args.seed),
    }
    print(
        f"samples built from the {args.split} split at {args.length} tokens, checked against the training text "
        f"({len(corpus.blocks):,} files, {len(corpus.text) / 1e6:.1f} M characters)"
    )
    print(
        f"{'task':<16} {'n':>4} {'in context':>11} {'in corpus':>10} {'fact in corpus':>15} {'later turns in corpus':>22}"
    )
    for task, c in results["tasks"].items():
        n = max(1, c["samples"])
        later = f"{c['later_turns_in_corpus']}/{c['later_turns']}" if c["later_turns"] else "-"
        print(
            f"{task:<16} {c['samples']:>4} {c['answer_in_context'] / n:>11.0%} {c['answer_in_corpus'] / n:>10.0%} "
            f"{c['fact_in_corpus'] / n:>15.0%} {later:>22}"
        )
    print(f"\n{'needle kind':<12} {'keys (pool)':>14} {'values (pool)':>16} {'distinct keys / values in draws':>34}")
    for kind, s in results["needle_spaces"].items():
        extra = {k: v for k, v in s.items() if k.startswith("values_given")}
        print(
            f"{kind:<12} {s['keys']:>14.3g} {s['values']:>16.3g} "
            f"{s['distinct_keys_in_draws']:>16} / {s['distinct_values_in_draws']:<6} of {s['draws']}"
            + (f"  {extra}" if extra else "")
        )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
