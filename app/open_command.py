"""`kimi-desk open`: the command line's way into the Textual app (app/tui.py).

Light to import, like the rest of the command line: textual, torch and the engine load only when the
command runs, so `kimi-desk --help` stays instant.
"""

from __future__ import annotations

import argparse

from kimi_desk.app.settings import QUANTIZE


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "open",
        help="the app on a folder, file, session id or exported .zip",
        description="Read a folder or file into the model and chat over it; a session id or an exported "
        ".zip archive is restored. Without PATH: the list of saved sessions.",
    )
    parser.add_argument("target", nargs="?", metavar="PATH|SESSION_ID|ARCHIVE.zip")
    parser.add_argument(
        "--model",
        help="a checkpoint folder, or a hub repo id fetched with 'kimi-desk pull' "
        "(default: the settings' model, else the embedded demo model)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs (default: the settings' device, else auto)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="the big matrices' format (default: the settings', "
        "else auto: the most faithful format that fits this device; see 'kimi-desk ingest --help')",
    )
    add_memory_options(parser, "the settings', else ")
    parser.set_defaults(run=run)


def _size(option: str):
    """argparse type: a size the engine reads (engine/placement.py parse_size), kept as written."""

    def check(text: str) -> str:
        from kimi_desk.engine.errors import UserError
        from kimi_desk.engine.placement import parse_size

        try:
            parse_size(text, option)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def add_memory_options(parser: argparse.ArgumentParser, default: str = "") -> None:
    """--gpu-memory and --cpu-memory: the budgets the engine places the model in (engine/placement.py)."""
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        type=_size("--gpu-memory"),
        help="GPU memory the model may use, e.g. 24GiB or 16GB; "
        "routed experts that do not fit stay in RAM (default: " + default + "what the card has "
        "free, less a margin)",
    )
    parser.add_argument(
        "--cpu-memory",
        metavar="SIZE",
        type=_size("--cpu-memory"),
        help="RAM the model may use, e.g. 64GiB (default: " + default + "what is available, less a margin)",
    )


def run(args: argparse.Namespace) -> int:
    from kimi_desk.app import backend
    from kimi_desk.app.tui import create_app

    app = create_app(
        args.target,
        model=args.model,
        device=args.device,
        quantize=args.quantize,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
    )
    # No model anywhere is a usage error, said on one line before the app takes the terminal.
    if app.model_choice is None:
        raise backend.ModelNotFound(backend.NO_MODEL_MESSAGE)
    app.run()
    return app.return_code or 0
