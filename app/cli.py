"""The `kimi-desk` command line.

Errors are one line on stderr and exit code 2 for bad input, never a traceback (set KIMI_DESK_DEBUG=1
to see one). Heavy imports (torch) happen inside the subcommands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kimi_desk import environment
from kimi_desk.app.commands import UsageError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help), not a usage dump."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _version() -> str:
    from kimi_desk import __version__

    return __version__


def build_parser(argv: list[str] | tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The command line; `bench`'s suites only when `argv` asks for `bench` (they import kimi_desk.bench)."""
    parser = _Parser(
        prog="kimi-desk",
        description="Read a whole book or codebase into a local Kimi Linear model, chat over it, "
        "and resume the session instantly later.",
    )
    parser.add_argument("--version", action="version", version=f"kimi-desk {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from kimi_desk.app import commands as session_commands
    from kimi_desk.app import open_command

    open_command.add_parser(commands)
    session_commands.add_parsers(commands)

    bench = commands.add_parser(
        "bench",
        help="measure this machine (prefill and decode tokens/s)",
        description="Benchmarks. Each writes a Markdown table to stdout.",
    )
    if argv[:1] == ["bench"]:  # the measurements (kimi_desk.bench) are imported only when asked for
        _add_bench_suites(bench)
    return parser


def _add_bench_suites(bench: argparse.ArgumentParser) -> None:
    """The thin entry points of `kimi-desk bench`: each suite's options and run live in kimi_desk.bench
    (packaging/bench/), which no other part of the product imports."""
    from kimi_desk.bench import cpu as cpu_bench
    from kimi_desk.bench import model as model_bench
    from kimi_desk.bench import sessions as sessions_bench
    from kimi_desk.bench import threads as threads_bench

    suites = bench.add_subparsers(dest="suite", metavar="SUITE", parser_class=_Parser)
    cpu = suites.add_parser(
        "cpu",
        help="the engine on the CPU: reading, answering and memory per weight format",
        description="Reading and decode tokens/s, first-token latency after a long document "
        "and peak memory on the CPU, for the weight formats none, int8 and int4.",
    )
    cpu_bench.add_arguments(cpu)
    cpu.set_defaults(run=cpu_bench.main)
    # The kernel benchmark parses its own options (it runs on a CUDA machine beside fla-core).
    suites.add_parser(
        "kernels", add_help=False, help="KDA kernels on a CUDA GPU beside fla-core (pass --help for its options)"
    )
    model = suites.add_parser(
        "model",
        help="the model at the 48B shapes on a CUDA GPU beside transformers + fla",
        description=model_bench.__doc__.split("\n\n")[0],
    )
    model_bench.add_arguments(model)
    model.set_defaults(run=model_bench.main)
    sessions = suites.add_parser(
        "sessions",
        help="reading against restoring a session; snapshot size; memory",
        description="Read documents of growing length into sessions on the CPU: time to "
        "read against time to restore from the snapshot, snapshot size per token, and peak "
        "memory while reading.",
    )
    sessions_bench.add_arguments(sessions)
    sessions.set_defaults(run=sessions_bench.main)
    threads = suites.add_parser(
        "threads",
        help="memory of a question in a thread after a long document",
        description=threads_bench.__doc__.split("\n\n")[0],
    )
    threads_bench.add_arguments(threads)
    threads.set_defaults(run=threads_bench.main)


def _known_errors() -> tuple[type[BaseException], ...]:
    """What the user can fix: every UserError, and the file system's refusals of a path they named."""
    from kimi_desk.engine.errors import UserError

    return (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # pypdf logs every oddity of a damaged PDF to stderr; the loader's own one-line errors and
    # per-file warnings already say what matters to the user.
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    try:
        if argv[:2] == ["bench", "kernels"]:
            from kimi_desk.bench import kernels as kernels_bench
            from kimi_desk.bench.model import demo_model_gates

            return kernels_bench.main(argv[2:], demo_gates=demo_model_gates)
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        if not hasattr(args, "run"):
            raise UsageError(f"'{args.command}' needs a subcommand (see 'kimi-desk {args.command} --help')")
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("kimi-desk: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into one line
        if environment.debug():
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, _known_errors()):
            print(f"kimi-desk: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(
            f"kimi-desk: internal error: {type(exc).__name__}: {message} (KIMI_DESK_DEBUG=1 shows details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
