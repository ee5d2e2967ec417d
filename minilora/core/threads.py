"""How many threads to compute with on a CPU that other processes share.

torch's default is one OpenMP thread per core, each spinning while it waits for the others. When
another process holds one of the cores, every parallel region waits for the thread that got no
core, and the spinning threads take the time the late one needed: training throughput fell 50x
on two cores with one busy. Two settings fix it (docs/benchmarks.md, "A shared CPU"):

- ``OMP_WAIT_POLICY=PASSIVE`` when the CPUs are busy: waiting threads sleep instead of spinning.
  OpenMP reads it once, when torch is first imported, so the command line sets it before that
  (``prepare_env``).
- as many intra-op threads as cores are actually free (``free_cpus``), and one inter-op thread.
"""

from __future__ import annotations

import os
import sys
import time

# A core counts as free when it was idle at least this share of the sample.
_IDLE_SHARE = 0.5


def prepare_env() -> None:
    """Sets OMP_WAIT_POLICY=PASSIVE when other processes keep this process's CPUs busy, unless
    the user set it; call before torch is imported (OpenMP reads it once: later calls do nothing).
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    # Only on a busy machine: on a quiet one spinning threads are faster (40 demo steps, 2 cores,
    # alternated: 17.3 and 18.1 s spinning against 18.8 and 24.9 s sleeping).
    if free_cpus() < usable_cpus():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> dict[str, tuple[int, int]]:
    """cpuN -> (idle + iowait jiffies, total jiffies), from /proc/stat."""
    times = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields[:8]]
                times[name] = (values[3] + values[4], sum(values))
    return times


def free_cpus(sample_s: float = 0.2) -> int:
    """How many of this process's CPUs other processes left idle over a short sample (at least 1).

    Without /proc/stat (not Linux) every usable CPU counts as free.
    """
    usable = usable_cpus()
    try:
        before = _cpu_times()
        time.sleep(sample_s)
        after = _cpu_times()
    except (OSError, ValueError):
        return usable
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        allowed = set(after)
    free = 0
    for name in allowed & set(before) & set(after):
        idle = after[name][0] - before[name][0]
        total = after[name][1] - before[name][1]
        free += total > 0 and idle / total >= _IDLE_SHARE
    return max(1, min(usable, free))


def configure_threads(threads: int | None = None) -> int:
    """Sets torch's intra-op threads to ``threads`` (default: the free CPUs) and its inter-op
    threads to one; returns the intra-op count.

    Args:
        threads: the count to use; None: OMP_NUM_THREADS when set, else the free CPUs.
    """
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # the user's own choice stands
    count = max(1, threads if threads is not None else free_cpus())
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work; then it stays
        pass
    return count
