"""The benchmarks' CPU accounting: per-thread user/kernel time and CPU waits, and how they name a bottleneck."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from proxybench import CpuWatch, Measured, bottleneck, cpu_per_unit, per_unit, task_times  # noqa: E402


def spin(seconds: float) -> None:
    """`seconds` of this thread's own CPU time (user time mostly: a Python loop), however long a busy machine
    makes it wait for a CPU in between (a spin on the wall clock gave too little CPU time under load)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        for _ in range(10_000):
            pass


def test_task_times_add_up_every_thread_of_a_process() -> None:
    """Threads that are still there when sampled (as a proxy's are; an exited thread's times leave the listing)."""
    done = threading.Event()
    spun = [threading.Event() for _ in range(2)]

    def work(mine: threading.Event) -> None:
        spin(0.15)
        mine.set()
        done.wait(60)

    before = task_times(os.getpid())
    threads = [threading.Thread(target=work, args=(mine,)) for mine in spun]
    for thread in threads:
        thread.start()
    try:
        assert all(mine.wait(60) for mine in spun)  # this thread waits: what is counted is the other two's
        after = task_times(os.getpid())
    finally:
        done.set()
        for thread in threads:
            thread.join()
    ticks = os.sysconf("SC_CLK_TCK")
    # each thread ran 0.15 s (the kernel scales a thread's user and system ticks to its run time): 0.3 s in
    # all, less a tick or two of rounding; most of it user time, as a Python loop is
    used = (after[0] - before[0] + after[1] - before[1]) / ticks
    assert 0.25 <= used < 5, (before, after)
    assert (after[0] - before[0]) / ticks >= 0.1, (before, after)
    assert after[1] >= before[1]
    assert len(after[2]) >= 3 and all(ns >= before[2].get(tid, 0) for tid, ns in after[2].items())  # per thread


def test_task_times_of_a_process_that_is_gone_are_zero() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert task_times(pid) == (0, 0, {})


def test_cpu_watch_reports_user_kernel_and_waits_of_a_group() -> None:
    watch = CpuWatch({"proxy": lambda: [os.getpid()]})
    started = time.monotonic()
    watch.begin()
    spin(0.3)
    os.stat("/")  # a syscall or two: kernel time may stay under a tick, but the key is there
    cpu = watch.end(0.0)
    wall = time.monotonic() - started  # a little longer than the watch's own window
    # shares are percent of one core over the window: back to seconds, about the 0.3 s spun however long a
    # busy machine stretched the window
    assert 0.25 <= (cpu["proxy user"] + cpu["proxy sys"]) / 100 * wall <= wall, (cpu, wall)
    assert cpu["proxy user"] / 100 * wall >= 0.1, (cpu, wall)
    assert {"proxy sys", "proxy waited", "proxy busiest"} <= cpu.keys()


def test_a_proxy_waiting_for_a_cpu_on_a_busy_machine_is_named_contention() -> None:
    shares = {"proxy": 52, "proxy busiest": 52, "origin": 47, "origin busiest": 47, "tool": 35, "machine": 78,
              "proxy waited": 21, "origin waited": 9}
    assert bottleneck(shares, "tunnel client", 2).startswith("CPU contention: the proxy waited for a CPU 21%")
    idle = dict(shares, machine=40)
    assert bottleneck(idle, "tunnel client", 2).startswith("none")
    calm = dict(shares, **{"proxy waited": 5})
    assert bottleneck(calm, "tunnel client", 2).startswith("none")
    at_core = dict(shares, **{"proxy busiest": 95})
    assert bottleneck(at_core, "tunnel client", 2).startswith("proxy")


def test_cpu_per_unit_from_shares() -> None:
    user, kernel = per_unit({"proxy user": 20.0, "proxy sys": 80.0}, 10.0, 100_000)
    assert (round(user, 3), round(kernel, 3)) == (20.0, 80.0)  # 2 s and 8 s over 100,000 units
    assert per_unit({"proxy user": 20.0}, 10.0, 0) == (0.0, 0.0)
    samples = [Measured(1.0, {}, {"user_us": u, "sys_us": k}) for u, k in ((10, 100), (12, 90), (30, 95))]
    assert cpu_per_unit(samples, "request") == "12.0 / 95.0 per request"
    assert cpu_per_unit([Measured(1.0, {}, {})], "MB") == "-"


def test_a_target_inside_the_rounds_spread_is_not_met() -> None:
    from proxybench import judged, round_ratios

    per_round = round_ratios([21.0, 30.0, 26.0], [10.0, 10.0, 10.0])
    assert per_round == [2.1, 3.0, 2.6]
    assert judged(2.6, per_round, 2.5)[0] == "NOT MET (spread)"  # the median meets 2.5, one round does not
    assert "2.10-3.00" in judged(2.6, per_round, 2.5)[1]
    assert judged(2.6, per_round, 2.0) == ("MET", "MET (every round: 2.10-3.00)")
    assert judged(1.9, per_round, 2.0)[0] == "NOT MET"
    assert judged(0.9, [0.8, 0.95], 1.0, higher=False)[0] == "MET"  # lower is better: p99, memory
    assert judged(0.9, [0.8, 1.05], 1.0, higher=False)[0] == "NOT MET (spread)"
    assert judged(None, [], 1.0) == ("-", "-")
    assert judged(1.2, [1.2], 1.0) == ("MET", "MET (one round: no spread to judge it by)")
    assert round_ratios([1.0, 2.0], [0.0, 4.0]) == [0.5]  # a reference that measured nothing is left out
