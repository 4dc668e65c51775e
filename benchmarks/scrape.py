#!/usr/bin/env python3
"""Legacy mode's /metrics with 10,000 conntrack entries: scrape time against the 50 ms target, beside what an
admin runs by hand today for the same facts.

Run as root from the repository:  .venv/bin/python benchmarks/scrape.py [--rounds N] [--quick]

One namespace lab. A legacy-mode router with EGRESS_METRICS_PORT=9253 and the rules `53 udp A 5353`,
`80 tcp A`, the fallback C (and --rules N more TCP rules). From the client namespace, FLOWS UDP datagrams
from distinct source ports go through the UDP rule to a socket in the destination namespace that never
reads, so every one leaves an unreplied conntrack entry in the router's namespace (they expire by
themselves after nf_conntrack_udp_timeout, 30 s; before each round the flows are sent again if the count
fell below FLOWS, outside the timed part). Then, in alternating rounds:

  ours       GET /metrics on the admin port from the client namespace: connect to the end of the body (the
             router reads both families' rule counters with iptables-save -c -t nat and the conntrack count
             and limit from /proc/sys/net/netfilter); each scrape is checked: status 200, the UDP rule's
             packets >= FLOWS, conntrack entries >= FLOWS
  reference  the same facts by hand in the router's namespace (as `kubectl exec` would run them there):
             `iptables -t nat -L -v -x -n` (every rule's packets and bytes), `wc -l < /proc/net/nf_conntrack`
             (the entries: conntrack -C is not in the legacy image, the table is) and nf_conntrack_max;
             process start to exit, nsenter included
  rules-only the reference's first command alone (`iptables -t nat -L -v -x -n`): the part that does not
             list the conntrack table
Rounds rotate the order of the three.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    BenchError,
    Deadline,
    Stats,
    busy_warning,
    check_tools,
    cpu_share_since,
    cpu_times,
    in_namespace,
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

from egress_router.lab import CLIENT_IP, DEST_IPS, ROUTER_POD_IP, Lab, router_command

A, B, C = DEST_IPS
PORT = 9253
FLOWS = 10_000
FIRST_SOURCE_PORT = 20_000
TARGET_SECONDS = 0.050
ROUNDS = 50
RULES_ONLY = "iptables -t nat -L -v -x -n"
REFERENCE = f"{RULES_ONLY}; wc -l < /proc/net/nf_conntrack; cat /proc/sys/net/netfilter/nf_conntrack_max"
CONTENDERS = ("ours", "reference", "rules-only")
UDP_PACKETS = re.compile(rf'^egress_router_redirect_packets_total\{{family="4",protocol="udp",port="53",'
                         rf'destination="{re.escape(A)}:5353"\}} (\d+)$', re.M)
ENTRIES = re.compile(r"^egress_router_conntrack_entries (\d+)$", re.M)


def rules(extra: int) -> str:
    filler = "".join(f"{20000 + i} tcp {B}\n" for i in range(extra))
    return f"53 udp {A} 5353\n80 tcp {A}\n{filler}{C}\n"


class Router:
    """The legacy-mode router in the lab's router namespace, ready when constructed."""

    def __init__(self, lab: Lab, extra_rules: int, work: Path):
        # in a file: 10,000 rules are over the 128 KiB an environment string may have
        path = work / "destination"
        path.write_text(rules(extra_rules), encoding="utf-8")
        env = lab.router_env("", mode="legacy", EGRESS_METRICS_PORT=str(PORT), EGRESS_DESTINATION_FILE=str(path))
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

    def cpu_seconds(self) -> float:
        """The router's CPU time and that of the children it waited for (its iptables-save runs)."""
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()  # our child, by its Popen handle
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def entries(lab: Lab) -> int:
    return int(lab.read_sysctl("router", "net.netfilter.nf_conntrack_count"))


def send_flows(lab: Lab, deadline: Deadline) -> float:
    """One datagram from each of FLOWS source ports through the UDP rule; seconds taken."""
    start = time.perf_counter()
    with lab.entered("client"):
        for port in range(FIRST_SOURCE_PORT, FIRST_SOURCE_PORT + FLOWS):
            if deadline.passed():
                raise BenchError("out of time while creating the conntrack entries")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((CLIENT_IP, port))
                sock.sendto(b"x", (ROUTER_POD_IP, 53))
    return time.perf_counter() - start


def scrape(lab: Lab) -> tuple[float, str]:
    """Seconds from connect to the end of the body, and the body."""
    with lab.entered("client"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(10)
        start = time.perf_counter()
        sock.connect((ROUTER_POD_IP, PORT))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(262144):
            data += chunk
        seconds = time.perf_counter() - start
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"the scrape failed: {head[:200]!r}")
    return seconds, body.decode()


def check_scrape(body: str) -> int:
    """The conntrack entries the scrape reported; it must show the flows in the rule's counter and the table."""
    packets, found = UDP_PACKETS.search(body), ENTRIES.search(body)
    if packets is None or found is None:
        raise BenchError("the scrape lacks the UDP rule's packets or the conntrack entries")
    if int(packets.group(1)) < FLOWS or int(found.group(1)) < FLOWS:
        raise BenchError(f"the scrape shows {packets.group(1)} packets and {found.group(1)} conntrack entries, "
                         f"fewer than the {FLOWS:,} flows sent")
    return int(found.group(1))


def reference(lab: Lab, command: str) -> float:
    run = timed_run(in_namespace(lab, "router", ["sh", "-c", command]), None, timeout=30)
    if not run.ok:
        raise BenchError(f"the reference failed: {run.describe()}")
    if "EGRESS-ROUTER-DNAT" not in run.stdout:
        raise BenchError("the reference's listing lacks the router's chain")
    if command == REFERENCE and int(run.stdout.strip().splitlines()[-2]) < FLOWS:
        raise BenchError(f"the reference counted fewer than {FLOWS:,} conntrack entries")
    return run.seconds


def p95(samples: list[float]) -> float:
    return statistics.quantiles(sorted(samples), n=20, method="inclusive")[-1] if len(samples) > 1 else samples[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--rules", type=int, default=0, help="more TCP redirect rules besides the three")
    parser.add_argument("--quick", action="store_true", help="10 rounds: a smoke test")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    require_root()
    check_tools(reference=False)
    rounds = 10 if args.quick else args.rounds
    deadline = Deadline(args.max_seconds)
    info = machine_info()
    warning = busy_warning(info)
    if warning:
        print(warning)
    times: dict[str, list[float]] = {who: [] for who in CONTENDERS}
    reported: list[int] = []
    top_ups = 0
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="egress-scrape-") as work:
        limit = int(lab.read_sysctl("router", "net.netfilter.nf_conntrack_max"))
        if limit < 2 * FLOWS:
            raise BenchError(f"nf_conntrack_max is {limit:,}: {FLOWS:,} entries would come close to it")
        with lab.entered("dest"):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never read: no replies, no ICMP errors
        with sink:
            sink.bind((A, 5353))
            router = Router(lab, args.rules, Path(work))
            try:
                created = send_flows(lab, deadline)
                print(f"{FLOWS:,} UDP flows sent in {secs(created)}; {entries(lab):,} conntrack entries in the "
                      f"router's namespace", flush=True)
                body = scrape(lab)[1]  # a first scrape: imports and caches warm, as on a pod scraped for a while
                cpu_before, machine = router.cpu_seconds(), cpu_times()
                for index in range(rounds):
                    if deadline.passed():
                        print(f"--max-seconds reached after {index} rounds")
                        break
                    if entries(lab) < FLOWS:
                        send_flows(lab, deadline)
                        top_ups += 1
                    for who in rotating_order(index, CONTENDERS):
                        if who == "ours":
                            seconds, body = scrape(lab)
                            reported.append(check_scrape(body))
                        else:
                            seconds = reference(lab, REFERENCE if who == "reference" else RULES_ONLY)
                        times[who].append(seconds)
                busy, steal = cpu_share_since(machine)
                router_cpu = (router.cpu_seconds() - cpu_before) / max(1, len(times["ours"]))
            finally:
                router.stop()
    stats = {who: Stats.of(times[who]) for who in CONTENDERS}
    ours, ref, alone = stats["ours"], stats["reference"], stats["rules-only"]
    met = "MET" if max(times["ours"]) < TARGET_SECONDS else "NOT MET"
    headers = ["", "ours: GET /metrics", "reference: iptables -L -v -x -n + /proc/net/nf_conntrack",
               "rules-only: iptables -L -v -x -n"]
    rows = [["runs", *(str(stats[who].n) for who in CONTENDERS)],
            ["median", *(secs(stats[who].median) for who in CONTENDERS)],
            ["p95", *(secs(p95(times[who])) for who in CONTENDERS)],
            ["max", *(secs(stats[who].high) for who in CONTENDERS)],
            ["min", *(secs(stats[who].low) for who in CONTENDERS)]]
    summary = [
        f"ours/reference (medians): {ours.median / ref.median:.2f}; ours/rules-only: {ours.median / alone.median:.2f}",
        f"target: every scrape under {secs(TARGET_SECONDS)} with {FLOWS:,} conntrack entries: {met} "
        f"(max {secs(ours.high)})",
        f"conntrack entries the scrapes reported: {min(reported):,}-{max(reported):,}; flows sent again "
        f"{top_ups} time(s) (entries expire after 30 s)",
        f"the router's CPU per scrape (its iptables-save runs included): {secs(router_cpu)}",
        f"response size: {len(body.encode()):,} bytes; NAT rules: {3 + args.rules} redirect + 1 SNAT",
        f"machine during the rounds: {busy:.0%} not idle, {steal:.1%} stolen",
    ]
    print()
    print(text_table(headers, rows))
    print("\n".join(summary))
    body_md = "\n".join([
        "## scrape.py: legacy mode's /metrics with 10,000 conntrack entries", "",
        f"{rounds} rounds, the order of the three rotating; ours is one GET /metrics on the admin port from the "
        "client namespace (connect to the end of the body), the reference what an admin runs by hand for the same "
        f"facts in the router's namespace: `{REFERENCE}` (process start to exit, nsenter included). "
        f"{FLOWS:,} unreplied UDP flows through a redirect rule hold the conntrack entries. rules-only: the "
        "reference's iptables command alone.", "",
        md_table(headers, rows), "", *[f"- {line}" for line in summary], "", *machine_lines(info),
    ])
    if not args.no_results:
        write_results("scrape", body_md)
    return 0 if met == "MET" else 1


if __name__ == "__main__":
    run_benchmark(main, "scrape benchmark")
