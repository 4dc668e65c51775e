#!/usr/bin/env python3
"""DNS proxy mode (TCP forwarding): egress-router's proxy vs haproxy configured as the legacy image did.

Run as root from the repository:  .venv/bin/python benchmarks/dns_proxy.py [--rounds N] [--quick]

Everything runs inside one namespace lab (egress_router.lab.Lab, documentation addresses only).
Init mode (EGRESS_ROUTER_MODE=dns-proxy, no EGRESS_DESTINATION) runs once and gives the router
192.0.2.99 on macvlan0 and its default route, so it reaches the dest namespace. There, on
203.0.113.10, nginx serves /1k (1,024 bytes, keep-alive) on port 80 and an iperf3 server listens on
5201. The proxy under test listens in the router namespace (198.51.100.1) on 8080 -> 203.0.113.10:80
and 5201 -> 203.0.113.10:5201; one proxy at a time holds the ports. The forwards name IP addresses,
so no DNS lookup is part of the measurement.

  ours     `egress-router` (container path), EGRESS_ROUTER_MODE=dns-proxy,
           EGRESS_DNS_PROXY_DESTINATION="8080 203.0.113.10 80\\n5201 203.0.113.10 5201",
           EGRESS_DNS_PROXY_WORKERS = the CPUs available (what `auto` picks)
  haproxy  `haproxy -db -f <temp>/haproxy.cfg`: mode tcp, a frontend/backend per port, timeouts
           connect 10s / client 60s / server 60s, maxconn 20000, nbthread = ours' worker count

Measured, in rounds that alternate the order of the two sides (medians over the rounds), on one
proxy life per side and round (after a short keep-alive warm-up):
  bulk 1 / bulk 4   iperf3 -c 198.51.100.1 -p 5201 -t 5 (-P 4): Gbit/s received
  keep-alive        wrk -c 64 GET /1k through 8080: requests/s
  latency           wrk -c 64 paced to --rate requests/s (Lua delay()): p50 and p99
  close             wrk with "Connection: close" (a new proxied connection per request): requests/s
  memory            RSS and PSS of all the proxy's processes, before and with 10,000 idle connections
CPU time of the proxy, the load tool and the backend (nginx or iperf3 server) is recorded per run
to name the bottleneck. Every process it starts is ended by pid; the lab always goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import string
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchlib import (
    BENCH,
    BenchError,
    Deadline,
    machine_lines,
    md_table,
    require_root,
    run_benchmark,
    text_table,
    write_results,
)
from proxybench import (
    HTTP_PROXY_DIR,
    CpuWatch,
    Managed,
    Measured,
    Origin,
    Proxy,
    QuietStarts,
    Results,
    alternate_rounds,
    bottleneck,
    client_get,
    common_arguments,
    describe_machine,
    end_facts,
    idle_memory,
    per_process_lines,
    prepare_lab,
    raise_fd_limit,
    ratio_digits,
    run_tool,
    scratch,
    tool_versions,
    wait_for_backends,
    wait_until_serving,
    wrk_error_notes,
    wrk_measured,
)

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, Lab, router_command

HERE = BENCH / "dns_proxy"
WRK_SCRIPT = HTTP_PROXY_DIR / "proxy.lua"  # shared: origin-form requests with WRK_TARGET=/1k
BACKEND_IP = DEST_IPS[0]
HTTP_PORT = 8080
IPERF_PORT = 5201
FORWARDS = ((HTTP_PORT, BACKEND_IP, 80), (IPERF_PORT, BACKEND_IP, IPERF_PORT))
DESTINATION = "\n".join(f"{port} {host} {remote}" for port, host, remote in FORWARDS)
CONNECTIONS = 64
SIDES = ("ours", "haproxy")


# ---------------------------------------------------------------- the proxies

class DnsProxy(Proxy):
    """A proxy under test with the worker count both sides get (ours' workers, haproxy's threads)."""

    def __init__(self, lab: Lab, tmp: Path, workers: int):
        super().__init__(lab, tmp)
        self.workers = workers


class Ours(DnsProxy):
    name = "ours"

    def start(self) -> None:
        self.lives += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
        # 10,000 idle connections must not sit at the default limit of 10,000 (haproxy: maxconn
        # 20000); no drain period on stop (it only shortens stopping)
        env.update(EGRESS_ROUTER_MODE="dns-proxy", EGRESS_DNS_PROXY_DESTINATION=DESTINATION,
                   EGRESS_DNS_PROXY_MAX_CONNECTIONS="16000", EGRESS_PROXY_GRACE_SECONDS="0",
                   # as many workers as haproxy gets threads (our default is one process)
                   EGRESS_DNS_PROXY_WORKERS=str(self.workers))
        self.proc = Managed(self.lab, "router", router_command(), self.tmp / f"ours-{self.lives}.out", env=env)


class Haproxy(DnsProxy):
    name = "haproxy"

    def start(self) -> None:
        self.lives += 1
        run = self.tmp / f"haproxy-{self.lives}"
        run.mkdir()
        sections = "\n".join(
            f"frontend f{port}\n    bind *:{port}\n    default_backend b{port}\n\n"
            f"backend b{port}\n    server s{port} {host}:{remote}\n"
            for port, host, remote in FORWARDS)
        conf = string.Template((HERE / "haproxy.cfg.in").read_text()).substitute(
            threads=self.workers, dir=run, sections=sections, maxconn=haproxy_maxconn())
        (run / "haproxy.cfg").write_text(conf)
        self.proc = Managed(self.lab, "router", ["haproxy", "-db", "-f", str(run / "haproxy.cfg")],
                            run / "haproxy.out")


HAPROXY_MAXCONN = 20000
HAPROXY_WANTS_FDS = 2 * HAPROXY_MAXCONN + 18  # haproxy 2.6's need for maxconn 20000 and 2 listeners


def haproxy_maxconn() -> int:
    """haproxy 2.6 exits ("FD limit too low for maxconn") if it cannot get the descriptors maxconn implies;
    where the hard limit forbids that (no CAP_SYS_RESOURCE), maxconn is lowered to what fits."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return min(HAPROXY_MAXCONN, (soft - 18) // 2)


# ---------------------------------------------------------------- checks

def wait_ready(lab: Lab, proxy: Proxy, expected: bytes, timeout: float = 30.0) -> float:
    def probe() -> str | None:
        status, body = client_get(lab, HTTP_PORT, "/1k", BACKEND_IP, timeout=2.0)
        return None if status == 200 and body == expected else f"status {status}, {len(body)} bytes"

    return wait_until_serving(proxy, probe, timeout)


# ---------------------------------------------------------------- the measurements

class ThreadCpuWatch(CpuWatch):
    """CpuWatch per thread: haproxy runs its nbthread threads in one process, ours one process per worker,
    so 'busiest' must be the busiest thread (a thread at one core is the limit either way)."""

    def _sample(self) -> dict[str, dict[int, int]]:
        sample: dict[str, dict[int, int]] = {}
        for name, pids in self.groups.items():
            sample[name] = {}
            for pid in pids():
                with contextlib.suppress(OSError):
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        with contextlib.suppress(OSError, IndexError), \
                                open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as handle:
                            rest = handle.read().rsplit(")", 1)[1].split()
                            sample[name][int(tid)] = int(rest[11]) + int(rest[12])
        return sample


class Bench:
    def __init__(self, lab: Lab, nginx: Origin, iperf: Managed, args: argparse.Namespace):
        self.lab = lab
        self.nginx = nginx
        self.iperf = iperf
        self.args = args
        self.ncpu = os.cpu_count() or 1
        self.quiet = QuietStarts(args.quiet_wait)

    def tool(self, argv: Sequence[str], env: Mapping[str, str] | None, timeout: float, proxy: Proxy | None,
             backend: Callable[[], list[int]], role: str = "client") -> tuple[str, dict[str, float]]:
        self.quiet.wait()
        groups: dict[str, Callable[[], list[int]]] = {"origin": backend}
        if proxy is not None:
            groups["proxy"] = proxy.pids
        return run_tool(self.lab, role, argv, env, timeout, ThreadCpuWatch(groups))

    def wrk(self, proxy: Proxy | None, seconds: float, *, close: bool = False, rate: float = 0,
            role: str = "client") -> Measured:
        env = dict(os.environ, WRK_TARGET="/1k", WRK_HOST=BACKEND_IP, WRK_CLOSE="1" if close else "0",
                   WRK_RATE=f"{rate:g}")
        where = f"http://{ROUTER_POD_IP}:{HTTP_PORT}" if proxy is not None else f"http://{BACKEND_IP}:80"
        argv = ["wrk", "-t", "1", "-c", str(CONNECTIONS), "-d", f"{seconds:g}s", "--timeout", "5s",
                "-s", str(WRK_SCRIPT), where]
        out, cpu = self.tool(argv, env, seconds + 60, proxy, self.nginx.workers, role)
        return wrk_measured(out, cpu)

    def iperf3(self, proxy: Proxy | None, streams: int, role: str = "client") -> Measured:
        host, port = (ROUTER_POD_IP, IPERF_PORT) if proxy is not None else (BACKEND_IP, IPERF_PORT)
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{self.args.iperf_seconds:g}", "-P", str(streams),
                "-J", "--connect-timeout", "5000"]
        out, cpu = self.tool(argv, None, self.args.iperf_seconds + 30, proxy, self.iperf.pids, role)
        try:
            result = json.loads(out[out.index("{"):out.rindex("}") + 1])
        except ValueError as exc:
            raise BenchError(f"iperf3 printed no JSON:\n{out[-1500:]}") from exc
        if "error" in result:
            raise BenchError(f"iperf3 through {proxy.name if proxy else 'nothing'}: {result['error']}")
        received = result["end"]["sum_received"]
        return Measured(received["bits_per_second"] / 1e9, cpu, {"bytes": received["bytes"],
                                                                  "retransmits": result["end"]["sum_sent"].get(
                                                                      "retransmits", 0)})

    def memory(self, proxy: Proxy, count: int) -> Measured:
        """RSS/PSS of the proxy's processes before and with `count` idle connections from the client
        (each is two sockets in the proxy: the client's and the backend's)."""
        extra = idle_memory(self.lab, proxy, HTTP_PORT, count, sockets_each=2, hold=50, connect_timeout=30)
        n = max(1, extra["connected"])
        extra["rss_per_conn"] = (extra["rss"] - extra["base_rss"]) / n
        extra["pss_per_conn"] = (extra["pss"] - extra["base_pss"]) / n
        return Measured(extra["rss_per_conn"], {}, extra)


# ---------------------------------------------------------------- rounds

def one_life(bench: Bench, proxy: Proxy, results: Results, expected: bytes) -> str:
    args = bench.args
    proxy.start()
    try:
        wait_ready(bench.lab, proxy, expected)
        results.workers[proxy.name] = len(proxy.pids())
        warm = bench.wrk(proxy, args.warmup)
        if warm.extra["requests"] == 0:
            raise BenchError(f"{proxy.name}: no request completed in the warm-up:\n{proxy.describe_failure()}")
        keep = bench.wrk(proxy, args.duration)
        results.add(proxy.name, "keepalive", keep)
        paced = bench.wrk(proxy, args.duration, rate=args.rate)
        paced.value = paced.extra["p99_us"] / 1000
        results.add(proxy.name, "latency", paced)
        bulk1 = bench.iperf3(proxy, 1)
        results.add(proxy.name, "bulk1", bulk1)
        bulk4 = bench.iperf3(proxy, 4)
        results.add(proxy.name, "bulk4", bulk4)
        close = bench.wrk(proxy, args.duration, close=True)
        results.add(proxy.name, "close", close)
        mem = bench.memory(proxy, args.idle)
        results.add(proxy.name, "memory", mem)
        if not proxy.proc or not proxy.proc.alive():
            raise BenchError(f"{proxy.name} died during the round:\n{proxy.describe_failure()}")
        return (f"bulk {bulk1.value:.2f}/{bulk4.value:.2f} Gbit/s, keep-alive {keep.value:.0f} req/s, "
                f"p50/p99 {paced.extra['p50_us'] / 1000:.2f}/{paced.extra['p99_us'] / 1000:.2f} ms at "
                f"{paced.extra['rate']:.0f}/s, close {close.value:.0f} conn/s, RSS "
                f"{mem.extra['base_rss'] / 1024:.1f} -> {mem.extra['rss'] / 1024:.1f} MiB with "
                f"{mem.extra['connected']} idle ({mem.extra['rss_per_conn']:.1f} KiB each)")
    finally:
        proxy.stop()


# ---------------------------------------------------------------- report

TARGETS = (  # (test, key, ratio bound, higher is better)
    ("bulk1", None, 1.0, True),
    ("bulk4", None, 1.0, True),
    ("keepalive", None, 0.8, True),
    ("close", None, 0.5, True),
    ("memory", "rss_per_conn", 2.0, False),
)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(results: Results, args: argparse.Namespace, sides: Sequence[str], ncpu: int) -> tuple[str, str, list[str]]:
    both = len(sides) == 2
    targets = {(t, k): (bound, higher) for t, k, bound, higher in TARGETS}
    verdicts = []

    def row(label: str, test: str, key: str | None = None, scale: float = 1.0, digits: int = 0) -> list[str]:
        ours, ref = results.median("ours", test, key), results.median("haproxy", test, key)
        ratio = ours / ref if both and ours is not None and ref else None
        goal, verdict = "", ""
        bound_of = targets[(test, key)][0] if (test, key) in targets else None
        if (test, key) in targets:
            bound, higher = targets[(test, key)]
            goal = f">= {bound:g}x" if higher else f"<= {bound:g}x"
            if ratio is not None:
                verdict = "MET" if (ratio >= bound if higher else ratio <= bound) else "NOT MET"
                verdicts.append(f"{label}: ours/haproxy {ratio:.{ratio_digits(ratio, bound)}f} ({goal}): {verdict}")
        return [label, fmt(ours and ours * scale, digits), fmt(ref and ref * scale, digits),
                fmt(ratio, ratio_digits(ratio, bound_of)), goal, verdict]

    rate = results.median("haproxy", "latency", "rate") or results.median("ours", "latency", "rate")
    rows = [
        row("bulk, 1 stream, Gbit/s (iperf3)", "bulk1", digits=2),
        row("bulk, 4 streams, Gbit/s (iperf3 -P 4)", "bulk4", digits=2),
        row(f"keep-alive, req/s ({CONNECTIONS} conns, GET 1 KiB)", "keepalive"),
        row("Connection: close, conn/s", "close"),
        row(f"p50 at ~{fmt(rate)} req/s, ms", "latency", "p50_us", 1e-3, 2),
        row(f"p99 at ~{fmt(rate)} req/s, ms", "latency", "p99_us", 1e-3, 2),
        row("memory per idle connection (RSS), KiB", "memory", "rss_per_conn", 1, 1),
        row("memory per idle connection (PSS), KiB", "memory", "pss_per_conn", 1, 1),
        row("RSS before the idle connections, MiB", "memory", "base_rss", 1 / 1024, 1),
        row(f"RSS with {args.idle:,} idle connections, MiB", "memory", "rss", 1 / 1024, 1),
        row("PSS before the idle connections, MiB", "memory", "base_pss", 1 / 1024, 1),
        row(f"PSS with {args.idle:,} idle connections, MiB", "memory", "pss", 1 / 1024, 1),
    ]
    headers = ["", "ours", "haproxy", "ours/haproxy", "target", ""]
    cpu_headers = ["test", "side", "proxy", "busiest proxy thread", "load tool", "backend", "softirq", "others",
                   "machine (all CPUs)", "bottleneck"]
    cpu_rows = []
    tools = {"keepalive": "wrk", "close": "wrk", "latency": "wrk", "bulk1": "iperf3 client",
             "bulk4": "iperf3 client"}
    for test in ("bulk1", "bulk4", "keepalive", "close", "latency"):
        for side in (*sides, "direct"):
            samples = results.samples.get((side, test))
            if not samples:
                continue
            med = {k: statistics.median(m.cpu.get(k, 0.0) for m in samples) for k in samples[0].cpu}
            neck = "- (paced)" if test == "latency" else bottleneck(med, tools[test], ncpu).replace(
                "origin (nginx worker", "backend (" + ("iperf3 server" if test.startswith("bulk") else "nginx worker")
            ).replace("a process at", "a thread at")
            cpu_rows.append([test, side if side != "direct" else "no proxy", fmt(med.get("proxy")) + "%",
                             fmt(med.get("proxy busiest")) + "%", fmt(med.get("tool")) + "%",
                             fmt(med.get("origin")) + "%", fmt(med.get("softirq")) + "%",
                             fmt(med.get("others")) + "%", fmt(med.get("machine")) + "%", neck])
    text = (text_table(headers, rows) + "\n\nCPU, medians, % of one core (machine: % of all CPUs)\n"
            + text_table(cpu_headers, cpu_rows))
    md = (md_table(headers, rows) + f"\n\nCPU during the runs (medians; % of one core; machine: % of all {ncpu} "
          "CPUs; 'others' is everything else on the machine):\n\n" + md_table(cpu_headers, cpu_rows))
    return text, md, verdicts


# ---------------------------------------------------------------- main

def check_tools() -> None:
    missing = [t for t in ("nsenter", "ip", "wrk", "nginx", "haproxy", "iperf3") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install haproxy iperf3 wrk nginx-light")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, sides=SIDES, rounds=3, duration=6.0, warmup=2.0, quiet_wait=10.0, max_seconds=900,
                     quick="1 round, 3 s runs: a smoke test")
    parser.add_argument("--iperf-seconds", type=float, default=5.0, help="seconds per iperf3 run (default 5)")
    parser.add_argument("--idle", type=int, default=0,
                        help="idle connections for the memory figure (default 10,000, or 9,000 where the "
                        "open files limit is below 21,000: haproxy holds two descriptors per connection "
                        "in one process)")
    parser.add_argument("--workers", type=int, help="ours' EGRESS_DNS_PROXY_WORKERS = haproxy's nbthread "
                        "(default: the CPUs available, what 'auto' picks)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.iperf_seconds, args.warmup = 1, 3.0, 3.0, 1.0
    args.rounds = max(1, min(args.rounds, 20))

    require_root()
    check_tools()
    sides = [args.only] if args.only else list(SIDES)
    began = time.monotonic()
    fd_limit = raise_fd_limit()
    if args.idle <= 0:
        args.idle = 10000 if fd_limit >= 21000 else 9000
    from egress_router.proxy.server import available_cpus

    workers = args.workers or available_cpus()  # ours' workers; haproxy gets as many threads
    extra = {"ours' workers (EGRESS_DNS_PROXY_WORKERS) = haproxy nbthread": str(workers)}
    if haproxy_maxconn() < HAPROXY_MAXCONN:
        extra["haproxy maxconn"] = (f"{haproxy_maxconn()}, not the legacy {HAPROXY_MAXCONN}: the open files hard "
                                    f"limit is {fd_limit}, haproxy 2.6 needs {HAPROXY_WANTS_FDS} for maxconn "
                                    f"{HAPROXY_MAXCONN} and refuses to start without them")
    info = describe_machine(fd_limit, tool_versions("haproxy", "iperf3", "nginx", "wrk"), extra)
    deadline = Deadline(args.max_seconds)
    results = Results()
    nginx: Origin | None = None
    iperf: Managed | None = None
    proxies: dict[str, Proxy] = {}
    with scratch("dns-proxy-") as tmp:
        try:
            with Lab() as lab:
                prepare_lab(lab, "dns-proxy")
                nginx = Origin(lab, tmp, 1, 1 << 20)
                iperf = Managed(lab, "dest", ["iperf3", "-s", "-B", BACKEND_IP, "-p", str(IPERF_PORT)],
                                tmp / "iperf3-server.out")
                bench = Bench(lab, nginx, iperf, args)
                wait_for_backends(lab, BACKEND_IP, [80, IPERF_PORT], [nginx.proc, iperf])
                if "ours" in sides:
                    proxies["ours"] = Ours(lab, tmp, workers)
                if "haproxy" in sides:
                    proxies["haproxy"] = Haproxy(lab, tmp, workers)
                print(f"\nlab {lab.suffix}: nginx (1 worker) on {BACKEND_IP}:80, iperf3 -s on {BACKEND_IP}:"
                      f"{IPERF_PORT}; proxies on {ROUTER_POD_IP}:{HTTP_PORT},{IPERF_PORT}")
                # the ceiling the lab allows: from the router namespace straight to the backends
                results.add("direct", "keepalive", bench.wrk(None, args.duration, role="router"))
                results.add("direct", "bulk1", bench.iperf3(None, 1, role="router"))
                results.add("direct", "bulk4", bench.iperf3(None, 4, role="router"))
                print(f"  direct from the router namespace: keep-alive {results.median('direct', 'keepalive'):,.0f} "
                      f"req/s, bulk {results.median('direct', 'bulk1'):.2f} / "
                      f"{results.median('direct', 'bulk4'):.2f} Gbit/s (1 / 4 streams)", flush=True)
                print(f"\n{args.rounds} round(s), alternating order")
                small = nginx.small
                alternate_rounds(args.rounds, sides, deadline, results.notes,
                                 lambda index, side: one_life(bench, proxies[side], results, small))
        finally:
            for proxy in proxies.values():
                proxy.stop()
            if iperf is not None:
                iperf.stop()
            if nginx is not None:
                nginx.stop()

    results.notes += wrk_error_notes(results, sides, ("keepalive", "close", "latency"))
    for side in sides:
        for m in results.samples.get((side, "memory"), []):
            e = m.extra
            if e["connected"] != args.idle or e["failed"] or e["alive"] != e["connected"] \
                    or e["sockets"] < 2 * e["connected"]:
                results.notes.append(f"{side} memory: {e['connected']} connected, {e['failed']} failed, "
                                     f"{e['sockets']} new sockets in the proxy, {e['alive']} still open at the end")
    quiet_note = bench.quiet.note()
    if quiet_note:
        results.notes.append(quiet_note)
    text, md, verdicts = report(results, args, sides, bench.ncpu)
    print("\n" + text + "\n")
    print("\n".join(verdicts))
    per_process = per_process_lines(
        results, sides, lambda side: f"{side} with idle connections ({results.workers.get(side, '?')} processes)")
    direct = (f"direct from the router namespace (no proxy): keep-alive "
              f"{results.median('direct', 'keepalive'):,.0f} req/s; bulk {results.median('direct', 'bulk1'):.2f} / "
              f"{results.median('direct', 'bulk4'):.2f} Gbit/s (1 / 4 streams)")
    print("\n".join(["", *per_process, direct, *results.notes]))
    end_facts(info, began)
    if not args.no_results:
        rounds = len(results.samples.get((sides[0], "keepalive"), []))
        lines = ["## dns_proxy.py: DNS proxy mode (TCP forwarding), ours vs haproxy (legacy image's config)", "",
                 *machine_lines(info), "",
                 f"{rounds} round(s), alternating order, medians; one proxy life per side and round, warmed up "
                 f"with {args.warmup:g} s of keep-alive traffic. iperf3 -t {args.iperf_seconds:g} (1 and 4 streams) "
                 f"through 5201; wrk -t1 -c{CONNECTIONS}, {args.duration:g} s runs, GET /1k through 8080; "
                 f"latency paced to ~{args.rate:g} req/s; memory: {args.idle:,} idle connections (each also "
                 f"opens a backend connection). Forwards to IP addresses: no DNS lookup is measured. Ours: "
                 f"EGRESS_DNS_PROXY_WORKERS={workers}, EGRESS_DNS_PROXY_MAX_CONNECTIONS=16000; "
                 f"haproxy: nbthread "
                 f"{workers}, maxconn {haproxy_maxconn()}. Lab sysctls: ip_local_port_range 1024-65000 "
                 f"(client, router), tcp_tw_reuse=1 (client).", "", md, "", *[f"- {v}" for v in verdicts],
                 *[f"- {line}" for line in per_process], f"- {direct}", *[f"- note: {n}" for n in results.notes]]
        write_results("dns_proxy", "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "processes stopped, lab torn down")
