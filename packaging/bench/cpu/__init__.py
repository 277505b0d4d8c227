"""`kimi-desk bench cpu`: the entry point of the CPU benchmark, whose measurements live beside this
module in cpu_bench.py (a script as well: it runs its own worker processes by path). Its options are
declared there; this module only finds and runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
from pathlib import Path

from kimi_desk.engine.errors import UserError

HARNESS = Path(__file__).resolve().parent / "cpu_bench.py"


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _harness():
    if not HARNESS.is_file():
        raise UserError(f"kimi-desk bench cpu needs {HARNESS}, which this installation lacks")
    spec = importlib.util.spec_from_file_location("kimi_desk_cpu_bench", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if HARNESS.is_file():
        _harness().add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return _harness().main(args)
