"""Proxy rule reloads: from the rule file's swap to the new rule in force, and established connections lost, for the
HTTP and the DNS proxy at several rule counts, beside a restart of the proxy (what a rule change cost before).

Not part of the package. Everything runs inside the namespace lab (documentation addresses only); the only
processes it ends are ones it started, by pid. Each round starts a fresh proxy, opens the held connections
(data before), changes the rules (a ConfigMap-style `..data` swap, or: SIGTERM and a new process with the new
file), times until a probe through the added rule succeeds, then sends data on every held connection again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchlib import (
    PYTHON,
    WORK,
    BenchError,
    Stats,
    machine_info,
    machine_lines,
    md_table,
    require_root,
    round_order,
    run_benchmark,
    secs,
    text_table,
    write_results,
)
from proxybench import Managed, raise_fd_limit

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, Lab
from egress_router.labtraffic import ConfigMapVolume, EchoHub, exchange_all

HELD_IP, PROBE_IP, FILLER_IP = DEST_IPS  # held connections' echo, the added rule's probe target, fillers
HELD_PORT, PROBE_PORT = 7100, 7101
HTTP_PORT = 8080
DNS_HELD_PORT, DNS_PROBE_PORT, DNS_FILLER_BASE = 7000, 7001, 20000
LIMIT = 30.0  # seconds a change may take before the run is called failed
METHODS = ("reload", "restart")


# ---------------------------------------------------------------- the two proxies

def http_rules(count: int, added: bool) -> str:
    rules = [f"h{i}.example.net" for i in range(max(0, count - 2))] + [HELD_IP]
    return "\n".join(rules + ([PROBE_IP] if added else [f"h{count}.example.net"])) + "\n"


def dns_rules(count: int, added: bool) -> str:
    rules = [f"{DNS_FILLER_BASE + i} {FILLER_IP} 9" for i in range(max(0, count - 2))]
    rules.append(f"{DNS_HELD_PORT} {HELD_IP} {HELD_PORT}")
    rules.append(f"{DNS_PROBE_PORT} {PROBE_IP} {PROBE_PORT}" if added else f"{DNS_FILLER_BASE + count} {FILLER_IP} 9")
    return "\n".join(rules) + "\n"


class Kind:
    def __init__(self, name: str, rules: Callable[[int, bool], str], port: int, env: dict[str, str]):
        self.name, self.rules, self.port, self.env = name, rules, port, env


HTTP = Kind("http-proxy", http_rules, HTTP_PORT, {"EGRESS_HTTP_PROXY_PORT": str(HTTP_PORT)})
DNS = Kind("dns-proxy", dns_rules, DNS_HELD_PORT, {})


def connect(lab: Lab, port: int, timeout: float = 5.0) -> socket.socket:
    with lab.entered("client"):
        return socket.create_connection((ROUTER_POD_IP, port), timeout=timeout)


def tunnel(sock: socket.socket, ip: str, port: int) -> bool:
    sock.sendall(f"CONNECT {ip}:{port} HTTP/1.1\r\nHost: {ip}:{port}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            return False
        head += chunk
    return head.startswith(b"HTTP/1.1 200 ")


def probe(lab: Lab, kind: Kind) -> bool:
    """Whether the added rule is in force: a tunnel to the probe target, or a relayed echo through its port."""
    try:
        if kind is HTTP:
            with connect(lab, HTTP_PORT, 2.0) as sock:
                return tunnel(sock, PROBE_IP, PROBE_PORT)
        with connect(lab, DNS_PROBE_PORT, 2.0) as sock:
            sock.sendall(b"probe\n")
            return sock.recv(16) == b"probe\n"
    except OSError:
        return False


def exchange(socks: list[socket.socket], tag: str) -> int:
    """One echoed line per connection; how many did not get theirs back."""
    return len(exchange_all(socks, tag))


@contextlib.contextmanager
def proxy(lab: Lab, kind: Kind, path: str, log: Path) -> Iterator[Managed]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
    env.update(kind.env)
    env.update({f"EGRESS_{'HTTP' if kind is HTTP else 'DNS'}_PROXY_DESTINATION_FILE": path,
                "EGRESS_PROXY_GRACE_SECONDS": "0.1"})
    managed = Managed(lab, "router", [PYTHON, "-m", "egress_router"], log, env)
    try:
        yield managed
    finally:
        stop(managed)


def stop(managed: Managed) -> None:
    """SIGTERM, then SIGKILL if it outstays 15 s (one process: the proxies run one worker by default). Not
    Managed.stop, which select()s on pidfds: with 1,000 connections held, those are above select's limit."""
    if managed.alive():
        managed.process.send_signal(signal.SIGTERM)
        try:
            managed.process.wait(15)
        except subprocess.TimeoutExpired:
            managed.process.kill()
            managed.process.wait(10)


def wait_serving(lab: Lab, kind: Kind, managed: Managed) -> None:
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline:
        if not managed.alive():
            raise BenchError(f"{kind.name} exited:\n{managed.tail()}")
        with contextlib.suppress(OSError):
            connect(lab, kind.port, 1.0).close()
            return
        time.sleep(0.02)
    raise BenchError(f"{kind.name} did not listen within {LIMIT:g} s:\n{managed.tail()}")


def one_round(lab: Lab, kind: Kind, count: int, method: str, held: int, work: Path) -> tuple[float, int]:
    """(seconds from the change until the added rule is in force, held connections lost)."""
    volume = ConfigMapVolume(work / f"{kind.name}-{count}-{method}-{time.monotonic_ns()}", "rules")
    volume.swap(kind.rules(count, False))
    log = work / f"{kind.name}.log"
    socks: list[socket.socket] = []
    try:
        with proxy(lab, kind, volume.path, log) as managed:
            wait_serving(lab, kind, managed)
            time.sleep(0.6)  # past the start-up check of the file (not measured, it changes nothing)
            for _ in range(held):
                sock = connect(lab, kind.port)
                socks.append(sock)
                if kind is HTTP and not tunnel(sock, HELD_IP, HELD_PORT):
                    raise BenchError(f"a held tunnel was refused:\n{managed.tail()}")
            if exchange(socks, "before"):
                raise BenchError(f"held connections failed before the change:\n{managed.tail()}")
            if method == "reload":
                changed = volume.swap(kind.rules(count, True))
                elapsed = wait_probe(lab, kind, changed, managed)
                return elapsed, exchange(socks, "after")
            changed = time.monotonic()
            stop(managed)
            volume.swap(kind.rules(count, True))
            with proxy(lab, kind, volume.path, log) as fresh:
                elapsed = wait_probe(lab, kind, changed, fresh)
                return elapsed, exchange(socks, "after")
    finally:
        for sock in socks:
            sock.close()


def wait_probe(lab: Lab, kind: Kind, since: float, managed: Managed) -> float:
    while not probe(lab, kind):
        if time.monotonic() - since > LIMIT:
            raise BenchError(f"the added rule was not in force within {LIMIT:g} s:\n{managed.tail()}")
        time.sleep(0.01)
    return time.monotonic() - since


# ---------------------------------------------------------------- the run

def configure_network(lab: Lab) -> None:
    env = lab.router_env(mode="http-proxy")
    del env["EGRESS_DESTINATION"]
    result = lab.run_router(env)
    if result.returncode != 0:
        raise BenchError(f"network set-up failed: {result.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--held", type=int, default=1000, help="established connections held across the change")
    parser.add_argument("--http-counts", default="10,1000,10000", help="allow-list sizes")
    parser.add_argument("--dns-counts", default="10,1000", help="forward counts (each listens on IPv4 and IPv6)")
    parser.add_argument("--quick", action="store_true", help="1 round, 100 held connections, 10 and 1000 rules")
    parser.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    options = parser.parse_args()
    require_root()
    if options.quick:
        options.rounds, options.held, options.http_counts, options.dns_counts = 1, 100, "10,1000", "10"
    raise_fd_limit()
    info = machine_info()
    work = WORK / "reload_proxies"
    work.mkdir(parents=True, exist_ok=True)
    plan = [(HTTP, int(c)) for c in options.http_counts.split(",")] + \
           [(DNS, int(c)) for c in options.dns_counts.split(",")]
    samples: dict[tuple[str, int, str], list[tuple[float, int]]] = {}
    with Lab() as lab:
        configure_network(lab)
        echoes = [EchoHub(lab, "dest", HELD_IP, HELD_PORT), EchoHub(lab, "dest", PROBE_IP, PROBE_PORT)]
        try:
            for index in range(options.rounds):
                for kind, count in plan:
                    for method in round_order(index, METHODS):
                        result = one_round(lab, kind, count, method, options.held, work)
                        samples.setdefault((kind.name, count, method), []).append(result)
                        print(f"round {index + 1}: {kind.name} {count} rules {method}: in force after "
                              f"{secs(result[0])}, {result[1]} of {options.held} held connections lost", flush=True)
        finally:
            for echo in echoes:
                echo.stop()
    headers = ["proxy", "rules", "change", "in force after (median)", "max", f"lost of {options.held} (max)"]
    rows = []
    for (name, count, method), results in samples.items():
        stats = Stats.of([t for t, _ in results])
        rows.append([name, str(count), method, secs(stats.median), secs(stats.high), str(max(n for _, n in results))])
    print("\n" + text_table(headers, rows))
    if not options.no_results:
        body = "\n".join([
            "## Proxy rule reloads (benchmarks/reload_proxies.py)", "",
            f"{options.rounds} round(s); {options.held} established connections held through an unchanged rule "
            "while a rule is added (reload: a ConfigMap-style `..data` swap; restart: SIGTERM, then a new process "
            "with the new file, the reference). Time: from the swap (or the SIGTERM) until a new connection "
            "through the added rule works.", "",
            md_table(headers, rows), "", *machine_lines(info),
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- interpreter: {sys.version.split()[0]}"])
        write_results("reload_proxies", body)
    return 0


if __name__ == "__main__":
    run_benchmark(main, "the lab is torn down")
