"""Synthetic retrieval conversations: the product's skill, reading a long document and answering from it.

A sample is what a kimi-desk session feeds the model, ids for ids:

    document_head_ids(system)              system turn, then <|im_user|>user<|im_middle|>
    folder tree + "==> path <==" blocks    files of the corpus, read as a session reads a folder
    question_ids(question)                 "\n\n" ends the document, the question, <|im_end|>, <|im_assistant|>...
    answer ids, <|im_end|>                 the assistant's reply: what the loss is taken on

with one fact planted in the document ("The secret port of service korvani is 4711.") and, to make the
model read the key and not just grab the one fact-like line, 0-3 distractor facts of the same kind
about other keys; a README's kinds (a command, a variable) half the time also with the other kind's
line about the same tool beside them; plain facts say everyday things of a named subject ("The billing
job runs every 45 minutes."), each in several wordings. A fact goes in as a small notes file beside a file at the chosen depth, or as a line
(a comment in code) inside that file. Files keep kimi-desk's reading order, so the tree and the blocks
are what `load_path` would render for a folder holding exactly these files.
"""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass, field, replace

from corpus_tokens import TokenizedSplit

from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT, IM_END, document_head_ids, document_text, question_ids
from kimi_desk.engine.ingest.listing import reading_order_key
from kimi_desk.engine.ingest.render import render_file_block, render_folder_preamble

# Keys, names and made-up words are drawn from spaces far larger than the facts a run plants (tens of
# thousands), so that a key and its value are never seen together twice: a value can only be read.
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "ta",
    "vo",
    "zu",
    "shi",
    "bar",
    "nel",
    "qui",
    "dor",
    "fen",
    "gal",
    "hu",
    "jin",
    "kor",
    "lum",
    "mar",
    "nox",
    "pra",
    "sel",
    "tir",
    "ul",
    "vex",
    "wyn",
    "yor",
    "zen",
    "bri",
    "cas",
    "del",
    "esk",
    "fio",
    "gro",
    "hal",
    "ith",
    "jum",
    "kel",
    "lor",
    "mun",
    "nim",
    "oth",
    "pel",
    "rav",
    "sun",
    "tob",
    "ury",
    "vin",
    "wal",
    "xan",
    "yel",
    "zor",
    "ab",
    "eb",
    "ob",
    "ag",
)
_FIRST_NAMES = (
    "Mira",
    "Tomas",
    "Aiko",
    "Kwame",
    "Lena",
    "Ravi",
    "Sofia",
    "Jonas",
    "Ines",
    "Omar",
    "Hana",
    "Piotr",
    "Zara",
    "Mateo",
    "Yuki",
    "Nadia",
    "Elias",
    "Chen",
    "Amara",
    "Felix",
    "Aino",
    "Bruno",
    "Carmen",
    "Dmitri",
    "Esra",
    "Farid",
    "Greta",
    "Hugo",
    "Ilse",
    "Jamal",
    "Keiko",
    "Lars",
    "Maya",
    "Nils",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Ugo",
    "Vera",
    "Wen",
    "Ximena",
    "Yara",
    "Zoltan",
    "Anil",
    "Bea",
    "Cyril",
    "Dalia",
)
_LAST_NAMES = (
    "Okafor",
    "Lindqvist",
    "Tanaka",
    "Moreau",
    "Novak",
    "Haddad",
    "Petrov",
    "Silva",
    "Kowalski",
    "Nguyen",
    "Fischer",
    "Mensah",
    "Rossi",
    "Kaur",
    "Duarte",
    "Ivanova",
    "Abara",
    "Berg",
    "Castillo",
    "Dvorak",
    "Eriksen",
    "Fujita",
    "Garcia",
    "Horvat",
    "Ito",
    "Jensen",
    "Kim",
    "Larsen",
    "Mbeki",
    "Nakamura",
    "Oliveira",
    "Park",
    "Quispe",
    "Rahman",
    "Sato",
    "Toth",
    "Urban",
    "Varga",
    "Weber",
    "Yilmaz",
    "Zhou",
    "Adler",
    "Bauer",
    "Costa",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_COMMENT_PREFIX = {
    ".py": "# ",
    ".sh": "# ",
    ".toml": "# ",
    ".yaml": "# ",
    ".yml": "# ",
    ".rb": "# ",
    ".c": "// ",
    ".h": "// ",
    ".js": "// ",
    ".ts": "// ",
    ".go": "// ",
    ".rs": "// ",
    ".java": "// ",
    ".sql": "-- ",
}


@dataclass(frozen=True)
class Fact:
    kind: str
    key: str
    value: str
    statement: str  # the sentence planted in the document
    question: str
    answer: str  # the assistant's reply, without <|im_end|>


def random_key(rng: random.Random) -> str:
    """A made-up word of 3 or 4 syllables (about 10 M of them)."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(3, 4)))


def random_surname(rng: random.Random) -> str:
    """A real surname or, half the time, a made-up one."""
    return rng.choice(_LAST_NAMES) if rng.random() < 0.5 else random_key(rng).capitalize()


def random_tool(rng: random.Random) -> str:
    """A command-line tool's name: one made-up word, or two joined by a hyphen (as kimi-desk)."""
    return random_key(rng) if rng.random() < 0.5 else f"{random_key(rng)}-{random_key(rng)}"


def make_fact(kind: str, key: str, rng: random.Random) -> Fact:
    if kind in PLAIN_KINDS:
        return _plain_fact(kind, key, rng)
    if kind == "port":
        value = str(rng.randint(1024, 65535))
        statement = f"The secret port of service {key} is {value}."
        return Fact(kind, key, value, statement, f"What is the secret port of service {key}?", statement)
    if kind == "code":
        letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        value = f"{letters}-{rng.randint(1000, 9999)}"
        statement = f"The access code for the {key} vault is {value}."
        return Fact(kind, key, value, statement, f"What is the access code for the {key} vault?", statement)
    if kind == "maintainer":
        value = f"{rng.choice(_FIRST_NAMES)} {random_surname(rng)}"
        statement = f"The {key} module is maintained by {value}."
        return Fact(kind, key, value, statement, f"Who maintains the {key} module?", statement)
    if kind == "date":
        value = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2069)}"
        statement = f"Project {key} launches on {value}."
        return Fact(kind, key, value, statement, f"When does project {key} launch?", statement)
    if kind == "setting":
        value = str(rng.choice((rng.randint(2, 99), rng.randint(100, 9999), rng.randint(10000, 999999))))
        statement = f"The {key}_limit setting must be set to {value}."
        return Fact(kind, key, value, statement, f"What must the {key}_limit setting be set to?", statement)
    if kind == "command":
        # key: "tool|action|noun"; the README's kind of line ("kimi-desk sessions list" lists the sessions).
        # The subcommand's verb is one of several for the action: the question does not give it away.
        tool, action, noun = key.split("|")
        verbs, plain_verb = _ACTIONS[action]
        if rng.random() < USAGE_SYNOPSIS_SHARE:
            # A usage synopsis, as READMEs write a command's subcommands (`kimi-desk sessions [list] | show
            # ID | rm ID`): the default in brackets, no words saying what any of them does, so the asked
            # action is found in the plain verb of its subcommand.
            value = f"{tool} {noun} {plain_verb}"
            others = rng.sample(sorted(v for a, (_, v) in _ACTIONS.items() if a != action), rng.randint(2, 4))
            arguments = ("ID", "NAME", "FILE", "ID FILE")
            statement = f"{tool} {noun} [{plain_verb}] | " + " | ".join(f"{o} {rng.choice(arguments)}" for o in others)
        else:
            value = f"{tool} {noun} {rng.choice(verbs)}"
            statement = rng.choice(
                (
                    f"`{value}` {action} the saved {noun}.",
                    f"Run `{value}` to {plain_verb} the saved {noun}.",
                    f"The command `{value}` {action} the saved {noun}.",
                    f"| `{value}` | {action} the saved {noun} |",  # a README's table of commands
                )
            )
        return Fact(
            kind,
            key,
            value,
            statement,
            f"Which command {action} the saved {noun}?",
            f"`{value}` {action} the saved {noun}.",
        )
    if kind == "variable":
        # key: "TOOL|thing"; the README's kind of line (KIMI_DESK_KERNELS=torch forces the PyTorch kernels).
        tool, thing = key.split("|")
        value = f"{tool}_{rng.choice(_VARIABLE_WORDS)}"
        setting = rng.choice(
            (
                "torch",
                "1",
                "cpu",
                "plain",
                "0",
                "safe",
                "eager",
                "on",
                "yes",
                "off",
                "strict",
                "fast",
                "2",
                "auto",
                random_key(rng),
            )
        )
        statement = rng.choice(
            (
                f"`{value}={setting}` forces the {thing}.",
                f"Set {value}={setting} to force the {thing}.",
                f"Environment: `{value}={setting}` forces the {thing} everywhere.",
                f"| `{value}={setting}` | forces the {thing} everywhere |",  # a README's table of variables
                f"| `{value}` | forces the {thing} |",
            )
        )
        return Fact(
            kind,
            key,
            value,
            statement,
            f"Which variable forces the {thing}?",
            f"`{value}={setting}` forces the {thing}.",
        )
    raise ValueError(f"unknown fact kind {kind!r}")


# -- plain facts: everyday sentences, each relation said and asked in several wordings ----------------

# The things a plain fact is about: a real word (as people name their jobs and teams) or, half the time,
# a made-up one, before the relation's noun ("the billing job", "the korvani team").
_PLAIN_WORDS = (
    "billing payroll search backup reporting staging mobile checkout inventory shipping analytics marketing "
    "support security nightly weekly legacy pricing accounts orders invoices metrics alerts login "
    "upload export import mail calendar storage media photo video audio print scanner kitchen garden "
    "finance research design sales travel hiring training audit cleanup sync gateway proxy cache index "
    "crawler ledger catalog forecast weather traffic parking lobby north south east west central "
    "harbor river summit maple cedar falcon otter comet orbit pixel quartz atlas beacon canvas delta ember "
    "fable glacier horizon ivory jasper"
).split()


def _between(low: int, high: int):
    return lambda rng: str(rng.randint(low, high))


# What each kind of value can be: (the generator, how many values it draws from).
_PLAIN_VALUES = {
    "person": (
        lambda rng: f"{rng.choice(_FIRST_NAMES)} {random_surname(rng)}",
        len(_FIRST_NAMES) * (len(_LAST_NAMES) + 10**6),
    ),
    "room": (lambda rng: f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randint(100, 999)}", 23 * 900),
    "host": (
        lambda rng: f"{random_key(rng)}-{rng.randint(1, 99)}.{rng.choice(('internal', 'lan', 'local', 'corp'))}",
        10**6,
    ),
    "clock": (lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", 24 * 60),
    "day": (lambda rng: f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2069)}", 12 * 28 * 80),
    "version": (lambda rng: f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 30)}", 9 * 31 * 31),
    "mailbox": (lambda rng: f"{random_key(rng)}@{random_key(rng)}.{rng.choice(('org', 'com', 'net', 'io'))}", 10**12),
    "minutes": (_between(5, 1439), 1435),
    "seconds": (_between(2, 3600), 3599),
    "days": (_between(2, 3650), 3649),
    "count": (_between(2, 4096), 4095),
    "people": (_between(10, 5000), 4991),
    "messages": (_between(100, 99999), 99900),
    "money": (_between(1000, 999999), 999000),
    "extension": (_between(1000, 9999), 9000),
}


@dataclass(frozen=True)
class Relation:
    """One thing a plain fact can say of a subject ("the billing job" runs every 45 minutes): its
    statements and questions with {S} for the subject at a sentence's start, {s} inside it, {V} for
    the value."""

    noun: str
    value: str  # a key of _PLAIN_VALUES
    statements: tuple[str, ...]
    questions: tuple[str, ...]


# Training draws these; the evaluation asks HELD_OUT_RELATIONS, worded as no training sample is, so
# that its row measures looking a fact up rather than a template learnt.
PLAIN_RELATIONS = {
    "lead": Relation(
        "team", "person", ("{S} is led by {V}.", "{V} leads {s}."), ("Who leads {s}?", "Who is the lead of {s}?")
    ),
    "owner": Relation(
        "service",
        "person",
        ("{S} is owned by {V}.", "{V} owns {s}."),
        ("Who owns {s}?", "Who is the owner of {s}?"),
    ),
    "nodes": Relation(
        "cluster",
        "count",
        ("{S} has {V} nodes.", "{S} runs on {V} nodes."),
        ("How many nodes does {s} have?", "On how many nodes does {s} run?"),
    ),
    "timeout": Relation(
        "client",
        "seconds",
        ("{S} times out after {V} seconds.", "The timeout of {s} is {V} seconds."),
        ("After how many seconds does {s} time out?", "What is the timeout of {s}?"),
    ),
    "room": Relation(
        "workshop",
        "room",
        ("{S} is in room {V}.", "{S} takes place in room {V}."),
        ("Which room is {s} in?", "In which room does {s} take place?"),
    ),
    "runtime": Relation(
        "library",
        "version",
        ("{S} needs version {V} of the runtime.", "{S} requires runtime {V}."),
        ("Which runtime version does {s} need?", "What version of the runtime does {s} require?"),
    ),
    "budget": Relation(
        "project",
        "money",
        ("{S} has a budget of {V} euros.", "The budget of {s} is {V} euros."),
        ("What is the budget of {s}?", "How large is the budget of {s}?"),
    ),
    "mailbox": Relation(
        "desk",
        "mailbox",
        ("{S} can be reached at {V}.", "Write to {V} to reach {s}."),
        ("How can {s} be reached?", "What is the address of {s}?"),
    ),
    "backed_up": Relation(
        "database",
        "clock",
        ("{S} is backed up at {V} every night.", "Every night at {V}, {s} is backed up."),
        ("When is {s} backed up?", "At what time is {s} backed up?"),
    ),
    "due": Relation(
        "report",
        "day",
        ("{S} is due on {V}.", "The deadline for {s} is {V}."),
        ("When is {s} due?", "What is the deadline for {s}?"),
    ),
    "seats": Relation(
        "hall",
        "people",
        ("{S} seats {V} people.", "{S} has room for {V} people."),
        ("How many people does {s} seat?", "How many people fit in {s}?"),
    ),
    "holds": Relation(
        "queue",
        "messages",
        ("{S} holds at most {V} messages.", "At most {V} messages fit in {s}."),
        ("How many messages can {s} hold?", "What is the size limit of {s}?"),
    ),
    "deployed": Relation(
        "branch",
        "host",
        ("{S} is deployed to {V}.", "{S} runs on the host {V}."),
        ("Where is {s} deployed?", "Which host does {s} run on?"),
    ),
    "extension": Relation(
        "office",
        "extension",
        ("{S} answers on extension {V}.", "The phone extension of {s} is {V}."),
        ("What is the phone extension of {s}?", "Which extension does {s} answer on?"),
    ),
    "syncs": Relation(
        "mirror",
        "minutes",
        ("{S} syncs every {V} minutes.", "Every {V} minutes, {s} syncs."),
        ("How often does {s} sync?", "How many minutes pass between syncs of {s}?"),
    ),
    "kept": Relation(
        "archive",
        "days",
        ("{S} is kept for {V} days.", "{S} is deleted after {V} days."),
        ("How long is {s} kept?", "After how many days is {s} deleted?"),
    ),
    "teaches": Relation(
        "course", "person", ("{S} is taught by {V}.", "{V} teaches {s}."), ("Who teaches {s}?", "Who is teaching {s}?")
    ),
    "chairs": Relation(
        "committee",
        "person",
        ("{V} chairs {s}.", "{S} is chaired by {V}."),
        ("Who chairs {s}?", "Who is the chair of {s}?"),
    ),
    "leaves": Relation(
        "bus",
        "clock",
        ("{S} leaves at {V}.", "{S} departs at {V}."),
        ("When does {s} leave?", "At what time does {s} depart?"),
    ),
    "updated": Relation(
        "form",
        "day",
        ("{S} was last updated on {V}.", "The last update of {s} was on {V}."),
        ("When was {s} last updated?", "On which day was {s} last updated?"),
    ),
    "trees": Relation(
        "garden", "count", ("{S} has {V} trees.", "There are {V} trees in {s}."), ("How many trees does {s} have?",)
    ),
    "reports": Relation(
        "sensor",
        "host",
        ("{S} reports to {V}.", "{S} sends its readings to {V}."),
        ("Where does {s} report to?", "Which host does {s} send its readings to?"),
    ),
    "pinned": Relation(
        "plugin",
        "version",
        ("{S} is pinned to version {V}.", "{S} stays at version {V}."),
        ("Which version is {s} pinned to?", "At which version does {s} stay?"),
    ),
    "orders": Relation(
        "shop",
        "mailbox",
        ("Orders for {s} go to {V}.", "{S} takes orders at {V}."),
        ("Where do orders for {s} go?", "At which address does {s} take orders?"),
    ),
    "moved": Relation(
        "lab",
        "room",
        ("{S} moved to room {V}.", "{S} is now in room {V}."),
        ("Which room did {s} move to?", "Where is {s} now?"),
    ),
    "worth": Relation(
        "contract",
        "money",
        ("{S} is worth {V} euros.", "{S} has a value of {V} euros."),
        ("How much is {s} worth?", "What is the value of {s}?"),
    ),
    "expires": Relation(
        "cache",
        "seconds",
        ("Entries in {s} expire after {V} seconds.", "{S} keeps an entry for {V} seconds."),
        ("When do entries in {s} expire?", "For how many seconds does {s} keep an entry?"),
    ),
    "takes": Relation(
        "pipeline",
        "minutes",
        ("{S} takes about {V} minutes.", "A run of {s} lasts {V} minutes."),
        ("How long does {s} take?", "How many minutes does a run of {s} last?"),
    ),
}
# Asked of any training relation now and then: the answer is the sentence about the subject, whatever
# the relation, so what is learnt is to find that sentence and say it.
GENERIC_QUESTIONS = ("What does the document say about {s}?", "What do you know about {s}?", "Tell me about {s}.")
GENERIC_SHARE = 0.25
HELD_OUT_RELATIONS = {
    "runs": Relation(
        "job", "minutes", ("{S} runs every {V} minutes.",), ("How often does {s} run?", "How frequently does {s} run?")
    ),
    "located": Relation(
        "server",
        "room",
        ("{S} is located in rack {V}.",),
        ("Where is {s} located?", "In which rack is {s}?"),
    ),
    "opened": Relation(
        "account", "person", ("{S} was opened by {V}.",), ("Who opened {s}?", "By whom was {s} opened?")
    ),
    "retention": Relation(
        "bucket",
        "days",
        ("{S} keeps files for {V} days.",),
        ("For how many days does {s} keep files?", "How long does {s} keep files?"),
    ),
    "released": Relation(
        "app",
        "version",
        ("The latest release of {s} is version {V}.",),
        ("What is the latest version of {s}?", "Which version of {s} was released last?"),
    ),
    "reachable": Relation(
        "printer",
        "host",
        ("{S} is reachable at {V}.",),
        ("At which address is {s} reachable?", "Where is {s} reachable?"),
    ),
}
_RELATIONS = {**PLAIN_RELATIONS, **HELD_OUT_RELATIONS}
PLAIN_KINDS = {"plain": PLAIN_RELATIONS, "plain_held_out": HELD_OUT_RELATIONS}


def _plain_fact(kind: str, key: str, rng: random.Random) -> Fact:
    """A plain fact of the key "relation|word", about the subject "the {word} {noun}"."""
    name, word = key.split("|")
    relation = _RELATIONS[name]
    subject = f"the {word} {relation.noun}"
    value = _PLAIN_VALUES[relation.value][0](rng)
    fill = dict(S=subject[0].upper() + subject[1:], s=subject, V=value)
    statement = rng.choice(relation.statements).format(**fill)
    generic = kind == "plain" and rng.random() < GENERIC_SHARE
    question = rng.choice(GENERIC_QUESTIONS if generic else relation.questions).format(**fill)
    return Fact(kind, key, value, statement, question, statement)


# The model card's needle table draws from these (as the first card did); training also plants the
# documentation kinds, the form of the README's answers.
FACT_KINDS = ("port", "code", "maintainer", "date", "setting")
DOC_FACT_KINDS = ("command", "variable")
# Plain facts (above) in everyday words; the evaluation's own "plain_held_out" wordings are never trained.
ALL_FACT_KINDS = FACT_KINDS + DOC_FACT_KINDS + ("plain",)
# action: (the subcommand's verbs, the infinitive)
# The share of command facts planted as a usage synopsis line (make_fact).
USAGE_SYNOPSIS_SHARE = 0.2
_ACTIONS = {
    "lists": (("list", "ls", "all", "index"), "list"),
    "deletes": (("rm", "delete", "remove", "drop"), "delete"),
    "exports": (("export", "dump", "out"), "export"),
    "imports": (("import", "load", "in"), "import"),
    "shows": (("show", "info", "view", "cat"), "show"),
    "renames": (("rename", "mv", "move"), "rename"),
    "archives": (("archive", "pack", "stash"), "archive"),
    "restores": (("restore", "unpack", "revert"), "restore"),
    "checks": (("check", "verify", "lint", "test"), "check"),
    "prunes": (("prune", "gc", "clean"), "prune"),
    "syncs": (("sync", "push", "mirror"), "sync"),
    "locks": (("lock", "freeze", "pin"), "lock"),
}
_NOUNS = (
    "sessions",
    "snapshots",
    "models",
    "caches",
    "bookmarks",
    "jobs",
    "profiles",
    "plugins",
    "workspaces",
    "notes",
    "reports",
    "backups",
    "queries",
    "layouts",
    "keys",
    "themes",
    "recordings",
    "indexes",
    "drafts",
    "answers",
    "folders",
    "tags",
    "filters",
    "logs",
)
_THINGS = (
    "PyTorch kernels",
    "CPU path",
    "debug log",
    "offline mode",
    "plain renderer",
    "safe loader",
    "legacy parser",
    "single thread",
    "compact output",
    "slow decoder",
    "fp32 weights",
    "eager mode",
    "Triton kernels",
    "GPU path",
    "verbose log",
    "dry run",
    "colour output",
    "strict checks",
    "old tokenizer",
    "slow path",
    "bf16 weights",
    "lazy loading",
    "proxy mode",
    "local cache",
)
_VARIABLE_WORDS = (
    "KERNELS",
    "BACKEND",
    "DEVICE",
    "MODE",
    "DEBUG",
    "OFFLINE",
    "THREADS",
    "RENDER",
    "LOADER",
    "PARSER",
    "DTYPE",
    "EAGER",
    "PLAIN",
    "SAFE",
    "CUDA_GRAPH",
    "CACHE",
    "PATH",
    "HOME",
    "LEVEL",
    "FORCE",
    "ENGINE",
    "PROFILE",
    "TRACE",
    "STRICT",
    "COLOR",
    "LOG",
    "WORKERS",
    "IMPL",
    "FLAGS",
    "RUNTIME",
    "TARGET",
    "ARCH",
    "OUTPUT",
    "CONFIG",
    "DRIVER",
    "POLICY",
)


def space_sizes() -> dict:
    """How many keys each fact kind can draw, and how many values for one key (for the documentation kinds:
    also how many are left once the question's words are known)."""
    keys = sum(len(_SYLLABLES) ** n for n in (3, 4))
    tools = keys + keys * keys
    surnames = len(_LAST_NAMES) + keys
    verbs = sum(len(verbs) for verbs, _ in _ACTIONS.values()) / len(_ACTIONS)
    return {
        "port": {"keys": keys, "values": 65535 - 1024 + 1},
        "code": {"keys": keys, "values": 24**3 * 9000},
        "maintainer": {"keys": keys, "values": len(_FIRST_NAMES) * surnames},
        "date": {"keys": keys, "values": 12 * 28 * 80},
        "setting": {"keys": keys, "values": 98 + 9900 + 990000},
        "command": {
            "keys": tools * len(_ACTIONS) * len(_NOUNS),
            "values": tools * verbs,
            "values_given_the_question": tools * verbs,
        },
        "variable": {
            "keys": tools * len(_THINGS),
            "values": tools * len(_VARIABLE_WORDS),
            "values_given_the_tool": len(_VARIABLE_WORDS),
        },
        # Real words repeat as subjects, with a fresh value each time; the fewest values of a relation.
        "plain": {
            "keys": len(PLAIN_RELATIONS) * (len(_PLAIN_WORDS) + keys),
            "values": min(_PLAIN_VALUES[r.value][1] for r in PLAIN_RELATIONS.values()),
        },
    }


# What a fact's key names, for the kinds a follow-up can point back to ("that service").
ENTITY_NOUNS = {"port": "service", "code": "vault", "maintainer": "module", "date": "project"}
_DUTIES = ("Restart", "Redeploy", "Drain", "Reload", "Reindex", "Flush", "Rebuild", "Purge", "Pause", "Reset")
_EVENTS = ("deploy", "release", "upgrade", "backup", "outage", "migration", "reboot", "audit")
_ROLES = ("owned", "reviewed", "audited", "run")


@dataclass(frozen=True)
class Aspect:
    """A second thing said of each planted key, right after its fact, with a pronoun for the key ("Restart
    it after every deploy."), and the follow-up that asks it of "that service": every fact of a sample
    gets the same sentence with a value of its own, so that only the key the previous answer named tells
    which one is meant."""

    statement: str  # with {} for the value
    question: str
    kind: str  # what the values are: "duty", "person" or "host"

    def value(self, rng: random.Random) -> str:
        if self.kind == "duty":
            return rng.choice(_DUTIES)
        if self.kind == "person":
            return f"{rng.choice(_FIRST_NAMES)} {random_surname(rng)}"
        return f"{random_key(rng)}-{rng.randint(1, 9)}"


def make_aspect(kind: str, rng: random.Random) -> Aspect:
    noun = ENTITY_NOUNS[kind]
    form = rng.randrange(3)
    if form == 0:
        event = rng.choice(_EVENTS)
        return Aspect(f"{{}} it after every {event}.", f"What must be done to that {noun} after every {event}?", "duty")
    if form == 1:
        role = rng.choice(_ROLES)
        return Aspect(f"It is {role} by {{}}.", f"Who is that {noun} {role} by?", "person")
    return Aspect("It lives on host {}.", f"Which host does that {noun} live on?", "host")


def reverse_question(fact: Fact, rng: random.Random) -> str:
    """The fact's key asked for by its value ("Which service listens on the secret port 4711?")."""
    value = fact.value
    forms = {
        "port": (
            f"Which service listens on the secret port {value}?",
            f"Which service has the secret port {value}?",
            f"Which service uses the secret port {value}?",
        ),
        "code": (f"Which vault has the access code {value}?", f"Which vault opens with the access code {value}?"),
        "maintainer": (f"Which module does {value} maintain?", f"Which module is maintained by {value}?"),
        "date": (f"Which project launches on {value}?",),
    }
    return rng.choice(forms[fact.kind])


def fact_keys(kind: str, count: int, rng: random.Random) -> list[str]:
    """`count` distinct keys of one kind: the asked fact's and its distractors'. The documentation
    kinds share one tool among them, so only the asked action or thing tells them apart."""
    keys: set[str] = set()
    if kind == "command":
        tool = random_tool(rng)
        while len(keys) < count:
            keys.add(f"{tool}|{rng.choice(sorted(_ACTIONS))}|{rng.choice(_NOUNS)}")
    elif kind == "variable":
        tool = random_tool(rng).upper().replace("-", "_")
        while len(keys) < count:
            keys.add(f"{tool}|{rng.choice(_THINGS)}")
    elif kind in PLAIN_KINDS:
        relation = rng.choice(sorted(PLAIN_KINDS[kind]))
        while len(keys) < count:
            keys.add(f"{relation}|{rng.choice(_PLAIN_WORDS) if rng.random() < 0.5 else random_key(rng)}")
    else:
        while len(keys) < count:
            keys.add(random_key(rng))
    keys = sorted(keys)
    rng.shuffle(keys)
    return keys


def neighbour_fact(fact: Fact, rng: random.Random) -> Fact:
    """A fact of the other documentation kind about the same tool: the variable beside a command's line
    in a README, or the command beside a variable's."""
    if fact.kind == "command":
        tool = fact.key.split("|")[0].upper().replace("-", "_")
        return make_fact("variable", f"{tool}|{rng.choice(_THINGS)}", rng)
    tool = fact.key.split("|")[0].lower().replace("_", "-")
    return make_fact("command", f"{tool}|{rng.choice(sorted(_ACTIONS))}|{rng.choice(_NOUNS)}", rng)


# The README's table (README.md's own list of variables is one): the share of the documentation kinds'
# needles whose fact and distractors are rows of one table, beside rows of other effects.
README_TABLE_SHARE = 0.3
# Rows a README's table holds besides the facts': what other variables and commands of a tool do, in
# words that never say "forces" or name an action of _ACTIONS, so no such row answers a question.
_OTHER_VARIABLE_EFFECTS = (
    "one folder for settings and sessions instead of the platform's user folders",
    "prints the traceback of an unexpected error instead of one line",
    "fixes the number of CPU threads",
    "seconds to wait for the network before giving up",
    "loads a model the memory check would refuse",
    "turns off the graph replay (diagnosis: slower)",
    "the level of detail in the log",
    "where the download cache lives",
    "the proxy to connect through",
    "the colour theme of the terminal",
)
_OTHER_COMMAND_EFFECTS = (
    "opens the app on a folder or a file",
    "prints the version",
    "reads a folder into a new session",
    "answers one question and exits",
    "measures the speed of this machine",
    "downloads a model from the hub",
    "shows where the settings live",
)


def _code_span(text: str) -> str:
    return text.split("`")[1]


def readme_table(fact: Fact, distractors: list[Fact], rng: random.Random) -> str:
    """The tool's README section as one block: a title, then a table whose rows are `fact`'s and the
    distractors' statements as rows plus 1-8 rows of other effects, shuffled."""
    tool = fact.key.split("|")[0]
    taken = {fact.value, *(d.value for d in distractors)}
    rows = []
    for f in (fact, *distractors):
        if f.kind == "variable":
            thing = f.key.split("|")[1]
            rows.append(f"| `{_code_span(f.answer)}` | forces the {thing}{rng.choice(('', ' everywhere'))} |")
        else:
            action, noun = f.key.split("|")[1:]
            rows.append(f"| `{f.value}` | {action} the saved {noun} |")
    for _ in range(rng.randint(1, 8)):  # tables as long as real READMEs' (a dozen rows)
        if fact.kind == "variable":
            name = f"{tool}_{rng.choice(_VARIABLE_WORDS)}"
            effect = rng.choice(_OTHER_VARIABLE_EFFECTS)
        else:
            name = f"{tool} {rng.choice(('open', 'version', 'ingest', 'ask', 'bench', 'pull', 'where'))}"
            effect = rng.choice(_OTHER_COMMAND_EFFECTS)
        if name not in taken:
            taken.add(name)
            rows.append(f"| `{name}` | {effect} |")
    rng.shuffle(rows)
    if fact.kind == "variable":
        title, header = "Environment variables:", "| variable | effect |"
    else:
        title, header = "Commands:", "| command | what it does |"
    return "\n".join([f"# {tool.lower().replace('_', '-')}", "", title, "", header, "|---|---|", *rows])


def key_slug(key: str) -> str:
    """The key as a piece of a file name."""
    return "".join(c if c.isalnum() else "_" for c in key.split("|")[-1].lower())[:24]


@dataclass
class RetrievalSample:
    input_ids: list[int]  # the whole conversation, answer and closing <|im_end|> included
    answer_start: int  # input_ids[answer_start:] is the reply the loss is taken on
    document_start: int  # input_ids[document_start:document_end] is the document (folder tree and files)
    document_end: int
    fact: Fact
    fact_position: int  # token index where the planted statement starts
    distractors: list[Fact] = field(default_factory=list)
    planted_path: str | None = None  # the file that holds the asked fact
    aspect_values: list[str] = field(default_factory=list)  # with an Aspect: the asked fact's, then each distractor's

    @property
    def prompt_ids(self) -> list[int]:
        """What generation continues from: everything up to the assistant's reply."""
        return self.input_ids[: self.answer_start]

    @property
    def depth(self) -> float:
        return (self.fact_position - self.document_start) / max(1, self.document_end - self.document_start)

    def target_weights(self, document_weight: float = 0.0) -> list[float]:
        """One weight per next-token target (input_ids[1:]): 1 on the reply's tokens, <|im_end|> included,
        `document_weight` on the document's, 0 elsewhere (system turn, question)."""
        weights = []
        for target in range(1, len(self.input_ids)):
            if target >= self.answer_start:
                weights.append(1.0)
            elif self.document_start < target < self.document_end:
                weights.append(document_weight)
            else:
                weights.append(0.0)
        return weights


@dataclass
class _File:
    path: str
    segment: int | None  # the cached block, or None when the text was changed or made up
    text: str | None = None  # the block's text, when it is not the cached one
    ids: list[int] | None = None  # the block's ids, once encoded


class RetrievalSampleBuilder:
    """Builds retrieval samples of an exact token budget from a tokenized corpus split."""

    def __init__(self, split: TokenizedSplit, tokenizer, sources: list[str] | None = None):
        self.split, self.tokenizer = split, tokenizer
        self.im_end = tokenizer.special_tokens[IM_END]
        # Documents by source; a haystack takes its files from one source where it can, so the folder
        # reads as one project (or one manual).
        self.documents_by_source: dict[str, list[int]] = {}
        for document, source in enumerate(split.document_sources):
            if sources is None or source in sources:
                self.documents_by_source.setdefault(source, []).append(document)
        if not self.documents_by_source:
            raise ValueError("no documents to build retrieval samples from")
        self.source_roots = {
            split.document_sources[d]: split.document_roots[d]
            for docs in self.documents_by_source.values()
            for d in docs
        }
        # Plain lists: this runs per sample, and indexing tensors one element at a time is slow.
        self.segment_lengths = (split.segment_offsets[1:] - split.segment_offsets[:-1]).tolist()
        self.file_segments = {
            d: list(split.document_segment_range(d))[1:] for docs in self.documents_by_source.values() for d in docs
        }

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allow_special=False)

    def _block_text(self, file: _File) -> str:
        return (
            file.text if file.text is not None else self.tokenizer.decode(self.split.segment_ids(file.segment).tolist())
        )

    def _block_ids(self, file: _File) -> list[int]:
        if file.ids is None:
            file.ids = (
                self._encode(file.text) if file.text is not None else self.split.segment_ids(file.segment).tolist()
            )
        return file.ids

    def _block_length(self, file: _File) -> int:
        if file.ids is None and file.text is None:
            return self.segment_lengths[file.segment]
        return len(self._block_ids(file))

    def _pick_files(self, rng: random.Random, budget: int) -> tuple[list[tuple[str, int]], bool]:
        """(source, segment) pairs of about `budget` tokens of file blocks: whole documents from a random
        source in corpus order, then single files to fill the gap. Second: whether several sources were
        needed (the held-out split has little text per source)."""
        sources = list(self.documents_by_source)
        rng.shuffle(sources)
        chosen, used = [], 0
        for source in sources:
            documents = self.documents_by_source[source]
            start = rng.randrange(len(documents))
            candidates = [s for d in documents[start:] + documents[:start] for s in self.file_segments[d]]
            for segment in candidates:
                length = self.segment_lengths[segment]
                if used + length <= budget:
                    chosen.append((source, segment))
                    used += length
                if budget - used < 64:
                    break
            if budget - used < 64:
                break
        return chosen, len({source for source, _ in chosen}) > 1

    def build(
        self,
        total_tokens: int,
        rng: random.Random,
        depth: float | None = None,
        num_distractors: int | None = None,
        system: str | None = DEFAULT_SYSTEM_PROMPT,
        kind: str | None = None,
        aspect: Aspect | None = None,
    ) -> RetrievalSample:
        """A sample of at most `total_tokens` ids (a few tokens less when no file fits the last gap). With
        an `aspect`, each fact's statement is followed by the aspect's sentence with a value of its own."""
        kind = kind or rng.choice(FACT_KINDS)
        num_distractors = rng.randint(0, 3) if num_distractors is None else num_distractors
        keys = fact_keys(kind, num_distractors + 1, rng)
        facts: list[Fact] = []
        for key in keys:
            candidate = make_fact(kind, key, rng)
            # Distinct values too, so that a reply holding the asked value cannot have read another fact.
            while any(candidate.value == other.value for other in facts):
                candidate = make_fact(kind, key, rng)
            facts.append(candidate)
        aspect_values: list[str] = []
        if aspect is not None:
            for _ in facts:
                value = aspect.value(rng)
                while any(value in other or other in value for other in aspect_values):  # none within another
                    value = aspect.value(rng)
                aspect_values.append(value)
            facts = [
                replace(f, statement=f"{f.statement} {aspect.statement.format(v)}")
                for f, v in zip(facts, aspect_values)
            ]
        fact, *distractors = facts
        depth = depth if depth is not None else rng.random()
        depths = [(fact, depth)] + [(d, rng.random()) for d in distractors]
        if kind in DOC_FACT_KINDS and aspect is None and rng.random() < README_TABLE_SHARE:
            # One block at the fact's depth (_plant gives it a README of its own), its question unchanged.
            fact = replace(fact, statement=readme_table(fact, distractors, rng))
            depths = [(fact, depth)]
        elif kind in DOC_FACT_KINDS and rng.random() < 0.5:
            # A README's two kinds side by side (a command and a variable of one tool, at the same
            # depth): the asked line must be told from its neighbour of the other kind too.
            neighbour = neighbour_fact(fact, rng)
            distractors.append(neighbour)
            depths.append((neighbour, depth))
        head = document_head_ids(self.tokenizer, system)
        question = question_ids(self.tokenizer, fact.question)
        answer = self._encode(fact.answer) + [self.im_end]
        fixed = len(head) + len(question) + len(answer)
        # Room for the folder tree and the planted lines, re-measured below once the files are known.
        reserve = 48 * (len(distractors) + 1)
        budget = total_tokens - fixed - reserve
        tree_share = 0
        for _ in range(8):
            picked, multi_source = self._pick_files(rng, budget - tree_share)
            files = self._files(picked, multi_source)
            files, planted_path = self._plant(files, depths, rng)
            root = "workspace" if multi_source or not picked else self.source_roots[picked[0][0]]
            tree = render_folder_preamble(root, [f.path for f in files])
            blocks = [self._block_ids(f) for f in files[:-1]]
            last_text = document_text(self._block_text(files[-1]))
            blocks.append(self._encode(last_text))
            document = self._encode(tree) + [i for block in blocks for i in block]
            if fixed + len(document) <= total_tokens:
                break
            tree_share += fixed + len(document) - total_tokens + 16
        else:
            raise ValueError(f"cannot fit a retrieval sample into {total_tokens} tokens")
        input_ids = head + document + question + answer
        document_start, document_end = len(head), len(head) + len(document)
        fact_position = self._statement_position(files, blocks, tree, planted_path, fact, document_start)
        return RetrievalSample(
            input_ids,
            len(input_ids) - len(answer),
            document_start,
            document_end,
            fact,
            fact_position,
            distractors,
            planted_path,
            aspect_values,
        )

    def _files(self, picked: list[tuple[str, int]], multi_source: bool) -> list[_File]:
        files = []
        for source, segment in picked:
            path = self.split.segment_paths[segment]
            if multi_source:
                path = f"{self.source_roots[source]}/{path}"
                files.append(_File(path, None, render_file_block(path, self._file_text(segment))))
            else:
                files.append(_File(path, segment))
        return files

    def _file_text(self, segment: int) -> str:
        """The file's own text, from its cached block: header line and closing blank line removed."""
        block = self.tokenizer.decode(self.split.segment_ids(segment).tolist())
        return block.split("\n", 1)[1][:-1]

    def _plant(self, files: list[_File], facts: list[tuple[Fact, float]], rng: random.Random):
        """Put each fact in or beside the file found at its depth (a fraction of the files' tokens, in
        reading order); returns the files in reading order and the path of the file holding the asked
        fact."""
        files = sorted(files, key=lambda f: reading_order_key(f.path))
        planted_path = None
        for index, (fact, depth) in enumerate(facts):
            lengths = [self._block_length(f) for f in files]
            goal, reached = depth * sum(lengths), 0
            target = files[-1] if files else None
            for file, length in zip(files, lengths):
                reached += length
                if reached > goal:
                    target = file
                    break
            # With no file short enough for the budget, the folder holds only the notes. A README's table
            # (several lines) is always a file of its own.
            table = "\n" in fact.statement
            if target is None or table or rng.random() < 0.5:
                folder = posixpath.dirname(target.path) if target is not None else ""
                name = f"{key_slug(fact.key)}_{rng.choice(('notes.txt', 'NOTES.md', 'secrets.txt', 'config.txt'))}"
                if table:
                    taken = {f.path for f in files}
                    name = next(
                        n
                        for n in ("README.md", "USAGE.md", f"{key_slug(fact.key)}_README.md")
                        if posixpath.join(folder, n) not in taken
                    )
                path = posixpath.join(folder, name) if folder else name
                files.append(_File(path, None, render_file_block(path, fact.statement + "\n")))
                files.sort(key=lambda f: reading_order_key(f.path))
            else:
                path = target.path
                prefix = _COMMENT_PREFIX.get(posixpath.splitext(path)[1], "")
                header, body = self._block_text(target).split("\n", 1)
                lines = body[:-1].split("\n")
                at = rng.randint(0, max(0, len(lines) - 1))
                lines.insert(at, prefix + fact.statement)
                target.segment, target.text, target.ids = None, render_file_block(path, "\n".join(lines)), None
            if index == 0:
                planted_path = path
        return files, planted_path

    def _statement_position(self, files, blocks, tree, planted_path, fact, document_start) -> int:
        position = document_start + len(self._encode(tree))
        for file, block in zip(files, blocks):
            if file.path == planted_path:
                text = self._block_text(file)
                # The statement starts a line, and no pre-tokenizer piece runs from a newline into a
                # non-space character, so the ids before it are those of the text before it.
                before = text[: text.index(fact.statement)]
                before = before[: before.rfind("\n") + 1]
                return position + len(self._encode(before))
            position += len(block)
        raise AssertionError("the planted file is missing")
