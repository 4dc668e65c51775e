#!/usr/bin/env python3
"""Where the proxies' time goes: CPU per request, per connection and per byte, split into kernel and
Python, the syscalls behind it, and the Python functions that take it (issue 16's first step).

Run as root from the repository:  .venv/bin/python benchmarks/profile_proxies.py [--paths ...] [--refs]

Everything runs inside the namespace lab (egress_router.lab.Lab, documentation addresses only), with
the same origin, proxies and settings as http_proxy.py and dns_proxy.py (one process of ours; with
--refs squid, and haproxy with nbthread 1, get the first two passes too). Each path gets a fresh proxy
life, 2 s of keep-alive warm-up, then passes of one fixed load each (wrk -t1 -c64 for --duration s,
or CONNECT / iperf3 transfers for about as long), watching the proxy's serving process (the one that
took the most CPU in the warm-up):

  cpu       utime and stime of that process over the run (/proc/<pid>/stat): us of CPU per request
            (per connection for close, per MB for the transfers), user (Python, uvloop, libc) and
            system (syscalls and the network stack work done in its context); machine softirq beside it;
            and the router namespace's TCP segments per unit (/proc/<pid>/net/snmp, netstat): out, of those
            how many carried data, retransmitted, in (both legs: the client's and the upstream's)
  syscalls  perf stat on syscall tracepoints of that process (exact counts, little overhead): per unit
  kernel    (--kernel) perf record -F 999 of that process: the share of samples per symbol, kernel and
            user, self time (where the system time of the cpu pass goes)
  py-spy    py-spy record --function --nonblocking (Python frames; with --native also C frames):
            the share of busy samples per function, self and inclusive, top --top

Paths: http-keepalive, http-close (a new client connection per request), http-connect (CONNECT, GET
of the large object in the tunnel, spliced to /dev/null by the client), http-get-big (a plain GET of
the large object through the proxy, curl writing it to /dev/null), dns-keepalive, dns-close (a
new proxied TCP connection per request), dns-paced (keep-alive paced to 2,000 requests/s, the
latency run's load: the cost of a request when the proxy sleeps between them), dns-bulk (iperf3, 1
stream). Raw outputs (perf, py-spy stacks, a JSON of every figure) go to --out (default
benchmarks/.work/profile-<time>/, kept).
Nothing in egress_router is changed; every process started is ended by pid; the lab always goes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns_proxy
import http_proxy
from benchlib import PYTHON, WORK, BenchError, cpu_busy, load_average, require_root, run_benchmark
from proxybench import (
    BIG,
    CLK,
    HTTP_PROXY_DIR,
    ORIGIN_IP,
    SMALL,
    Managed,
    Origin,
    Proxy,
    ns_argv,
    prepare_lab,
    raise_fd_limit,
    scratch,
    wait_for_backends,
)

from egress_router.lab import ROUTER_POD_IP, Lab

PATHS = ("http-keepalive", "http-close", "http-connect", "http-get-big", "dns-keepalive", "dns-close", "dns-paced",
         "dns-bulk")
PACED = 2000.0  # requests/s of dns-paced: the rate of the benchmarks' latency run
SYSCALLS = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "accept4", "connect", "socket", "setsockopt", "getsockopt", "getsockname",
            "getpeername", "close", "shutdown", "splice", "fcntl", "ioctl", "futex", "mmap", "munmap", "brk",
            "madvise", "getpid", "clock_gettime", "rt_sigprocmask", "eventfd2", "io_uring_enter", "getrandom")
PY_SPY = Path(sys.executable).with_name("py-spy")


def stat_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) ticks of one process, all its threads (0, 0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            rest = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0, 0
    return int(rest[11]), int(rest[12])


def tcp_counters(pid: int) -> dict[str, int]:
    """The TCP counters of the network namespace `pid` is in (/proc/<pid>/net/snmp and netstat): segments in
    and out, of those out how many carried data, and retransmitted ones ({} if the process is gone)."""
    wanted = {("Tcp", "InSegs"): "in", ("Tcp", "OutSegs"): "out", ("Tcp", "RetransSegs"): "retrans",
              ("TcpExt", "TCPOrigDataSent"): "data"}
    found: dict[str, int] = {}
    for name in ("snmp", "netstat"):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii") as handle:
                lines = handle.read().splitlines()
        except OSError:
            return {}
        for head, values in zip(lines[::2], lines[1::2], strict=True):  # a line of names, then its line of values
            group, _, names = head.partition(":")
            for key, value in zip(names.split(), values.partition(":")[2].split(), strict=True):
                if (group, key) in wanted:
                    found[wanted[group, key]] = int(value)
    return found


def softirq_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as handle:
        values = handle.readline().split()[1:9]
    return int(values[5]) + int(values[6])


class Watchers:
    """perf stat / py-spy attached to one pid for the length of a load, ended by SIGINT (pid we started)."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        time.sleep(0.3)  # attached before the load starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Loads:
    """The fixed loads, from the client namespace: each returns (units done, what the unit is)."""

    def __init__(self, lab: Lab, args: argparse.Namespace):
        self.lab = lab
        self.args = args

    def wrk(self, port: int, target: str, close: bool, seconds: float, rate: float = 0) -> tuple[float, dict[str, Any]]:
        env = dict(os.environ, WRK_TARGET=target, WRK_HOST=ORIGIN_IP, WRK_CLOSE="1" if close else "0",
                   WRK_RATE=f"{rate:g}")
        argv = ["wrk", "-t1", "-c64", "-d", f"{seconds:g}s", "--timeout", "5s", "-s", str(HTTP_PROXY_DIR / "proxy.lua"),
                f"http://{ROUTER_POD_IP}:{port}"]
        done = subprocess.run(ns_argv(self.lab, "client", argv), env=env, capture_output=True, text=True,
                              timeout=seconds + 60, check=False, start_new_session=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise BenchError(f"wrk printed no summary: {done.stdout[-800:]} {done.stderr[-800:]}")
        summary: dict[str, Any] = json.loads(line.split(" ", 1)[1])
        summary["rate"] = summary["requests"] / (summary["duration_us"] / 1e6)
        return float(summary["requests"]), summary

    def tunnels(self, seconds: float) -> tuple[float, dict[str, Any]]:
        """CONNECT transfers of the large object, one after another, until `seconds` have passed: MB moved."""
        moved, runs, began = 0, 0, time.monotonic()
        while runs == 0 or time.monotonic() - began < seconds:
            argv = [PYTHON, str(HTTP_PROXY_DIR / "tunnel_client.py"), "--target", f"{ORIGIN_IP}:80", "--path", BIG,
                    "--timeout", "120", "--proxy", f"{ROUTER_POD_IP}:{http_proxy.PORT}", "--splice"]
            done = subprocess.run(ns_argv(self.lab, "client", argv), capture_output=True, text=True, timeout=180,
                                  check=False, start_new_session=True)
            result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("{")))
            if result["error"] or result["bytes"] != result["expected"]:
                raise BenchError(f"CONNECT transfer failed: {result}")
            moved += result["bytes"]
            runs += 1
        wall = time.monotonic() - began
        return moved / 1e6, {"transfers": runs, "rate": moved / 1e6 / wall}

    def big_gets(self, seconds: float) -> tuple[float, dict[str, Any]]:
        """Plain GETs of the large object through the proxy (curl, body to /dev/null) until `seconds` have passed."""
        moved, runs, began = 0, 0, time.monotonic()
        while runs == 0 or time.monotonic() - began < seconds:
            argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--max-time", "120", "-x",
                    f"http://{ROUTER_POD_IP}:{http_proxy.PORT}", f"http://{ORIGIN_IP}{BIG}"]
            done = subprocess.run(ns_argv(self.lab, "client", argv), capture_output=True, text=True, timeout=180,
                                  check=False, start_new_session=True)
            if done.returncode != 0 or not done.stdout.strip().isdigit():
                raise BenchError(f"GET {BIG} through the proxy failed ({done.returncode}): {done.stderr[-400:]}")
            moved += int(done.stdout)
            runs += 1
        wall = time.monotonic() - began
        return moved / 1e6, {"transfers": runs, "rate": moved / 1e6 / wall}

    def iperf(self, seconds: float) -> tuple[float, dict[str, Any]]:
        argv = ["iperf3", "-c", ROUTER_POD_IP, "-p", str(dns_proxy.IPERF_PORT), "-t", f"{seconds:g}", "-J",
                "--connect-timeout", "5000"]
        done = subprocess.run(ns_argv(self.lab, "client", argv), capture_output=True, text=True,
                              timeout=seconds + 30, check=False, start_new_session=True)
        out = done.stdout
        result = json.loads(out[out.index("{"):out.rindex("}") + 1])
        if "error" in result:
            raise BenchError(f"iperf3: {result['error']}")
        received = result["end"]["sum_received"]
        return received["bytes"] / 1e6, {"rate": received["bits_per_second"] / 8e6}

    def run(self, path: str, seconds: float) -> tuple[float, dict[str, Any]]:
        if path == "http-connect":
            return self.tunnels(seconds)
        if path == "http-get-big":
            return self.big_gets(seconds)
        if path == "dns-bulk":
            return self.iperf(seconds)
        if path.startswith("http-"):
            return self.wrk(http_proxy.PORT, f"http://{ORIGIN_IP}{SMALL}", path == "http-close", seconds)
        return self.wrk(dns_proxy.HTTP_PORT, SMALL, path == "dns-close", seconds, PACED if path == "dns-paced" else 0)


UNITS = {"http-keepalive": "request", "http-close": "connection", "http-connect": "MB", "http-get-big": "MB",
         "dns-keepalive": "request",
         "dns-close": "connection", "dns-paced": "request", "dns-bulk": "MB"}


def serving_pid(proxy: Proxy, warm: Callable[[], object]) -> int:
    """The proxy process that took the most CPU during `warm` (ours: the one process; squid: not the pinger)."""
    before = {pid: sum(stat_ticks(pid)) for pid in proxy.pids()}
    warm()
    gained = {pid: sum(stat_ticks(pid)) - ticks for pid, ticks in before.items()}
    return max(gained, key=lambda pid: gained[pid])


def cpu_pass(loads: Loads, path: str, pid: int, seconds: float) -> dict[str, Any]:
    user0, sys0 = stat_ticks(pid)
    tcp0 = tcp_counters(pid)
    soft0, began = softirq_ticks(), time.monotonic()
    units, extra = loads.run(path, seconds)
    wall = time.monotonic() - began
    user1, sys1 = stat_ticks(pid)
    tcp1 = tcp_counters(pid)
    user, system = (user1 - user0) / CLK, (sys1 - sys0) / CLK
    soft = (softirq_ticks() - soft0) / CLK
    per = 1e6 / max(units, 1e-9)
    return {"units": units, "wall": wall, "rate": extra.get("rate"), "user_us": user * per, "sys_us": system * per,
            "cpu_us": (user + system) * per, "proxy_core": 100 * (user + system) / wall,
            "softirq_us": soft * per, "errors": extra.get("errors", 0), "extra": extra,
            # the router namespace's TCP segments, every side of it (client leg and upstream leg) per unit
            "segments": {key: (tcp1[key] - tcp0[key]) / max(units, 1e-9) for key in tcp0 if key in tcp1}}


def syscall_pass(loads: Loads, path: str, pid: int, seconds: float, out: Path) -> dict[str, Any]:
    events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)])
    data = out / f"{path}-{pid}-perf.csv"
    watch = Watchers(["perf", "stat", "-x,", "-o", str(data), "-e", events, "-p", str(pid)], out / f"{path}-perf.log")
    try:
        units, extra = loads.run(path, seconds)
    finally:
        watch.stop()
    counts: dict[str, float] = {}
    for line in data.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            name = fields[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "ALL")
            counts[name] = int(fields[0]) / max(units, 1e-9)
    return {"units": units, "rate": extra.get("rate"), "per_unit": counts}


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def short_frame(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("egress_router/", "site-packages/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file})"


def spy_pass(loads: Loads, path: str, pid: int, seconds: float, out: Path, native: bool, top: int) -> dict[str, Any]:
    """py-spy record of the busy samples: per function, the share of samples it is the leaf of (self) and
    the share it appears in (inclusive)."""
    stacks = out / f"{path}-{pid}-{'native' if native else 'py'}.txt"
    argv = [str(PY_SPY), "record", "-p", str(pid), "-r", "250", "-f", "raw", "--function", "-o", str(stacks)]
    argv += ["--native"] if native else ["--nonblocking"]
    watch = Watchers(argv, out / f"{path}-spy.log")
    try:
        units, extra = loads.run(path, seconds)
    finally:
        watch.stop()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.read_text().splitlines() if stacks.exists() else []:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = 100 / max(total, 1)
    return {"units": units, "rate": extra.get("rate"), "samples": total,
            "self": [(f, round(c * share, 1)) for f, c in own.most_common(top)],
            # frames on (nearly) every stack (the entry point, the event loop) say nothing: left out
            "inclusive": [(f, round(c * share, 1)) for f, c in inclusive.most_common()
                          if c * share < 99.5][: top + 8]}


SYMBOL = re.compile(r"^\s*(?P<share>[\d.]+)%\s+\[(?P<kind>[k.])\]\s+(?P<sym>\S.*?)\s*$")


def kernel_pass(loads: Loads, path: str, pid: int, seconds: float, out: Path, top: int) -> dict[str, Any]:
    """perf record of the process, kernel and user (sampled at 999 Hz): the share of samples per symbol, self."""
    data = out / f"{path}-{pid}-perf.data"
    watch = Watchers(["perf", "record", "-F", "999", "-o", str(data), "-p", str(pid)], out / f"{path}-record.log")
    try:
        units, extra = loads.run(path, seconds)
    finally:
        watch.stop()
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "sym"],
                            capture_output=True, text=True, timeout=300, check=False)
    (out / f"{path}-{pid}-perf-report.txt").write_text(report.stdout)
    symbols = [(m["sym"], m["kind"] == "k", float(m["share"]))
               for m in map(SYMBOL.match, report.stdout.splitlines()) if m]
    kernel = sum(share for _, k, share in symbols if k)
    return {"units": units, "rate": extra.get("rate"), "kernel_share": round(kernel, 1),
            "self": [(sym if k else f"{sym} (user)", share) for sym, k, share in symbols[:top]]}


def profile_path(lab: Lab, loads: Loads, proxy: Proxy, ready: Callable[[], object], path: str,
                 args: argparse.Namespace, out: Path, ours: bool) -> dict[str, Any]:
    proxy.start()
    try:
        ready()
        port = http_proxy.PORT if path.startswith("http") else dns_proxy.HTTP_PORT
        target = f"http://{ORIGIN_IP}{SMALL}" if path.startswith("http") else SMALL
        pid = serving_pid(proxy, lambda: loads.wrk(port, target, False, 2.0))
        found: dict[str, Any] = {"side": proxy.name, "pid": pid, "processes": len(proxy.pids()),
                                 "load_before": load_average(), "busy_before": round(100 * cpu_busy(0.5))}
        found["cpu"] = cpu_pass(loads, path, pid, args.duration)
        if not args.no_syscalls:
            found["syscalls"] = syscall_pass(loads, path, pid, args.duration, out)
        if args.kernel:
            found["kernel"] = kernel_pass(loads, path, pid, args.duration, out, args.top)
        if ours and not args.no_py_spy:
            found["py"] = spy_pass(loads, path, pid, args.duration, out, False, args.top)
            if args.native:
                found["native"] = spy_pass(loads, path, pid, args.duration, out, True, args.top)
        if not proxy.proc or not proxy.proc.alive():
            raise BenchError(f"{proxy.name} died during {path}:\n{proxy.describe_failure()}")
        return found
    finally:
        proxy.stop()


def print_found(path: str, found: dict[str, Any], top: int) -> None:
    unit = UNITS[path]
    cpu = found["cpu"]
    rate = f"{cpu['rate']:,.0f}/s" if cpu["rate"] is not None else "-"
    print(f"\n== {path} ({found['side']}, pid {found['pid']}, {found['processes']} processes, busy before "
          f"{found['busy_before']}%): {rate}, proxy at {cpu['proxy_core']:.0f}% of a core")
    print(f"   CPU per {unit}: {cpu['cpu_us']:.1f} us = user {cpu['user_us']:.1f} + sys {cpu['sys_us']:.1f} "
          f"(machine softirq {cpu['softirq_us']:.1f} us per {unit}; errors {cpu['errors']})")
    if seg := cpu.get("segments"):
        print(f"   TCP segments per {unit} in the router namespace: out {seg.get('out', 0):.2f} (carrying data "
              f"{seg.get('data', 0):.2f}, retransmitted {seg.get('retrans', 0):.2f}), in {seg.get('in', 0):.2f}")
    if "syscalls" in found:
        sc = found["syscalls"]
        pairs = sorted(((k, v) for k, v in sc["per_unit"].items() if k != "ALL" and v >= 0.005), key=lambda kv: -kv[1])
        print(f"   syscalls per {unit}: {sc['per_unit'].get('ALL', 0):.2f} in all (pass at {sc['rate'] or 0:,.0f}/s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in pairs))
    if "kernel" in found:
        kern = found["kernel"]
        print(f"   perf record (pass at {kern['rate'] or 0:,.0f}/s): {kern['kernel_share']}% of samples in the kernel; "
              "self, by symbol:")
        for sym, share in kern["self"]:
            print(f"     {share:5.1f}%  {sym}")
    for key in ("py", "native"):
        if key in found:
            spy = found[key]
            print(f"   py-spy {key} ({spy['samples']} busy samples, pass at {spy['rate'] or 0:,.0f}/s), self:")
            for frame, share in spy["self"][:top]:
                print(f"     {share:5.1f}%  {frame}")
            print("   inclusive:")
            for frame, share in spy["inclusive"][: top + 8]:
                print(f"     {share:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per pass (default 8)")
    parser.add_argument("--connect-mib", type=int, default=1024, help="size of the CONNECT object (default 1024)")
    parser.add_argument("--top", type=int, default=10, help="functions listed per path (default 10)")
    parser.add_argument("--refs", action="store_true", help="also squid and haproxy (nbthread 1): cpu, syscalls")
    parser.add_argument("--native", action="store_true", help="a second py-spy pass with C frames (--native)")
    parser.add_argument("--kernel", action="store_true", help="a perf record pass: self time by symbol")
    parser.add_argument("--no-py-spy", action="store_true", help="no py-spy passes")
    parser.add_argument("--no-syscalls", action="store_true", help="no perf stat pass")
    parser.add_argument("--out", type=Path, help="raw outputs (default benchmarks/.work/profile-<time>)")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in paths if p not in PATHS]:
        parser.error(f"unknown path(s) {', '.join(unknown)}")
    require_root()
    needed = ["wrk", "nginx", "perf", "curl"] + (["iperf3"] if "dns-bulk" in paths else [])
    needed += (["squid"] if any(p.startswith("http") for p in paths) else []) + (["haproxy"] if args.refs else [])
    if missing := [tool for tool in needed if shutil.which(tool) is None]:
        sys.exit(f"missing {', '.join(missing)}: apt-get install wrk nginx-light linux-perf iperf3 squid haproxy")
    if not args.no_py_spy and not PY_SPY.exists():
        sys.exit(f"no {PY_SPY}: .venv/bin/pip install py-spy, or --no-py-spy")
    out = args.out or WORK / time.strftime("profile-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    print(f"load average at start {load_average()}; raw outputs in {out}")
    found: dict[str, list[dict[str, Any]]] = {}
    for family in ("http", "dns"):
        mine = [p for p in paths if p.startswith(family)]
        if mine:
            profile_family(family, mine, args, out, found)
    (out / "profile.json").write_text(json.dumps(found, indent=1))
    print(f"\nload average at end {load_average()}; figures in {out / 'profile.json'}")
    return 0


def profile_family(family: str, paths: Sequence[str], args: argparse.Namespace, out: Path,
                   found: dict[str, list[dict[str, Any]]]) -> None:
    """One lab, origin (and iperf3 server) for the paths of one proxy; ours, then the reference if asked."""
    with scratch(f"profile-{family}-") as tmp, Lab() as lab:
        prepare_lab(lab, "http-proxy" if family == "http" else "dns-proxy")
        origin = Origin(lab, tmp, 1, args.connect_mib << 20 if family == "http" else 1 << 20)
        iperf = None
        try:
            backends = [origin.proc]
            if family == "dns":
                iperf = Managed(lab, "dest", ["iperf3", "-s", "-B", ORIGIN_IP, "-p", str(dns_proxy.IPERF_PORT)],
                                tmp / "iperf3.out")
                backends.append(iperf)
            wait_for_backends(lab, ORIGIN_IP, [80] + ([dns_proxy.IPERF_PORT] if iperf else []), backends)
            loads = Loads(lab, args)
            sides: list[tuple[Proxy, Callable[[], object], bool]] = []
            if family == "http":
                candidates: list[tuple[Proxy, bool]] = [(http_proxy.Ours(lab, tmp, None), True)]
                candidates += [(http_proxy.Squid(lab, tmp), False)] if args.refs else []
                sides = [(proxy, functools.partial(http_proxy.wait_ready, lab, proxy, origin.small), ours)
                         for proxy, ours in candidates]
            else:
                candidates = [(dns_proxy.Ours(lab, tmp, 1), True)]
                candidates += [(dns_proxy.Haproxy(lab, tmp, 1), False)] if args.refs else []
                sides = [(proxy, functools.partial(dns_proxy.wait_ready, lab, proxy, origin.small), ours)
                         for proxy, ours in candidates]
            for path in paths:
                for proxy, ready, ours in sides:
                    result = profile_path(lab, loads, proxy, ready, path, args, out, ours)
                    found.setdefault(path, []).append(result)
                    print_found(path, result, args.top)
        finally:
            if iperf is not None:
                iperf.stop()
            origin.stop()


if __name__ == "__main__":
    run_benchmark(main, "the lab and every process started were cleaned up")
