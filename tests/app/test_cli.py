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
    return subprocess.run([sys.executable, "-m", "kimi_desk.app.cli", *args], capture_output=True, text=True,
                          **kwargs)


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


def test_bench_cpu_runs_small(tmp_path):
    result = kimi_desk("bench", "cpu", "--formats", "none,int4", "--prefill", "0+64,300+64", "--decode-at", "100",
                       "--decode-steps", "2", "--question-after", "300", "--repeats", "1", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "| reading tok/s, 64 after 300 |" in result.stdout and "| first token: total s |" in result.stdout
    import json

    none, int4 = json.loads((tmp_path / "r.json").read_text())["results"]
    assert (none["format"], int4["format"]) == ("none", "int4")
    for r in (none, int4):
        assert [x["tok_s"] > 0 for x in r["reading"]] == [True, True] and r["decoding"][0]["tok_s_median"] > 0
        assert r["first_token"]["total_s"] > 0 and r["peak_rss_mb"] >= r["rss_after_load_mb"] > 0


FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
p, n = int(args["-p"]), int(args["-n"])
out = []
for d in args["-d"].split(","):
    out.append(dict(model_filename=args["-m"], model_type="kimi-linear BF16", model_size=1, model_n_params=2,
                    n_prompt=p, n_gen=n, n_depth=int(d), avg_ts=50.0, stddev_ts=1.0, avg_ns=1e9,
                    samples_ts=[49.0, 51.0], build_number=1, build_commit="fake", cpu_info="cpu", gpu_info="",
                    backends="CPU", n_batch=2048, n_ubatch=512, n_gpu_layers=0, flash_attn=-1, test_time="t"))
print(json.dumps(out))
"""


def test_bench_cpu_sets_llama_cpp_beside_ours(tmp_path):
    """--llama-cpp: each GGUF timed beside its format in the one table, depths past the limit said so
    (a stand-in llama-bench that reports fixed figures; the GGUF files already converted)."""
    from kimi_desk.engine.loading import DEMO_MODEL
    from kimi_desk.engine.weights import checkpoint_fingerprint

    build = tmp_path / "llama"
    (build / "bin").mkdir(parents=True)
    (build / "src" / "llama.cpp").mkdir(parents=True)
    (build / "src" / "llama.cpp" / "convert_hf_to_gguf.py").write_text("")
    (build / "bin" / "llama-quantize").write_text("")
    (build / "bin" / "llama-bench").write_text(FAKE_LLAMA_BENCH)
    (build / "bin" / "llama-bench").chmod(0o755)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / f"model-{checkpoint_fingerprint(DEMO_MODEL)[:16]}-bf16.gguf").write_bytes(b"GGUF")
    result = kimi_desk("bench", "cpu", "--formats", "none", "--prefill", "0+64,300+64", "--decode-at", "100",
                       "--decode-steps", "2", "--question-after", "0", "--repeats", "1", "--llama-cpp", str(build),
                       "--gguf-dir", str(gguf), "--llama-max-depth", "200", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert "| measurement | none (bfloat16) | llama.cpp (bf16) |" in result.stdout
    assert "| reading tok/s, 64 after 0 | " in result.stdout and "| 51 |" in result.stdout
    assert "llama.cpp bf16: not run (deeper than --llama-max-depth): reading 64 after 300" in result.stdout
    ours, llama = json.loads((tmp_path / "r.json").read_text())["results"]
    assert llama["format"] == "llama.cpp" and llama["decoding"] == [
        dict(cached=100, steps=2, tok_s_median=50.0, tok_s_best=51.0, tok_s_mean=50.0)]
    assert llama["threads"] >= 1 and llama["peak_rss_mb"] > 0


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


@pytest.mark.parametrize("damage,message", [
    pytest.param(_edit_config(num_shared_experts=-1), "num_shared_experts must be an integer from 0", id="negative"),
    pytest.param(_edit_config(hidden_size="128"), "hidden_size must be an integer", id="string"),
    pytest.param(_edit_config(num_hidden_layers=True), "num_hidden_layers must be an integer", id="bool"),
    pytest.param(_edit_config(hidden_size=128.0), "got 128.0", id="float"),
    pytest.param(_edit_config(rms_norm_eps=float("nan")), "rms_norm_eps must be a number", id="nan"),
    pytest.param(_edit_config(routed_scaling_factor=float("inf")), "routed_scaling_factor must be", id="infinity"),
    pytest.param(_edit_config(eos_token_id={"id": 2}), "eos_token_id must be", id="object"),
    pytest.param(_edit_config(linear_attn_config__kda_layers=["1", "2", "3"]), "kda_layers must be a list", id="list"),
    pytest.param(_edit_config(num_hidden_layers=10**7), "num_hidden_layers must be an integer from 1 to 4,096",
                 id="huge-layers"),
    pytest.param(_write("config.json", b'{"hidden_size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                 "nested too deeply", id="deep-nesting"),
    pytest.param(_write("config.json", b'{"hidden_size": 1' + b"0" * 5000 + b"}"), "not valid JSON", id="long-number"),
    pytest.param(_huge_header_claim, "its header claims 3,221,225,472 bytes", id="header-3gb"),
    pytest.param(_header_without_offsets, "has data_offsets None", id="header-no-offsets"),
    pytest.param(_write("model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": "../model.safetensors"}}'),
                 "not a .safetensors file in its folder", id="index-outside"),
    pytest.param(_write("model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": 7}}'),
                 "the index names 7", id="index-int"),
    pytest.param(_edit_config(vocab_size=1 << 24, hidden_size=1 << 16), "needs about", id="beyond-memory"),
    pytest.param(_write("tokenizer_config.json", b"[" * 100_000), "tokenizer_config.json: not valid JSON",
                 id="tokenizer-config-deep"),
])
def test_a_bad_model_folder_is_one_line_and_exit_2(chat_checkpoint, tmp_path, home, monkeypatch, capsys, damage, message):
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
        chat_checkpoint, tmp_path, home, monkeypatch, capsys):
    monkeypatch.setenv("KIMI_DESK_SKIP_MEMORY_CHECK", "1")
    folder = shutil.copytree(chat_checkpoint, tmp_path / "bad-model")
    _edit_config(vocab_size=1 << 24, hidden_size=1 << 16)(folder)
    (tmp_path / "notes.txt").write_text("Some notes.\n")
    code = main(["ingest", "--model", str(folder), "--device", "cpu", "--quantize", "none", str(tmp_path / "notes.txt")])
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
