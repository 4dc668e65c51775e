#!/usr/bin/env python3
"""High availability (legacy or dns-proxy mode): from a fault to the first new connection from EGRESS_SOURCE.

Run as root from the repository:  .venv/bin/python benchmarks/failover.py [--trials N] [--quick] [--mode M]

--mode dns-proxy runs the replicas as DNS proxies (port 80 forwarded to the outside server), each under its
keeper (egress_router/ha_keeper.py): the same faults, the proxy's own path for the connections.

An HA lab (egress_router/halab.py) with 2 and then 3 router pods on one LAN, legacy mode, EGRESS_HA_PEERS = the
pod IPs, each replica with its own EGRESS_HA_STATE_DIR. The client stands in for the Service: it asks each pod's
admin port for /ready and connects to the ready one's pod IP, port 80 (timeout 150 ms), every 10 ms; a
connection counts when the outside server answers that it came from 192.0.2.99. Per trial, t0 is taken just
before the fault's syscall:

  kill   the active pod's processes SIGKILLed (router and keepalived, no goodbye; the namespace stays)
  term   the active router SIGTERMed (the hand-over a rolling update or a drain does)
  link   the active's egress link (macvlan0) set down
  split  the heartbeat path (VRRP on eth0) cut on every replica, all alive: the longest time two or more hold
         the address (holders sampled every 20 ms)
  return after each kill trial the killed replica starts again: any change of holder within RETURN_WATCH s
         is a flap

A sampler reads the gateway's neighbour entry for 192.0.2.99 every 2 ms: per trial, whether it was on the new
holder's MAC when the landing connection started. Between trials the lab is restored (the replica started
again, the link up, the path healed), and every trial starts from the steady state it claims: every replica
running, exactly one holding the address and exactly that one ready, and every other one's state file saying
"standby" (its keepalived in BACKUP, so a goodbye reaches it; "starting" until keepalived's first state line,
"fault" while it is in FAULT), bounded by SETTLE_TIMEOUT. A trial started while a restarted replica is still
starting would measure the master-down wait of a VRRP router that missed the goodbye, not the hand-over. How
long a restarted replica takes from its start to "standby" (the state file's time) is reported too. The fault
order rotates between rounds.

The reference is today's recovery: a rescheduled pod, of which the lab can time only the router's own part,
`egress-router` in init mode (the same configuration without EGRESS_HA_PEERS) in a fresh pod namespace, from
process start to exit 0. A real reschedule adds the kubelet's and the controller's detection on top (the
node-monitor-grace-period of 40 s, then the eviction, then scheduling and a new sandbox), so it is a lower bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    BenchError,
    Deadline,
    busy_warning,
    cpu_share_since,
    cpu_times,
    in_namespace,
    load_average,
    machine_info,
    machine_lines,
    md_table,
    require_root,
    rotating_order,
    run_benchmark,
    secs,
    text_table,
    timed_run,
    write_results,
)

from egress_router.halab import OUT_IPS, SOURCE, HaLab, macvlan_mac
from egress_router.lab import router_command

FAULTS = ("kill", "term", "link", "split")
TARGETS = {"kill": 2.0, "term": 0.5, "link": 2.0, "split": 3.0}
WHAT = {"kill": "active SIGKILLed", "term": "active SIGTERMed (hand-over)", "link": "active's egress link down",
        "split": "heartbeat cut, all alive: two holders for"}
PROBE_EVERY = 0.01
CONNECT_TIMEOUT = 0.15
READY_TIMEOUT = 0.1
NEIGHBOUR_EVERY = 0.002
HOLDERS_EVERY = 0.02
GIVE_UP = 6.0  # seconds after a fault without a landing connection: no takeover (a finding, not a figure)
SPLIT_WATCH = 8.0  # the longest a split trial watches the holders
DEBUG = bool(os.environ.get("FAILOVER_DEBUG"))  # the routers log at debug level (keepalived's lines too)
KEYS = ("High availability", "Repaired drift", "keepalived: ")  # the log lines a trial's detail quotes
MODES = ("legacy", "dns-proxy")
# dns-proxy: the same client and servers, the replicas' DNS proxy forwarding port 80 to the outside server (its
# default workers: a master and one per CPU), each run by its keeper (egress_router/ha_keeper.py)
PROXY_ENV = {"EGRESS_ROUTER_MODE": "dns-proxy", "EGRESS_DNS_PROXY_DESTINATION": f"80 {OUT_IPS[0]}"}
mode = "legacy"  # --mode
SETTLE_TIMEOUT = 20.0  # for the lab to be in its steady state again (one ready holder, every other one standby)


def p95(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return statistics.quantiles(ordered, n=20, method="inclusive")[-1] if len(ordered) > 1 else ordered[0]


@dataclass
class Trial:
    fault: str
    seconds: float | None  # None: no takeover within GIVE_UP (or, for split, no double holding resolved)
    neighbour_ok: bool | None = None  # the gateway's entry on the new holder's MAC when the landing connection began
    detail: str = ""
    same: bool = False  # the connection landed through the replica that had the fault (it recovered; no takeover)
    back: float | None = None  # split: seconds from the heal until every replica that gave way is a standby again


@dataclass
class Results:
    replicas: int
    trials: list[Trial] = field(default_factory=list)
    flaps: list[int] = field(default_factory=list)  # per return of a killed replica
    to_standby: list[float] = field(default_factory=list)  # per restart: seconds from its start to "standby"
    settle_waits: list[float] = field(default_factory=list)  # per trial: seconds waited for the steady state
    notes: list[str] = field(default_factory=list)

    def of(self, fault: str) -> list[Trial]:
        return [t for t in self.trials if t.fault == fault]


class Neighbour(threading.Thread):
    """Samples the gateway's neighbour entry for EGRESS_SOURCE (every 2 ms) until stopped: the (time, MAC) changes.

    One thread for the lab's whole life (HaLab.netlink keeps an IPRoute per thread and namespace)."""

    def __init__(self, lab: HaLab):
        super().__init__(daemon=True)
        self.lab = lab
        self.changes: list[tuple[float, str | None]] = []
        self.done = threading.Event()

    def run(self) -> None:
        last: object = object()
        while not self.done.is_set():
            mac = self.lab.gateway_neighbour(SOURCE)
            if mac != last:
                self.changes.append((time.monotonic(), mac))
                last = mac
            self.done.wait(NEIGHBOUR_EVERY)

    def at(self, when: float) -> str | None:
        value = None
        for moment, mac in self.changes:
            if moment > when:
                break
            value = mac
        return value

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


class Bench:
    """The routers of one HA lab and the client that follows the ready one."""

    def __init__(self, lab: HaLab, directory: Path, neighbour: Neighbour):
        self.lab, self.dir, self.neighbour = lab, directory, neighbour
        self.processes: dict[int, subprocess.Popen[str]] = {}
        self.earlier: dict[int, str] = {}  # the log of each replica's earlier lives
        self.flap_logs: list[str] = []
        self.started: dict[int, float] = {}  # a restarted replica not yet seen standby: when it started (wall clock)
        self.to_standby: list[float] = []
        self.settle_waits: list[float] = []

    def log(self, i: int) -> str:
        return self.earlier.get(i, "") + self.lab.output(self.processes[i])

    def ha_lines(self, since: dict[int, int]) -> str:
        """The HA and drift-repair lines (and keepalived's, at debug level) each replica logged since `since`."""
        found = []
        for i, p in self.processes.items():
            lines = self.lab.output(p).splitlines()[since.get(i, 0):]
            found += [f"pod{i}: {line}" for line in lines if any(key in line for key in KEYS)]
        return "; ".join(found)

    def marks(self) -> dict[int, int]:
        return {i: len(self.lab.output(p).splitlines()) for i, p in self.processes.items()}

    def since(self, i: int, marks: dict[int, int]) -> str:
        """What replica i logged in its current life since `marks` (marks())."""
        return "\n".join(self.lab.output(self.processes[i]).splitlines()[marks.get(i, 0):])

    def start(self, i: int) -> None:
        if i in self.processes:
            self.earlier[i] = self.log(i) + "\n"
            self.started[i] = time.time()  # the state file's time is wall clock
        debug = {"EGRESS_ROUTER_DEBUG": "1"} if DEBUG else {}
        env = self.lab.router_env(i, EGRESS_HA_STATE_DIR=str(self.dir / f"pod{i}"), **debug)
        if mode == "dns-proxy":
            del env["EGRESS_DESTINATION"]
            env.update(PROXY_ENV)
        self.processes[i] = self.lab.run_router(i, env)

    def state(self, i: int) -> tuple[str, float]:
        """What replica i's state file says now ('' before its first), and when it was written (wall clock)."""
        path = self.dir / f"pod{i}" / "ha-state"
        try:
            with path.open(encoding="ascii") as handle:
                return handle.read().split()[0], os.fstat(handle.fileno()).st_mtime
        except (OSError, IndexError):
            return "", 0.0

    def logs(self, tail: int = 12) -> str:
        return "\n".join(f"--- pod{i}\n" + "\n".join(self.lab.output(p).splitlines()[-tail:])
                         for i, p in self.processes.items())

    def ready(self, exclude: int | None = None) -> list[int]:
        return [i for i in range(self.lab.replicas)
                if i != exclude and self.lab.http_status(i, timeout=READY_TIMEOUT) == 200]

    def settle(self) -> int:
        """Wait (bounded) for the steady state: every replica running, exactly one holding the address and exactly
        it ready, every other one "standby" in its state file; that replica. A restarted replica's time from its
        start to "standby" is recorded on the way."""
        begun = time.monotonic()
        deadline = begun + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            states = {i: self.state(i) for i in self.processes}
            for i, started in list(self.started.items()):
                if states[i][0] == "standby":
                    self.to_standby.append(states[i][1] - started)
                    del self.started[i]
            holders = self.lab.holders()
            if (len(holders) == 1 and all(p.poll() is None for p in self.processes.values())
                    and all(state == ("active" if i == holders[0] else "standby") for i, (state, _) in states.items())
                    and self.ready() == holders):
                self.settle_waits.append(time.monotonic() - begun)
                return holders[0]
            time.sleep(0.02)
        raise BenchError(f"no steady state within {SETTLE_TIMEOUT:g} s (holders {self.lab.holders()}, ready "
                         f"{self.ready()}, states {[self.state(i)[0] for i in self.processes]})\n{self.logs()}")

    def first_landing(self, t0: float, exclude: int | None) -> tuple[float, int, float] | None:
        """The first connection after t0 that lands outside from EGRESS_SOURCE through a ready replica other than
        `exclude`: (seconds from t0, through which pod, when it was started); None within GIVE_UP."""
        while (now := time.monotonic()) - t0 < GIVE_UP:
            # a SIGTERMed router answers for a few ms more (no takeover), and its admin port may hang while it
            # stops (each poll of it would cost the client READY_TIMEOUT): the client leaves it out
            for i in self.ready(exclude):
                began = time.monotonic()
                try:
                    if self.lab.connect(i, timeout=CONNECT_TIMEOUT) == SOURCE:
                        return time.monotonic() - t0, i, began
                except OSError:
                    pass
            time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - now)))
        return None

    def takeover(self, fault: str, act: Callable[[], object], active: int) -> Trial:
        marks = self.marks()
        t0 = time.monotonic()
        act()
        landed = self.first_landing(t0, None if fault == "link" else active)
        if landed is None:
            return Trial(fault, None, None, f"no connection landed within {GIVE_UP:g} s; holders "
                         f"{self.lab.holders()}, ready {self.ready()}; logged: {self.ha_lines(marks)}")
        seconds, via, began = landed
        before = self.neighbour.at(began)
        detail = f"via pod{via}" + (" (the same replica: no takeover)" if via == active else "")
        detail += "" if before == macvlan_mac(via) else f" (gateway on {before} then)"
        if fault == "link":
            detail += f"; logged: {self.ha_lines(marks)}"
        return Trial(fault, seconds, before == macvlan_mac(via), detail, same=via == active)

    def split(self) -> Trial:
        """Cut every replica's heartbeat path: the longest stretch with two or more holders."""
        marks = self.marks()
        t0 = time.monotonic()
        for i in range(self.lab.replicas):
            self.lab.cut_heartbeat(i)
        longest, since, seen_two, single_since = 0.0, None, False, None
        while time.monotonic() - t0 < SPLIT_WATCH:
            now = time.monotonic()
            many = len(self.lab.holders()) >= 2
            if many:
                seen_two, single_since = True, None
                since = now if since is None else since
                longest = max(longest, now - since)
            else:
                if since is not None:
                    longest = max(longest, now - since)
                since = None
                single_since = now if single_since is None else single_since
                if seen_two and now - single_since > 1.0:
                    break
            time.sleep(max(0.0, HOLDERS_EVERY - (time.monotonic() - now)))
        unresolved = since is not None
        gave_way = [i for i in self.processes if "giving way" in self.since(i, marks)]
        healed = time.monotonic()
        for i in range(self.lab.replicas):
            self.lab.heal_heartbeat(i)
        back = None
        while time.monotonic() - healed < GIVE_UP:  # a replica that gave way waits for the heartbeats
            if all("a standby again" in self.since(i, marks) for i in gave_way):
                back = time.monotonic() - healed
                break
            time.sleep(HOLDERS_EVERY)
        if unresolved:
            return Trial("split", None, None, f"still {self.lab.holders()} after {SPLIT_WATCH:g} s; "
                         f"logged: {self.ha_lines(marks)}")
        detail = "two holders seen" if seen_two else "never two holders"
        if longest > TARGETS["split"]:
            detail += f"; logged: {self.ha_lines(marks)}"
        detail += f"; back to standby {secs(back)} after the heal" + (
            "" if back is not None else f"; logged: {self.ha_lines(marks)}")
        return Trial("split", longest, None, detail, back=back)

    def watch_return(self, seconds: float) -> int:
        """Changes of the holders in the `seconds` after the returned replica settled (nopreempt: none expected)."""
        holder = self.settle()  # the returned replica's leftover address gone, one holder left
        marks = self.marks()
        flaps, last = 0, [holder]
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # a watch window: whatever moves in it is counted
            now = self.lab.holders()
            if now != last:
                flaps += 1
                last = now
            time.sleep(HOLDERS_EVERY)
        if flaps:
            self.flap_logs.append(self.ha_lines(marks))
        return flaps


def run_lab(replicas: int, trials: int, return_watch: float, deadline: Deadline) -> Results:
    results = Results(replicas)
    lab = HaLab(replicas)
    with lab, tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        lab.serve_outside()
        neighbour = Neighbour(lab)
        neighbour.start()
        bench = Bench(lab, Path(tmp), neighbour)
        for i in range(replicas):
            bench.start(i)
        if lab.connect(bench.settle(), timeout=2.0) != SOURCE:  # the gateway has an entry for the address now
            raise BenchError(f"the first connection did not come from {SOURCE}")
        for index in range(trials):
            if deadline.passed():
                results.notes.append(f"stopped after {index} of {trials} rounds (the time bound)")
                break
            for fault in rotating_order(index, FAULTS):
                active = bench.settle()
                if fault == "kill":
                    results.trials.append(bench.takeover(fault, lambda: lab.kill_pod(active), active))  # noqa: B023
                    bench.start(active)
                    results.flaps.append(bench.watch_return(return_watch))
                elif fault == "term":
                    process = bench.processes[active]
                    results.trials.append(bench.takeover(fault, process.terminate, active))
                    process.wait(timeout=10)
                    bench.start(active)
                elif fault == "link":
                    results.trials.append(bench.takeover(fault, lambda: lab.egress_link(active, False),  # noqa: B023
                                                         active))
                    lab.egress_link(active, True)
                else:
                    results.trials.append(bench.split())
                last = results.trials[-1]
                print(f"  {replicas} replicas, round {index + 1}, {fault}: {secs(last.seconds)} "
                      f"{last.detail}{'' if last.neighbour_ok is None else f', neighbour ok {last.neighbour_ok}'}",
                      flush=True)
        bench.settle()
        neighbour.stop()
        results.to_standby, results.settle_waits = bench.to_standby, bench.settle_waits
        results.notes += [f"{replicas} replicas, a flap after a return; logged: {line}" for line in bench.flap_logs]
    return results


def reference_runs(trials: int, deadline: Deadline) -> list[float]:
    """egress-router init (no EGRESS_HA_PEERS) in a fresh pod namespace: process start to exit 0."""
    seconds = []
    for _ in range(trials):
        if deadline.passed():
            break
        lab = HaLab(2)
        with lab:
            env = lab.router_env(0, EGRESS_ROUTER_MODE="init")
            del env["EGRESS_HA_PEERS"]
            del env["EGRESS_METRICS_PORT"]
            run = timed_run(in_namespace(lab, lab.pod(0), router_command()), env, timeout=30)
            if not run.ok:
                raise BenchError(f"init in a fresh pod failed: {run.describe()}")
            if lab.holders() != [0]:
                raise BenchError(f"init ran but pod0 does not hold {SOURCE}")
            seconds.append(run.seconds)
    return seconds


def rows(all_results: Sequence[Results]) -> list[list[str]]:
    table = []
    for results in all_results:
        for fault in FAULTS:
            trials = results.of(fault)
            figures = [t.seconds for t in trials if t.seconds is not None]
            failed = len(trials) - len(figures)
            neighbour = [t.neighbour_ok for t in trials if t.neighbour_ok is not None]
            target = TARGETS[fault]
            if fault == "split":
                met = "met" if figures and not failed and max(figures) <= target else "NOT MET"
                goal = f"max <= {secs(target)}"
            else:
                met = "met" if figures and not failed and p95(figures) <= target else "NOT MET"
                goal = f"p95 <= {secs(target)}"
            stats = ([secs(min(figures)), secs(statistics.median(figures)), secs(p95(figures)), secs(max(figures))]
                     if figures else ["-"] * 4)
            same = sum(t.same for t in trials)
            if same:
                met += f" ({same}/{len(trials)} without a takeover)"
            table.append([str(results.replicas), WHAT[fault], f"{len(figures)}/{len(trials)}", *stats, goal, met,
                          f"{sum(neighbour)}/{len(neighbour)}" if neighbour else "-"])
            if fault == "split":
                backs = [t.back for t in trials if t.back is not None]
                table.append([str(results.replicas), "  after the heal: the one that gave way a standby again",
                              f"{len(backs)}/{len(trials)}",
                              *([secs(min(backs)), secs(statistics.median(backs)), secs(p95(backs)), secs(max(backs))]
                                if backs else ["-"] * 4), "-", "-", "-"])
        flaps = sum(results.flaps)
        table.append([str(results.replicas), "old active returns: flaps", f"{len(results.flaps)}", *["-"] * 4,
                      "0", "met" if results.flaps and flaps == 0 else "NOT MET", str(flaps)])
    return table


def distribution(samples: Sequence[float]) -> str:
    if not samples:
        return "none"
    return (f"median {secs(statistics.median(samples))}, p95 {secs(p95(samples))}, max {secs(max(samples))} "
            f"(n={len(samples)})")


def steady_lines(all_results: Sequence[Results]) -> list[str]:
    """What every trial started from, and how long a restarted replica took to be able to take over."""
    lines = ["Every trial started from the steady state: every replica running, exactly one holding the address "
             "and ready, every other one's state file \"standby\" (its keepalived in BACKUP)."]
    for r in all_results:
        lines.append(f"{r.replicas} replicas: waited for it {distribution(r.settle_waits)}; a restarted replica "
                     f"from its start to \"standby\" {distribution(r.to_standby)}")
    return lines


HEADERS = ["replicas", "fault", "n ok/trials", "min", "median", "p95", "max", "target", "", "neighbour ok / flaps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per fault and replica count (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 trials, 1 s return watch: a smoke test")
    parser.add_argument("--return-watch", type=float, default=5.0, help="seconds a returned replica is watched")
    parser.add_argument("--max-seconds", type=float, default=540.0, help="stop starting rounds after this")
    parser.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--mode", choices=MODES, default="legacy",
                        help="the replicas' mode: legacy (redirect rules) or dns-proxy (a proxy under its keeper)")
    args = parser.parse_args()
    global mode
    mode = args.mode
    require_root()
    if shutil.which("keepalived") is None:
        sys.exit("keepalived not found: apt-get install keepalived (the replicas' election)")
    trials = 3 if args.quick else args.trials
    watch = 1.0 if args.quick else args.return_watch
    info = machine_info()
    warning = busy_warning(info)
    if warning:
        print(warning)
    print("\n".join(machine_lines(info)))
    deadline = Deadline(args.max_seconds)
    started = cpu_times()
    all_results = []
    for replicas in (2, 3):
        print(f"\n{replicas} replicas, {trials} round(s)", flush=True)
        all_results.append(run_lab(replicas, trials, watch, deadline))
    reference = reference_runs(trials, deadline)
    busy, steal = cpu_share_since(started)
    info["CPU during the run"] = f"{100 * busy:.0f}% busy, {100 * steal:.0f}% steal; load average at the end " \
                                 f"{load_average()}"
    table = rows(all_results)
    print("\n" + text_table(HEADERS, table))
    ref = (f"reference, init of a fresh router (n={len(reference)}): min {secs(min(reference))}, median "
           f"{secs(statistics.median(reference))}, p95 {secs(p95(reference))}, max {secs(max(reference))}; a real "
           "reschedule adds the node controller's detection (node-monitor-grace-period 40 s) and the eviction on "
           "top: a lower bound") if reference else "reference: not run (the time bound)"
    print(ref)
    steady = steady_lines(all_results)
    print("\n".join(steady))
    failures = [f"{r.replicas} replicas, {t.fault}: {t.detail}" for r in all_results for t in r.trials
                if t.seconds is None]
    notes = [note for r in all_results for note in r.notes]
    for line in failures + notes:
        print(line)
    print(f"CPU during the run: {info['CPU during the run']}")
    if not args.no_results:
        title = "" if mode == "legacy" else f", {mode} mode (--mode {mode})"
        body = [f"## failover.py: high availability{title}, from a fault to the first new connection ({info['date']})",
                "",
                *machine_lines(info), "", f"{trials} round(s) per replica count, the fault order rotating; "
                f"GIVE_UP {GIVE_UP:g} s, return watch {watch:g} s.", "", md_table(HEADERS, table), "", ref, "",
                *(f"- {line}" for line in steady)]
        if failures or notes:
            body += ["", "Trials without a figure and notes:", "", *(f"- {line}" for line in failures + notes)]
        write_results("failover" if mode == "legacy" else f"failover-{mode}", "\n".join(body))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "the labs are torn down")
