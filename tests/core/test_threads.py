"""minilora.core.threads: free CPUs counted from /proc/stat samples, the OpenMP wait policy, the
thread settings a command starts with."""

from __future__ import annotations

import os

import pytest
import torch

from minilora.core import threads


@pytest.mark.parametrize("samples, affinity, expected", [
    # (idle, total) jiffies before and after, per CPU
    ({"cpu0": ((0, 0), (90, 100)), "cpu1": ((0, 0), (10, 100))}, {0, 1}, 1),
    ({"cpu0": ((0, 0), (90, 100)), "cpu1": ((0, 0), (60, 100))}, {0, 1}, 2),
    ({"cpu0": ((0, 0), (0, 100)), "cpu1": ((0, 0), (5, 100))}, {0, 1}, 1),  # never below 1
    ({"cpu0": ((0, 0), (90, 100)), "cpu1": ((0, 0), (90, 100))}, {1}, 1),  # outside affinity
])
def test_free_cpus_counts_the_cores_others_left_idle(monkeypatch, samples, affinity, expected):
    calls = iter([{k: v[0] for k, v in samples.items()}, {k: v[1] for k, v in samples.items()}])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(calls))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    assert threads.free_cpus(sample_s=0) == expected


def test_cpu_times_reads_every_cpu_of_proc_stat():
    times = threads._cpu_times()
    assert len(times) == (os.cpu_count() or 1)
    assert all(0 <= idle <= total for idle, total in times.values())


def test_prepare_env_sets_passive_on_a_busy_machine_unless_the_user_chose(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "torch")  # as on the command line: before torch loads
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "free_cpus", lambda: 2)  # quiet: spinning is faster
    threads.prepare_env()
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(threads, "free_cpus", lambda: 1)  # one core taken: sleep, do not spin
    threads.prepare_env()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_env()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_configure_threads_uses_free_cpus_or_the_users_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "free_cpus", lambda: 1)
        assert threads.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.configure_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
