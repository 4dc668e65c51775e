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
           EGRESS_DNS_PROXY_DESTINATION="8080 203.0.113.10 80\\n5201 203.0.113.10 5201"
  haproxy  `haproxy -db -f <temp>/haproxy.cfg`: mode tcp, a frontend/backend per port, timeouts
           connect 10s / client 60s / server 60s, maxconn 20000

Two comparisons, as issue 16 asks, in the same run (--compare one|defaults|both, default both):
  one       one process of ours (EGRESS_DNS_PROXY_WORKERS=1) against haproxy `nbthread 1`
            (--workers N: N workers against nbthread N)
  defaults  both at their defaults: ours without EGRESS_DNS_PROXY_WORKERS (the proxy picks its own
            count), haproxy without an nbthread line (haproxy 2.6: one thread per CPU it may run on);
            the processes and threads each side ran are printed
Each comparison's figures are printed with MET / NOT MET against the issue's bounds (keep-alive
>= 1.0x haproxy, close >= 0.8x, memory per idle connection <= 1x, p99 at 2,000 req/s <= 1x) and the
CPU each side used. Run time: about 4.5 minutes per comparison at 3 rounds (both: about 9; a
--baseline adds half again).

Measured, in rounds that alternate the order of the sides (ours, baseline, haproxy; reversed every
other round, the two comparisons one after the other in the same order), medians over the rounds,
on one proxy life per side, comparison and round (after a short keep-alive warm-up):
  bulk 1 / bulk 4   iperf3 -c 198.51.100.1 -p 5201 -t 5 (-P 4): Gbit/s received
  keep-alive        wrk -c 64 GET /1k through 8080: requests/s
  latency           wrk -c 64 paced to --rate requests/s (Lua delay()): p50 and p99
  close             wrk with "Connection: close" (a new proxied connection per request): requests/s
  memory            RSS and PSS of all the proxy's processes, before and with 10,000 idle connections
CPU time of the proxy, the load tool and the backend (nginx or iperf3 server) is recorded per run
to name the bottleneck. Every process it starts is ended by pid; the lab always goes.

With --floor, a side named floor runs in the same rounds: benchmarks/reference/floor_relay.c (built
here with cc), the relay design of egress_router/proxy/dns_conn.py in C without any of its policy (no
limits, timeouts, counters or logs): the floor a relay of that design pays, what a compiled engine of
ours could at best reach. Its workers are ours' count in each comparison (the defaults: the CPUs this
process may use). Each table gains floor and floor/haproxy; the verdicts stay ours'.

With --baseline TREE, a third side, baseline (TREE's .venv/bin/egress-router: TREE's interpreter and
code, ours' settings in each comparison), runs in the same rounds; each comparison's table gains
baseline and ours/baseline, and an A/B table gives each side's IQR and min-max and the per-round
ratios. With --only ours, that is ours and baseline alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchlib import (
    BASELINE_HELP,
    BENCH,
    Baseline,
    BenchError,
    Deadline,
    load_baseline,
    machine_lines,
    require_root,
    run_benchmark,
    write_results,
)
from dns_report import CONNECTIONS, report
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
    client_get,
    common_arguments,
    describe_machine,
    end_facts,
    idle_memory,
    per_process_lines,
    per_unit,
    prepare_lab,
    raise_fd_limit,
    run_tool,
    scratch,
    thread_count,
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
SIDES = ("ours", "haproxy")
COMPARISONS = ("one", "defaults")


# ---------------------------------------------------------------- the proxies

class DnsProxy(Proxy):
    """A proxy under test with its worker count (ours' workers, haproxy's threads); None: its default."""

    def __init__(self, lab: Lab, tmp: Path, workers: int | None):
        super().__init__(lab, tmp)
        self.workers = workers


class Ours(DnsProxy):
    name = "ours"

    def command(self) -> list[str]:
        return router_command()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
        # 10,000 idle connections must not sit at the default limit of 10,000 (haproxy: maxconn
        # 20000); no drain period on stop (it only shortens stopping)
        env.update(EGRESS_ROUTER_MODE="dns-proxy", EGRESS_DNS_PROXY_DESTINATION=DESTINATION,
                   EGRESS_DNS_PROXY_MAX_CONNECTIONS="16000", EGRESS_PROXY_GRACE_SECONDS="0")
        if self.workers is not None:
            env["EGRESS_DNS_PROXY_WORKERS"] = str(self.workers)
        return env

    def start(self) -> None:
        self.lives += 1
        self.proc = Managed(self.lab, "router", self.command(), self.tmp / f"{self.name}-{self.lives}.out",
                            env=self.env())


class BaselineOurs(Ours):
    """Ours as another checkout has it (--baseline TREE): TREE's console script, interpreter and code."""

    name = "baseline"

    def __init__(self, lab: Lab, tmp: Path, workers: int | None, baseline: Baseline):
        super().__init__(lab, tmp, workers)
        self.baseline = baseline

    def command(self) -> list[str]:
        return self.baseline.command()

    def env(self) -> dict[str, str]:
        return self.baseline.env(super().env())


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
        # no nbthread line at all for haproxy's own default (one thread per CPU it may run on)
        threads = f"nbthread {self.workers}" if self.workers is not None else "# nbthread: haproxy's default"
        conf = string.Template((HERE / "haproxy.cfg.in").read_text()).substitute(
            threads=threads, dir=run, sections=sections, maxconn=haproxy_maxconn())
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


class Floor(DnsProxy):
    """benchmarks/reference/floor_relay.c, built once per run (see --floor)."""

    name = "floor"
    source = BENCH / "reference" / "floor_relay.c"

    def __init__(self, lab: Lab, tmp: Path, workers: int | None, binary: Path):
        super().__init__(lab, tmp, workers)
        self.binary = binary

    @classmethod
    def build(cls, tmp: Path) -> Path:
        binary = tmp / "floor_relay"
        done = subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(cls.source)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"building {cls.source.name} failed:\n{done.stderr.strip()}")
        return binary

    def start(self) -> None:
        from egress_router.proxy.server import available_cpus

        self.lives += 1
        workers = self.workers if self.workers is not None else available_cpus()
        forwards = [f"0.0.0.0:{port}={host}:{remote}" for port, host, remote in FORWARDS]
        self.proc = Managed(self.lab, "router", [str(self.binary), "-w", str(workers), *forwards],
                            self.tmp / f"floor-{self.lives}.out")


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
        user_us, sys_us = per_unit(cpu, cpu.get("wall", 0.0), received["bytes"] / 1e6)  # per MB
        return Measured(received["bits_per_second"] / 1e9, cpu, {"bytes": received["bytes"], "user_us": user_us,
                                                                  "sys_us": sys_us,
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
        warm = bench.wrk(proxy, args.warmup)
        if warm.extra["requests"] == 0:
            raise BenchError(f"{proxy.name}: no request completed in the warm-up:\n{proxy.describe_failure()}")
        # after the warm-up: every worker has started and served by now
        results.workers[proxy.name] = len(proxy.pids())
        results.threads[proxy.name] = thread_count(proxy.pids())
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


# ---------------------------------------------------------------- main

def check_tools(floor: bool) -> None:
    missing = [t for t in ("nsenter", "ip", "wrk", "nginx", "haproxy", "iperf3") if not shutil.which(t)]
    if floor and not shutil.which("cc"):
        missing.append("cc")
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install haproxy iperf3 wrk nginx-light")


def life_seconds(args: argparse.Namespace) -> float:
    """About how long one proxy life takes: the warm-up, three wrk runs, two iperf3 runs, the memory sample
    (10,000 connections opened, settled, checked: ~8 s) and the start and stop (~4 s)."""
    return float(args.warmup + 3 * args.duration + 2 * (args.iperf_seconds + 0.5) + 12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, sides=SIDES, rounds=3, duration=6.0, warmup=2.0, quiet_wait=10.0, max_seconds=2400,
                     quick="1 round, 3 s runs: a smoke test (both comparisons: about 2 minutes)")
    parser.add_argument("--iperf-seconds", type=float, default=5.0, help="seconds per iperf3 run (default 5)")
    parser.add_argument("--idle", type=int, default=0,
                        help="idle connections for the memory figure (default 10,000, or 9,000 where the "
                        "open files limit is below 21,000: haproxy holds two descriptors per connection "
                        "in one process)")
    parser.add_argument("--compare", choices=(*COMPARISONS, "both"), default="both",
                        help="one: one process of ours against haproxy nbthread 1; defaults: both at their "
                        "defaults; both (default): the two in the same rounds")
    parser.add_argument("--workers", type=int, default=1, help="the 'one' comparison with N workers of ours "
                        "(EGRESS_DNS_PROXY_WORKERS=N) against haproxy nbthread N (default 1)")
    parser.add_argument("--baseline", metavar="TREE", type=Path, help=BASELINE_HELP)
    parser.add_argument("--floor", action="store_true", help="a third side: benchmarks/reference/floor_relay.c, "
                        "ours' relay design in C without its policy (built with cc; see above)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.iperf_seconds, args.warmup = 1, 3.0, 3.0, 1.0
    args.rounds = max(1, min(args.rounds, 20))
    args.workers = max(1, args.workers)

    require_root()
    check_tools(args.floor)
    sides = [args.only] if args.only else list(SIDES)
    baseline = load_baseline(args.baseline)
    if baseline is not None:
        sides.insert(sides.index("ours") + 1 if "ours" in sides else 0, "baseline")
    if args.floor:
        sides.append("floor")
    comparisons = list(COMPARISONS) if args.compare == "both" else [args.compare]
    counts: dict[str, int | None] = {"one": args.workers, "defaults": None}
    n = args.workers
    titles = {"one": "one process of ours against haproxy nbthread 1" if n == 1 else
              f"{n} workers of ours against haproxy nbthread {n}",
              "defaults": "both at their defaults (ours: EGRESS_DNS_PROXY_WORKERS unset; haproxy: no nbthread)"}
    began = time.monotonic()
    fd_limit = raise_fd_limit()
    if args.idle <= 0:
        args.idle = 10000 if fd_limit >= 21000 else 9000
    from egress_router.proxy.server import available_cpus

    extra = {"comparisons": "; ".join(titles[c] for c in comparisons),
             "CPUs this process may use (what ours' auto counts from)": str(available_cpus())}
    if baseline is not None:
        extra["baseline"] = baseline.facts
    if haproxy_maxconn() < HAPROXY_MAXCONN:
        extra["haproxy maxconn"] = (f"{haproxy_maxconn()}, not the legacy {HAPROXY_MAXCONN}: the open files hard "
                                    f"limit is {fd_limit}, haproxy 2.6 needs {HAPROXY_WANTS_FDS} for maxconn "
                                    f"{HAPROXY_MAXCONN} and refuses to start without them")
    info = describe_machine(fd_limit, tool_versions("haproxy", "iperf3", "nginx", "wrk"), extra)
    lives = args.rounds * len(comparisons) * len(sides)
    print(f"{lives} proxy lives: about {lives * life_seconds(args) / 60:.0f} minutes")
    deadline = Deadline(args.max_seconds)
    results = {c: Results() for c in comparisons}
    notes: list[str] = []
    nginx: Origin | None = None
    iperf: Managed | None = None
    proxies: dict[str, Proxy] = {}
    with scratch("dns-proxy-") as tmp:
        floor = Floor.build(tmp) if args.floor else None
        try:
            with Lab() as lab:
                prepare_lab(lab, "dns-proxy")
                nginx = Origin(lab, tmp, 1, 1 << 20)
                iperf = Managed(lab, "dest", ["iperf3", "-s", "-B", BACKEND_IP, "-p", str(IPERF_PORT)],
                                tmp / "iperf3-server.out")
                bench = Bench(lab, nginx, iperf, args)
                wait_for_backends(lab, BACKEND_IP, [80, IPERF_PORT], [nginx.proc, iperf])
                for c in comparisons:
                    (tmp / c).mkdir()  # each comparison's proxies keep their logs and configs apart
                    for side in sides:
                        proxies[f"{c}/{side}"] = make_proxy(side, lab, tmp / c, counts[c], baseline, floor)
                print(f"\nlab {lab.suffix}: nginx (1 worker) on {BACKEND_IP}:80, iperf3 -s on {BACKEND_IP}:"
                      f"{IPERF_PORT}; proxies on {ROUTER_POD_IP}:{HTTP_PORT},{IPERF_PORT}")
                # the ceiling the lab allows: from the router namespace straight to the backends
                direct = {"keepalive": bench.wrk(None, args.duration, role="router"),
                          "bulk1": bench.iperf3(None, 1, role="router"), "bulk4": bench.iperf3(None, 4, role="router")}
                for c in comparisons:
                    for test, measured in direct.items():
                        results[c].add("direct", test, measured)
                print(f"  direct from the router namespace: keep-alive {direct['keepalive'].value:,.0f} req/s, bulk "
                      f"{direct['bulk1'].value:.2f} / {direct['bulk4'].value:.2f} Gbit/s (1 / 4 streams)", flush=True)
                print(f"\n{args.rounds} round(s), alternating order: " + ", ".join(proxies))
                small = nginx.small

                def life(index: int, entry: str) -> str:
                    return one_life(bench, proxies[entry], results[entry.split("/")[0]], small)

                alternate_rounds(args.rounds, list(proxies), deadline, notes, life)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            if iperf is not None:
                iperf.stop()
            if nginx is not None:
                nginx.stop()

    quiet_note = bench.quiet.note()
    notes += [quiet_note] if quiet_note else []
    every: list[str] = []
    sections: dict[str, list[str]] = {}
    for c in comparisons:
        sections[c], verdicts = comparison_report(results[c], args, sides, bench.ncpu, titles[c], notes,
                                                   defaults=c == "defaults")
        every += verdicts
    print("\nTargets (issue 16; bulk: this benchmark's own bound):\n" + "\n".join(every))
    end_facts(info, began)
    if not args.no_results:
        for c in comparisons:
            heading = ("## dns_proxy.py: DNS proxy mode (TCP forwarding), ours vs haproxy (legacy image's config)"
                       if c == "one" else "## dns_proxy.py --compare defaults: DNS proxy mode, both at their defaults")
            write_results("dns_proxy" if c == "one" else "dns_proxy_defaults",
                          "\n".join([heading, "", *machine_lines(info), "", *sections[c]]))
    return 0


def make_proxy(side: str, lab: Lab, tmp: Path, workers: int | None, baseline: Baseline | None,
               floor: Path | None) -> Proxy:
    if side == "haproxy":
        return Haproxy(lab, tmp, workers)
    if side == "floor":
        assert floor is not None
        return Floor(lab, tmp, workers, floor)
    if side == "baseline":
        assert baseline is not None
        return BaselineOurs(lab, tmp, workers, baseline)
    return Ours(lab, tmp, workers)


def comparison_report(results: Results, args: argparse.Namespace, sides: Sequence[str], ncpu: int, title: str,
                      notes: Sequence[str], defaults: bool) -> tuple[list[str], list[str]]:
    """Print one comparison's tables and notes; return its RESULTS.md lines and its verdicts."""
    results.notes += wrk_error_notes(results, sides, ("keepalive", "close", "latency"))
    for side in sides:
        for m in results.samples.get((side, "memory"), []):
            e = m.extra
            if e["connected"] != args.idle or e["failed"] or e["alive"] != e["connected"] \
                    or e["sockets"] < 2 * e["connected"]:
                results.notes.append(f"{side} memory: {e['connected']} connected, {e['failed']} failed, "
                                     f"{e['sockets']} new sockets in the proxy, {e['alive']} still open at the end")
    short = "defaults" if defaults else ("one process" if args.workers == 1 else f"{args.workers} workers")
    text, md, verdicts = report(results, args, sides, ncpu, f"[{short}]")
    print(f"\n=== {title}\n\n{text}\n\n" + "\n".join(verdicts))
    per_process = per_process_lines(
        results, sides, lambda side: f"{side} with idle connections ({results.workers.get(side, '?')} processes)")
    direct = (f"direct from the router namespace (no proxy): keep-alive "
              f"{results.median('direct', 'keepalive'):,.0f} req/s; bulk {results.median('direct', 'bulk1'):.2f} / "
              f"{results.median('direct', 'bulk4'):.2f} Gbit/s (1 / 4 streams)")
    all_notes = [*results.notes, *notes]
    print("\n".join(["", *per_process, direct, *all_notes]))
    rounds = len(results.samples.get((sides[0], "keepalive"), []))
    workers = {"ours": "EGRESS_DNS_PROXY_WORKERS unset (its default)", "haproxy": "no nbthread (its default)"} \
        if defaults else {"ours": f"EGRESS_DNS_PROXY_WORKERS={args.workers}", "haproxy": f"nbthread {args.workers}"}
    lines = [f"{title}: {rounds} round(s), alternating order, medians; one proxy life per side and round, "
             f"warmed up with {args.warmup:g} s of keep-alive traffic. iperf3 -t {args.iperf_seconds:g} (1 and 4 "
             f"streams) through 5201; wrk -t1 -c{CONNECTIONS}, {args.duration:g} s runs, GET /1k through 8080; "
             f"latency paced to ~{args.rate:g} req/s; memory: {args.idle:,} idle connections (each also "
             f"opens a backend connection). Forwards to IP addresses: no DNS lookup is measured. Ours: "
             f"{workers['ours']}, EGRESS_DNS_PROXY_MAX_CONNECTIONS=16000; haproxy: {workers['haproxy']}, "
             f"maxconn {haproxy_maxconn()}. Lab sysctls: ip_local_port_range 1024-65000 (client, router), "
             "tcp_tw_reuse=1 (client).", "", md, "", "Targets (issue 16; bulk: this benchmark's own bound):", "",
             *[f"- {v}" for v in verdicts], "", *[f"- {line}" for line in per_process], f"- {direct}",
             *[f"- note: {n}" for n in all_notes]]
    return lines, verdicts


if __name__ == "__main__":
    run_benchmark(main, "processes stopped, lab torn down")
