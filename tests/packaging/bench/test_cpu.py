"""`kimi-desk bench cpu` (packaging/bench/cpu/) on the embedded demo model, small: the table and the JSON
it writes, and llama.cpp's columns beside ours through a stand-in llama-bench."""

import json
import subprocess
import sys


def bench_cpu_small(tmp_path, formats, question_after, *options):
    """`kimi-desk bench cpu` at sizes that take seconds (two readings of 64 tokens, 2 decode steps, one
    repeat), its JSON in tmp_path / r.json; it must succeed. Returns its stdout and the JSON's results."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimi_desk.app.cli",
            "bench",
            "cpu",
            "--formats",
            formats,
            "--prefill",
            "0+64,300+64",
            "--decode-at",
            "100",
            "--decode-steps",
            "2",
            "--question-after",
            question_after,
            "--repeats",
            "1",
            *options,
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads((tmp_path / "r.json").read_text())["results"]


def test_bench_cpu_runs_small(tmp_path):
    stdout, (none, int4) = bench_cpu_small(tmp_path, "none,int4", "300")
    assert "| reading tok/s, 64 after 300 |" in stdout and "| first token: total s |" in stdout
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
    stdout, (ours, llama) = bench_cpu_small(
        tmp_path, "none", "0", "--llama-cpp", str(build), "--gguf-dir", str(gguf), "--llama-max-depth", "200"
    )
    dtype = ours["dtype"]  # the engine's choice on this CPU (engine/memory.py cpu_compute_dtype)
    assert dtype in ("float32", "bfloat16") and f"| measurement | none ({dtype}) | llama.cpp (bf16) |" in stdout
    assert "| reading tok/s, 64 after 0 | " in stdout and "| 51 |" in stdout
    assert "llama.cpp bf16: not run (deeper than --llama-max-depth): reading 64 after 300" in stdout
    assert llama["format"] == "llama.cpp" and llama["decoding"] == [
        dict(cached=100, steps=2, tok_s_median=50.0, tok_s_best=51.0, tok_s_mean=50.0)
    ]
    assert llama["threads"] >= 1 and llama["peak_rss_mb"] > 0
