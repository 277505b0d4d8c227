"""The shipped embedded model (assets/model) on the product's path: `kimi-desk ingest` of small folders with
planted facts, then `kimi-desk ask` at temperature 0; the replies must contain the facts.

A test of the model, not of a fake engine (issue 18's last deliverable): the CLI as a user runs it, with
no --model, so the embedded model answers. The facts are of the kinds a user asks about a folder: a
value in a notes file, a code in a comment, a command and a variable in a README, in FOLDERS small
projects whose names are made up (from a fixed seed, so that a run is repeatable). A 22 M-parameter
model misses some: on two other seeds' 20 such folders both recent models answered 84-85% (67 and 68 of
80), each missing a different few. So the test asks for what the model card promises, not for every
reply: at least three quarters of the replies right, and at least half of each kind.

The embedded model answers with its code spans held to the text it read (engine/code_spans.py): on its
own it can garble a name it copies (`LOBOR_BACKEND=torch`, `KIMI_DEBUG=1`); the app replaces a name the
text lacks by the one it holds that the model finds most probable there.

And README's run command, the first thing a new user does: this repository's README.md read as
`kimi-desk open README.md` reads it, asked the two questions of issue 18; both must be right.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

FOLDERS = 6
SEED = 2026
_SYLLABLES = ["ka", "lo", "mer", "tu", "vin", "sar", "dol", "pe", "rix", "no", "bel", "gan", "hu", "qua", "zor", "fi"]
_THINGS = ["ships", "crates", "tickets", "builds", "notes", "jobs", "maps", "songs"]


def small_project(rng: random.Random) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A made-up project's files and its four questions with the text each reply must contain."""

    def name(syllables: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))

    tool, things, service, vault = name(2), rng.choice(_THINGS), name(3), name(2)
    variable = f"{tool.upper()}_{rng.choice(['BACKEND', 'ENGINE', 'KERNELS', 'MODE'])}"
    code = "".join(rng.choice("QXRLMT") for _ in range(3)) + f"-{rng.randint(1000, 9999)}"
    port = str(rng.randint(1024, 9999))
    usage = [
        f"`{tool} {things} list` lists the saved {things}.",
        f"Environment: `{variable}={rng.choice(['torch', 'cpu', 'native'])}` forces the PyTorch kernels everywhere.",
    ]
    rng.shuffle(usage)
    files = {
        "README.md": f"# {tool}\n\nA small tool that keeps track of {things}.\n\n## Usage\n\n"
        + "\n\n".join(usage)
        + "\n",
        f"src/{tool}/core.py": f'"""{tool.title()} bookkeeping."""\n\n\ndef free_{things}(port):\n'
        f"    # The access code for the {vault} vault is {code}.\n"
        f"    return [b for b in port.{things} if not b.ship]\n",
        "notes/services.txt": f"Operations notes.\n\nThe secret port of service {service} is {port}.\n"
        "Restart it after every deploy.\n",
    }
    questions = [
        (f"What is the secret port of service {service}?", port),
        (f"What is the access code for the {vault} vault?", code),
        (f"Which command lists the saved {things}?", f"{tool} {things} list"),
        ("Which variable forces the PyTorch kernels?", variable),
    ]
    return files, questions


# The project the follow-up is asked about.
HARBOR = {
    "README.md": "# harbor\n\nA small tool that keeps track of ships in port.\n\n## Usage\n\n"
    "`harbor ships list` lists the saved ships.\n\n"
    "Environment: `HARBOR_BACKEND=torch` forces the PyTorch kernels everywhere.\n",
    "src/harbor/berths.py": '"""Berth bookkeeping."""\n\n\ndef free_berths(port):\n'
    "    # The access code for the lumtir vault is QXR-5821.\n"
    "    return [b for b in port.berths if not b.ship]\n",
    "notes/services.txt": "Operations notes.\n\nThe secret port of service korvani is 4711.\n"
    "Restart it after every deploy.\n",
}


def write(folder: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    return folder


ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The two questions and what counts as right, as the model card's evaluation asks them.
sys.path.insert(0, str(ROOT / "packaging" / "demo_model"))
from evaluate import README_QUESTIONS  # noqa: E402

ASK = ["--json", "--temperature", "0", "--max-new-tokens", "40", "--device", "cpu"]


def _kimi_desk(home, *args):
    env = {**os.environ, "KIMI_DESK_HOME": str(home / "kimi-home"), "HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_embedded_model_answers_with_the_planted_facts(tmp_path):
    rng = random.Random(SEED)
    right, misses = {kind: 0 for kind in ("port", "code", "command", "variable")}, []
    for index in range(FOLDERS):
        files, questions = small_project(rng)
        folder = write(tmp_path / f"project{index}", files)
        session = json.loads(_kimi_desk(tmp_path, "ingest", str(folder), "--json", "--device", "cpu"))["id"]
        for kind, (question, expected) in zip(right, questions):
            answer = json.loads(_kimi_desk(tmp_path, "ask", session, question, *ASK))["answer"]
            right[kind] += expected in answer
            misses += [] if expected in answer else [(question, expected, answer)]
    assert sum(right.values()) >= 3 * 4 * FOLDERS / 4 and min(right.values()) >= FOLDERS / 2, (right, misses)


def test_a_follow_up_is_answered_from_the_earlier_turn(tmp_path):
    """`ask -c` after a first question asked by value: "that service" is only known from the first turn,
    and what must be done to it is said right after its fact."""
    folder = write(tmp_path / "harbor", HARBOR)
    session = json.loads(_kimi_desk(tmp_path, "ingest", str(folder), "--json", "--device", "cpu"))["id"]
    _kimi_desk(tmp_path, "ask", session, "Which service listens on the secret port 4711?", *ASK)
    reply = json.loads(
        _kimi_desk(tmp_path, "ask", session, "What must be done to that service after every deploy?", "-c", *ASK)
    )
    assert reply["turn"] == 2 and "restart" in reply["answer"].lower(), reply["answer"]


def test_readme_read_by_the_embedded_model_answers_its_two_questions(tmp_path):
    session = json.loads(_kimi_desk(tmp_path, "ingest", str(README), "--json", "--device", "cpu"))["id"]
    answers = {q: json.loads(_kimi_desk(tmp_path, "ask", session, q, *ASK))["answer"] for q, _, _ in README_QUESTIONS}
    wrong = {q: answers[q] for q, _, right in README_QUESTIONS if not re.search(right, answers[q])}
    assert not wrong, wrong
