#!/usr/bin/env python3
"""Legacy mode's /metrics with 10,000 conntrack entries: scrape time against the 50 ms target, beside what an
admin runs by hand today for the same facts.

Run as root from the repository:  .venv/bin/python benchmarks/scrape.py [--rounds N] [--rules 0,1000] [--quick]

One namespace lab per rule count. A legacy-mode router with EGRESS_METRICS_PORT=9253 and the rules
`53 udp A 5353`, `80 tcp A`, the fallback C, and 0, 1,000 and 10,000 more TCP rules (--rules). From the
client namespace, FLOWS UDP datagrams from distinct source ports go through the UDP rule to a socket in
the destination namespace that never reads, so every one leaves an unreplied conntrack entry in the
router's namespace (they expire by themselves after nf_conntrack_udp_timeout, 30 s; before each round
the flows are sent again if the count fell below FLOWS, outside the timed part). Then, in rounds whose
order rotates:

  ours       GET /metrics on the admin port from the client namespace: connect to the end of the body (the
             router reads both families' rule counters with iptables-save -c -t nat and the conntrack count
             and limit from /proc/sys/net/netfilter); each scrape is checked: status 200, the UDP rule's
             packets >= FLOWS, conntrack entries >= FLOWS
  reference  the same facts by hand in the router's namespace (as `kubectl exec` would run them there):
             `iptables -t nat -L -v -x -n` (every rule's packets and bytes), `wc -l < /proc/net/nf_conntrack`
             (the entries: conntrack -C needs conntrack-tools, which neither this machine nor the image has;
             the table is always there) and nf_conntrack_max;
             process start to exit, nsenter included
  rules-only the reference's first command alone (`iptables -t nat -L -v -x -n`): the part that does not
             list the conntrack table
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
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
from reload import Router

from egress_router.lab import CLIENT_IP, DEST_IPS, ROUTER_POD_IP, Lab

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


def start_router(lab: Lab, extra_rules: int, work: Path) -> Router:
    """The legacy-mode router with the admin port; its rules in a file: 10,000 rules are over the 128 KiB an
    environment string may have."""
    path = work / "destination"
    path.write_text(rules(extra_rules), encoding="utf-8")
    return Router(lab, str(path), EGRESS_METRICS_PORT=str(PORT))


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


@dataclass
class Measured:
    """One rule count's figures."""

    extra_rules: int
    times: dict[str, list[float]]
    reported: list[int]
    top_ups: int
    router_cpu: float
    response_bytes: int
    busy: float
    steal: float


def measure(extra_rules: int, rounds: int, deadline: Deadline) -> Measured:
    """A fresh lab and router with `extra_rules` more rules, FLOWS conntrack entries, then the rounds."""
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
            router = start_router(lab, extra_rules, Path(work))
            try:
                created = send_flows(lab, deadline)
                print(f"{3 + extra_rules:,} redirect rules: {FLOWS:,} UDP flows sent in {secs(created)}; "
                      f"{entries(lab):,} conntrack entries in the router's namespace; {rounds} rounds ...", flush=True)
                body = scrape(lab)[1]  # a first scrape: imports and caches warm, as on a pod scraped for a while
                cpu_before, machine = router.cpu_seconds(children=True), cpu_times()
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
                router_cpu = (router.cpu_seconds(children=True) - cpu_before) / max(1, len(times["ours"]))
            finally:
                router.stop()
    if not reported:
        raise BenchError("no round was measured (--max-seconds too short)")
    return Measured(extra_rules, times, reported, top_ups, router_cpu, len(body.encode()), busy, steal)


HEADERS = ["redirect rules", "ours: GET /metrics (median / p95 / max)", "reference: iptables -L -v -x -n + "
           "/proc/net/nf_conntrack", "rules-only: iptables -L -v -x -n", "ours/reference", "ours/rules-only",
           f"every scrape < {TARGET_SECONDS * 1000:g} ms", "router CPU per scrape", "response"]


def row(found: Measured) -> list[str]:
    stats = {who: Stats.of(found.times[who]) for who in CONTENDERS}

    def three(who: str) -> str:
        return f"{secs(stats[who].median)} / {secs(p95(found.times[who]))} / {secs(stats[who].high)}"

    ours = stats["ours"]
    return [f"{3 + found.extra_rules:,}", three("ours"), three("reference"), three("rules-only"),
            f"{ours.median / stats['reference'].median:.2f}", f"{ours.median / stats['rules-only'].median:.2f}",
            "MET" if ours.high < TARGET_SECONDS else "NOT MET", secs(found.router_cpu),
            f"{found.response_bytes / 1024:,.0f} KiB"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--rules", default="0,1000,10000", help="more TCP redirect rules besides the three, one "
                        "lab for each of these comma-separated counts (default 0,1000,10000)")
    parser.add_argument("--quick", action="store_true", help="10 rounds, no extra rules: a smoke test")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="bound on the whole run")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()
    require_root()
    check_tools(reference=False)
    rounds = 10 if args.quick else args.rounds
    counts = [0] if args.quick else [int(count) for count in args.rules.split(",")]
    deadline = Deadline(args.max_seconds)
    info = machine_info()
    warning = busy_warning(info)
    if warning:
        print(warning)
    measured = [measure(count, rounds, deadline) for count in counts]
    rows = [row(found) for found in measured]
    notes = [f"{3 + found.extra_rules:,} rules: conntrack entries the scrapes reported "
             f"{min(found.reported):,}-{max(found.reported):,}, flows sent again {found.top_ups} time(s); machine "
             f"during the rounds {found.busy:.0%} not idle, {found.steal:.1%} stolen" for found in measured]
    print()
    print(text_table(HEADERS, rows))
    print("\n".join(notes))
    body_md = "\n".join([
        "## scrape.py: legacy mode's /metrics with 10,000 conntrack entries", "",
        f"{rounds} rounds per rule count, the order of the three rotating; ours is one GET /metrics on the admin "
        "port from the client namespace (connect to the end of the body), the reference what an admin runs by "
        f"hand for the same facts in the router's namespace: `{REFERENCE}` (process start to exit, nsenter "
        f"included); rules-only its iptables command alone. {FLOWS:,} unreplied UDP flows through a redirect "
        "rule hold the conntrack entries. Figures: median / p95 / max; the ratios are of the medians; the "
        "router's CPU includes its iptables-save runs.", "",
        md_table(HEADERS, rows), "", *[f"- {line}" for line in notes], "", *machine_lines(info),
    ])
    if not args.no_results:
        write_results("scrape", body_md)
    return 0 if measured[0].times["ours"] and max(measured[0].times["ours"]) < TARGET_SECONDS else 1


if __name__ == "__main__":
    run_benchmark(main, "scrape benchmark")
