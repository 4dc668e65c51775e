"""What the proxy benchmarks (http_proxy.py, dns_proxy.py) share: the processes they run in the lab,
CPU accounting, the nginx origin, the proxy wrapper, wrk summaries, the sample store, and the frame
of a run around the measurements (machine facts, scratch directory, lab preparation, alternating
rounds, notes on disturbed runs, idle-connection memory).

Not part of the package. Everything here runs inside the namespace lab (egress_router.lab.Lab,
documentation addresses only) and touches no interface of the machine; the only processes it ends
are ones it started, by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH,
    PYTHON,
    WORK,
    BenchError,
    Deadline,
    ab_compare,
    busy_warning,
    command_output,
    cpu_busy,
    load_average,
    machine_info,
    machine_lines,
    round_order,
)

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, Lab

HTTP_PROXY_DIR = BENCH / "http_proxy"  # files both proxy benchmarks use: nginx.conf.in, proxy.lua, idle_conns.py
ORIGIN_IP = DEST_IPS[0]
SMALL = "/1k"
BIG = "/big"
CLK = os.sysconf("SC_CLK_TCK")
MAIN_PID = os.getpid()
CONTENDED = 15.0  # % of the wall time a process waited for a CPU that makes "CPU contention" the bottleneck
BUSY = 0.25  # a run that starts with the machine busier than this (share of all CPUs) is noted


# ---------------------------------------------------------------- processes

def ns_argv(lab: Lab, role: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net={lab.path(role)}", "--", *argv]


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            rest = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(rest[1]), int(rest[11]) + int(rest[12])


def descendants(root: int) -> list[int]:
    """`root` and every process below it (read from /proc at call time)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat:
                children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError), \
            open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def thread_count(pids: Sequence[int]) -> int:
    """Threads of the processes `pids` (from /proc/<pid>/task)."""
    count = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            count += len(os.listdir(f"/proc/{pid}/task"))
    return count


def socket_fds(pids: Sequence[int]) -> int:
    count = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    return text[:60]


class Managed:
    """A long-running program we started in a lab namespace, in a session of its own, output to a file."""

    def __init__(self, lab: Lab, role: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        self.log = log
        self.argv = list(argv)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(ns_argv(lab, role, argv), env=dict(env) if env is not None else None,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.pid = self.process.pid  # nsenter execs the program: this is its pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.alive() else []

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the program (by pid), then SIGKILL whatever of its tree is left, through pidfds."""
        if not self.alive():
            return
        tree: list[int] = []
        fds: list[int] = []
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                fds.append(os.pidfd_open(pid))
                tree.append(pid)
        try:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            deadline = time.monotonic() + 5
            for fd in fds:  # children (workers, helpers) get a moment to follow their parent
                if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    select.select([fd], [], [], 5)
        finally:
            for fd in fds:
                os.close(fd)


def raise_fd_limit() -> int:
    """The proxies and the idle-connection client inherit this (raising the hard limit needs CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]




# ---------------------------------------------------------------- CPU accounting

def task_times(pid: int) -> tuple[int, int, dict[int, int]]:
    """(user ticks, system ticks) over every thread of `pid`, and each thread's ns spent runnable but waiting
    for a CPU, from /proc/PID/task/*/stat and schedstat; zeros for what is gone. Threads that exited are not
    in the listing any more (their times are not counted): for long-lived servers, whose threads stay."""
    user = system = 0
    waits: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as handle:
                    rest = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as handle:
                    sched = handle.read().split()
                user += int(rest[11])
                system += int(rest[12])
                waits[int(tid)] = int(sched[1])
    return user, system, waits


def machine_ticks() -> dict[str, int]:
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(v) for v in handle.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return {"busy": user + nice + system + irq + softirq + steal, "total": sum(values), "softirq": softirq + irq}


class CpuWatch:
    """CPU ticks of named groups of long-lived processes (their trees) and of the machine, over a window.

    Short-lived tools (wrk, the clients) are accounted separately from their rusage."""

    def __init__(self, groups: Mapping[str, Callable[[], list[int]]]):
        self.groups = groups
        self.start_ticks: dict[str, dict[int, int]] = {}
        self.start_times: dict[str, dict[int, tuple[int, int, dict[int, int]]]] = {}
        self.start_machine: dict[str, int] = {}
        self.started = 0.0

    def _times(self) -> dict[str, dict[int, tuple[int, int, dict[int, int]]]]:
        return {name: {pid: task_times(pid) for pid in pids()} for name, pids in self.groups.items()}

    def _sample(self) -> dict[str, dict[int, int]]:
        sample: dict[str, dict[int, int]] = {}
        for name, pids in self.groups.items():
            sample[name] = {}
            for pid in pids():
                stat = proc_stat(pid)
                if stat:
                    sample[name][pid] = stat[1]
        return sample

    def begin(self) -> None:
        self.start_ticks = self._sample()
        self.start_times = self._times()
        self.start_machine = machine_ticks()
        self.started = time.monotonic()

    def end(self, tool_seconds: float) -> dict[str, float]:
        """Percent of one core per group (and its busiest process; NAME user and NAME sys: its user and kernel
        time; NAME waited: the time its thread that waited longest was runnable without a CPU), the load
        tool, kernel softirq, everything else on the machine ('others'), and the machine's busy share of all
        its CPUs."""
        after = self._sample()
        times = self._times()
        machine = machine_ticks()
        wall = max(1e-6, time.monotonic() - self.started)
        out: dict[str, float] = {}
        ours_ticks = 0
        for name, now in after.items():
            before = self.start_ticks.get(name, {})
            deltas = [ticks - before.get(pid, 0) for pid, ticks in now.items()]
            ours_ticks += sum(deltas)
            out[name] = 100 * sum(deltas) / CLK / wall
            out[f"{name} busiest"] = 100 * max(deltas, default=0) / CLK / wall
            was = self.start_times.get(name, {})
            user = system = longest = 0
            for pid, (pid_user, pid_system, waits) in times.get(name, {}).items():
                old_user, old_system, old_waits = was.get(pid, (0, 0, {}))
                user += pid_user - old_user
                system += pid_system - old_system
                longest = max([longest, *(ns - old_waits.get(tid, 0) for tid, ns in waits.items())])
            out[f"{name} user"] = 100 * user / CLK / wall
            out[f"{name} sys"] = 100 * system / CLK / wall
            out[f"{name} waited"] = 100 * longest / 1e9 / wall  # its thread that waited longest
        out["tool"] = 100 * tool_seconds / wall
        busy = machine["busy"] - self.start_machine["busy"]
        soft = machine["softirq"] - self.start_machine["softirq"]
        total = machine["total"] - self.start_machine["total"]
        out["softirq"] = 100 * soft / CLK / wall
        out["others"] = max(0.0, 100 * (busy - soft - ours_ticks) / CLK / wall - out["tool"])
        out["machine"] = 100 * busy / max(1, total)
        out["wall"] = wall
        return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bottleneck(cpu: Mapping[str, float], tool: str, ncpu: int) -> str:
    """Which part ran out of CPU, judged from the shares (100 = one core)."""
    if cpu.get("tool", 0) >= 90:
        return f"{tool} (one core)"
    if cpu.get("origin busiest", 0) >= 90:
        return "origin (nginx worker at one core)"
    if cpu.get("proxy busiest", 0) >= 85:
        return "proxy (a process at ~one core)"
    if cpu.get("machine", 0) >= 90:
        parts = {"proxy": cpu.get("proxy", 0), tool: cpu.get("tool", 0), "origin": cpu.get("origin", 0),
                 "kernel softirq": cpu.get("softirq", 0), "others": cpu.get("others", 0)}
        top = max(parts, key=lambda k: parts[k])
        return f"CPU: all {ncpu} cores busy (largest: {top})"
    waited = {"proxy": cpu.get("proxy waited", 0), "origin": cpu.get("origin waited", 0)}
    who = max(waited, key=lambda k: waited[k])
    if waited[who] >= CONTENDED and cpu.get("machine", 0) >= 60:
        return (f"CPU contention: the {who} waited for a CPU {waited[who]:.0f}% of the time "
                f"(machine {cpu.get('machine', 0):.0f}% busy)")
    return "none (no process at one core, CPUs not all busy)"


def per_unit(cpu: Mapping[str, float], seconds: float, count: float) -> tuple[float, float]:
    """The proxy's user and kernel CPU per unit (µs), from its shares over `seconds` and `count` units."""
    if count <= 0:
        return 0.0, 0.0
    return (cpu.get("proxy user", 0) / 100 * seconds * 1e6 / count,
            cpu.get("proxy sys", 0) / 100 * seconds * 1e6 / count)




# ---------------------------------------------------------------- the origin (nginx in the dest namespace)

class Origin:
    """nginx serving SMALL (1 KiB), BIG (`big_bytes`) and any `more` objects (path: size in bytes)."""

    def __init__(self, lab: Lab, tmp: Path, workers: int, big_bytes: int, more: Mapping[str, int] | None = None):
        self.dir = tmp / "origin"
        (self.dir / "www").mkdir(parents=True)
        self.small = bytes((i * 7 + 13) % 256 for i in range(1024))
        (self.dir / "www" / SMALL.lstrip("/")).write_bytes(self.small)
        chunk = bytes(range(256)) * 32768  # 8 MiB
        self.sizes = {BIG: big_bytes, **(more or {})}
        for path, size in self.sizes.items():
            with open(self.dir / "www" / path.lstrip("/"), "wb") as handle:
                left = size
                while left > 0:
                    handle.write(chunk[:left])
                    left -= len(chunk)
        self.big_bytes = big_bytes
        conf = string.Template((HTTP_PROXY_DIR / "nginx.conf.in").read_text()).substitute(
            dir=self.dir, workers=workers, listen=f"{ORIGIN_IP}:80")
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = Managed(lab, "dest", ["nginx", "-e", str(self.dir / "nginx-error.log"),
                                          "-c", str(self.dir / "nginx.conf")], self.dir / "nginx.out")

    def workers(self) -> list[int]:
        return [pid for pid in self.proc.pids() if pid != self.proc.pid] or self.proc.pids()

    def stop(self) -> None:
        self.proc.stop()




# ---------------------------------------------------------------- the proxies under test

class Proxy:
    name = "?"

    def __init__(self, lab: Lab, tmp: Path):
        self.lab = lab
        self.tmp = tmp
        self.proc: Managed | None = None
        self.lives = 0

    def start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def rss_kib(self) -> tuple[int, int, list[tuple[str, int]]]:
        """(sum of RSS, sum of PSS, per process) over the proxy's processes."""
        pids = self.pids()
        per = [(process_name(pid), status_kib(pid, "VmRSS")) for pid in pids]
        return sum(v for _, v in per), sum(pss_kib(pid) for pid in pids), per

    def fd_limit(self) -> str:
        if not self.proc:
            return "-"
        with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/limits") as handle:
            for line in handle:
                if line.startswith("Max open files"):
                    return line.split()[3]
        return "?"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None

    def describe_failure(self) -> str:
        return self.proc.tail() if self.proc else ""


def client_get(lab: Lab, port: int, target: str, host: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET from the client namespace to the router pod's `port` (Connection: close): status and body.
    `target` is the request target as sent: a path (origin form) or a URL (absolute form, for a proxy)."""
    with lab.entered("client"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((ROUTER_POD_IP, port))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match:
        body = body[: int(match.group(1))]
    return status, body


def wait_until_serving(proxy: Proxy, probe: Callable[[], str | None], timeout: float = 30.0) -> float:
    """Seconds until `probe` (None: served right; else what was wrong) succeeds through a started proxy."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if proxy.proc is None or not proxy.proc.alive():
            raise BenchError(f"{proxy.name} exited during start-up:\n{proxy.describe_failure()}")
        try:
            wrong = probe()
            if wrong is None:
                return time.monotonic() - start
            last = wrong
        except (OSError, ValueError, IndexError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{proxy.name} not ready within {timeout:g} s ({last}):\n{proxy.describe_failure()}")




# ---------------------------------------------------------------- the measurements

@dataclass
class Measured:
    value: float
    cpu: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_per_unit(samples: Sequence[Measured], unit: str) -> str:
    """The proxy's user and kernel CPU per request, connection or MB: medians over the samples."""
    if not samples or "user_us" not in samples[0].extra:
        return "-"
    user = statistics.median(float(m.extra["user_us"]) for m in samples)
    kernel = statistics.median(float(m.extra["sys_us"]) for m in samples)
    return f"{user:.1f} / {kernel:.1f} per {unit}"


def wrk_measured(out: str, cpu: dict[str, float]) -> Measured:
    """requests/s from the WRKJSON line the Lua scripts print, with the whole summary (errors added up)."""
    line = next((line for line in out.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no summary:\n{out[-1500:]}")
    summary = json.loads(line.split(" ", 1)[1])
    summary["rate"] = summary["requests"] / (summary["duration_us"] / 1e6)
    summary["errors"] = sum(summary[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                                 "timeouts"))
    summary["user_us"], summary["sys_us"] = per_unit(cpu, cpu.get("wall", 0.0), summary["requests"])
    return Measured(summary["rate"], cpu, summary)


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Measured]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    start_ups: dict[str, list[float]] = field(default_factory=dict)
    fd_limits: dict[str, str] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    probe: dict[str, list[tuple[str, float, int]]] = field(default_factory=dict)

    def add(self, side: str, test: str, measured: Measured) -> None:
        self.samples.setdefault((side, test), []).append(measured)

    def values(self, side: str, test: str, key: str | None = None) -> list[float]:
        return [m.value if key is None else float(m.extra[key]) for m in self.samples.get((side, test), [])]

    def median(self, side: str, test: str, key: str | None = None) -> float | None:
        values = self.values(side, test, key)
        return statistics.median(values) if values else None

    def ab_rows(self, tests: Sequence[tuple[str, str, str | None, float, int, bool]]) -> list[list[str]]:
        """The A/B table's rows, ours against the baseline over the rounds, for (label, test, key, scale, digits,
        higher is better) of each measurement both sides have."""
        rows = []
        for label, test, key, scale, digits, higher in tests:
            ours, base = self.values("ours", test, key), self.values("baseline", test, key)
            if ours and base:
                rows.append(ab_compare(label, [v * scale for v in ours], [v * scale for v in base],
                                       functools.partial(_number, digits=digits), higher_better=higher))
        return rows


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def run_tool(lab: Lab, role: str, argv: Sequence[str], env: Mapping[str, str] | None, timeout: float,
             watch: CpuWatch) -> tuple[str, dict[str, float]]:
    """Run a load tool (wrk, iperf3, a client script) to its end in a lab namespace: its output, and the
    CPU shares of the watched groups, the tool and the rest of the machine over the run."""
    before = children_cpu()
    watch.begin()
    try:
        done = subprocess.run(ns_argv(lab, role, argv), env=dict(env) if env is not None else None,
                              capture_output=True, text=True, timeout=timeout, check=False, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout:g} s") from exc
    cpu = watch.end(children_cpu() - before)
    if done.returncode not in (0, 1) and "WRKJSON" not in done.stdout:  # wrk, iperf3: 1 comes with a report
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout + done.stderr, cpu


class QuietStarts:
    """Other work on the machine distorts the figures: before each run, wait (bounded) for it to calm down,
    and remember how busy the machine still was when the run started."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.busy: list[float] = []

    def wait(self) -> None:
        deadline = time.monotonic() + self.seconds
        busy = cpu_busy(0.5)
        while busy > BUSY and time.monotonic() < deadline:
            busy = cpu_busy(0.5)
        self.busy.append(busy)

    def note(self) -> str | None:
        noisy = [b for b in self.busy if b > BUSY]
        if not noisy:
            return None
        return (f"{len(noisy)} of {len(self.busy)} runs started while the machine was over {100 * BUSY:.0f}% busy "
                f"with other work (up to {100 * max(noisy):.0f}%) after waiting {self.seconds:g} s")


def idle_memory(lab: Lab, proxy: Proxy, port: int, count: int, *, sockets_each: int, hold: float,
                connect_timeout: float = 60.0) -> dict[str, Any]:
    """RSS and PSS of the proxy's processes before and with `count` idle client connections open.

    The client (idle_conns.py, in the client namespace) connects and sends nothing; the sample is taken
    once the proxy holds `sockets_each` new sockets per connection (bounded wait) and has settled. The
    client then checks how many are still open and closes them all; it also exits by itself after `hold`.
    """
    time.sleep(1.0)
    base_rss, base_pss, _ = proxy.rss_kib()
    base_sockets = socket_fds(proxy.pids())
    argv = [PYTHON, str(HTTP_PROXY_DIR / "idle_conns.py"), "--host", ROUTER_POD_IP, "--port", str(port),
            "--count", str(count), "--hold", f"{hold:g}", "--connect-timeout", f"{connect_timeout:g}"]
    client = subprocess.Popen(ns_argv(lab, "client", argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline() if select.select([client.stdout], [], [], connect_timeout + 30)[0] else ""
        found = re.match(r"connected (\d+) failed (\d+)", line)
        if not found:
            client.kill()
            client.wait(10)
            why = client.stderr.read()[-800:] if client.stderr else ""
            raise BenchError(f"idle connection client said {line!r}: {why}")
        connected, failed = int(found.group(1)), int(found.group(2))
        deadline = time.monotonic() + 60
        held = socket_fds(proxy.pids()) - base_sockets
        while held < sockets_each * connected and time.monotonic() < deadline:
            time.sleep(0.5)
            held = socket_fds(proxy.pids()) - base_sockets
        time.sleep(2.0)
        rss, pss, per = proxy.rss_kib()
        client.stdin.write("check\n")
        client.stdin.flush()
        alive_line = client.stdout.readline() if select.select([client.stdout], [], [], 30)[0] else ""
        alive = int(alive_line.split()[1]) if alive_line.startswith("alive ") else -1
        client.stdin.write("close\n")
        client.stdin.flush()
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    return {"base_rss": base_rss, "base_pss": base_pss, "rss": rss, "pss": pss, "connected": connected,
            "failed": failed, "sockets": held, "alive": alive, "per": per}


# ---------------------------------------------------------------- the frame of a run

def common_arguments(parser: argparse.ArgumentParser, *, sides: Sequence[str], rounds: int, duration: float,
                     warmup: float, quiet_wait: float, max_seconds: float, quick: str) -> None:
    """The options both proxy benchmarks take, with each one's defaults."""
    parser.add_argument("--rounds", type=int, default=rounds, help=f"measured rounds, alternating order "
                        f"(default {rounds})")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--duration", type=float, default=duration, help=f"seconds per wrk run (default {duration:g})")
    parser.add_argument("--warmup", type=float, default=warmup,
                        help=f"keep-alive warm-up per proxy life, s (default {warmup:g})")
    parser.add_argument("--only", choices=sides, help="run one side only")
    parser.add_argument("--rate", type=float, default=2000, help="offered rate of the latency run (default 2000/s)")
    parser.add_argument("--quiet-wait", type=float, default=quiet_wait,
                        help=f"before each run wait up to this long for the machine to be under {100 * BUSY:.0f}%% "
                        f"busy (default {quiet_wait:g})")
    parser.add_argument("--max-seconds", type=float, default=max_seconds,
                        help=f"start no new round after this (default {max_seconds:g})")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")


def tool_versions(*tools: str) -> dict[str, str]:
    """`tool -v` for each tool, and whether the venv has uvloop (the proxies use it when it is there)."""
    import importlib.util

    versions = {tool: command_output([tool, "-v"]) for tool in tools}
    versions["uvloop in the venv"] = "yes" if importlib.util.find_spec("uvloop") else "no"
    return versions


def ratio_digits(ratio: float | None, target: float | None) -> int:
    """Two decimals, or three where two would round onto the target (1.995 is not 2.00 when the target is 2)."""
    return 3 if ratio is not None and target is not None and abs(ratio - target) < 0.005 else 2


def round_ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Ours over the reference, sample by sample in the order they were taken (the same round, or the same
    proxy life, for both): how the ratio moved over the run."""
    return [a / b for a, b in zip(ours, reference, strict=False) if b]


def judged(ratio: float | None, per_round: Sequence[float], bound: float, higher: bool = True) -> tuple[str, str]:
    """The verdict on a target (the table's cell, the verdict line's end): MET only when the median ratio meets
    `bound` and so does every round's; a median that meets it while some round does not has the target inside
    the run-to-run spread, which does not count as met."""
    if ratio is None:
        return "-", "-"

    def meets(value: float) -> bool:
        return value >= bound if higher else value <= bound

    if not meets(ratio):
        return "NOT MET", "NOT MET"
    if per_round and not all(meets(value) for value in per_round):
        low, high = min(per_round), max(per_round)
        return "NOT MET (spread)", (f"NOT MET: the median meets it, but the rounds' ratios ran {low:.2f}-{high:.2f}, "
                                    "the target inside that spread")
    if len(per_round) < 2:
        return "MET", "MET (one round: no spread to judge it by)"
    return "MET", f"MET (every round: {min(per_round):.2f}-{max(per_round):.2f})"


def describe_machine(fd_limit: int, tools: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The machine facts every results section starts with, printed (with a warning if it is busy)."""
    info = machine_info()
    info.update(tools)
    info["open files limit (soft, for the proxies)"] = str(fd_limit)
    info.update(extra or {})
    warning = busy_warning(info)
    print("\n".join(machine_lines(info)))
    if warning:
        print(warning)
    return info


def end_facts(info: dict[str, str], began: float) -> None:
    info["load average at end"] = load_average()
    info["wall time of the benchmark"] = f"{time.monotonic() - began:.0f} s"
    print(f"wall time {info['wall time of the benchmark']}; load average at end {info['load average at end']}")


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A scratch directory under benchmarks/.work, removed at the end; SIGTERM ends the run like Ctrl-C,
    so the caller's clean-up (processes stopped by pid, lab torn down) runs."""

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() == MAIN_PID:  # a forked helper (pyroute2) must not run our clean-up
            raise KeyboardInterrupt
        os._exit(1)

    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK))
    os.chmod(tmp, 0o755)  # squid and nginx workers read from it under their own users
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_lab(lab: Lab, mode: str) -> None:
    """Init mode once, as the legacy init container did (the router gets 192.0.2.99 on macvlan0 and its
    default route, so it reaches the dest namespace), then the lab-only sysctls both sides share."""
    env = lab.router_env(mode=mode)
    env.pop("EGRESS_DESTINATION", None)
    init = lab.run_router(env)
    if init.returncode != 0:
        raise BenchError(f"init ({mode} mode) failed: {init.stderr.strip()[-800:]}")
    # Lab namespaces only. wrk closes most Connection: close connections itself, so its side keeps
    # them in TIME_WAIT for 60 s: without reuse, the client namespace runs out of ports after some
    # 14,000-30,000 requests and every proxy then crawls at ~100 req/s (SYN retries), which would
    # measure the load generator. Reuse needs the TIME_WAIT to be over 1 s old (timestamps).
    for role in ("client", "router"):
        lab.sysctl(role, "net.ipv4.ip_local_port_range", "1024 65000")
    lab.sysctl("client", "net.ipv4.tcp_tw_reuse", "1")


def wait_for_backends(lab: Lab, host: str, ports: Sequence[int], processes: Sequence[Managed],
                      timeout: float = 15.0) -> None:
    """Until each port of `host` accepts a connection from the router namespace (bounded)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                with lab.entered("router"), socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or not all(p.alive() for p in processes):
                    tails = "\n".join(p.tail() for p in processes)
                    raise BenchError(f"{host}:{port} did not come up:\n{tails}") from None
                time.sleep(0.1)


def alternate_rounds(rounds: int, sides: Sequence[str], deadline: Deadline, notes: list[str],
                     life: Callable[[int, str], str]) -> None:
    """`rounds` rounds of one proxy life per side, the order reversed every other round; the time bound
    ends them early (noted). `life(index, side)` measures and returns the round's one-line summary."""
    width = max(len(side) for side in sides)
    for index in range(rounds):
        if deadline.passed():
            notes.append(f"time bound reached after {index} round(s)")
            print(notes[-1])
            break
        for side in round_order(index, sides):
            print(f"  round {index + 1} {side:>{width}}: {life(index, side)}", flush=True)


def wrk_error_notes(results: Results, sides: Sequence[str], tests: Sequence[str]) -> list[str]:
    return [f"{side} {test}: {m.extra['errors']} wrk errors in one run ({m.extra['requests']} requests)"
            for side in sides for test in tests for m in results.samples.get((side, test), [])
            if m.extra.get("errors")]


def per_process_lines(results: Results, sides: Sequence[str], label: Callable[[str], str]) -> list[str]:
    """Per side, the RSS of each of its processes in the last idle-connection sample."""
    lines = []
    for side in sides:
        mem = results.samples.get((side, "memory"))
        if mem:
            lines.append(f"{label(side)}: " + ", ".join(f"{name.split()[0].rsplit('/', 1)[-1]} {kib / 1024:.1f} MiB"
                                                        for name, kib in mem[-1].extra["per"]))
    return lines
