"""The session commands: `ingest`, `ask` and `sessions list|show|rm|export|import`.

Each prints what a script needs on stdout (a session id, an answer, or `--json`), progress on stderr
only when stderr is a terminal, and errors as one line (app/cli.py turns exceptions into that).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from kimi_desk.app.formatting import printable, unreadable_sessions
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.loading import QUANTIZE_CHOICES

QUANTIZE_HELP = ("the big matrices' format, chosen at load time and cached beside the model: fp8 (GPUs from "
                 "Ada on) or int8 halve the memory of bf16, int4 quarters it; auto (default): the most faithful "
                 "format that fits this device, said on one line when it is not the checkpoint's own")


class UsageError(UserError):
    """Bad input on the command line (printed as one line, exit code 2)."""


# -- choosing the model and device ------------------------------------------------------------------


def load_assistant(args, session=None):
    """The engine's choice of model, device and format for these options (engine/loading.py); its
    notices go to stderr as one line each."""
    from kimi_desk.engine.loading import load_assistant as load
    from kimi_desk.engine.loading import resolve_model

    return load(resolve_model(args.model, session), args.device, getattr(args, "quantize", "auto"),
                notice=lambda line: print(f"kimi-desk: {line}", file=sys.stderr),
                gpu_memory=getattr(args, "gpu_memory", None), cpu_memory=getattr(args, "cpu_memory", None))


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH|REPO_ID", help="a model folder, or a hub repo id (owner/name) "
                        "after 'kimi-desk pull' (default: the session's model, else the embedded demo model)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (default: auto, CUDA when present)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=QUANTIZE_HELP)
    from kimi_desk.app.open_command import add_memory_options

    add_memory_options(parser)


# -- formatting -------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLine:
    """A one-line progress bar on a terminal; nothing at all when stderr is piped."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def say(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[2K{text}\n")
            self.stream.flush()

    def update(self, p) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and p.tokens_done < p.tokens_total):
            return
        self._last = now
        fraction = p.tokens_done / max(p.tokens_total, 1)
        bar = "█" * int(fraction * 20) + " " * (20 - int(fraction * 20))
        line = (f"reading {fraction:4.0%} |{bar}| {p.tokens_done:,}/{p.tokens_total:,} tokens  "
                f"{p.files_done}/{p.files_total} files  {p.tokens_per_second:,.0f} tok/s  "
                f"{human_seconds(p.seconds_left)} left  {p.path}")
        self.stream.write("\r\x1b[2K" + line[:200])
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


# -- ingest -----------------------------------------------------------------------------------------

# The ingest option that sets each loader limit (engine/ingest LoaderLimits), named when it leaves files out.
_LIMIT_OPTIONS = {
    "max_files": "--max-files", "max_file_bytes": "--max-file-bytes", "max_total_bytes": "--max-total-bytes",
}


def _ingest_limits(args):
    """The loader's limits from the ingest options (each at least 1: positive_int)."""
    from kimi_desk.engine.ingest import LoaderLimits

    return LoaderLimits(**{field: getattr(args, field) for field in _LIMIT_OPTIONS})


def _limit_notice_line(notice) -> str:
    """What a limit left out, as ingest says it on stderr: the engine's words and the option to raise."""
    option = _LIMIT_OPTIONS.get(notice.limit)
    return f"kimi-desk: {notice.message}" + (f" ({option} N)" if option else "")


def run_ingest(args) -> int:
    from kimi_desk.engine.session import ReadCancelled, SessionStore

    if not Path(args.path).expanduser().exists():
        raise UsageError(f"{args.path}: no such file or folder")
    limits = _ingest_limits(args)
    progress = ProgressLine()
    assistant = load_assistant(args)

    def on_plan(session, tokens_to_read, limit_notices=()):
        # Said whether or not stderr is a terminal: the document lacks these files.
        for notice in limit_notices:
            print(_limit_notice_line(notice), file=sys.stderr)
        if tokens_to_read == 0:
            progress.say(f"{session.name}: already read ({session.document_tokens:,} tokens), nothing to do")
        else:
            # Reading slows as the document grows: the average rate over this document's length.
            estimate = tokens_to_read / assistant.reading_rate(tokens_to_read, session.read_position)
            progress.say(f"{session.name}: {tokens_to_read:,} tokens to read, about {human_seconds(estimate)} "
                         f"on this device ({assistant.model.device.type})")

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    started = time.perf_counter()
    try:
        session = assistant.read(SessionStore(), args.path, name=args.name, limits=limits,
                                 on_progress=progress.update, cancel=cancel, on_plan=on_plan)
    except ReadCancelled as stopped:
        progress.done()
        print(f"kimi-desk: {stopped}; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    progress.done()
    if args.json:
        print(json.dumps({"id": session.id, "name": session.name, "source": session.source,
                          "tokens": session.document_tokens, "files": len(session.files),
                          "seconds": round(time.perf_counter() - started, 3)}))
    else:
        print(session.id)
    return 0


# -- ask --------------------------------------------------------------------------------------------


def run_ask(args) -> int:
    from kimi_desk.engine.generate import Sampling
    from kimi_desk.engine.session import SessionStore

    session = SessionStore().get(args.session)
    assistant = load_assistant(args, session)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        for event in assistant.ask(session, args.text, sampling=sampling, max_new_tokens=args.max_new_tokens,
                                   cancel=cancel):
            if not args.json:
                sys.stdout.write(_printable_answer(event.text))
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    turn = session.transcript[-1]
    if args.json:
        print(json.dumps({"session": session.id, "question": turn.question, "answer": turn.answer,
                          "finish_reason": turn.finish_reason, "tokens": len(turn.answer_token_ids),
                          "seconds": turn.seconds}))
    else:
        sys.stdout.write("\n")
    return 130 if turn.finish_reason == "cancelled" else 0


# -- sessions ---------------------------------------------------------------------------------------


def _summary(session) -> dict:
    return {"id": session.id, "name": session.name, "source": session.source, "tokens": session.document_tokens,
            "read": session.read_position, "complete": session.complete, "files": len(session.files),
            "bytes": session.nbytes(), "created": session.created, "last_used": session.last_used,
            "questions": len(session.transcript)}


def run_sessions_list(args) -> int:
    from kimi_desk.engine.session import SessionStore

    store = SessionStore()
    sessions = [_summary(s) for s in store.list()]
    unreadable = store.unreadable()
    if args.json:
        print(json.dumps(sessions, indent=1))
    elif not sessions and not unreadable:
        print("no sessions yet: 'kimi-desk ingest PATH' reads a folder or a book into one")
    elif sessions:
        print(f"{'ID':<9} {'NAME':<24} {'TOKENS':>10} {'SIZE':>9}  {'LAST USED':<20} SOURCE")
        for s in sessions:
            tokens = f"{s['tokens']:,}" if s["complete"] else f"{s['read']:,}/{s['tokens']:,}"
            print(f"{s['id']:<9} {printable(s['name'], 24):<24} {tokens:>10} {human_bytes(s['bytes']):>9}  "
                  f"{s['last_used'][:19].replace('T', ' '):<20} {printable(s['source'])}")
    if unreadable:
        print(f"kimi-desk: {unreadable_sessions(unreadable)}", file=sys.stderr)
    return 0


def run_sessions_show(args) -> int:
    from kimi_desk.engine.session import SessionStore

    session = SessionStore().get(args.session)
    info = _summary(session)
    info["model"] = session.model_source
    info["checkpoints"] = session.snapshots().positions
    info["transcript"] = [{"question": t.question, "answer": t.answer, "finish_reason": t.finish_reason,
                           "asked": t.asked} for t in session.transcript]
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    state = "read" if session.complete else f"read {session.read_position:,} of"
    print(f"{printable(session.name)} ({session.id})\n  source: {printable(session.source)}\n  {state} "
          f"{session.document_tokens:,} tokens in {len(session.files)} files, {human_bytes(info['bytes'])} on disk\n"
          f"  model: {printable(session.model_source)}\n"
          f"  checkpoints at: {', '.join(f'{p:,}' for p in info['checkpoints']) or 'none'}")
    for turn in session.transcript:
        print(f"\n> {printable(turn.question)}\n{_printable_answer(turn.answer)}")
    return 0


def _printable_answer(text: str) -> str:
    """An answer keeps its line breaks and tabs; every other control character is escaped."""
    return "\n".join("\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n"))


def run_sessions_rm(args) -> int:
    from kimi_desk.engine.session import SessionStore

    store = SessionStore()
    for session_id in args.sessions:
        store.get(session_id)  # every id is checked before anything is removed
    for session_id in args.sessions:
        store.remove(session_id)
        print(f"removed {session_id}", file=sys.stderr)
    return 0


def run_sessions_export(args) -> int:
    from kimi_desk.engine.session import SessionStore

    archive = SessionStore().export(args.session, Path(args.file))
    print(archive)
    return 0


def run_sessions_import(args) -> int:
    from kimi_desk.engine.session import SessionStore

    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    session = SessionStore().import_(Path(args.file))
    print(session.id)
    return 0


def add_parsers(commands) -> None:
    ingest = commands.add_parser("ingest", help="read a folder or a book into a new session",
                                 description="Read PATH (a folder, PDF, EPUB, HTML, Markdown or text file) into a "
                                 "session. Re-running on the same PATH resumes an interrupted reading and re-reads "
                                 "a changed folder from its first changed file. Progress goes to stderr, the "
                                 "session id to stdout.")
    ingest.add_argument("path", metavar="PATH")
    ingest.add_argument("--name", help="a name for the session (default: the file or folder name)")
    ingest.add_argument("--json", action="store_true", help="print a JSON summary instead of the id")
    ingest.add_argument("--max-file-bytes", type=positive_int, default=2 << 20, metavar="N",
                        help="skip files in a folder larger than N bytes (default: 2 MiB)")
    ingest.add_argument("--max-total-bytes", type=positive_int, default=16 << 20, metavar="N",
                        help="stop adding files once N bytes are read (default: 16 MiB)")
    ingest.add_argument("--max-files", type=positive_int, default=10_000, metavar="N",
                        help="read at most N files of a folder (default: 10,000)")
    _add_model_options(ingest)
    ingest.set_defaults(run=run_ingest)

    ask = commands.add_parser("ask", help="answer one question from a saved session",
                              description="Answer TEXT from SESSION's document, streamed to stdout.")
    ask.add_argument("session", metavar="SESSION")
    ask.add_argument("text", metavar="TEXT")
    ask.add_argument("--json", action="store_true", help="print one JSON object when the answer is complete")
    ask.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                     help="the longest answer, in tokens (default: 512)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    _add_model_options(ask)
    ask.set_defaults(run=run_ask)

    sessions = commands.add_parser("sessions", help="list, show, rm, export, import",
                                   description="Manage saved sessions.")
    verbs = sessions.add_subparsers(dest="verb", metavar="VERB")
    listing = verbs.add_parser("list", help="every session, most recent first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_sessions_list)
    show = verbs.add_parser("show", help="one session: sources, checkpoints, transcript")
    show.add_argument("session", metavar="SESSION")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=run_sessions_show)
    rm = verbs.add_parser("rm", help="delete sessions")
    rm.add_argument("sessions", metavar="SESSION", nargs="+")
    rm.set_defaults(run=run_sessions_rm)
    export = verbs.add_parser("export", help="write a session to one .zip file")
    export.add_argument("session", metavar="SESSION")
    export.add_argument("file", metavar="FILE")
    export.set_defaults(run=run_sessions_export)
    imported = verbs.add_parser("import", help="add a session from an exported .zip file")
    imported.add_argument("file", metavar="FILE")
    imported.set_defaults(run=run_sessions_import)

    # pull imports this module's formatting helpers, so it is imported here, not at the top.
    from kimi_desk.app import pull

    pull.add_parser(commands)
