"""`kimi-desk bench cpu`: the entry point of the CPU benchmark, whose measurements live beside the other
benchmarks in packaging/bench/cpu/cpu_bench.py (a source checkout's; an installed wheel has no
benchmarks). Its options are declared there; this module only finds and runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
from pathlib import Path

from kimi_desk.engine.errors import UserError

HARNESS = Path(__file__).resolve().parents[1] / "packaging" / "bench" / "cpu" / "cpu_bench.py"


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _harness():
    if not HARNESS.is_file():
        raise UserError("kimi-desk bench cpu runs from a source checkout of kimi-desk "
                         f"(it needs {HARNESS.relative_to(HARNESS.parents[3])})")
    spec = importlib.util.spec_from_file_location("kimi_desk_cpu_bench", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if HARNESS.is_file():
        _harness().add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return _harness().main(args)
