"""The session commands: `ingest`, `ask` and `sessions list|show|rm|export|export-thread|import`.

Each prints what a script needs on stdout (a session id, an answer, or `--json`), progress on stderr
(a bar redrawn in place on a terminal, a plain line every few seconds when stderr is piped or logged),
and errors as one line (app/cli.py turns exceptions into that).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from kimi_desk.app import formatting, pull
from kimi_desk.app.backend import DEMO_MODEL_NOTE, DEMO_MODEL_REMEDY
from kimi_desk.app.formatting import nbytes, printable, unreadable_sessions
from kimi_desk.app.progress_line import ProgressLine
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.loading import QUANTIZE_CHOICES

QUANTIZE_HELP = (
    "the big matrices' format, chosen at load time and cached beside the model: fp8 (GPUs from "
    "Ada on) or int8 halve the memory of bf16, int4 quarters it; auto (default): the most faithful "
    "format that fits this device, said on one line when it is not the checkpoint's own"
)


class UsageError(UserError):
    """Bad input on the command line (printed as one line, exit code 2)."""


# -- choosing the model and device ------------------------------------------------------------------


# Said whenever the embedded demo model is about to answer: its answers look fluent and are invented.
DEMO_MODEL_NOTICE = f"{DEMO_MODEL_NOTE} {DEMO_MODEL_REMEDY}--model moonshotai/Kimi-Linear-48B-A3B-Instruct"


def load_assistant(args, session=None, answering: bool = False):
    """The engine's choice of model, device and format for these options (engine/loading.py); its
    notices go to stderr as one line each (and, when `answering`, what the demo model can do)."""
    from kimi_desk.engine.loading import DEMO_MODEL, resolve_model
    from kimi_desk.engine.loading import load_assistant as load

    path = resolve_model(args.model, session)
    if answering and Path(path).resolve() == DEMO_MODEL.resolve():
        print(f"kimi-desk: {DEMO_MODEL_NOTICE}", file=sys.stderr)
    return load(
        path,
        args.device,
        getattr(args, "quantize", "auto"),
        notice=lambda line: print(f"kimi-desk: {line}", file=sys.stderr),
        gpu_memory=getattr(args, "gpu_memory", None),
        cpu_memory=getattr(args, "cpu_memory", None),
    )


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
    parser.add_argument(
        "--model",
        metavar="PATH|REPO_ID",
        help="a model folder, or a hub repo id (owner/name) "
        "after 'kimi-desk pull' (default: the session's model, else the embedded demo model)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the model runs (default: auto, CUDA when present)",
    )
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto", help=QUANTIZE_HELP)
    from kimi_desk.app.open_command import add_memory_options

    add_memory_options(parser)


class ReadingProgress(ProgressLine):
    """Reading progress (module progress_line): tokens, files, speed, time left, the piece being read."""

    def update(self, p) -> None:
        fraction = p.tokens_done / max(p.tokens_total, 1)
        left = "estimating the time left" if p.seconds_left is None else f"{formatting.clock(p.seconds_left)} left"
        files = f"{p.files_done:,}/{p.files_total:,} file{'' if p.files_total == 1 else 's'}"
        # The piece being read: a file's path, or what the engine names in parentheses itself.
        where = printable(p.path) if p.path.startswith("(") else f"({printable(p.path)})"
        self.show(
            "reading",
            fraction,
            f"{p.tokens_done:,}/{p.tokens_total:,} tokens  {files}  {p.tokens_per_second:,.0f} tok/s  {left}  "
            f"{printable(p.path)}",
            f"{p.tokens_done:,}/{p.tokens_total:,} tokens, {files}, {p.tokens_per_second:,.0f} tokens/s, "
            f"{left} {where}",
            finished=p.tokens_done >= p.tokens_total,
        )


# -- ingest -----------------------------------------------------------------------------------------

# The ingest option that sets each loader limit (engine/ingest LoaderLimits), named when it leaves files out.
_LIMIT_OPTIONS = {
    "max_files": "--max-files",
    "max_file_bytes": "--max-file-bytes",
    "max_total_bytes": "--max-total-bytes",
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
    progress = ReadingProgress()
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
            progress.say(
                f"{session.name}: {tokens_to_read:,} tokens to read, about {formatting.clock(estimate)} "
                f"on this device ({assistant.model.device.type})"
            )

    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    started = time.perf_counter()
    try:
        session = assistant.read(
            SessionStore(),
            args.path,
            name=args.name,
            limits=limits,
            on_progress=progress.update,
            cancel=cancel,
            on_plan=on_plan,
        )
    except ReadCancelled as stopped:
        progress.done()
        print(f"kimi-desk: {stopped}; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    progress.done()
    if args.json:
        print(
            json.dumps(
                {
                    "id": session.id,
                    "name": session.name,
                    "source": session.source,
                    "tokens": session.document_tokens,
                    "files": len(session.files),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        )
    else:
        print(session.id)
    return 0


# -- ask --------------------------------------------------------------------------------------------


def run_ask(args) -> int:
    from kimi_desk.engine.citations import SourceIndex
    from kimi_desk.engine.generate import Sampling
    from kimi_desk.engine.session import SessionStore

    session = SessionStore().get(args.session)
    thread = _thread_to_continue(session, args)
    assistant = load_assistant(args, session, answering=True)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    notice = lambda line: print(f"kimi-desk: {line}", file=sys.stderr)  # noqa: E731
    try:
        index = None if args.turn is None else args.turn - 1
        for event in assistant.ask(
            session,
            args.text,
            thread=thread,
            index=index,
            sampling=sampling,
            max_new_tokens=args.max_new_tokens,
            cancel=cancel,
            notice=notice,
        ):
            if not args.json:
                sys.stdout.write(_printable_answer(event.text))
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    thread = event.thread
    turn = session.thread(thread).turns[-1]
    citations = SourceIndex(session).cite(turn.answer)
    if args.json:
        print(
            json.dumps(
                {
                    "session": session.id,
                    "thread": thread,
                    "turn": len(session.thread(thread).turns),
                    "question": turn.question,
                    "answer": turn.answer,
                    "finish_reason": turn.finish_reason,
                    "tokens": len(turn.answer_token_ids),
                    "seconds": turn.seconds,
                    "citations": [c.to_json() for c in citations],
                }
            )
        )
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        for line in citation_lines(citations):
            print(f"kimi-desk: {line}", file=sys.stderr)
        print(f"kimi-desk: thread {thread} (continue it with 'kimi-desk ask {session.id} -c \"...\"')", file=sys.stderr)
    return 130 if turn.finish_reason == "cancelled" else 0


def _thread_to_continue(session, args) -> str | None:
    """The thread `ask` continues: --thread ID, -c the session's most recent one, else None (a new one)."""
    if args.turn is not None and not (args.thread or args.continue_):
        raise UsageError("--turn N asks again at a turn of a thread: give the thread with --thread ID or -c")
    if args.thread:
        session.thread(args.thread)  # SessionError, naming the session's threads, when it has no such thread
        return args.thread
    if args.continue_:
        latest = session.latest_thread()
        if latest is None:
            raise UsageError(f"session {session.id} has no thread to continue yet; ask without -c to start one")
        return latest.id
    return None


def citation_lines(citations) -> list[str]:
    """The places an answer cites, a line each: found in the document, or why not."""
    lines = []
    for c in citations:
        where = f"{printable(c.label)}" + (f" ({printable(c.symbol)})" if c.symbol else "")
        lines.append(f"cites {where}" if c.found else f"cites {printable(c.text)}: not found ({printable(c.reason)})")
    return lines


# -- sessions ---------------------------------------------------------------------------------------


def _summary(session) -> dict:
    return {
        "id": session.id,
        "name": session.name,
        "source": session.source,
        "tokens": session.document_tokens,
        "read": session.read_position,
        "complete": session.complete,
        "files": len(session.files),
        "bytes": session.nbytes(),
        "created": session.created,
        "last_used": session.last_used,
        "threads": len(session.threads),
        "questions": session.turns,
    }


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
            print(
                f"{s['id']:<9} {printable(s['name'], 24):<24} {tokens:>10} {nbytes(s['bytes']):>9}  "
                f"{s['last_used'][:19].replace('T', ' '):<20} {printable(s['source'])}"
            )
    if unreadable:
        print(f"kimi-desk: {unreadable_sessions(unreadable)}", file=sys.stderr)
    return 0


def run_sessions_show(args) -> int:
    from kimi_desk.engine.session import SessionStore

    session = SessionStore().get(args.session)
    info = _summary(session)
    info["model"] = session.model_source
    info["checkpoints"] = session.snapshots().positions
    info["sources"] = [{"path": f["path"], "bytes": f["size"], "tokens": f["end"] - f["start"]} for f in session.files]
    info["threads"] = [
        {
            "id": t.id,
            "created": t.created,
            "tokens": t.tokens,
            "turns": [
                {
                    "question": x.question,
                    "answer": x.answer,
                    "finish_reason": x.finish_reason,
                    "asked": x.asked,
                    "tokens": x.tokens,
                }
                for x in t.turns
            ],
        }
        for t in session.threads
    ]
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    state = "read" if session.complete else f"read {session.read_position:,} of"
    print(
        f"{printable(session.name)} ({session.id})\n  source: {printable(session.source)}\n  {state} "
        f"{session.document_tokens:,} tokens in {plural(len(session.files), 'file')}, "
        f"{nbytes(info['bytes'])} on disk\n"
        f"  model: {printable(session.model_source)}\n"
        f"  checkpoints at: {', '.join(f'{p:,}' for p in info['checkpoints']) or 'none'}"
    )
    if session.files:
        width = max(len(f"{s['tokens']:,}") for s in info["sources"])
        print(f"\nsources ({plural(len(session.files), 'file')}, tokens each):")
        for source in info["sources"]:
            print(f"  {source['tokens']:>{width},}  {printable(source['path'])}")
    if not session.threads:
        print(f"\nno threads yet: 'kimi-desk ask {session.id} \"...\"' starts one")
    for thread in sorted(session.threads, key=lambda t: t.created):
        print(
            f"\nthread {thread.id}: {plural(len(thread.turns), 'turn')}, {thread.tokens:,} tokens, "
            f"started {thread.created[:19].replace('T', ' ')}"
        )
        for number, turn in enumerate(thread.turns, 1):
            print(f"\n  {number}. > {printable(turn.question)}\n{_indented(_printable_answer(turn.answer))}")
    return 0


def _indented(text: str, prefix: str = "     ") -> str:
    return "\n".join(prefix + line if line else line for line in text.split("\n"))


def plural(count: int, noun: str) -> str:
    """`1 file`, `2 files`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def run_sessions_export_thread(args) -> int:
    from kimi_desk.app.thread_export import thread_markdown
    from kimi_desk.engine.session import SessionStore

    session = SessionStore().get(args.session)
    thread = session.thread(args.thread)
    target = Path(args.file).expanduser()
    if target.exists() or target.is_symlink():
        raise UsageError(f"{target} already exists; choose another name")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent}: no such folder")
    text = thread_markdown(session, thread)
    from kimi_desk.engine.errors import writing

    with writing(target), open(target, "x", encoding="utf-8") as fh:
        fh.write(text)
    print(target)
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
    ingest = commands.add_parser(
        "ingest",
        help="read a folder or a book into a new session",
        description="Read PATH (a folder, PDF, EPUB, HTML, Markdown or text file) into a "
        "session. Re-running on the same PATH resumes an interrupted reading and re-reads "
        "a changed folder from its first changed file. Progress goes to stderr, the "
        "session id to stdout.",
    )
    ingest.add_argument("path", metavar="PATH")
    ingest.add_argument("--name", help="a name for the session (default: the file or folder name)")
    ingest.add_argument("--json", action="store_true", help="print a JSON summary instead of the id")
    # The reading limits: how much of a large folder a session takes in.
    for flag, default, help_text in (
        ("--max-file-bytes", 2 << 20, "skip files in a folder larger than N bytes (default: 2 MiB)"),
        ("--max-total-bytes", 16 << 20, "stop adding files once N bytes are read (default: 16 MiB)"),
        ("--max-files", 10_000, "read at most N files of a folder (default: 10,000)"),
    ):
        ingest.add_argument(flag, type=positive_int, default=default, metavar="N", help=help_text)
    _add_model_options(ingest)
    ingest.set_defaults(run=run_ingest)

    ask = commands.add_parser(
        "ask",
        help="ask a question in a saved session: a new thread, or a follow-up",
        description="Answer TEXT from SESSION's document, streamed to stdout. Each ask starts "
        "a new thread (its id goes to stderr); -c continues the session's most recent thread "
        "and --thread ID a given one, so the model sees the earlier questions and answers. "
        "The places the answer cites are checked against the files read (stderr).",
    )
    ask.add_argument("session", metavar="SESSION")
    ask.add_argument("text", metavar="TEXT")
    follow = ask.add_mutually_exclusive_group()
    follow.add_argument(
        "-c", "--continue", dest="continue_", action="store_true", help="continue the session's most recent thread"
    )
    follow.add_argument("--thread", metavar="ID", help="continue this thread ('sessions show SESSION' lists them)")
    ask.add_argument(
        "--turn",
        type=positive_int,
        metavar="N",
        help="with -c or --thread: ask TEXT in place of the thread's turn N (1 is the first), from the "
        "state before it: the last turn is replaced, an earlier one starts a new thread and the "
        "thread keeps its turns",
    )
    ask.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object when the answer is complete: the answer, its thread and the places it cites",
    )
    ask.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=512,
        metavar="N",
        help="the longest answer, in tokens (default: 512)",
    )
    ask.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    _add_model_options(ask)
    ask.set_defaults(run=run_ask)

    sessions = commands.add_parser(
        "sessions",
        help="list (the default), show, rm, export, export-thread, import",
        description="Manage saved sessions; without a verb, list them.",
    )
    sessions.set_defaults(run=run_sessions_list, json=False)
    verbs = sessions.add_subparsers(dest="verb", metavar="VERB")
    listing = verbs.add_parser("list", help="every session, most recent first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_sessions_list)
    show = verbs.add_parser("show", help="one session: its files with their tokens, checkpoints, threads")
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
    export_thread = verbs.add_parser(
        "export-thread",
        help="write one thread as Markdown, with the places it cites",
        description="Write THREAD of SESSION to FILE (which must not exist) as Markdown: "
        "each question and answer, and under it the lines each cited place points to, "
        "as the session read them, or why a place was not found.",
    )
    export_thread.add_argument("session", metavar="SESSION")
    export_thread.add_argument("thread", metavar="THREAD")
    export_thread.add_argument("file", metavar="FILE.md")
    export_thread.set_defaults(run=run_sessions_export_thread)
    imported = verbs.add_parser("import", help="add a session from an exported .zip file")
    imported.add_argument("file", metavar="FILE")
    imported.set_defaults(run=run_sessions_import)

    pull.add_parser(commands)
