#!/usr/bin/env python3
"""HTTP proxy mode: egress-router's proxy vs squid configured as the legacy image did, in one lab.

Run as root from the repository:  .venv/bin/python benchmarks/http_proxy.py [--rounds N] [--quick]

Everything runs inside one namespace lab (egress_router.lab.Lab, documentation addresses only):
nginx serves a 1 KiB object and a large one on 203.0.113.10:80 in the dest namespace, the proxy
under test listens on 198.51.100.1:8080 in the router namespace (after init mode has given the
router its macvlan0 address and default route), and the load comes from the client namespace.

  ours   `egress-router http-proxy`, EGRESS_HTTP_PROXY_DESTINATION=203.0.113.0/24
  squid  `squid -N -f <temp>/squid.conf`: the legacy image's squid.conf (http_proxy/squid.conf.in)

Measured, in rounds that alternate the order of the two sides (medians over the rounds):
  keep-alive    wrk, 64 connections, GET http://203.0.113.10/1k in absolute form: requests/s
  close         the same with "Connection: close" (a new connection per request): requests/s
  connect       CONNECT 203.0.113.10:80, GET of the large object inside the tunnel, read by a client
                that splices it to /dev/null: MB/s
  get           a plain GET (absolute form, no CONNECT) of a 1 GiB object (--get-mib) through the proxy,
                by the same splicing client: MB/s; beside it the direct path, the same client fetching
                the same object from the origin without a proxy, from the router namespace (the
                proxy's own), in every proxy life; target: ours >= 0.6x direct (squid's figure beside)
  latency       wrk paced to a fixed schedule of --rate requests/s (64 connections): p50 and p99
  memory        RSS (and PSS) of all the proxy's processes, before and with 10,000 idle
                connections open from the client namespace
Each proxy life is warmed up with keep-alive traffic before anything is measured. Every round
starts each proxy twice: once for keep-alive, latency, CONNECT and memory, and once (last) for
close, because squid degrades under sustained Connection: close traffic. Before the rounds, a
cold probe shows each proxy fresh meeting close traffic first, in short slices. CPU time of every
process involved (and of the rest of the machine) is recorded to tell which one was the
bottleneck. Lab-only sysctls: a wider ephemeral port range in the client and router namespaces,
and tcp_tw_reuse=1 in the client namespace (see main()). Every process it starts is ended by pid;
the lab always goes.

Why the router namespace is the direct path of the GET: it is where the proxy runs, so the direct
fetch from there takes exactly the proxy's upstream leg (router -> gateway -> dest); no proxy there
can deliver more than that leg carries. The client namespace has no path to the origin without the
proxy (the router does not forward: ip_forward=0, and the origin has no route back to the pod
network), and adding one would add kernel forwarding and NAT, i.e. measure another product (legacy
mode). The proxied path has one hop more (client -> router veth); that hop is part of what a proxy
costs. The issue's "3.1 GB/s direct" is this figure. The client splices the body to /dev/null, so
it stays far from one core (its CPU is in the CPU table: "load tool").

With --baseline TREE, a third side, baseline (TREE's .venv/bin/egress-router http-proxy: TREE's
interpreter and code, ours' settings), runs in the same rounds (order ours, baseline, squid, then
reversed); the table gains baseline and ours/baseline, and an A/B table gives each side's IQR and
min-max and the per-round ratios. With --only ours, that is ours and baseline alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchlib import (
    BASELINE_HELP,
    PYTHON,
    Baseline,
    BenchError,
    Deadline,
    load_baseline,
    machine_lines,
    require_root,
    run_benchmark,
    write_results,
)
from http_report import probe_lines, report
from proxybench import (
    BIG,
    HTTP_PROXY_DIR,
    ORIGIN_IP,
    SMALL,
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
    tool_versions,
    wait_for_backends,
    wait_until_serving,
    wrk_error_notes,
    wrk_measured,
)

from egress_router.lab import ROUTER_POD_IP, Lab, router_command

HERE = HTTP_PROXY_DIR  # also squid.conf.in and tunnel_client.py
PORT = 8080
DESTINATION = "203.0.113.0/24"  # the allow list of both proxies
DENIED_URL = "http://192.0.2.50/1k"  # outside the allow list: both must answer 403 without connecting
CONNECTIONS = 64
SIDES = ("ours", "squid")
GET_PATH = "/get"


# ---------------------------------------------------------------- the proxies


class Squid(Proxy):
    name = "squid"

    def __init__(self, lab: Lab, tmp: Path):
        super().__init__(lab, tmp)
        self.service = f"egrbench{os.getpid()}"  # squid names its /dev/shm segments after this

    def start(self) -> None:
        self.lives += 1
        run = self.tmp / f"squid-{self.lives}"
        run.mkdir()
        acls = f"acl dest1 dst {DESTINATION}\nhttp_access allow dest1"
        conf = string.Template((HERE / "squid.conf.in").read_text()).substitute(
            dir=run, acls=acls, destination=DESTINATION)
        (run / "squid.conf").write_text(conf)
        shutil.chown(run, "proxy", "proxy")  # squid drops to its effective user (proxy) after start
        self.proc = Managed(self.lab, "router", ["squid", "-N", "-n", self.service, "-f", str(run / "squid.conf")],
                            run / "squid.out")
        self.run_dir = run

    def stop(self) -> None:
        super().stop()
        for leftover in Path("/dev/shm").glob(f"{self.service}-*"):
            leftover.unlink()  # its own segments, named after our service name

    def describe_failure(self) -> str:
        text = super().describe_failure()
        with contextlib.suppress(OSError, AttributeError):
            text += "\n" + (self.run_dir / "cache.log").read_text(errors="replace")[-2000:]
        return text


class Ours(Proxy):
    name = "ours"

    def __init__(self, lab: Lab, tmp: Path, workers: int | None):
        super().__init__(lab, tmp)
        self.workers = workers

    def command(self) -> list[str]:
        return router_command()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
        env.update(EGRESS_HTTP_PROXY_DESTINATION=DESTINATION, EGRESS_HTTP_PROXY_PORT=str(PORT),
                   EGRESS_HTTP_PROXY_ACCESS_LOG="0",
                   # 10,000 idle connections must not sit at the default limit (as squid's
                   # max_filedescriptors is raised); no drain period on stop (squid: shutdown_lifetime 0)
                   EGRESS_HTTP_PROXY_MAX_CONNECTIONS="16000", EGRESS_PROXY_GRACE_SECONDS="0")
        if self.workers:
            env["EGRESS_HTTP_PROXY_WORKERS"] = str(self.workers)
        return env

    def start(self) -> None:
        self.lives += 1
        self.proc = Managed(self.lab, "router", [*self.command(), "http-proxy"],
                            self.tmp / f"{self.name}-{self.lives}.out", env=self.env())


class BaselineProxy(Ours):
    """Ours as another checkout has it (--baseline TREE): TREE's console script, interpreter and code."""

    name = "baseline"

    def __init__(self, lab: Lab, tmp: Path, workers: int | None, baseline: Baseline):
        super().__init__(lab, tmp, workers)
        self.baseline = baseline

    def command(self) -> list[str]:
        return self.baseline.command()

    def env(self) -> dict[str, str]:
        return self.baseline.env(super().env())


def ours_available(command: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    try:
        done = subprocess.run([*command, "http-proxy", "--help"], capture_output=True, text=True,
                              timeout=30, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-1:][0] if done.returncode else ""


# ---------------------------------------------------------------- requests from the client namespace

def proxy_get(lab: Lab, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET in absolute form through the proxy (Connection: close): status and body."""
    return client_get(lab, PORT, url, url.split("/")[2], timeout)


def wait_ready(lab: Lab, proxy: Proxy, expected: bytes, timeout: float = 30.0) -> float:
    def probe() -> str | None:
        status, body = proxy_get(lab, f"http://{ORIGIN_IP}{SMALL}", timeout=2.0)
        return None if status == 200 and body == expected else f"status {status}, {len(body)} bytes"

    return wait_until_serving(proxy, probe, timeout)


# ---------------------------------------------------------------- the measurements


class Bench:
    def __init__(self, lab: Lab, origin: Origin, args: argparse.Namespace):
        self.lab = lab
        self.origin = origin
        self.args = args
        self.ncpu = os.cpu_count() or 1
        self.quiet = QuietStarts(args.quiet_wait)
        self.retried = 0
        self.disturbed: list[str] = []

    def clean(self, what: str, run: Callable[[], Measured]) -> Measured:
        """Run a measurement after waiting for quiet; re-run it (bounded) if other work on the machine
        took more than --max-others % of a core meanwhile, keeping the least disturbed run."""
        tries: list[Measured] = []
        for _ in range(1 + max(0, self.args.retries)):
            self.quiet.wait()
            tries.append(run())
            if tries[-1].cpu.get("others", 0.0) <= self.args.max_others:
                break
        self.retried += len(tries) - 1
        best = min(tries, key=lambda m: m.cpu.get("others", 0.0))
        if best.cpu.get("others", 0.0) > self.args.max_others:
            self.disturbed.append(f"{what}: others {best.cpu['others']:.0f}% of a core")
        return best

    def watch(self, proxy: Proxy | None) -> CpuWatch:
        groups: dict[str, Callable[[], list[int]]] = {"origin": self.origin.proc.pids}
        if proxy is not None:
            groups["proxy"] = proxy.pids
        return CpuWatch(groups)

    def tool(self, role: str, argv: Sequence[str], env: Mapping[str, str] | None, timeout: float,
             watch: CpuWatch) -> tuple[str, dict[str, float]]:
        return run_tool(self.lab, role, argv, env, timeout, watch)

    def wrk(self, proxy: Proxy | None, seconds: float, *, close: bool = False, rate: float = 0,
            role: str = "client", target: str = f"http://{ORIGIN_IP}{SMALL}") -> Measured:
        env = dict(os.environ, WRK_TARGET=target, WRK_CLOSE="1" if close else "0",
                   WRK_RATE=f"{rate / self.args.wrk_threads:g}")
        where = f"http://{ROUTER_POD_IP}:{PORT}" if proxy is not None else f"http://{ORIGIN_IP}:80"
        argv = ["wrk", "-t", str(self.args.wrk_threads), "-c", str(CONNECTIONS), "-d", f"{seconds:g}s",
                "--timeout", "5s", "-s", str(HERE / "proxy.lua"), where]
        out, cpu = self.tool(role, argv, env, seconds + 60, self.watch(proxy))
        return wrk_measured(out, cpu)

    def tunnel(self, proxy: Proxy | None, path: str = BIG, timeout: float = 180.0, role: str = "client",
               plain: bool = False) -> Measured:
        """CONNECT + GET inside the tunnel, or with `plain` a GET in absolute form through the proxy (or,
        without a proxy, the GET straight to the origin): MB/s."""
        argv = [PYTHON, str(HERE / "tunnel_client.py"), "--target", f"{ORIGIN_IP}:80", "--path", path,
                "--timeout", str(timeout)]
        argv += ["--proxy", f"{ROUTER_POD_IP}:{PORT}"] if proxy is not None else ["--direct"]
        if plain and proxy is not None:
            argv.append("--plain")
        if not self.args.recv:
            argv.append("--splice")
        out, cpu = self.tool(role, argv, None, timeout + 30, self.watch(proxy))
        line = next((line for line in out.splitlines() if line.startswith("{")), None)
        if line is None:
            raise BenchError(f"tunnel client printed no result:\n{out[-1500:]}")
        result = json.loads(line)
        who = proxy.name if proxy is not None else "origin"
        if result["error"] or result["bytes"] != result["expected"]:
            raise BenchError(f"{who}: transfer of {path} failed: {result}")
        # shares over the transfer itself, not the client's interpreter start-up before it
        scale = cpu["wall"] / result["seconds"]
        for key in [k for k in cpu if k not in ("machine", "wall")]:
            cpu[key] *= scale
        cpu["tool"] = 100 * (result["cpu_user"] + result["cpu_system"]) / result["seconds"]
        result["user_us"], result["sys_us"] = per_unit(cpu, result["seconds"], result["bytes"] / 1e6)  # per MB
        return Measured(result["bytes"] / result["seconds"] / 1e6, cpu, result)

    def check(self, proxy: Proxy) -> None:
        """Correctness, once per side: a GET, a denied GET, a CONNECT with the right byte count."""
        status, body = proxy_get(self.lab, f"http://{ORIGIN_IP}{SMALL}")
        if status != 200 or body != self.origin.small:
            raise BenchError(f"{proxy.name}: GET {SMALL} gave status {status} and {len(body)} bytes")
        status, _ = proxy_get(self.lab, DENIED_URL)
        if status != 403:
            raise BenchError(f"{proxy.name}: GET {DENIED_URL} (not in the allow list) gave status {status}, not 403")
        small = self.tunnel(proxy, SMALL, timeout=20)
        if small.extra["bytes"] != 1024:
            raise BenchError(f"{proxy.name}: CONNECT + GET {SMALL} read {small.extra['bytes']} bytes")

    def memory(self, proxy: Proxy, count: int) -> Measured:
        """RSS of the proxy's processes before and with `count` idle connections from the client."""
        extra = idle_memory(self.lab, proxy, PORT, count, sockets_each=1, hold=120)
        held = min(extra["sockets"], extra["alive"] if extra["alive"] >= 0 else extra["connected"])
        extra["per_conn"] = (extra["rss"] - extra["base_rss"]) / max(1, held)
        return Measured(extra["rss"], {}, extra)


# ---------------------------------------------------------------- rounds


def start_proxy(bench: Bench, proxy: Proxy, results: Results) -> None:
    proxy.start()
    seconds = wait_ready(bench.lab, proxy, bench.origin.small)
    results.start_ups.setdefault(proxy.name, []).append(seconds)
    results.fd_limits[proxy.name] = proxy.fd_limit()
    results.workers[proxy.name] = len(proxy.pids())


def warm_up(bench: Bench, proxy: Proxy) -> None:
    warm = bench.wrk(proxy, bench.args.warmup)
    if warm.extra["requests"] == 0:
        raise BenchError(f"{proxy.name}: no request completed during the warm-up:\n{proxy.describe_failure()}")


def life_main(bench: Bench, proxy: Proxy, results: Results, first: bool) -> str:
    """Keep-alive, fixed-rate latency, CONNECT throughput and memory, on one warmed-up proxy life."""
    args = bench.args
    start_proxy(bench, proxy, results)
    try:
        if first:
            bench.check(proxy)
        results.add(proxy.name, "rss_fresh", Measured(float(proxy.rss_kib()[0])))
        warm_up(bench, proxy)
        keep = bench.clean(f"{proxy.name} keep-alive", lambda: bench.wrk(proxy, args.duration))
        results.add(proxy.name, "keepalive", keep)
        paced = bench.clean(f"{proxy.name} latency", lambda: bench.wrk(proxy, args.duration, rate=args.rate))
        paced.value = paced.extra["p99_us"] / 1000
        results.add(proxy.name, "latency", paced)
        transfers = []
        for _ in range(args.connect_runs):
            transfers.append(bench.clean(f"{proxy.name} CONNECT", lambda: bench.tunnel(proxy)))
            results.add(proxy.name, "connect", transfers[-1])
        tunnel = max(transfers, key=lambda m: m.value)
        get = plain_gets(bench, proxy, results)
        memory = bench.memory(proxy, args.idle)
        results.add(proxy.name, "memory", memory)
        return (f"keep-alive {keep.value:8.0f} req/s, p50/p99 {paced.extra['p50_us'] / 1000:.2f}/"
                f"{paced.extra['p99_us'] / 1000:.2f} ms at {paced.extra['rate']:.0f}/s, "
                f"CONNECT {tunnel.value:6.0f} MB/s, {get},"
                f" RSS {memory.extra['base_rss'] / 1024:.1f} -> {memory.extra['rss'] / 1024:.1f} MiB with "
                f"{memory.extra['sockets']} idle")
    finally:
        proxy.stop()


def plain_gets(bench: Bench, proxy: Proxy, results: Results) -> str:
    """--get-runs plain GETs of the GET object through the proxy, then the same GET direct from the router
    namespace (the same client, no proxy), in the same life: the ratio of a life compares the same stretch
    of machine time. Before the memory sample, so that what a large body leaves in the proxy counts there."""
    gets = []
    for _ in range(bench.args.get_runs):
        gets.append(bench.clean(f"{proxy.name} GET", lambda: bench.tunnel(proxy, GET_PATH, plain=True)))
        results.add(proxy.name, "get", gets[-1])
    direct = bench.clean("direct GET", lambda: bench.tunnel(None, GET_PATH, role="router"))
    results.add("origin", "get", direct)
    best = max(m.value for m in gets)
    for m in [*gets, direct]:
        if m.extra["bytes"] != bench.origin.sizes[GET_PATH]:  # the whole object, not only what was announced
            raise BenchError(f"GET {GET_PATH} read {m.extra['bytes']} bytes, not {bench.origin.sizes[GET_PATH]}")
        m.extra["direct"] = direct.value
    return f"GET {best:6.0f} MB/s (direct {direct.value:.0f})"


def life_close(bench: Bench, proxy: Proxy, results: Results) -> str:
    start_proxy(bench, proxy, results)
    try:
        warm_up(bench, proxy)
        bench.quiet.wait()  # no re-run here: a second close run would meet a proxy changed by the first
        close = bench.wrk(proxy, bench.args.duration, close=True)
        close.extra["rss_after"] = proxy.rss_kib()[0]
        results.add(proxy.name, "close", close)
        return f"close {close.value:8.0f} req/s (RSS after: {close.extra['rss_after'] / 1024:.1f} MiB)"
    finally:
        proxy.stop()


def cold_probe(bench: Bench, proxy: Proxy, results: Results) -> None:
    """A fresh proxy meets Connection: close traffic first (no warm-up), then keep-alive: req/s per slice."""
    slices: list[tuple[str, float, int]] = []
    start_proxy(bench, proxy, results)
    try:
        for index in range(bench.args.probe_close + bench.args.probe_keepalive):
            close = index < bench.args.probe_close
            measured = bench.wrk(proxy, bench.args.probe_slice, close=close)
            slices.append(("close" if close else "keep-alive", measured.value, proxy.rss_kib()[0]))
    finally:
        proxy.stop()
    results.probe[proxy.name] = slices
    print(f"  {proxy.name:>5} fresh, close first: "
          + ", ".join(f"{kind[0]}{value:.0f}" for kind, value, _ in slices)
          + f" req/s per {bench.args.probe_slice:g} s slice (c = close, k = keep-alive); RSS at the end "
          f"{slices[-1][2] / 1024:.0f} MiB", flush=True)


def origin_alone(bench: Bench, results: Results) -> None:
    """The ceiling: wrk from the router namespace straight to nginx, and the large GET without a tunnel."""
    direct = bench.wrk(None, bench.args.duration, role="router", target=f"http://{ORIGIN_IP}{SMALL}")
    results.add("origin", "keepalive", direct)
    direct_get = bench.tunnel(None, role="router")
    if direct_get.extra["bytes"] != bench.origin.big_bytes:
        raise BenchError(f"direct GET of {BIG} read {direct_get.extra['bytes']} bytes")
    results.add("origin", "connect", direct_get)


# ---------------------------------------------------------------- main

def check_tools(sides: Sequence[str]) -> None:
    needed = ["nsenter", "ip", "wrk", "nginx"] + (["squid"] if "squid" in sides else [])
    missing = [tool for tool in needed if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install squid wrk nginx-light (see benchmarks/README.md)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, sides=SIDES, rounds=5, duration=8.0, warmup=3.0, quiet_wait=20.0, max_seconds=1800,
                     quick="1 round, 3 s runs, 512 MiB CONNECT transfer and plain GET, short probe: a smoke test")
    parser.add_argument("--workers", type=int, help="EGRESS_HTTP_PROXY_WORKERS for ours (default: ours' default)")
    parser.add_argument("--connect-mib", type=int, default=2048, help="size of the CONNECT transfer (default 2048)")
    parser.add_argument("--connect-runs", type=int, default=2, help="CONNECT transfers per round (default 2)")
    parser.add_argument("--get-mib", type=int, default=1024, help="size of the plain GET's body (default 1024)")
    parser.add_argument("--get-runs", type=int, default=2, help="plain GETs per round and side (default 2)")
    parser.add_argument("--idle", type=int, default=10000, help="idle connections for the memory figure")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--origin-workers", type=int, default=1, help="nginx worker processes (default 1)")
    parser.add_argument("--recv", action="store_true",
                        help="the tunnel client reads with recv_into (default: splice to /dev/null, cheaper)")
    parser.add_argument("--probe-close", type=int, default=10, help="cold probe: close slices (0: no probe)")
    parser.add_argument("--probe-keepalive", type=int, default=4, help="cold probe: keep-alive slices after")
    parser.add_argument("--probe-slice", type=float, default=3.0, help="cold probe: seconds per slice")
    parser.add_argument("--max-others", type=float, default=25.0,
                        help="re-run a measurement if other processes took more than this %% of a core (default 25)")
    parser.add_argument("--retries", type=int, default=2, help="at most this many re-runs per measurement")
    parser.add_argument("--baseline", metavar="TREE", type=Path, help=BASELINE_HELP)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup, args.connect_mib, args.get_mib = 1, 3.0, 2.0, 512, 512
        args.probe_close, args.probe_keepalive, args.probe_slice = min(args.probe_close, 2), 1, 2.0
    args.rounds = max(1, min(args.rounds, 50))
    args.connect_runs = max(1, min(args.connect_runs, 10))
    args.get_runs = max(1, min(args.get_runs, 10))

    require_root()
    sides = [args.only] if args.only else list(SIDES)
    check_tools(sides)
    if "ours" in sides:
        ok, why = ours_available(router_command())
        if not ok:
            if args.only == "ours":
                sys.exit(f"egress-router http-proxy is not available: {why}")
            print(f"egress-router http-proxy is not available ({why}): squid only")
            sides = ["squid"]
    baseline = load_baseline(args.baseline)
    if baseline is not None:
        ok, why = ours_available(baseline.command(), baseline.env(os.environ))
        if not ok:
            sys.exit(f"--baseline {baseline.tree}: its egress-router http-proxy is not available: {why}")
        sides.insert(sides.index("ours") + 1 if "ours" in sides else 0, "baseline")
    began = time.monotonic()
    fd_limit = raise_fd_limit()
    info = describe_machine(fd_limit, tool_versions("squid", "nginx", "wrk"),
                            {"baseline": baseline.facts} if baseline else None)
    deadline = Deadline(args.max_seconds)
    results = Results()
    origin: Origin | None = None
    proxies: dict[str, Proxy] = {}
    with scratch("http-proxy-") as tmp:
        try:
            with Lab() as lab:
                prepare_lab(lab, "http-proxy")
                origin = Origin(lab, tmp, args.origin_workers, args.connect_mib << 20, {GET_PATH: args.get_mib << 20})
                bench = Bench(lab, origin, args)
                wait_for_backends(lab, ORIGIN_IP, [80], [origin.proc])
                if "squid" in sides:
                    proxies["squid"] = Squid(lab, tmp)
                if "ours" in sides:
                    proxies["ours"] = Ours(lab, tmp, args.workers)
                if baseline is not None:
                    proxies["baseline"] = BaselineProxy(lab, tmp, args.workers, baseline)

                print(f"\nlab {lab.suffix}: origin nginx on {ORIGIN_IP}:80 ({args.origin_workers} worker), proxies "
                      f"on {ROUTER_POD_IP}:{PORT}; wrk -t{args.wrk_threads} -c{CONNECTIONS}, {args.duration:g} s runs")
                origin_alone(bench, results)
                print(f"  origin alone (from the router namespace): {results.median('origin', 'keepalive'):.0f} "
                      f"req/s keep-alive, {results.median('origin', 'connect'):.0f} MB/s for the large GET")
                if args.probe_close > 0:
                    print("cold probe: a fresh proxy meeting Connection: close traffic first")
                    for side in sides:
                        cold_probe(bench, proxies[side], results)
                print(f"\n{args.rounds} round(s), alternating order")

                def life(index: int, side: str) -> str:
                    main_text = life_main(bench, proxies[side], results, first=index == 0)
                    return f"{main_text}; {life_close(bench, proxies[side], results)}"

                alternate_rounds(args.rounds, sides, deadline, results.notes, life)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            if origin is not None:
                origin.stop()

    results.notes += wrk_error_notes(results, sides, ("keepalive", "close", "latency"))
    for side in sides:
        for m in results.samples.get((side, "memory"), []):
            if m.extra["alive"] != args.idle or m.extra["failed"] or m.extra["sockets"] < m.extra["connected"]:
                results.notes.append(f"{side} memory: {m.extra['connected']} connected, {m.extra['failed']} failed, "
                                     f"{m.extra['sockets']} accepted by the proxy after 60 s, {m.extra['alive']} "
                                     "still open at the sample")
    for side, slices in results.probe.items():
        closes = [value for kind, value, _ in slices if kind == "close"]
        if len(closes) >= 2 and closes[-1] < 0.5 * closes[0]:
            results.notes.append(
                f"{side}: a fresh {side} meeting Connection: close traffic first slowed down: from {closes[0]:,.0f} to "
                f"{closes[-1]:,.0f} req/s within {len(closes) * args.probe_slice:g} s (lowest {min(closes):,.0f}); "
                f"RSS {slices[len(closes) - 1][2] / 1024:.0f} MiB after it")
    for side in sides:
        rss = sorted(results.values(side, "memory", "rss"))
        if len(rss) > 1 and rss[-1] > 1.5 * rss[0]:
            results.notes.append(f"{side}: RSS with {args.idle:,} idle connections varied over the rounds: "
                                 + ", ".join(f"{v / 1024:.0f}" for v in results.values(side, "memory", "rss"))
                                 + " MiB (every time the proxy held them all)")
    if bench.retried:
        results.notes.append(f"{bench.retried} run(s) were repeated because other work on the machine took over "
                             f"{args.max_others:g}% of a core during them (the least disturbed run counts)")
    results.notes += [f"still disturbed after {args.retries} repeat(s): {what}" for what in bench.disturbed]
    quiet_note = bench.quiet.note()
    if quiet_note:
        results.notes.append(quiet_note)
    text, md, verdicts = report(results, args, sides, bench.ncpu)
    print("\n" + text + "\n\nTargets (issue 16):\n" + "\n".join(verdicts))
    details = [f"{side}: {results.workers.get(side, '?')} process(es) at "
               f"start, open files limit {results.fd_limits.get(side, '?')}, start-up to first 200 "
               f"{statistics.median(results.start_ups[side]):.2f} s (median)"
               for side in sides if side in results.start_ups]
    per_process = per_process_lines(results, sides, lambda side: f"{side} with idle connections")
    origin_line = (f"origin alone (wrk from the router namespace straight to nginx): "
                   f"{results.median('origin', 'keepalive'):,.0f} req/s keep-alive; large GET without a tunnel "
                   f"{results.median('origin', 'connect'):,.0f} MB/s")
    print("\n".join(["", *details, *per_process, origin_line, *probe_lines(results, args), *results.notes]))
    end_facts(info, began)
    if not args.no_results:
        lines = ["## http_proxy.py: HTTP proxy mode, ours vs squid (legacy image's config)", "",
                 *machine_lines(info), "",
                 f"{len(results.values(sides[0], 'keepalive'))} round(s), alternating order, medians; "
                 f"wrk -t{args.wrk_threads} -c{CONNECTIONS}, {args.duration:g} s per run after a {args.warmup:g} s "
                 f"keep-alive warm-up of each proxy life; latency run paced to ~{args.rate:g} req/s "
                 f"({CONNECTIONS} connections taking the slots of a fixed schedule through wrk's delay()); "
                 f"CONNECT: {args.connect_runs} x one {args.connect_mib} MiB GET inside a tunnel per round; plain GET: "
                 f"{args.get_runs} x {args.get_mib} MiB through the proxy per round, and once direct from the router "
                 f"namespace per proxy life (the same splicing client); memory: "
                 f"{args.idle:,} idle connections. MB = 10^6 bytes. Lab sysctls: ip_local_port_range 1024-65000 "
                 f"(client, router), tcp_tw_reuse=1 (client: see README). Ours: "
                 f"{'EGRESS_HTTP_PROXY_WORKERS=' + str(args.workers) if args.workers else 'default workers'}.", "",
                 md, "", f"Targets (issue 16), medians of {len(results.values(sides[0], 'keepalive'))} "
                 "round(s):", "", *[f"- {line}" for line in verdicts], "",
                 *[f"- {line}" for line in details], *[f"- {line}" for line in per_process],
                 f"- {origin_line}", "", "Cold probe (a fresh proxy, Connection: close traffic first):", "",
                 *probe_lines(results, args), "", *[f"- note: {n}" for n in results.notes]]
        write_results("http_proxy", "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "processes stopped, lab torn down")
