"""The embedded demo model as shipped in assets/model: complete and small enough, the same function in
our engine as in transformers' native Kimi Linear, and the default of the commands, offline."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_desk.engine import load_model
from kimi_desk.engine.chat import DEFAULT_SYSTEM_PROMPT, document_head_ids, question_ids, stop_token_ids
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.generate import GREEDY, generate
from kimi_desk.engine.loading import DEMO_MODEL, resolve_model
from kimi_desk.engine.tokenizer import load_tokenizer

ORACLE = Path(__file__).parents[1] / "engine" / "transformers_oracle.py"
REPO = Path(__file__).parents[2]


def test_shipped_folder_is_complete_and_under_50_mb():
    names = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir() if p.is_file()) < 50_000_000


def test_architecture_is_kimi_linear():
    config = KimiLinearConfig.from_file(DEMO_MODEL / "config.json")
    assert config.kda_layers == [1, 2, 3, 5, 6, 7] and config.full_attn_layers == [4, 8]  # 1-based: K K K M K K K M
    assert config.num_experts == 8 and config.num_experts_per_token == 2 and config.num_shared_experts == 1
    with safe_open(DEMO_MODEL / "model.safetensors", "pt") as f:
        parameters = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert 10e6 <= parameters <= 40e6


def test_logits_and_greedy_match_transformers_on_real_text(tmp_path):
    tokenizer = load_tokenizer(DEMO_MODEL)
    text = (REPO / "engine" / "state.py").read_text(encoding="utf-8")
    input_ids = torch.tensor([tokenizer.encode(text, allow_special=False)[:300]])
    save_file({"input_ids": input_ids}, tmp_path / "inputs.safetensors")
    subprocess.run(
        [
            sys.executable,
            str(ORACLE),
            str(DEMO_MODEL),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "oracle.safetensors"),
            "16",
        ],
        check=True,
        capture_output=True,
    )
    oracle = load_file(tmp_path / "oracle.safetensors")

    model = load_model(DEMO_MODEL, dtype=torch.float32)
    state = model.new_state(1)
    logits = model(input_ids, state)
    assert ((logits.double() - oracle["logits"].double()).norm() / oracle["logits"].double().norm()) < 1e-4
    token = logits[:, -1].argmax(-1, keepdim=True)
    greedy = [token]
    for _ in range(15):
        token = model(token, state)[:, -1].argmax(-1, keepdim=True)
        greedy.append(token)
    assert torch.equal(torch.cat(greedy, 1), oracle["greedy"])


def test_replies_in_the_chat_format():
    """After a document and a question, the reply is a turn that ends: the format the product relies on."""
    tokenizer = load_tokenizer(DEMO_MODEL)
    model = load_model(DEMO_MODEL, dtype=torch.float32)
    document = tokenizer.encode(
        "==> notes.txt <==\nThe access code for the orbit vault is QFT-2231.\n", allow_special=False
    )
    prompt = (
        document_head_ids(tokenizer, DEFAULT_SYSTEM_PROMPT)
        + document
        + question_ids(tokenizer, "What is the access code for the orbit vault?")
    )
    result = generate(
        model,
        prompt,
        model.new_state(1),
        max_new_tokens=64,
        sampling=GREEDY,
        stop_token_ids=stop_token_ids(tokenizer, model.config),
    )
    assert result.token_ids and result.token_ids[-1] in stop_token_ids(tokenizer, model.config)
    assert tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()


def kimi_desk_offline(tmp_path, *args) -> subprocess.CompletedProcess:
    """`kimi-desk ARGS --device cpu` in a fresh process, its home under tmp_path and the hub offline (no
    model named: the shipped one); it must succeed."""
    env = {
        **os.environ,
        "KIMI_DESK_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "kimi_desk.app.cli", *args, "--device", "cpu"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result


def test_commands_default_to_it_offline(tmp_path):
    assert resolve_model(None) == DEMO_MODEL
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.md").write_text("The maintainer of the quasar module is Ada Park.\n")
    info = json.loads(kimi_desk_offline(tmp_path, "ingest", str(folder), "--json").stdout)
    answer = kimi_desk_offline(tmp_path, "ask", info["id"], "Who maintains the quasar module?").stdout
    assert answer.strip()


def test_a_follow_up_continues_the_thread_across_processes(tmp_path):
    """The product path on the shipped model: `ingest`, `ask`, then `ask -c` in a fresh process. The
    follow-up's answer is what the model gives after the document, the first question, its answer and
    the follow-up fed as one conversation (temperature 0): it is answered from the earlier turn, by a
    thread restored from what the first process saved. Each answer says what the demo model is worth."""
    from kimi_desk.engine.chat import follow_up_ids
    from kimi_desk.engine.loading import load_assistant
    from kimi_desk.engine.session import SessionStore

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "vault.md").write_text(
        "# Vault\n\nThe access code for the orbit vault is QFT-2231.\nAda Park keeps the orbit vault's keys.\n"
    )
    session_id = kimi_desk_offline(tmp_path, "ingest", str(folder)).stdout.strip()
    first = kimi_desk_offline(
        tmp_path, "ask", session_id, "What is the access code for the orbit vault?", "--json", "--max-new-tokens", "12"
    )
    second = kimi_desk_offline(
        tmp_path, "ask", session_id, "And who keeps its keys?", "-c", "--json", "--max-new-tokens", "12"
    )
    assert "demo model" in first.stderr and "often invents" in first.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert two["thread"] == one["thread"] and two["turn"] == 2

    session = SessionStore(tmp_path / "home").get(session_id)
    turns = session.thread(one["thread"]).turns
    assistant = load_assistant(DEMO_MODEL, "cpu", "auto")  # as the command loads it
    conversation = (
        question_ids(assistant.tokenizer, turns[0].question)
        + turns[0].answer_token_ids
        + follow_up_ids(assistant.tokenizer, turns[1].question)
    )
    # The saved answer, fed after the conversation in one call from the document's state: each of its
    # tokens is the greedy choice there, up to ties within the rounding of the model's dtype (bf16 on CPUs
    # that multiply it in hardware): the product computed the answer token by token, this call in chunks,
    # the same sums in another order.
    answer = turns[1].answer_token_ids
    assert answer
    with torch.no_grad():
        logits = assistant.model(torch.tensor([conversation + answer]), assistant.document_state(session).clone())
    compute_dtype = next(p.dtype for p in assistant.model.parameters() if p.is_floating_point())
    ties = max(1e-4, 4 * torch.finfo(compute_dtype).eps)
    logits = logits[0, len(conversation) - 1 : -1].float()
    top = logits.max(-1).values
    chosen = logits.gather(-1, torch.tensor(answer)[:, None])[:, 0]
    assert ((top - chosen) <= ties * top.abs().clamp(min=1)).all(), (top - chosen).tolist()
