"""`kimi-desk pull REPO_ID`: download a checkpoint from the Hugging Face hub into its cache.

The local folder goes to stdout (so `--model "$(kimi-desk pull owner/name)"` works); a progress bar goes
to stderr (a bar on a terminal, plain lines now and then when piped). Errors are one line (app/cli.py prints HubError as it is).
"""

from __future__ import annotations

import sys
import time

from kimi_desk.app import formatting
from kimi_desk.app.progress_line import ProgressLine


class PullProgress(ProgressLine):
    """Pulling progress (module progress_line): bytes, files, speed, time left, the file being fetched."""

    def __init__(self, stream=sys.stderr):
        super().__init__(stream)
        self._started = time.monotonic()
        self._first_bytes: int | None = None  # bytes already cached when the pull started: not speed
        self.last = None

    def update(self, p) -> None:
        self.last = p
        now = time.monotonic()
        if self._first_bytes is None:
            self._first_bytes, self._started = p.bytes_done, now
        rate = (p.bytes_done - self._first_bytes) / max(now - self._started, 1e-6)
        left = (p.bytes_total - p.bytes_done) / rate if rate > 0 else None
        files = f"{p.files_done}/{p.files_total} file{'' if p.files_total == 1 else 's'}"
        sizes = f"{formatting.nbytes(p.bytes_done)}/{formatting.nbytes(p.bytes_total)}"
        self.show(
            f"pulling {p.repo_id}",
            p.bytes_done / max(p.bytes_total, 1),
            f"{sizes}  {files}  {formatting.nbytes(rate)}/s  {formatting.clock(left)} left  {formatting.printable(p.current_file)}",
            f"{sizes}, {files}, {formatting.nbytes(rate)}/s, {formatting.clock(left)} left ({formatting.printable(p.current_file)})",
            finished=p.bytes_done >= p.bytes_total and p.files_done >= p.files_total,
        )


def run_pull(args) -> int:
    from kimi_desk.engine.hub import pull

    progress = PullProgress()
    try:
        path = pull(args.repo_id, revision=args.revision, on_progress=progress.update)
    except KeyboardInterrupt:
        progress.done()
        print("kimi-desk: pull interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BaseException:
        progress.done()
        raise
    summary = ""
    if progress.last is not None:
        p = progress.last
        summary = f" ({p.files_total} file{'' if p.files_total == 1 else 's'}, {formatting.nbytes(p.bytes_total)})"
    progress.done(f"pulled {args.repo_id}{summary}; use it with --model {args.repo_id}")
    print(path)
    return 0


def add_parser(commands) -> None:
    pull = commands.add_parser(
        "pull",
        help="download a checkpoint from the Hugging Face hub",
        description="Download REPO_ID's checkpoint (config.json, safetensors weights, tokenizer; never pickled "
        "weights or code) into the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and print its folder. An "
        "interrupted pull resumes where it stopped when run again. HF_ENDPOINT selects a mirror, HF_TOKEN "
        "a login for gated or private repos, and HF_HUB_OFFLINE=1 answers from the cache only. "
        "KIMI_DESK_HUB_TIMEOUT is how many seconds to wait for the hub to answer (default 10).",
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="owner/name, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct")
    pull.add_argument("--revision", metavar="R", help="a branch, tag or commit (default: main)")
    pull.set_defaults(run=run_pull)
