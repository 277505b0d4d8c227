"""The `kimi-desk` command line.

Errors are one line on stderr and exit code 2 for bad input, never a traceback (set KIMI_DESK_DEBUG=1
to see one). Heavy imports (torch) happen inside the subcommands, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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


def build_parser() -> argparse.ArgumentParser:
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

    bench = commands.add_parser("bench", help="measure this machine (prefill and decode tokens/s)",
                                description="Benchmarks. Each writes a Markdown table to stdout.")
    suites = bench.add_subparsers(dest="suite", metavar="SUITE", parser_class=_Parser)
    cpu = suites.add_parser("cpu", help="the engine on the CPU: reading, answering and memory per weight format",
                            description="Reading and decode tokens/s, first-token latency after a long document "
                            "and peak memory on the CPU, for the weight formats none, int8 and int4 (from a source "
                            "checkout: packaging/bench/cpu).")
    from kimi_desk.engine import bench as engine_bench

    engine_bench.add_arguments(cpu)
    cpu.set_defaults(run=engine_bench.main)
    # The kernel benchmark parses its own options (it runs on a CUDA machine beside fla-core).
    suites.add_parser("kernels", add_help=False, help="KDA kernels on a CUDA GPU beside fla-core "
                      "(pass --help for its options)")
    from kimi_desk.engine import bench_model

    model = suites.add_parser("model", help="the model at the 48B shapes on a CUDA GPU beside transformers + fla",
                              description=bench_model.__doc__.split("\n\n")[0])
    bench_model.add_arguments(model)
    model.set_defaults(run=bench_model.main)
    from kimi_desk.engine import bench_sessions

    sessions = suites.add_parser("sessions", help="reading against restoring a session; snapshot size; memory",
                                 description="Read documents of growing length into sessions on the CPU: time to "
                                 "read against time to restore from the snapshot, snapshot size per token, and peak "
                                 "memory while reading.")
    bench_sessions.add_arguments(sessions)
    sessions.set_defaults(run=bench_sessions.main)
    from kimi_desk.engine import bench_threads

    threads = suites.add_parser("threads", help="memory of a question in a thread after a long document",
                                description=bench_threads.__doc__.split("\n\n")[0])
    bench_threads.add_arguments(threads)
    threads.set_defaults(run=bench_threads.main)
    return parser


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
            from kimi_desk.engine.bench_model import demo_model_gates
            from kimi_desk.kernels import bench as kernel_bench

            return kernel_bench.main(argv[2:], demo_gates=demo_model_gates)
        parser = build_parser()
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
        if os.environ.get("KIMI_DESK_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, _known_errors()):
            print(f"kimi-desk: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"kimi-desk: internal error: {type(exc).__name__}: {message} (KIMI_DESK_DEBUG=1 shows details)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
