#!/usr/bin/env python3
"""Legacy-mode reload: from a ConfigMap-style file swap to the new rule in force, and established
connections lost, for 10, 1,000 and 10,000 redirect rules; beside a restart as the reference.

Run as root from the repository:  .venv/bin/python benchmarks/reload.py [--rounds N] [--quick]

One namespace lab per rule count. The rule file holds `80 tcp A`, `7000 tcp A` and filler rules to
203.0.113.12; each round flips the port-80 rule between 203.0.113.10 and .11 and times, from the
swap of the `..data` symlink, until a TCP probe from the client namespace lands on the new target
(probes every 10 ms: the figure is an upper bound by that much). Meanwhile HELD connections through
the unchanged 7000 rule carry one echo before and one after; a connection that fails is lost.

  ours       the running legacy-mode router notices the swap (inotify on the volume's directory; a
             0.5 s stat poll behind it), validates, and applies the difference
  reference  a restart: SIGTERM the router, swap, start a new one, until the rule is in force. This
             is a lower bound for a pod restart: a real one also recreates the pod sandbox and its
             network namespace (seconds more), and resets every connection through the pod, which
             this lab does not model, so its "lost" column understates a real restart.
Rounds alternate the order. Also reported: the CPU the idle router spends on its drift checks
(every 2 s) at each rule count, measured over IDLE_SECONDS.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from benchlib import (
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

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, Lab, router_command
from egress_router.labtraffic import ConfigMapVolume, EchoHub, exchange_all

A, B, C = DEST_IPS
COUNTS = (10, 1000, 10000)
HELD = 1000
IDLE_SECONDS = 10.0
PROBE_EVERY = 0.01
IN_FORCE_TIMEOUT = 30.0


def rules(count: int, target: str) -> str:
    filler = "".join(f"{20000 + i} tcp {C}\n" for i in range(count - 2))
    return f"80 tcp {target}\n7000 tcp {A}\n{filler}"


def probe(lab: Lab) -> str | None:
    try:
        with lab.entered("client"):
            sock = socket.create_connection((ROUTER_POD_IP, 80), timeout=0.5)
        with sock:  # the lab's servers answer "landed peer"
            answer = sock.recv(128).decode().split()
        return answer[0].rsplit(":", 1)[0] if answer else None
    except OSError:
        return None


def until_lands(lab: Lab, target: str, since: float) -> float:
    while time.monotonic() - since < IN_FORCE_TIMEOUT:
        if probe(lab) == target:
            return time.monotonic() - since
        time.sleep(PROBE_EVERY)
    raise BenchError(f"the rule to {target} was not in force within {IN_FORCE_TIMEOUT:g} s")


class Router:
    """The legacy-mode router in the lab's router namespace, its rules in the file `path`; ready when constructed."""

    def __init__(self, lab: Lab, path: str, **variables: str):
        env = lab.router_env("", mode="legacy", EGRESS_DESTINATION_FILE=path, **variables)
        env.pop("EGRESS_DESTINATION")
        self.process = subprocess.Popen(lab.enter_argv("router") + router_command(), env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if "Ready:" in line:
                break
            if "error" in line:
                raise BenchError(f"the router failed: {line.strip()}")
        else:
            raise BenchError("the router exited before it was ready")
        self.drain = threading.Thread(target=lambda: [None for _ in self.process.stderr or ()], daemon=True)
        self.drain.start()

    def cpu_seconds(self, children: bool = False) -> float:
        """The router's CPU time; with `children`, that of the children it waited for too (iptables-save runs)."""
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(fields[i]) for i in ((11, 12, 13, 14) if children else (11, 12))) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def hold(lab: Lab) -> list[socket.socket]:
    conns = []
    with lab.entered("client"):
        for _ in range(HELD):
            conns.append(socket.create_connection((ROUTER_POD_IP, 7000), timeout=5))
    return conns


def lost(conns: list[socket.socket], tag: bytes) -> int:
    return len(exchange_all(conns, tag.decode()))


def measure(count: int, rounds: int, work: Path) -> dict[str, object]:
    results: dict[str, list[float]] = {"ours": [], "reference": []}
    losses: dict[str, list[int]] = {"ours": [], "reference": []}
    with Lab() as lab:
        lab.serve([("tcp", A, 80), ("tcp", B, 80)])  # they say where a probe landed
        echo = EchoHub(lab, "dest", A, 7000)
        volume = ConfigMapVolume(work / f"volume-{count}", "destination")
        target = A
        volume.swap(rules(count, target))
        router = Router(lab, volume.path)
        conns = hold(lab)
        try:
            if lost(conns, b"warm"):
                raise BenchError("held connections failed before the first round")
            idle_start = router.cpu_seconds()
            time.sleep(IDLE_SECONDS)
            idle_cpu = (router.cpu_seconds() - idle_start) / IDLE_SECONDS
            for index in range(rounds):
                for who in round_order(index, ("ours", "reference")):
                    target = B if target == A else A
                    if who == "ours":
                        since = volume.swap(rules(count, target))
                    else:
                        router.stop()
                        since = volume.swap(rules(count, target))
                        router = Router(lab, volume.path)
                    results[who].append(until_lands(lab, target, since))
                    losses[who].append(lost(conns, who.encode()))
        finally:
            for conn in conns:
                conn.close()
            router.stop()
            echo.stop()
    return {"times": results, "lost": losses, "idle_cpu": idle_cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 10 and 1,000 rules only")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    require_root()
    rounds, counts = (2, COUNTS[:2]) if args.quick else (args.rounds, COUNTS)
    import resource
    import tempfile

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * HELD + 1024)), hard))
    info = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="egress-reload-") as work:
        for count in counts:
            print(f"{count:,} rules: {rounds} rounds ...", flush=True)
            found = measure(count, rounds, Path(work))
            times, losses = found["times"], found["lost"]
            assert isinstance(times, dict) and isinstance(losses, dict)
            ours, ref = Stats.of(times["ours"]), Stats.of(times["reference"])
            rows.append([f"{count:,}", secs(ours.median), f"{secs(ours.low)}-{secs(ours.high)}",
                         f"{max(losses['ours'])} of {HELD}", secs(ref.median), f"{secs(ref.low)}-{secs(ref.high)}",
                         f"{max(losses['reference'])} of {HELD}", f"{ours.median / ref.median:.2f}",
                         f"{found['idle_cpu']:.1%}"])
    headers = ["rules", "ours: swap to in force (median)", "ours: min-max", "ours: lost (worst round)",
               "restart: swap to in force", "restart: min-max", "restart: lost (worst)", "ours/restart",
               "idle CPU (drift checks)"]
    print()
    print(text_table(headers, rows))
    body = "\n".join([
        "## Reload (benchmarks/reload.py)", "",
        f"{rounds} alternating rounds per rule count; {HELD} connections held through an unchanged rule; "
        "probes every 10 ms; median of the rounds. The restart is a process restart in the same namespace: "
        "a lower bound for a pod restart in time, and it keeps connections a pod restart would reset.", "",
        md_table(headers, rows), "", *machine_lines(info),
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ])
    if not args.no_results:
        write_results("reload", body)
    return 0


if __name__ == "__main__":
    run_benchmark(main, "reload benchmark")
