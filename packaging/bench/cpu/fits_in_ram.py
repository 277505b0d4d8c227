"""Does the model run on a machine with less memory than this one? A ballast process holds all but
--available of the memory (every page written, so it stays resident), then kimi-desk starts on the CPU
as slice_48b.py's worker does (load, 512 tokens read, decode after each depth) twice: the first start
quantizes the checkpoint and writes the cache beside it, the second reads the cache. Each start's peak
resident memory, load time and speeds are reported, and whether the ballast survived (the kernel's
out-of-memory killer is pointed at kimi-desk first, so a start that does not fit fails instead of
freeing the ballast).

    python packaging/bench/cpu/fits_in_ram.py CHECKPOINT --available 28GiB [--depths 0,8192] [--json OUT]

Made for the whole 48B model in int4 (issue 16: it must run with 32 GB of RAM), from
`random_48b.py --layers 27 --empty-experts` (its routed experts are zeros: a memory test, not a
quality one). The machine must have no swap, else the ballast would be swapped out instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SLICE = Path(__file__).with_name("slice_48b.py")
GiB = 1 << 30


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values


def size_bytes(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)\s*(GiB|GB|MiB|MB)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 28GiB")
    unit = {"GiB": GiB, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6}[match.group(2)]
    return int(float(match.group(1)) * unit)


def start_ballast(nbytes: int) -> subprocess.Popen:
    """A process holding `nbytes` of written memory until its stdin closes."""
    code = (
        "import sys, torch\n"
        f"held = torch.ones({nbytes}, dtype=torch.uint8)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    ballast = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if ballast.stdout.readline().strip() != "held":
        raise SystemExit("fits_in_ram.py: the ballast could not take its memory")
    return ballast


def _sample_peaks(pid: int, peaks: dict[str, int]) -> None:
    """The largest anonymous and file-backed resident memory of `pid` seen, every 0.1 s until it ends:
    file-backed pages (the checkpoint and cache read through mmap) count in the peak resident size but
    the kernel can drop them under pressure; anonymous ones are what a start really holds."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        for key in peaks:
            match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
            if match:
                peaks[key] = max(peaks[key], int(match.group(1)) * 1024)
        time.sleep(0.1)


def start_kimi_desk(checkpoint: Path, depths: str) -> dict:
    """One start of the worker: its result or error, and its peak resident memory."""

    def first_to_be_killed():
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:  # the ballast may then be chosen instead, which the report shows
            pass

    command = [sys.executable, str(SLICE), str(checkpoint), "--ours-only", "--depths", depths]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=first_to_be_killed)
        peaks = {"RssAnon": 0, "RssFile": 0}
        threading.Thread(target=_sample_peaks, args=(proc.pid, peaks), daemon=True).start()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        error = err.read().strip().splitlines()
    row = dict(
        exit=proc.returncode,
        seconds=time.perf_counter() - started,
        peak_rss_gib=usage.ru_maxrss * 1024 / GiB,
        peak_anonymous_gib=peaks["RssAnon"] / GiB,
        peak_file_backed_gib=peaks["RssFile"] / GiB,
        notices=[line for line in out.splitlines()[:-1] if line.strip()],
    )
    if proc.returncode == 0:
        row["result"] = json.loads(out.strip().splitlines()[-1])
    else:
        row["error"] = error[-1] if error else f"killed (signal {-proc.returncode})"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--available", type=size_bytes, required=True, help="memory left to kimi-desk, e.g. 28GiB")
    ap.add_argument("--depths", default="0,8192")
    ap.add_argument("--starts", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    before = meminfo()
    if before.get("SwapTotal", 0):
        raise SystemExit("fits_in_ram.py: this machine has swap; the ballast would be swapped out")
    ballast_bytes = before["MemAvailable"] - args.available
    if ballast_bytes <= 0:
        raise SystemExit(f"fits_in_ram.py: only {before['MemAvailable'] / GiB:.1f} GiB available already")
    ballast = start_ballast(ballast_bytes)
    report = dict(
        machine_total_gib=before["MemTotal"] / GiB,
        ballast_gib=ballast_bytes / GiB,
        available_gib=meminfo()["MemAvailable"] / GiB,
        starts=[],
    )
    print(f"ballast {report['ballast_gib']:.1f} GiB; available now {report['available_gib']:.1f} GiB", flush=True)
    try:
        for _ in range(args.starts):
            row = start_kimi_desk(args.checkpoint, args.depths)
            report["starts"].append(row)
            print(json.dumps(row), flush=True)
            if row["exit"]:
                break
    finally:
        report["ballast_survived"] = ballast.poll() is None
        ballast.stdin.close()
        ballast.wait()
    cache = (args.checkpoint / ".kimi-desk-cache").glob("*.safetensors")  # engine/quantized_cache.py's place
    report["cache_gib"] = sum(p.stat().st_size for p in cache) / GiB
    print(json.dumps({k: v for k, v in report.items() if k != "starts"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ballast_survived"] and all(r["exit"] == 0 for r in report["starts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
