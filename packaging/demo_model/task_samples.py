"""Conversations for the product's questions, in the product's reading format, for training and evaluation.

A kimi-desk session reads a folder as `render_folder_preamble` (the tree) then one `render_file_block`
("==> path <==") per file, in `reading_order_key` order, each file's block tokenized on its own (the
token cache holds them so), after `document_head_ids`; then `question_ids(question)`, the reply and
`<|im_end|>`. RetrievalSampleBuilder already builds such documents; this module asks the questions a
user of the product asks about them:

    needle           a planted fact (ports, codes, maintainers, dates, settings, and the README's kinds:
                     "which command lists the saved X", "which variable forces the Y") at any depth,
                     and plain facts ("The billing job runs every 45 minutes."), with 0-7 distractor
                     facts of the same kind that hold other values
    which_file       "Which file defines X?": X a top-level class or function defined once in the folder
    where_function   "Where is the function that returns ...?": from a function's docstring
    setting_default  "What does the timeout argument of connect default to?", "What is MAX_SIZE set to?":
                     the literal defaults of real code
    followup         one of the above, then a second user turn that refers to the first answer
                     ("Which file says so?", "What else does that file define?")

The code questions read real files of the corpus (code sources only, so a folder reads as one project),
but the model has read those files in training too, so a question about them could be answered from the
weights. So each code sample is disguised (`fresh_names`, on by default, in training and evaluation
alike): the names the questions ask about and answer with are renamed, consistently in every file of
the folder, to made-up names of the same style (`connect` -> `velmor_dast`, `MAX_SIZE` -> `KORVEL_TIM`);
the literal a default question asks for is replaced by a fresh one of its kind; and the folder's files
sit under a made-up directory (`vexlor/django/db/models/...`). Every answer is then a string that
occurs nowhere in the training corpus, only in the sample's own document (memorisation_check.py
measures it). The reading format stays ingest's: `render_folder_preamble`, then `render_file_block`
per file in reading order.
Each sample marks its replies (`answer_spans`): training takes the loss on them only. Each turn says
what a reply must contain to count (`expected`, `any_of`): evaluation generates and checks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from retrieval_samples import (
    _SYLLABLES,
    ALL_FACT_KINDS,
    ENTITY_NOUNS,
    RetrievalSampleBuilder,
    _File,
    make_aspect,
    reverse_question,
)

from kimi_desk.engine.chat import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    chat_token_ids,
    document_head_ids,
    document_text,
    question_ids,
)
from kimi_desk.engine.ingest.listing import reading_order_key
from kimi_desk.engine.ingest.render import render_file_block, render_folder_preamble

CODE_SOURCES = ("cpython-stdlib", "django", "twisted", "sqlalchemy")
# A training needle's distractors: mostly several facts of the kind. Lone facts are found (run 6: 10/10/7
# of 10 at 4k/32k/128k); telling the asked key's value from its neighbours' is what is still learnt.
DISTRACTOR_COUNTS = (0, 1, 3, 4, 5, 7)
# The share of training needles that are plain facts (else any kind, plain included, alike).
PLAIN_SHARE = 0.3
TASKS = ("needle", "which_file", "where_function", "setting_default", "followup")
# The training mix: needles first (the skill the others build on), the code questions, follow-ups.
DEFAULT_MIX = {"needle": 0.35, "which_file": 0.2, "where_function": 0.1, "setting_default": 0.15, "followup": 0.2}

_TOP_LEVEL_DEF = re.compile(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)", re.M)
_ANY_DEF = r"(?:def|class)\s+{}\b"
_DOCSTRING = re.compile(
    r"^[ \t]*(?:async\s+)?def\s+(\w+)\s*\((?:[^()]|\([^()]*\))*\)[^:\n]*:[ \t]*\n[ \t]*[rRuU]?(?:\"\"\"|''')"
    r"[ \t]*([A-Z][^\n]*?)[ \t]*$",
    re.M,
)
_SIGNATURE = re.compile(r"^[ \t]*(?:async\s+)?def\s+(\w+)\s*\(([^)\n]*)\)", re.M)
_LITERAL = r"(-?\d+(?:\.\d+)?|'[^'\n,]{1,24}'|\"[^\"\n,]{1,24}\"|True|False|None)"
_PARAMETER = re.compile(r"\s*(\w+)\s*(?::\s*[^=]+?)?\s*=\s*" + _LITERAL + r"\s*")
_CONSTANT = re.compile(r"^([A-Z][A-Z0-9_]{2,})\s*=\s*" + _LITERAL + r"\s*$", re.M)


# Docstrings that start with one of these read as "the function that returns ...".
_IMPERATIVES = frozenset(
    """Return Create Get Set Check Make Build Compute Convert Parse Read Write Test Add Remove
Find Load Save Open Close Handle Run Call Send Start Stop Update Generate Print Format Validate Ensure Verify Apply
Initialize Register Yield Extract Encode Decode Connect Clean Reset Wrap Raise Emit Process Fetch Render Resolve
Determine Construct Install Insert Delete Append Copy Move Retrieve Translate Normalize List Show Compare Split
Join Sort Count Wait Accept Reject Release Acquire Lookup Serialize Deserialize Quote Unquote Strip""".split()
)


_CAMEL_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+")


def _name_parts(name: str) -> list[str]:
    return [p for chunk in name.strip("_").split("_") for p in _CAMEL_PART.findall(chunk)] or [name]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def fresh_name(like: str, rng: random.Random, avoid: str = "") -> str:
    """A made-up identifier in the style of `like` (CamelCase, mixedCase, snake_case, UPPER_CASE, leading
    underscores kept), two made-up words, sometimes ending in `like`'s last word (`FindFailureTests`
    -> `VormelTisaTests`); never a word of `avoid`."""
    parts = _name_parts(like)
    for _ in range(100):
        words = [_word(rng) for _ in range(2)]
        if len(parts) > 1 and rng.random() < 0.4:
            words[-1] = parts[-1].lower()
        if like.isupper() or (like.strip("_").replace("_", "").isupper() and len(like.strip("_")) > 1):
            name = "_".join(w.upper() for w in words)
        elif like.strip("_")[:1].isupper():
            name = "".join(w.capitalize() for w in words)
        elif "_" not in like.strip("_") and any(c.isupper() for c in like):
            name = words[0] + "".join(w.capitalize() for w in words[1:])
        else:
            name = "_".join(words)
        name = like[: len(like) - len(like.lstrip("_"))] + name
        if not re.search(rf"\b{re.escape(name)}\b", avoid):
            return name
    raise NoQuestion("no fresh name")


def fresh_literal(value: str, rng: random.Random) -> str:
    """Another literal of `value`'s kind (an int of about its size, a float, a string in the same quotes; True
    and False drawn anew, None kept)."""
    if value in ("True", "False"):
        return rng.choice(("True", "False"))
    if value == "None":
        return value
    if value[:1] in "'\"":
        quote = value[0]
        words = [_word(rng) for _ in range(rng.randint(1, 2))]
        return quote + rng.choice(("_", "-", " ", ".")).join(words)[:22] + quote
    sign = "-" if value.startswith("-") else ""
    digits = value.lstrip("-")
    if "." in digits:
        whole, fraction = digits.split(".")
        new = f"{rng.randint(0, 10 ** len(whole) - 1)}.{rng.randint(0, 10 ** len(fraction) - 1):0{len(fraction)}d}"
    else:
        width = max(1, min(len(digits) + rng.choice((0, 0, 1)), 7))
        new = str(rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1))
    if sign + new == value:
        return fresh_literal(value, rng)
    return sign + new


def fresh_prefix(rng: random.Random) -> str:
    """A made-up folder (or two) the sample's files are put under."""
    return "/".join(_word(rng) for _ in range(rng.randint(1, 2)))


@dataclass
class Disguise:
    """How a code sample's folder is changed: names renamed in every file, exact edits in one file, every
    path under a prefix."""

    renames: dict[str, str] = field(default_factory=dict)
    edits: list[tuple[str, int, str, str]] = field(default_factory=list)  # (path, offset, old text, new text)
    prefix: str = ""

    def path(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def text(self, path: str, text: str) -> str:
        for where, at, old, new in sorted(self.edits, reverse=True):
            if where == path:
                if text[at : at + len(old)] != old:
                    raise AssertionError(f"{old!r} is not at {at} in {path}")
                text = text[:at] + new + text[at + len(old) :]
        if self.renames:
            pattern = re.compile(
                r"\b(" + "|".join(re.escape(n) for n in sorted(self.renames, key=len, reverse=True)) + r")\b"
            )
            text = pattern.sub(lambda m: self.renames[m.group(1)], text)
        return text


class NoQuestion(Exception):
    """The folder drawn has nothing to ask this question about (another task is drawn instead)."""


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str  # the reference reply (the training target), without <|im_end|>
    expected: tuple[str, ...]  # a reply is right when it contains each of these
    any_of: tuple[str, ...] = ()  # ... and, when given, at least one of these


@dataclass
class TaskSample:
    task: str
    input_ids: list[int]  # the whole conversation, every reply and its closing <|im_end|> included
    answer_spans: list[tuple[int, int]]  # input_ids[a:b] is turn i's reply and its <|im_end|>: the loss's tokens
    feeds: list[tuple[int, int]]  # input_ids[a:b] is what is fed before turn i's reply (question, headers)
    document_start: int
    document_end: int
    turns: list[Turn]
    depth: float | None = None  # where the asked fact sits in the document (needles)
    detail: dict = field(default_factory=dict)

    def target_weights(self, document_weight: float = 0.0, looked_up_weight: float = 1.0) -> list[float]:
        """One weight per next-token target (input_ids[1:]): 1 on reply tokens, `document_weight` on the
        document's, 0 elsewhere (system turn, questions, turn headers). A reply token that the turn's
        question does not hold (the value, path or name that had to be looked up in the document, as
        against the words the reply repeats from the question) weighs `looked_up_weight`: the reply's
        template is learnt early, and its near-zero loss would otherwise dilute the look-up's."""
        weights = [0.0] * (len(self.input_ids) - 1)
        if document_weight:
            for target in range(self.document_start + 1, self.document_end):
                weights[target - 1] = document_weight
        for (start, end), (feed_start, feed_end) in zip(self.answer_spans, self.feeds):
            asked = set(self.input_ids[feed_start:feed_end])
            for target in range(start, end):
                looked_up = target < end - 1 and self.input_ids[target] not in asked  # end - 1: <|im_end|>
                weights[target - 1] = looked_up_weight if looked_up else 1.0
        return weights


def is_correct(turn: Turn, reply: str) -> bool:
    return all(value in reply for value in turn.expected) and (not turn.any_of or any(v in reply for v in turn.any_of))


def code(text: str) -> str:
    """A name, path or literal as replies write it: between backticks, so that the app holds it to the
    text read (engine/code_spans.py) and it can be checked (as it is when it holds a backtick itself)."""
    return text if "`" in text else f"`{text}`"


def third_person(verb: str) -> str:
    """'Return' -> 'returns', 'Fetch' -> 'fetches': a docstring's imperative as a question's verb."""
    verb = verb.lower()
    if verb.endswith("s") and not verb.endswith("ss"):
        return verb
    if verb.endswith(("ss", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


class TaskSampleBuilder:
    """Task samples of at most a given number of tokens, from a tokenized corpus split."""

    def __init__(
        self,
        split,
        tokenizer,
        mix: dict[str, float] | None = None,
        fresh_names: bool = True,
        code_sources: tuple[str, ...] = CODE_SOURCES,
    ):
        self.tokenizer = tokenizer
        self.fresh_names = fresh_names  # disguise the code samples (module docstring); off: the files as they are
        self.im_end = tokenizer.special_tokens[IM_END]
        self.needles = RetrievalSampleBuilder(split, tokenizer)
        code = [s for s in code_sources if s in set(split.document_sources)]
        self.code = RetrievalSampleBuilder(split, tokenizer, code) if code else None
        self.mix = dict(mix or DEFAULT_MIX)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allow_special=False)

    # -- assembling -------------------------------------------------------------------------------

    def _assemble(self, task: str, head: list[int], document: list[int], turns: list[Turn]) -> TaskSample:
        ids = head + document
        spans, feeds = [], []
        for index, turn in enumerate(turns):
            if index == 0:
                feed_start = len(ids)
                ids = ids + question_ids(self.tokenizer, turn.question)
            else:
                # The previous reply's <|im_end|> is already in ids (a target); a session that generated
                # that reply would feed it with the next turn: next_turn_token_ids.
                feed_start = len(ids) - 1
                ids = ids + chat_token_ids(self.tokenizer, [{"role": "user", "content": turn.question}])
            feeds.append((feed_start, len(ids)))
            answer = self._encode(turn.answer) + [self.im_end]
            spans.append((len(ids), len(ids) + len(answer)))
            ids = ids + answer
        start = len(head)
        return TaskSample(task, ids, spans, feeds, start, start + len(document), turns)

    def _folder(
        self,
        builder: RetrievalSampleBuilder,
        total: int,
        reserve: int,
        rng: random.Random,
        system,
        make_turns,
        task: str,
    ) -> TaskSample:
        """A folder of real files filling `total` tokens with the turns `make_turns(files, bodies, rng,
        disguise)` asks; the turns' names and paths are the disguised ones, which the files get here."""
        head = document_head_ids(self.tokenizer, system)
        tree_share = 0
        for _ in range(8):
            picked, multi_source = builder._pick_files(rng, total - len(head) - reserve - tree_share)
            files = sorted(builder._files(picked, multi_source), key=lambda f: reading_order_key(f.path))
            if not files:
                raise NoQuestion("no file fits")
            bodies = {f.path: builder._block_text(f).split("\n", 1)[1] for f in files}
            disguise = Disguise(prefix=fresh_prefix(rng)) if self.fresh_names else Disguise()
            turns = make_turns(files, bodies, rng, disguise)
            if disguise.prefix or disguise.renames or disguise.edits:
                files = sorted(
                    (self._disguised(builder, f, bodies[f.path], disguise) for f in files),
                    key=lambda f: reading_order_key(f.path),
                )
            root = "workspace" if multi_source else builder.source_roots[picked[0][0]]
            tree = render_folder_preamble(root, [f.path for f in files])
            blocks = [builder._block_ids(f) for f in files[:-1]]
            blocks.append(self._encode(document_text(builder._block_text(files[-1]))))
            document = self._encode(tree) + [i for block in blocks for i in block]
            sample = self._assemble(task, head, document, turns)
            if len(sample.input_ids) <= total:
                sample.detail = {
                    "root": root,
                    "prefix": disguise.prefix,
                    "renames": dict(disguise.renames),
                    "literals": [(old, new) for _, _, old, new in disguise.edits],
                }
                return sample
            tree_share += len(sample.input_ids) - total + 16
        raise NoQuestion(f"cannot fit a {task} sample into {total} tokens")

    def _disguised(self, builder: RetrievalSampleBuilder, file: _File, body: str, disguise: Disguise) -> _File:
        """The file as the disguise has it: its path, its text (the block without the header line and the
        closing blank line), and its block's ids. A file whose text is unchanged keeps its ids after the
        header: the header ends with a newline and, when the text starts with a non-space character, no
        pre-tokenizer piece runs across that boundary, so only the header is encoded anew."""
        text = body[:-1]
        new_text = disguise.text(file.path, text)
        path = disguise.path(file.path)
        block = render_file_block(path, new_text)
        ids = None
        if new_text == text and text[:1] and not text[:1].isspace():
            old_ids = builder._block_ids(file)
            old_header = self._encode(builder._block_text(file).split("\n", 1)[0] + "\n")
            if old_ids[: len(old_header)] == old_header:
                ids = self._encode(block.split("\n", 1)[0] + "\n") + old_ids[len(old_header) :]
        return _File(path, None, block, ids)

    def _rename(self, disguise: Disguise, names, everything: str, rng: random.Random) -> None:
        """Fresh names for `names` (when disguising), none already a word of the folder or another new name."""
        if not self.fresh_names:
            return
        for name in names:
            if name not in disguise.renames:
                disguise.renames[name] = fresh_name(name, rng, everything + " " + " ".join(disguise.renames.values()))

    # -- the tasks --------------------------------------------------------------------------------

    def needle(
        self,
        total: int,
        rng: random.Random,
        depth: float | None = None,
        distractors: int | None = None,
        kind: str | None = None,
        system=DEFAULT_SYSTEM_PROMPT,
        followup: bool = False,
        reverse_share: float = 0.2,
    ) -> TaskSample:
        """A planted fact asked for (by its key; `reverse_share` of the questions about a named key, by its
        value: "Which service listens on port 4711?"), and with `followup` a second turn: half the time,
        for the kinds with a named key, a second thing said of that key, asked of "that service"; else
        the file that says so."""
        if distractors is None:
            distractors = rng.choice(DISTRACTOR_COUNTS)
        kind = kind or ("plain" if rng.random() < PLAIN_SHARE else rng.choice(ALL_FACT_KINDS))
        reserve = 48 if followup else 0
        entity = kind in ENTITY_NOUNS
        aspect = make_aspect(kind, rng) if followup and entity and rng.random() < 0.5 else None
        reverse = entity and reverse_share and rng.random() < reverse_share
        for _ in range(4):
            # The haystack is built for the fact's own question; a question by value or a second turn
            # may be longer: rebuild with that much more room.
            try:
                sample = self.needles.build(
                    total - reserve,
                    rng,
                    depth=depth,
                    num_distractors=distractors,
                    system=system,
                    kind=kind,
                    aspect=aspect,
                )
            except ValueError as error:  # no haystack this short holds these facts
                raise NoQuestion(str(error)) from None
            fact = sample.fact
            if reverse:
                turns = [Turn(reverse_question(fact, rng), fact.answer, (fact.key,))]
            else:
                turns = [Turn(fact.question, fact.answer, (fact.value,))]
            if aspect is not None:
                value = sample.aspect_values[0]
                turns.append(Turn(aspect.question, aspect.statement.format(value), (value,)))
            elif followup:
                question = rng.choice(
                    ("Which file says so?", "In which file did you find that?", "Which file is that in?")
                )
                turns.append(Turn(question, f"It is in {code(sample.planted_path)}.", (sample.planted_path,)))
            head = sample.input_ids[: sample.document_start]
            document = sample.input_ids[sample.document_start : sample.document_end]
            result = self._assemble("needle" if not followup else "followup", head, document, turns)
            if len(result.input_ids) <= total:
                break
            reserve += len(result.input_ids) - total + 8
        else:
            raise NoQuestion(f"cannot fit a needle sample into {total} tokens")
        result.depth = sample.depth
        # The distractors' values: a wrong reply that names one confused the keys, one that names none invented.
        result.detail = {
            "kind": kind,
            "key": fact.key,
            "distractors": distractors,
            "path": sample.planted_path,
            "distractor_values": [d.value for d in sample.distractors],
            "aspect_values": sample.aspect_values,
        }
        return result

    def which_file(self, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT, followup: bool = False):
        def make_turns(files, bodies, rng, disguise):
            defined = {path: _TOP_LEVEL_DEF.findall(body) for path, body in bodies.items() if path.endswith(".py")}
            everything = "\n".join(bodies.values())
            once = {
                name
                for names in defined.values()
                for name in names
                if len(name) >= 4
                and not name.startswith("_")
                and len(re.findall(_ANY_DEF.format(re.escape(name)), everything)) == 1
            }
            candidates = sorted((name, path) for path, names in defined.items() for name in names if name in once)
            if followup:
                candidates = [(n, p) for n, p in candidates if len(set(defined[p]) & once - {n}) > 0]
            if not candidates:
                raise NoQuestion("no name defined once")
            name, path = rng.choice(candidates)
            others = [n for n in dict.fromkeys(defined[path]) if n != name and n in once] if followup else []
            self._rename(disguise, [name, *others], everything, rng)
            new, where = disguise.renames.get(name, name), disguise.path(path)
            question = rng.choice(
                (f"Which file defines {new}?", f"Where is {new} defined?", f"In which file is `{new}` defined?")
            )
            turns = [Turn(question, f"{code(new)} is defined in {code(where)}.", (where,))]
            if followup:
                others = [disguise.renames.get(n, n) for n in others]
                turns.append(
                    Turn(
                        rng.choice(("What else does that file define?", "What else is defined there?")),
                        f"It also defines {', '.join(map(code, others[:3]))}.",
                        (),
                        tuple(others),
                    )
                )
            return turns

        return self._code_folder(total, rng, system, make_turns, "which_file", followup)

    def where_function(self, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT):
        def make_turns(files, bodies, rng, disguise):
            everything = "\n".join(bodies.values())
            candidates = []
            for path, body in bodies.items():
                for name, line in _DOCSTRING.findall(body):
                    line = re.sub(r"(\"\"\"|''')\s*$", "", line).strip()
                    words = line.split()
                    if (
                        12 <= len(line) <= 90
                        and len(words) >= 3
                        and words[0].isalpha()
                        and everything.count(line) == 1
                        and not name.startswith("__")
                        # renamed, the name must be one function's
                        and (not self.fresh_names or len(re.findall(_ANY_DEF.format(re.escape(name)), everything)) == 1)
                    ):
                        candidates.append((name, path, line))
            if not candidates:
                raise NoQuestion("no documented function")
            name, path, line = rng.choice(sorted(candidates))
            self._rename(disguise, [name], everything, rng)
            line = disguise.text("", line)  # the docstring as the disguised file has it
            new = disguise.renames.get(name, name)
            first, rest = line.split(" ", 1)
            rest = rest.rstrip(".")
            forms = [f'Which function says "{line}"?', f'Where is the function whose docstring says "{line}"?']
            if first in _IMPERATIVES:
                forms.append(f"Where is the function that {third_person(first)} {rest}?")
            question = rng.choice(forms)
            return [Turn(question, f"{code(new)}, in {code(disguise.path(path))}.", (new,))]

        return self._folder(self._code_builder(), total, 128, rng, system, make_turns, "where_function")

    def setting_default(self, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT, followup: bool = False):
        def make_turns(files, bodies, rng, disguise):
            everything = "\n".join(bodies.values())
            candidates = []  # (value, path, kind, name, function, where the literal is in the file's text)
            for path, body in bodies.items():
                if not path.endswith(".py"):
                    continue
                for signature in _SIGNATURE.finditer(body):
                    function, parameters = signature.groups()
                    if len(re.findall(_ANY_DEF.format(re.escape(function)), everything)) != 1:
                        continue
                    offset = signature.start(2)
                    for parameter in parameters.split(","):
                        match = _PARAMETER.fullmatch(parameter)
                        if match and match.group(1) != "self":
                            span = (offset + match.start(2), offset + match.end(2))
                            candidates.append((match.group(2), path, "argument", match.group(1), function, span))
                        offset += len(parameter) + 1
                for constant in _CONSTANT.finditer(body):
                    name, value = constant.groups()
                    if len(re.findall(rf"^\s*{re.escape(name)}\s*=", everything, re.M)) == 1:
                        candidates.append((value, path, "constant", name, "", constant.span(2)))
            if not candidates:
                raise NoQuestion("no literal default")
            # Mostly values that cannot be guessed from the kind alone (None, True, False can).
            telling = [c for c in candidates if c[0] not in ("None", "True", "False")]
            value, path, kind, name, function, (a, b) = rng.choice(
                sorted(telling if telling and rng.random() < 0.85 else candidates)
            )
            if self.fresh_names:
                # A fresh literal in the one place it is defined, and fresh names for what the question names
                # (a dunder method keeps its name: the fresh literal is enough).
                disguise.edits.append((path, a, value, fresh_literal(value, rng)))
                value = disguise.edits[-1][3]
                owner = name if kind == "constant" else function
                if not (owner.startswith("__") and owner.endswith("__")):
                    self._rename(disguise, [owner], everything, rng)
            where = disguise.path(path)
            if kind == "constant":
                name = disguise.renames.get(name, name)
                question = rng.choice((f"What is {name} set to?", f"What value does the setting {name} have?"))
                answer = f"{code(name)} is set to {code(value)} in {code(where)}."
            else:
                function = disguise.renames.get(function, function)
                question = rng.choice(
                    (
                        f"What does the {name} argument of {function} default to?",
                        f"What is the default value of {name} in {function}?",
                    )
                )
                answer = f"{code(name)} defaults to {code(value)} in {code(function)}."
            turns = [Turn(question, answer, (value,))]
            if followup:
                turns.append(
                    Turn(
                        rng.choice(("Which file is that in?", "In which file is that?")),
                        f"It is in {code(where)}.",
                        (where,),
                    )
                )
            return turns

        return self._code_folder(total, rng, system, make_turns, "setting_default", followup)

    def followup(self, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT):
        first = rng.choice(("needle", "which_file", "setting_default"))
        return self.build(first, total, rng, system, followup=True)

    def _code_folder(self, total: int, rng: random.Random, system, make_turns, task: str, followup: bool):
        """_folder on the code source for `task`, or for a follow-up on it: then with room kept for the
        second turn, and the sample's task is "followup"."""
        return self._folder(
            self._code_builder(),
            total,
            160 if followup else 96,
            rng,
            system,
            make_turns,
            "followup" if followup else task,
        )

    def _code_builder(self) -> RetrievalSampleBuilder:
        if self.code is None:
            raise NoQuestion("no code source in this split")
        return self.code

    # -- drawing ----------------------------------------------------------------------------------

    def build(
        self, task: str, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT, followup: bool = False
    ) -> TaskSample:
        """One sample of `task`; a needle when the folder drawn has nothing to ask (after 3 draws), one
        without distractors when 3 needles' draws do not fit."""
        for _ in range(3):
            try:
                if task == "needle":
                    return self.needle(total, rng, system=system, followup=followup)
                if task == "which_file":
                    return self.which_file(total, rng, system, followup)
                if task == "where_function":
                    return self.where_function(total, rng, system)
                if task == "setting_default":
                    return self.setting_default(total, rng, system, followup)
                if task == "followup":
                    return self.followup(total, rng, system)
                raise ValueError(f"unknown task {task!r}")
            except NoQuestion:
                continue
        for _ in range(3):  # a needle's draw (its kind, its distractors) may not fit either: draw again
            try:
                return self.needle(total, rng, system=system, followup=followup)
            except NoQuestion:
                continue
        return self.needle(total, rng, distractors=0, system=system, followup=followup)

    def sample(self, total: int, rng: random.Random, system=DEFAULT_SYSTEM_PROMPT) -> TaskSample:
        """A sample of a task drawn from the mix."""
        tasks, weights = zip(*self.mix.items())
        return self.build(rng.choices(tasks, weights)[0], total, rng, system)
