"""The command line as a user meets it: --version, --help, one-line errors with exit code 2."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from kimi_desk import __version__

# Imported here, not under capsys: the progress lines' default stream is the sys.stderr of its import.
from kimi_desk.app.cli import main


def kimi_desk(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True, **kwargs)


def test_version_and_help():
    result = kimi_desk("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kimi-desk {__version__}"
    result = kimi_desk("--help")
    assert result.returncode == 0 and "bench" in result.stdout
    for sub in (["bench", "--help"], ["bench", "cpu", "--help"]):
        result = kimi_desk(*sub)
        assert result.returncode == 0, sub
        assert "usage: kimi-desk" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench"], "'bench' needs a subcommand"),
        (["bench", "cpu", "--prefill", "many"], "--prefill takes START+TOKENS items"),
        (["bench", "cpu", "--decode-at", "x"], "--decode-at takes comma-separated token counts"),
        (["bench", "cpu", "--formats", "fp16"], "--formats takes some of"),
        (["bench", "cpu", "--decode-steps", "x"], "invalid int value"),
        (["bench", "cpu", "--threads", "0"], "--threads must be at least 1"),
        (["bench", "cpu", "--llama-cpp", "/nonexistent-llama-build"], "no bin/llama-bench"),
        (["ingest", "--gpu-memory", "24", "notes.txt"], "--gpu-memory '24' needs a unit: 24GiB, 16GB or 512MiB"),
        (["ask", "s1", "why?", "--cpu-memory", "lots"], "--cpu-memory 'lots' is not a size"),
        (["open", "--gpu-memory", "2KB"], "--gpu-memory '2KB' is too small to hold anything"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = kimi_desk(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _edit_config(**changes):
    def edit(folder):
        raw = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            where, _, leaf = key.rpartition("__")
            (raw[where] if where else raw)[leaf] = value
        (folder / "config.json").write_text(json.dumps(raw))

    return edit


def _write(name, data):
    def edit(folder):
        (folder / name).write_bytes(data)

    return edit


def _huge_header_claim(folder):
    with open(folder / "model.safetensors", "wb") as fh:  # sparse: claims 3 GB, holds nothing
        fh.write(struct.pack("<Q", 3 << 30) + b"{")
        fh.truncate(8 + (3 << 30) + 100)


def _header_without_offsets(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    for entry in header.values():
        entry.pop("data_offsets", None)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize(
    "damage,message",
    [
        pytest.param(
            _edit_config(num_shared_experts=-1), "num_shared_experts must be an integer from 0", id="negative"
        ),
        pytest.param(_edit_config(hidden_size="128"), "hidden_size must be an integer", id="string"),
        pytest.param(_edit_config(num_hidden_layers=True), "num_hidden_layers must be an integer", id="bool"),
        pytest.param(_edit_config(hidden_size=128.0), "got 128.0", id="float"),
        pytest.param(_edit_config(rms_norm_eps=float("nan")), "rms_norm_eps must be a number", id="nan"),
        pytest.param(_edit_config(routed_scaling_factor=float("inf")), "routed_scaling_factor must be", id="infinity"),
        pytest.param(_edit_config(eos_token_id={"id": 2}), "eos_token_id must be", id="object"),
        pytest.param(
            _edit_config(linear_attn_config__kda_layers=["1", "2", "3"]), "kda_layers must be a list", id="list"
        ),
        pytest.param(
            _edit_config(num_hidden_layers=10**7),
            "num_hidden_layers must be an integer from 1 to 4,096",
            id="huge-layers",
        ),
        pytest.param(
            _write("config.json", b'{"hidden_size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            "nested too deeply",
            id="deep-nesting",
        ),
        pytest.param(
            _write("config.json", b'{"hidden_size": 1' + b"0" * 5000 + b"}"), "not valid JSON", id="long-number"
        ),
        pytest.param(_huge_header_claim, "its header claims 3,221,225,472 bytes", id="header-3gb"),
        pytest.param(_header_without_offsets, "has data_offsets None", id="header-no-offsets"),
        pytest.param(
            _write("model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": "../model.safetensors"}}'),
            "not a .safetensors file in its folder",
            id="index-outside",
        ),
        pytest.param(
            _write("model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": 7}}'),
            "the index names 7",
            id="index-int",
        ),
        pytest.param(_edit_config(vocab_size=1 << 24, hidden_size=1 << 16), "needs about", id="beyond-memory"),
        pytest.param(
            _write("tokenizer_config.json", b"[" * 100_000),
            "tokenizer_config.json: not valid JSON",
            id="tokenizer-config-deep",
        ),
    ],
)
def test_a_bad_model_folder_is_one_line_and_exit_2(
    chat_checkpoint, tmp_path, home, monkeypatch, capsys, damage, message
):
    """`kimi-desk ingest --model BAD FILE`: whatever is wrong in the config or the checkpoint, the user
    gets one line and exit code 2, never an internal error."""
    monkeypatch.delenv("KIMI_DESK_DEBUG", raising=False)
    folder = shutil.copytree(chat_checkpoint, tmp_path / "bad-model")
    damage(folder)
    document = tmp_path / "notes.txt"
    document.write_text("Some notes to read.\n")
    code = main(["ingest", "--model", str(folder), "--device", "cpu", str(document)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("kimi-desk: error: ") and message in lines[0] and len(lines[0]) < 400, lines[0]


def test_weights_far_smaller_than_the_config_are_refused_when_the_memory_check_is_off(
    chat_checkpoint, tmp_path, home, monkeypatch, capsys
):
    monkeypatch.setenv("KIMI_DESK_SKIP_MEMORY_CHECK", "1")
    folder = shutil.copytree(chat_checkpoint, tmp_path / "bad-model")
    _edit_config(vocab_size=1 << 24, hidden_size=1 << 16)(folder)
    (tmp_path / "notes.txt").write_text("Some notes.\n")
    code = main(
        ["ingest", "--model", str(folder), "--device", "cpu", "--quantize", "none", str(tmp_path / "notes.txt")]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has shape" in lines[0], lines


def test_reading_progress_is_plain_lines_when_piped_and_a_bar_on_a_terminal(monkeypatch):
    """Piped or logged: a line now and then and at the end, no time left before it means something.
    On a terminal: one line redrawn, cut with an ellipsis to the terminal's width."""
    import io

    from kimi_desk.app.commands import ReadingProgress
    from kimi_desk.engine.session import ReadProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    piped = io.StringIO()
    line = ReadingProgress(piped)
    line.update(ReadProgress(100, 1000, 0, 1, 900.0, None, "a.py"))  # the first chunk, under 5 s: nothing yet
    line._last_plain -= ReadingProgress.PLAIN_SECONDS
    line.update(ReadProgress(400, 1000, 0, 1, 1000.0, 0.6, "a.py"))
    line.update(ReadProgress(1000, 1000, 1, 1, 1000.0, 0.0, "b.py"))
    assert piped.getvalue().splitlines() == [
        "reading 40%: 400/1,000 tokens, 0/1 file, 1,000 tokens/s, 0:01 left (a.py)",
        "reading 100%: 1,000/1,000 tokens, 1/1 file, 1,000 tokens/s, 0:00 left (b.py)",
    ]
    named = io.StringIO()  # what the engine names itself in parentheses is not wrapped twice
    ReadingProgress(named).update(ReadProgress(30, 30, 0, 2, 100.0, 0.0, "(folder tree)"))
    assert named.getvalue().endswith(", 0:00 left (folder tree)\n")
    terminal = Terminal()
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: __import__("os").terminal_size((60, 24)))
    ReadingProgress(terminal).update(ReadProgress(100, 1000, 0, 3, 900.0, None, "a/very/long/path/" * 5))
    drawn = terminal.getvalue().split("\x1b[2K")[-1]
    assert len(drawn) == 59 and drawn.endswith("…") and drawn.startswith("reading  10% |██ ")
