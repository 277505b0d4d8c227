"""packaging/bench/llama_cpp without llama.cpp: the vocabulary convert.py writes in place of the
converter's, and how bench.py reads llama-bench's JSON. (The conversion itself, the logits check and
the benchmark need a llama.cpp build; their results are in packaging/bench/llama_cpp/README.md.)"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "packaging" / "bench" / "llama_cpp"))

import bench  # noqa: E402
import convert  # noqa: E402

from kimi_desk.bench.random_checkpoint import write_small_tokenizer  # noqa: E402
from kimi_desk.engine.tokenizer import bytes_to_unicode, load_tokenizer  # noqa: E402


def test_byte_alphabet_is_the_byte_level_one():
    table = bytes_to_unicode()
    assert convert.byte_alphabet() == [table[b] for b in range(256)]


def test_vocabulary_from_tokenizer_json(tmp_path):
    write_small_tokenizer(tmp_path, base_vocab=700)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(tmp_path)
    # Two rows short of the special block, as the official checkpoint (and the demo model) are.
    vocab_size = 700 + 256
    tokens, types, merges = convert.read_tokenizer_json(tmp_path, vocab_size)
    assert len(tokens) == len(types) == vocab_size
    assert tokens[:700] == [tokenizer.id_to_token(i) for i in range(700)]
    assert types[:700] == [1] * 700
    assert tokens[700] == "[BOS]" and types[700] == 3
    assert all(t == 3 for t in types[700:])
    assert merges == [" ".join(m) if not isinstance(m, str) else m for m in data["model"]["merges"]]


def test_vocabulary_rows_past_the_tokenizer_are_unused(tmp_path):
    write_small_tokenizer(tmp_path, base_vocab=700)
    tokens, types, _ = convert.read_tokenizer_json(tmp_path, 1000)
    assert tokens[990] == "[PAD990]" and types[990] == 5


def test_placeholder_vocabulary():
    tokens, types, merges = convert.placeholder_vocab(300)
    assert tokens[:256] == convert.byte_alphabet() and tokens[299] == "<|unused_299|>"
    assert len(set(tokens)) == 300 and types == [1] * 300 and merges == []
    with pytest.raises(SystemExit):
        convert.placeholder_vocab(255)


def _record(model, n_prompt, n_gen, depth, samples):
    return {
        "model_filename": model,
        "model_type": "kimi-linear ?B BF16",
        "model_size": 1,
        "model_n_params": 2,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": depth,
        "avg_ts": sum(samples) / len(samples),
        "stddev_ts": 0.5,
        "avg_ns": 1e9,
        "samples_ts": samples,
        "build_number": 0,
        "build_commit": "x",
        "cpu_info": "cpu",
        "gpu_info": "",
        "backends": "CPU",
        "n_batch": 2048,
        "n_ubatch": 512,
        "n_gpu_layers": 99,
        "flash_attn": -1,
        "test_time": "t",
    }


def test_bench_summary_splits_prefill_and_decode():
    records = [
        _record("a.gguf", 0, 64, 2048, [10.0, 30.0, 20.0]),
        _record("a.gguf", 512, 0, 0, [100.0]),
        _record("a.gguf", 0, 64, 0, [40.0, 50.0]),
        _record("b.gguf", 2048, 0, 0, [7.0]),
    ]
    result = bench.summarize(records, threads=2, extra_info={"load_before": 1.0})
    a, b = result["models"]
    assert [(e["tokens"], e["depth"]) for e in a["prefill"]] == [(512, 0)]
    assert [(e["tokens"], e["depth"]) for e in a["decode"]] == [(64, 0), (64, 2048)]
    assert a["decode"][1]["tok_s_median"] == 20.0 and a["decode"][1]["tok_s_max"] == 30.0
    assert b["prefill"][0]["tok_s"] == 7.0 and b["decode"] == []
    assert result["llama_cpp"]["threads"] == 2 and result["llama_cpp"]["load_before"] == 1.0
    assert "| a.gguf | tg64 | 2048 |" in bench.table(result)


def test_gpu_memory_peak_is_the_highest_reading_over_the_one_before(tmp_path, monkeypatch):
    # A stand-in nvidia-smi that reports 1,000 MiB, then 5,000 + 3,000 on two GPUs, then 1,500.
    readings = tmp_path / "readings"
    readings.write_text("1000\n5000 3000\n1500\n")
    script = tmp_path / "nvidia-smi"
    script.write_text(
        f"#!/bin/sh\nline=$(head -n 1 {readings})\n"
        f"[ $(wc -l < {readings}) -gt 1 ] && sed -i 1d {readings}\n"
        "for x in $line; do echo $x; done\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with bench.GpuMemoryPeak(period_s=0.01) as memory:
        time.sleep(0.3)
    assert memory.baseline_mib == 1000
    assert memory.peak_mib == 8000
