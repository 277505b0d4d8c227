"""How many threads PyTorch computes with on the CPU: the cores that nobody else is using right now.

PyTorch starts one thread per core, and every parallel operation ends at a barrier that waits for all
of them. On a desktop the cores are shared with the user's other programs: when another program holds
one of the cores, each barrier waits for the scheduler to give that core back, and a step of a few
hundred small operations (one decoded token) waits that long hundreds of times. On a 2-core machine
with other work running, reading and decoding the demo model on both cores ran 4-15 times slower than
on one. So before loading a model, the engine counts the other tasks that want a core
at that moment and leaves those cores to them (at least one thread, at most one per core). The count
is chosen once, when the model is loaded: a process computes with one count throughout, so that its
results do not change with its neighbours' load (sums split over another number of threads round
differently, and a resumed reading must give the state a fresh one gives).

KIMI_DESK_THREADS (or OMP_NUM_THREADS) set in the environment fixes the count instead.

Between parallel regions the threads wait for the next one. Sleeping is the safe choice on a shared
machine (a spinning thread holds a core another program wants, and on a busy 2-core machine reading
ran 5-10 times slower with PyTorch's default long spin); but waking a sleeping thread costs tens of
microseconds, and a decoded token is a few hundred short regions: on idle cores, sleeping threads
halved the demo model's decode on 2 cores and cost 15-25% on 16. So the threads sleep
(OMP_WAIT_POLICY=PASSIVE), after spinning briefly (GOMP_SPINCOUNT=IDLE_SPIN_TURNS, a fraction of a
millisecond) when no other task wants a core as kimi-desk starts (`choose_wait`, from the package's
import: OpenMP reads both once, when PyTorch loads). The thread count is then every core, so no
spinning thread shares one; a program that starts later and takes a core slows decode until the next
start. Either variable set in the environment decides instead.
"""

from __future__ import annotations

import os
import time

from kimi_desk import environment

SAMPLES = 5
SAMPLE_INTERVAL_S = 0.01
# Turns a waiting thread spins before it sleeps, on idle cores: about 0.1-0.3 ms (BENCHMARKS.md, "Threads
# that wait").
IDLE_SPIN_TURNS = 30000


def threads_for(cores: int, busy_elsewhere: float) -> int:
    """The thread count for `cores` usable cores while `busy_elsewhere` other tasks want one."""
    return max(1, min(cores, cores - round(busy_elsewhere)))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_elsewhere(samples: int = SAMPLES) -> float | None:
    """The other runnable tasks, averaged over a few samples 10 ms apart: /proc/loadavg's fourth field
    counts the tasks running or ready to run now, the one reading it included (the engine's own threads
    are idle between steps). None where the kernel does not say (not Linux)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(SAMPLE_INTERVAL_S)
    return sum(counts) / len(counts)


def fixed_threads() -> int | None:
    """The count the environment fixes, if any."""
    return environment.thread_count()


def use_idle_cores() -> int:
    """Set PyTorch's thread count to the idle cores (or the environment's count); returns it."""
    import torch

    threads = fixed_threads()
    if threads is None:
        others = busy_elsewhere()
        threads = usable_cores() if others is None else threads_for(usable_cores(), others)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def choose_wait(environ=os.environ) -> None:
    """How OpenMP's threads wait, set in `environ` before PyTorch loads (the module docstring): asleep,
    after a brief spin when no other task wants a core now. Either variable already set is kept."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    others = busy_elsewhere(samples=1)
    if others is not None and others < 0.5:
        environ["GOMP_SPINCOUNT"] = str(IDLE_SPIN_TURNS)
