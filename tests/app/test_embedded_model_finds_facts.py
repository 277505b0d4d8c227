"""The shipped embedded model (assets/model) on the product's path: `kimi-desk ingest` of a small folder with
planted facts, then `kimi-desk ask` at temperature 0; the replies must contain the facts.

A test of the model, not of a fake engine (issue 18's last deliverable): the CLI as a user runs it, with
no --model, so the embedded model answers. The facts are of the kinds a user asks about a folder: a
value in a notes file, a code in a comment, a command and a variable in a README.

The embedded model answers with its code spans held to the text it read (engine/code_spans.py): on its
own it finds the line but garbles the variable's name (3 of 4, `LOBOR_BACKEND=torch`); the app replaces
a name the folder lacks by the nearest one it holds (`HARBOR_BACKEND=torch`), and all 4 pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FILES = {
    "README.md": "# harbor\n\nA small tool that keeps track of ships in port.\n\n## Usage\n\n"
    "`harbor ships list` lists the saved ships.\n\n"
    "Environment: `HARBOR_BACKEND=torch` forces the PyTorch kernels everywhere.\n",
    "src/harbor/berths.py": "\"\"\"Berth bookkeeping.\"\"\"\n\n\ndef free_berths(port):\n"
    "    # The access code for the lumtir vault is QXR-5821.\n"
    "    return [b for b in port.berths if not b.ship]\n",
    "notes/services.txt": "Operations notes.\n\nThe secret port of service korvani is 4711.\n"
    "Restart it after every deploy.\n",
}
QUESTIONS = [
    ("What is the secret port of service korvani?", "4711"),
    ("What is the access code for the lumtir vault?", "QXR-5821"),
    ("Which command lists the saved ships?", "harbor ships list"),
    ("Which variable forces the PyTorch kernels?", "HARBOR_BACKEND"),
]


def _kimi_desk(home, *args):
    env = {**os.environ, "KIMI_DESK_HOME": str(home / "kimi-home"), "HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Each question's reply from the shipped model, on the CPU (ingest once, ask each question)."""
    home = tmp_path_factory.mktemp("embedded")
    folder = home / "harbor"
    for path, text in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    session = json.loads(_kimi_desk(home, "ingest", str(folder), "--json", "--device", "cpu"))["id"]
    return {
        question: json.loads(
            _kimi_desk(
                home,
                "ask",
                session,
                question,
                "--json",
                "--temperature",
                "0",
                "--max-new-tokens",
                "40",
                "--device",
                "cpu",
            )
        )["answer"]
        for question, _ in QUESTIONS
    }


def test_the_embedded_model_answers_with_the_planted_facts(answers):
    wrong = {q: answers[q] for q, expected in QUESTIONS if expected not in answers[q]}
    assert not wrong, wrong


def test_a_follow_up_is_answered_from_the_earlier_turn(tmp_path):
    """`ask -c` after a first question asked by value: "that service" is only known from the first turn,
    and what must be done to it is said right after its fact."""
    folder = tmp_path / "harbor"
    for path, text in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text, encoding="utf-8")
    session = json.loads(_kimi_desk(tmp_path, "ingest", str(folder), "--json", "--device", "cpu"))["id"]
    options = ["--json", "--temperature", "0", "--max-new-tokens", "40", "--device", "cpu"]
    _kimi_desk(tmp_path, "ask", session, "Which service listens on the secret port 4711?", *options)
    reply = json.loads(
        _kimi_desk(tmp_path, "ask", session, "What must be done to that service after every deploy?", "-c", *options)
    )
    assert reply["turn"] == 2 and "restart" in reply["answer"].lower(), reply["answer"]
