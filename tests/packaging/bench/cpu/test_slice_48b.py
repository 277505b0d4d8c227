"""packaging/bench/cpu/slice_48b.py's comparison table over alternating rounds: medians of each side, the
median of the rounds' ratios, each round's ratio (the engines themselves run on the GPU machine's CPU)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[4] / "packaging" / "bench" / "cpu" / "slice_48b.py"


def load():
    spec = importlib.util.spec_from_file_location("slice_48b", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def round_of(ours_read, ours_decode, their_read, their_decode):
    ours = dict(dtype="bfloat16", threads=16, prefill=dict(tokens=512, tok_s=ours_read))
    ours["decode"] = [dict(depth=d, tok_s=t) for d, t in ours_decode.items()]
    theirs = dict(
        prefill=[dict(tokens=512, tok_s=their_read)], decode=[dict(depth=d, tok_s=t) for d, t in their_decode.items()]
    )
    return ours, dict(models=[theirs])


def test_rounds_give_medians_and_each_ratio():
    bench = load()
    rounds = [
        round_of(1000.0, {0: 90.0, 1024: 80.0}, 1250.0, {0: 100.0, 1024: 100.0}),
        round_of(1100.0, {0: 100.0, 1024: 90.0}, 1000.0, {0: 80.0, 1024: 100.0}),
        round_of(900.0, {0: 95.0, 1024: 70.0}, 1000.0, {0: 100.0, 1024: 70.0}),
    ]
    table = bench.comparison_table(rounds, 512, 16).splitlines()
    assert table[0].endswith("| each round |") and len(table) == 5
    assert table[2] == "| reading 512 tokens, tok/s | 1000.00 | 1000.00 | 0.90x | 0.80 / 1.10 / 0.90 |"
    assert table[3] == "| decode after 0, tok/s | 95.00 | 100.00 | 0.95x | 0.90 / 1.25 / 0.95 |"
    assert table[4] == "| decode after 1,024, tok/s | 80.00 | 100.00 | 0.90x | 0.80 / 0.90 / 1.00 |"


def test_one_round_keeps_the_plain_table():
    bench = load()
    table = bench.comparison_table([round_of(500.0, {0: 50.0}, 1000.0, {0: 40.0})], 512, 2).splitlines()
    assert table[0].endswith("| ours / llama.cpp |") and table[1] == "|---|---:|---:|---:|"
    assert table[3] == "| decode after 0, tok/s | 50.00 | 40.00 | 1.25x |"
