#!/usr/bin/env python3
"""Init-mode latency: egress-router vs the legacy shell approach, each run in a fresh namespace lab.

Run as root from the repository:  .venv/bin/python benchmarks/setup_latency.py [--rounds N] [--quick]

What is timed: the wall clock of one init-mode run, from starting the process (nsenter into the
lab's router namespace, then the program) until it exits, for
  ours       the egress-router console script, EGRESS_ROUTER_MODE=init, env from lab.router_env()
  reference  benchmarks/reference/legacy-egress-router.sh with the same environment
Rounds alternate the order (ours then reference, then reference then ours, ...). Every run gets
a new lab (building and tearing it down is not timed), and after every run TCP requests from the
client must land on the right servers with source 192.0.2.99 (not timed either).

With --baseline TREE, a third contender, baseline (TREE's .venv/bin/egress-router: TREE's interpreter
and code), runs in the same rounds (order ours, baseline, reference, then reversed), and the run
prints ours/baseline with each side's IQR and min-max and the per-round ratios.

With --dual-stack, another contender, ours-dual (the same console script, dual-stack: a Lab(dual_stack=True),
lab.router_env6(), the demo's rules for both families), runs in the same rounds in rotating order (ours,
ours-dual, reference, then rotated, every other cycle reversed). After every ours-dual run TCP over IPv4 and
IPv6 must land on the right servers from 192.0.2.99 and 2001:db8:2::99. The run prints ours-dual/ours with
each side's IQR and min-max, the per-round ratios and the verdict against DUAL_TARGET_SECONDS, and, apart,
what the second family costs: ip6tables-save/-restore, the NDP module's import.

Then, outside the ratio, where the time goes: interpreter start-up and imports for ours, and a
per-command trace (ip, iptables, arping) of the reference.
"""

from __future__ import annotations

import argparse
import pstats
import re
import statistics
from pathlib import Path

from benchlib import (
    AB_HEADERS,
    BASELINE_HELP,
    PYTHON,
    REFERENCE,
    WORK,
    Baseline,
    BenchError,
    Deadline,
    Run,
    Stats,
    ab_compare,
    busy_warning,
    check_tools,
    cpu_share_since,
    cpu_times,
    in_namespace,
    load_average,
    load_baseline,
    machine_info,
    machine_lines,
    md_table,
    nat_payload,
    nat_payloads,
    require_root,
    rotating_order,
    round_order,
    run_benchmark,
    secs,
    settle_background,
    text_table,
    timed_run,
    write_results,
)

from egress_router.lab import (
    DEMO_DESTINATION,
    DEMO_DESTINATION6,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    SOURCE_IP6,
    Lab,
    router_command,
)

TARGET_SECONDS = 0.3
DUAL_TARGET_SECONDS = 0.25  # issue 13: dual-stack init mode under 0.25 s (median)
RUN_TIMEOUT = 30.0
# (router port, where it must land) for the demo destination, checked after every run
CHECKS = ((80, "203.0.113.10:80"), (8080, "203.0.113.11:80"), (7000, "203.0.113.12:7000"))
SERVERS = [("tcp", landed.split(":")[0], int(landed.split(":")[1])) for _, landed in CHECKS]
CHECKS6 = ((80, "[2001:db8:203::10]:80"), (8080, "[2001:db8:203::11]:80"), (7000, "[2001:db8:203::12]:7000"))
SERVERS6 = [("tcp", landed[1:landed.index("]")], int(landed.rsplit(":", 1)[1])) for _, landed in CHECKS6]
DUAL = "ours-dual"
NDP_IMPORT = "import egress_router.net.ndp"
READY = re.compile(r"\(init mode, ([0-9.]+) s since start\)")
CHANGES = re.compile(r"([0-9]+) network change")
IMPORTS_CLI = "import egress_router.entry, egress_router.container, egress_router.core.config"
IMPORTS_ALL = ("import egress_router.entry, egress_router.container, egress_router.core.config, egress_router.router\n"
               "from egress_router.net.pyroute import load_pyroute2_modules\n"
               "load_pyroute2_modules()")


def lab_env(lab: Lab, arping: str, *, dual: bool = False, **extra: str) -> dict[str, str]:
    """One environment for both programs: the lab's EGRESS_* plus the reference's ARPING (`dual`: both families)."""
    env = lab.router_env6(DEMO_DESTINATION6, mode="init") if dual else lab.router_env(DEMO_DESTINATION, mode="init")
    env["ARPING"] = arping
    env.update(extra)
    return env


def verify(lab: Lab, who: str, *, dual: bool = False) -> None:
    """TCP from the client to router ports lands on the right servers from the source (`dual`: both families)."""
    families = [(ROUTER_POD_IP, CHECKS, SOURCE_IP)] + ([(ROUTER_POD_IP6, CHECKS6, SOURCE_IP6)] if dual else [])
    lab.serve(SERVERS + (SERVERS6 if dual else []))
    for router_ip, checks, source in families:
        for port, landed in checks:
            try:
                reply = lab.request("tcp", router_ip, port)
            except OSError as exc:
                raise BenchError(f"{who}: tcp request to {router_ip} port {port} failed after init: {exc}") from None
            if reply.landed != landed or reply.peer_ip != source:
                raise BenchError(f"{who}: tcp to {router_ip} port {port} landed on {reply.landed} from "
                                 f"{reply.peer_ip}, expected {landed} from {source}")


def measure(who: str, arping: str, *, trace: Path | None = None, baseline: Baseline | None = None) -> tuple[Run, str]:
    """One init-mode run of `who` (ours, ours-dual, reference, or baseline: the one given) in a fresh lab, verified.
    Returns the run and the background job's fate."""
    pidfile = WORK / f"bg-{who}.pid"
    pidfile.unlink(missing_ok=True)
    dual = who == DUAL
    with Lab(dual_stack=dual) as lab:
        extra = {"LEGACY_BG_PIDFILE": str(pidfile)}
        if trace is not None:
            extra["LEGACY_TRACE"] = str(trace)
        env = lab_env(lab, arping, dual=dual, **extra)
        program = router_command() if who in ("ours", DUAL) else [str(REFERENCE)]
        if who == "baseline":
            assert baseline is not None
            program, env = baseline.command(), baseline.env(env)
        run = timed_run(in_namespace(lab, "router", program), env, timeout=RUN_TIMEOUT)
        background = settle_background(lab, pidfile) if who == "reference" else "none"
        if not run.ok:
            raise BenchError(f"{who} failed: {run.describe()}")
        verify(lab, who, dual=dual)
    return run, background


def component_runs(rounds: int, deadline: Deadline) -> dict[str, list[float]]:
    """Costs of the pieces, each timed the same way (nsenter into a fresh lab's router namespace)."""
    env_probe = {"EGRESS_SOURCE": f"{SOURCE_IP}/24", "EGRESS_GATEWAY": "192.0.2.1",
                 "EGRESS_DESTINATION": DEMO_DESTINATION, "EGRESS_ROUTER_MODE": "init"}
    payload = nat_payload(env_probe)
    WORK.mkdir(exist_ok=True)
    payload_file = WORK / "latency-payload.txt"
    payload_file.write_text(payload, encoding="ascii")
    pieces: dict[str, tuple[list[str], Path | None]] = {
        "nsenter + exec of 'true'": (["true"], None),
        "bash -c ':'": (["bash", "-c", ":"], None),
        "python -c pass": ([PYTHON, "-c", "pass"], None),
        f"python -c '{IMPORTS_CLI}'": ([PYTHON, "-c", IMPORTS_CLI], None),
        "python: all modules init needs": ([PYTHON, "-c", IMPORTS_ALL], None),
        "iptables-save -t nat": (["iptables-save", "-t", "nat"], None),
        "iptables-restore --noflush (our payload)": (["iptables-restore", "--noflush", "--wait", "10"], payload_file),
        "one iptables -t nat -A (empty table)": (["iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p",
                                                  "tcp", "--dport", "80", "-j", "DNAT", "--to-destination",
                                                  "203.0.113.10"], None),
    }
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(rounds):
        if deadline.passed():
            break
        with Lab() as lab:
            for name, (argv, stdin_path) in pieces.items():
                run = timed_run(in_namespace(lab, "router", argv), None, timeout=RUN_TIMEOUT, stdin_path=stdin_path)
                if not run.ok:
                    raise BenchError(f"component {name!r} failed: {run.describe()}")
                samples[name].append(run.seconds)
    payload_file.unlink()
    return samples


# in the router's order: each family's two reads, then each family's restore (int: that family's payload on stdin)
DUAL_PIECES: tuple[tuple[str, list[str], int | None], ...] = (
    ("iptables-save -t nat", ["iptables-save", "-t", "nat"], None),
    ("iptables-save -t mangle", ["iptables-save", "-t", "mangle"], None),
    ("ip6tables-save -t nat", ["ip6tables-save", "-t", "nat"], None),
    ("ip6tables-save -t mangle", ["ip6tables-save", "-t", "mangle"], None),
    ("iptables-restore --noflush (IPv4 payload)", ["iptables-restore", "--noflush", "--wait", "10"], 4),
    ("ip6tables-restore --noflush (IPv6 payload)", ["ip6tables-restore", "--noflush", "--wait", "10"], 6),
    (NDP_IMPORT, [PYTHON, "-X", "importtime", "-c", IMPORTS_ALL + "\nimport egress_router.net.ndp"], None),
)


def dual_component_runs(rounds: int, deadline: Deadline) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """What the second family adds, piece by piece, in a fresh dual-stack lab's router namespace each round:
    wall and CPU seconds of each piece."""
    env = {"EGRESS_SOURCE": f"{SOURCE_IP}/24,{SOURCE_IP6}/64", "EGRESS_GATEWAY": "192.0.2.1,2001:db8:2::1",
           "EGRESS_DESTINATION": DEMO_DESTINATION6, "EGRESS_ROUTER_MODE": "init"}
    WORK.mkdir(exist_ok=True)
    payloads = {version: WORK / f"latency-payload{version}.txt" for version in (4, 6)}
    for version, payload in nat_payloads(env).items():
        payloads[version].write_text(payload, encoding="ascii")
    samples: dict[str, list[float]] = {name: [] for name, _, _ in DUAL_PIECES}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in DUAL_PIECES}
    for _ in range(rounds):
        if deadline.passed():
            break
        with Lab(dual_stack=True) as lab:
            for name, argv, family in DUAL_PIECES:
                run = timed_run(in_namespace(lab, "router", argv), None, timeout=RUN_TIMEOUT,
                                stdin_path=payloads[family] if family else None)
                if not run.ok:
                    raise BenchError(f"component {name!r} failed: {run.describe()}")
                imported = ndp_import_seconds(run.stderr) if name == NDP_IMPORT else None
                samples[name].append(imported or run.seconds)
                cpus[name].append(imported or run.cpu_seconds)
    for path in payloads.values():
        path.unlink()
    return samples, cpus


def ndp_import_seconds(importtime: str) -> float:
    """The cumulative import time of egress_router.net.ndp from `python -X importtime` output (after init's
    other imports, so what an IPv6 router pays on top)."""
    for line in importtime.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == "egress_router.net.ndp":
            return int(parts[1]) / 1e6
    raise BenchError("python -X importtime did not show egress_router.net.ndp")


def dual_compare(walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> tuple[list[str], list[list[str]], str]:
    """ours-dual against ours (IPv4) in the same rounds, wall and CPU time, and the verdict against the target."""
    def spread(stats: Stats) -> str:
        return f"{secs(stats.p25)}-{secs(stats.p75)} / {secs(stats.low)}-{secs(stats.high)}"

    rows, summary = [], []
    for kind, samples in (("wall", walls), ("CPU (user+sys, process tree)", cpus)):
        a, b = Stats.of(samples[DUAL]), Stats.of(samples["ours"])
        pairs = Stats.of([x / y for x, y in zip(samples[DUAL], samples["ours"], strict=True) if y])
        apart = "IQRs apart" if a.p25 > b.p75 or a.p75 < b.p25 else "IQRs overlap"
        rows += [[f"{kind}, ours-dual", secs(a.median), spread(a), f"{a.median / b.median:.2f}",
                  f"{pairs.median:.2f}, {pairs.p25:.2f}-{pairs.p75:.2f} ({pairs.low:.2f}-{pairs.high:.2f})", apart],
                 [f"{kind}, ours (IPv4)", secs(b.median), spread(b), "", "", ""]]
        summary.append(f"{kind.split(' ')[0]} {a.median / b.median:.2f} (per round {pairs.median:.2f}, {apart})")
    wall = Stats.of(walls[DUAL])
    target = DUAL_TARGET_SECONDS
    where = ("inside the IQR" if wall.p25 <= target <= wall.p75 else "inside the min-max spread"
             if wall.low <= target <= wall.high else "outside the spread")
    verdict = (f"ratio ours-dual/ours (medians): {'; '.join(summary)}\n"
               f"target: ours-dual under {target:.2f} s (median): {'MET' if wall.median < target else 'NOT MET'} "
               f"(median {secs(wall.median)}; {target:.2f} s is {where} of ours-dual's {wall.n} runs)")
    headers = ["", "median", "IQR / min-max", "ours-dual/ours (medians)", "per-round ratio: median, IQR (min-max)",
               "IQRs"]
    return headers, rows, verdict


def dual_breakdown(walls: dict[str, float], cpus: dict[str, float], runs: dict[str, tuple[float, float]],
                   since: dict[str, list[float]], changes: dict[str, int]) -> list[list[str]]:
    """Where ours-dual's extra time goes: the IPv6 tools and the NDP import (measured apart), the rest derived.
    `runs` holds the (wall, CPU) medians of the measured rounds for ours and ours-dual."""
    v6 = ("ip6tables-save -t nat", "ip6tables-save -t mangle", "ip6tables-restore --noflush (IPv6 payload)")
    v4 = ("iptables-save -t nat", "iptables-save -t mangle", "iptables-restore --noflush (IPv4 payload)")
    extra = [runs[DUAL][i] - runs["ours"][i] for i in (0, 1)]
    measured = [sum(parts.get(name, 0.0) for name in (*v6, NDP_IMPORT)) for parts in (walls, cpus)]

    def both(name: str) -> list[str]:
        return [secs(walls.get(name)), secs(cpus.get(name))]

    def own(who: str) -> str:
        return secs(statistics.median(since[who])) if since[who] else "-"

    return [
        ["extra: median ours-dual - median ours (IPv4), measured rounds", secs(extra[0]), secs(extra[1])],
        ["  ip6tables-save -t nat (once per run)", *both(v6[0])],
        ["  ip6tables-save -t mangle (once per run)", *both(v6[1])],
        ["  ip6tables-restore --noflush of the IPv6 payload (one transaction)", *both(v6[2])],
        ["  import of egress_router.net.ndp after init's other imports (-X importtime, in-process)", *both(NDP_IMPORT)],
        ["= measured apart", secs(measured[0]), secs(measured[1])],
        [f"rest (derived: extra - measured): {changes.get(DUAL, 0) - changes.get('ours', 0)} more changes "
         "(sysctls, address, routes) and their netlink reads, the NA, the plan",
         secs(extra[0] - measured[0]), secs(extra[1] - measured[1])],
        ["for comparison: the IPv4 tools in the same labs (2 x iptables-save + iptables-restore)",
         secs(sum(walls.get(name, 0.0) for name in v4)), secs(sum(cpus.get(name, 0.0) for name in v4))],
        ["router's own 'since start' figure, ours-dual / ours (10 ms ticks)", f"{own(DUAL)} / {own('ours')}", ""],
    ]


# (label, module file, function) whose calls and cumulative time a profiled init run shows, ours vs ours-dual
PROFILED = (
    ("router.configure: the whole run after the imports", "egress_router/router.py", "configure"),
    ("  prepare: reads, plan, tools, NAT tables read", "egress_router/router.py", "prepare"),
    ("  apply: the changes", "egress_router/router.py", "apply"),
    ("iptables-save/-restore processes (iptables._run)", "egress_router/net/iptables.py", "_run"),
    ("netlink requests (Rtnl.request, dumps included)", "egress_router/net/rtnl.py", "request"),
    ("sysctl changes (apply.sysctl_apply, its check included)", "egress_router/net/apply.py", "sysctl_apply"),
    ("addresses (apply.address_apply)", "egress_router/net/apply.py", "address_apply"),
    ("routes (apply.route_apply)", "egress_router/net/apply.py", "route_apply"),
    ("announcements: ARP, NA (apply.announce_apply)", "egress_router/net/apply.py", "announce_apply"),
    ("the plan (core.plan.build_plan)", "egress_router/core/plan.py", "build_plan"),
)


def profiled_runs(rounds: int, arping: str, deadline: Deadline) -> dict[str, dict[str, tuple[float, float]]]:
    """For ours and ours-dual: (calls, cumulative seconds) of each PROFILED function, medians of profiled init
    runs in fresh labs (cProfile slows the Python parts down; the call counts are exact)."""
    found: dict[str, dict[str, list[tuple[int, float]]]] = {who: {} for who in ("ours", DUAL)}
    program = router_command()
    for _ in range(rounds):
        for who in ("ours", DUAL):
            if deadline.passed():
                break
            out = WORK / f"profile-{who}.pstats"
            target = ["-m", "egress_router"] if program[0] == PYTHON else program[:1]
            with Lab(dual_stack=who == DUAL) as lab:
                run = timed_run(in_namespace(lab, "router", [PYTHON, "-m", "cProfile", "-o", str(out), *target]),
                                lab_env(lab, arping, dual=who == DUAL), timeout=RUN_TIMEOUT)
                if not run.ok:
                    raise BenchError(f"profiled {who} failed: {run.describe()}")
                verify(lab, who, dual=who == DUAL)
            table = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
            out.unlink()
            for (filename, _, function), (_, calls, _, cumulative, _) in table.items():
                for label, module, name in PROFILED:
                    if function == name and filename.endswith(module):
                        found[who].setdefault(label, []).append((calls, cumulative))
    return {who: {label: (statistics.median(c for c, _ in values), statistics.median(t for _, t in values))
                  for label, values in labels.items()} for who, labels in found.items()}


def profile_rows(found: dict[str, dict[str, tuple[float, float]]]) -> list[list[str]]:
    def cell(who: str, label: str) -> str:
        calls, seconds = found[who].get(label, (0, 0.0))
        return f"{calls:.0f} x, {secs(seconds)}" if calls else "-"

    return [[label, cell("ours", label), cell(DUAL, label)] for label, _, _ in PROFILED]


def import_profile() -> list[tuple[str, float]]:
    """The biggest top-level imports of init mode (python -X importtime, cumulative), once."""
    run = timed_run([PYTHON, "-X", "importtime", "-c", IMPORTS_ALL], None, timeout=RUN_TIMEOUT)
    found = []
    for line in run.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            if not name.startswith("  "):  # top level (indent one space for the package itself)
                found.append((name.strip(), int(parts[1]) / 1e6))
    return sorted(found, key=lambda item: -item[1])[:6]


def trace_breakdown(trace: Path, started_epoch: float, wall: float) -> dict[str, float]:
    """Seconds per kind of command in one traced reference run, plus what the script itself took."""
    parts: dict[str, float] = {}
    script_start = script_end = 0.0
    for line in trace.read_text().splitlines():
        label, start, end = line.split()
        if label == "script":
            script_start, script_end = float(start), float(end)
        else:
            parts[label] = parts.get(label, 0.0) + float(end) - float(start)
            parts[f"{label} calls"] = parts.get(f"{label} calls", 0) + 1
    commands = sum(parts.get(k, 0.0) for k in ("ip", "iptables", "arping"))
    parts["process start + bash start-up (until the script's first line)"] = script_start - started_epoch
    parts["bash itself (parsing, echo to /proc, fork of the job)"] = (script_end - script_start) - commands
    parts["exit"] = wall - (script_end - started_epoch)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="measured runs of each program (default 15)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer component runs")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each first (default 1)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop starting new rounds after this")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument("--baseline", metavar="TREE", type=Path, help=BASELINE_HELP)
    parser.add_argument("--dual-stack", action="store_true",
                        help="also measure ours-dual (both families, the demo's IPv4 and IPv6 rules) in the same "
                             f"rounds, rotating order, against the {DUAL_TARGET_SECONDS} s target")
    args = parser.parse_args()
    rounds = 3 if args.quick else max(1, min(args.rounds, 200))
    component_rounds = 2 if args.quick else min(5, rounds)
    traced_rounds = 2 if args.quick else min(5, rounds)

    require_root()
    arping = check_tools()
    assert arping is not None
    WORK.mkdir(exist_ok=True)
    info = machine_info(arping)
    baseline = load_baseline(args.baseline)
    contenders: tuple[str, ...] = ("ours", "reference")
    if baseline is not None:
        info["baseline"] = baseline.facts
        contenders = ("ours", "baseline", "reference")
    if args.dual_stack:
        contenders = ("ours", DUAL, *contenders[1:])
    order_of = rotating_order if args.dual_stack else round_order
    deadline = Deadline(args.max_seconds)
    warning = busy_warning(info)
    print("\n".join(machine_lines(info)))
    if warning:
        print(warning)
    ordering = "rotating" if args.dual_stack else "alternating"
    print(f"\n{rounds} round(s) each, {ordering} order, fresh lab per run; warm-up {args.warmup} each")

    for _ in range(max(0, args.warmup)):
        for who in contenders:
            measure(who, arping, baseline=baseline)

    walls: dict[str, list[float]] = {who: [] for who in contenders}
    cpus: dict[str, list[float]] = {who: [] for who in contenders}
    in_process: dict[str, list[float]] = {"ours": [], DUAL: [], "baseline": []}
    killed = 0
    changes: dict[str, int] = {}
    cpu_start = cpu_times()
    for index in range(rounds):
        if deadline.passed():
            print(f"time bound reached after {index} round(s)")
            break
        order = order_of(index, contenders)
        for who in order:
            run, background = measure(who, arping, baseline=baseline)
            walls[who].append(run.seconds)
            cpus[who].append(run.cpu_seconds)
            killed += background == "killed"
            if who in in_process and (found := READY.search(run.stderr)):
                in_process[who].append(float(found.group(1)))
            if found := CHANGES.search(run.stderr):
                changes[who] = int(found.group(1))
        print(f"  round {index + 1:>3}: " + ", ".join(f"{who} {secs(walls[who][-1]):>9}" for who in order), flush=True)

    busy, steal = cpu_share_since(cpu_start)
    info["CPU during the rounds"] = (f"{100 * busy:.0f}% not idle (the benchmark's own work included), "
                                     f"{100 * steal:.1f}% stolen by the hypervisor (/proc/stat)")
    stats = {who: Stats.of(walls[who]) for who in contenders}
    ours, ref = stats["ours"], stats["reference"]
    ratio = ours.median / ref.median
    columns = [who for who in ("ours", DUAL, "reference", "baseline") if who in stats]
    rows = [[label, *(secs(getattr(stats[who], key)) for who in columns)]
            for label, key in (("median", "median"), ("p90", "p90"), ("min", "low"), ("max", "high"),
                               ("mean", "mean"))]
    rows.insert(0, ["runs", *(str(stats[who].n) for who in columns)])
    labels = {"ours": "ours (egress-router)", DUAL: "ours-dual (dual-stack)", "reference": "reference (legacy shell)",
              "baseline": "baseline"}
    headers = ["", *(labels[who] for who in columns)]
    checked = " (ours-dual: and over IPv6 from 2001:db8:2::99)" if args.dual_stack else ""
    print(f"\ninit mode, process start to exit (verified after every run: TCP lands from 192.0.2.99{checked})")
    print(text_table(headers, rows))
    faster = ours.median < ref.median
    under = ours.median < TARGET_SECONDS
    verdict = (f"ratio ours/reference (medians): {ratio:.2f}"
               f" ({'ours faster' if faster else 'ours slower'}, x{max(ratio, 1 / ratio):.1f})\n"
               f"target: ours under {TARGET_SECONDS:.1f} s: {'MET' if under else 'NOT MET'} "
               f"(median {secs(ours.median)}); faster than the reference: {'MET' if faster else 'NOT MET'}")
    print(verdict)
    dual_report = dual_compare(walls, cpus) if args.dual_stack else None
    if dual_report:
        print(f"\ndual-stack: ours-dual vs ours (IPv4), {stats[DUAL].n} rotating rounds")
        print(text_table(dual_report[0], dual_report[1]))
        print(dual_report[2])
    if killed:
        print(f"note: {killed} background arping job(s) outlived {secs(6.0)} and were killed (by pidfd)")
    ab_rows = []
    if baseline is not None:
        ab_rows.append(ab_compare("init wall time (lower is better)", walls["ours"], walls["baseline"], secs,
                                  higher_better=False))
        if in_process["ours"] and in_process["baseline"]:
            ab_rows.append(ab_compare("router's own 'since start' figure (10 ms ticks)", in_process["ours"],
                                      in_process["baseline"], secs, higher_better=False))
        print(f"\nA/B: ours vs baseline ({baseline.tree}), {ours.n} alternating rounds; ratio ours/baseline is time")
        print(text_table(AB_HEADERS, ab_rows))

    # ---------------------------------------------------------------- where the time goes
    print("\nwhere the time goes (not part of the ratio)")
    components = {name: statistics.median(values)
                  for name, values in component_runs(component_rounds, deadline).items() if values}
    traces = []
    for index in range(traced_rounds):
        if deadline.passed():
            break
        trace = WORK / f"trace-{index}.txt"
        run, _ = measure("reference", arping, trace=trace)
        traces.append(trace_breakdown(trace, run.started_epoch, run.seconds) | {"wall": run.seconds})
        trace.unlink()
    ref_parts = {key: statistics.median(t[key] for t in traces) for key in traces[0]} if traces else {}
    imports = import_profile()

    base = components.get("python -c pass", 0.0)
    cli = components.get(f"python -c '{IMPORTS_CLI}'", 0.0)
    everything = components.get("python: all modules init needs", 0.0)
    ours_rows = [
        ["nsenter + exec of a no-op ('true')", secs(components.get("nsenter + exec of 'true'"))],
        ["python -c pass (interpreter start-up, via nsenter)", secs(base)],
        ["  + import egress_router.entry and config (no click on this path)", f"+{secs(cli - base)}"],
        ["  + pyroute2 message classes and the rest of init mode's imports", f"+{secs(everything - cli)}"],
        ["= all imports, before any work", secs(everything)],
        ["work after the imports (median wall - all imports)", secs(ours.median - everything)],
        ["  iptables-save -t nat alone (ours runs it once)", secs(components.get("iptables-save -t nat"))],
        ["  iptables-restore of our payload alone (once)",
         secs(components.get("iptables-restore --noflush (our payload)"))],
        ["router's own 'Ready ... s since start' figure (kernel process start time, 10 ms ticks)",
         secs(statistics.median(in_process["ours"])) if in_process["ours"] else "-"],
    ]
    print("ours, medians:")
    print(text_table(["", "time"], ours_rows))
    print("largest imports (python -X importtime, cumulative, one run): "
          + ", ".join(f"{name} {secs(value)}" for name, value in imports))
    ref_rows = []
    arping_share = 0.0
    if ref_parts:
        wall = ref_parts["wall"]
        for key, value in ref_parts.items():
            if key == "wall" or key.endswith(" calls"):
                continue
            calls = ref_parts.get(f"{key} calls", 0)
            label = {"ip": f"{calls:.0f} x ip (addr, link up, 3 x route)",
                     "iptables": f"{calls:.0f} x iptables (one process per rule)",
                     "arping": f"{calls:.0f} x arping -q -A -c 1 (waited for)"}.get(key, key)
            ref_rows.append([label, secs(value), f"{100 * value / wall:.0f}%"])
        ref_rows.append(["wall (traced runs)", secs(wall), "100%"])
        arping_share = ref_parts.get("arping", 0.0) / wall
        print(f"reference, medians of {len(traces)} traced run(s) (bash EPOCHREALTIME around each command):")
        print(text_table(["", "time", "share"], ref_rows))
        without = ref.median - ref_parts.get("arping", 0.0)
        print(f"reference wall minus its arping (derived, not measured as such): {secs(without)}; "
              f"ours/that = {ours.median / without:.1f}")
    dominant = ""
    if arping_share > 0.5:
        dominant = (f"arping dominates the reference: {100 * arping_share:.0f}% of its wall time is iputils "
                    "`arping -A -c 1`, which only exits when its 1 s interval has passed.")
        print(dominant)
    print(f"the largest single part of ours: interpreter start-up + imports {secs(everything)} "
          f"({100 * everything / ours.median:.0f}% of the median)")
    dual_rows: list[list[str]] = []
    prof_rows: list[list[str]] = []
    if args.dual_stack:
        piece_walls, piece_cpus = (
            {name: statistics.median(values) for name, values in found.items() if values}
            for found in dual_component_runs(component_rounds, deadline))
        medians = {who: (statistics.median(walls[who]), statistics.median(cpus[who])) for who in ("ours", DUAL)}
        dual_rows = dual_breakdown(piece_walls, piece_cpus, medians, in_process, changes)
        print(f"ours-dual, where its extra time goes (medians of {component_rounds} fresh dual-stack labs, "
              "each piece run alone via nsenter, in the router's order):")
        print(text_table(["", "wall", "CPU"], dual_rows))
        prof_rows = profile_rows(profiled_runs(component_rounds, arping, deadline))
        print(f"profiled init runs (cProfile, medians of {component_rounds} each; calls exact, times inflated):")
        print(text_table(["", "ours: calls, cumulative", "ours-dual: calls, cumulative"], prof_rows))

    info["load average at end"] = load_average()
    print(f"load average at start {info['load average at start']}, at end {info['load average at end']}")
    print(f"CPU during the rounds: {info['CPU during the rounds']}")
    steal_note = (f"note: the hypervisor stole {100 * steal:.1f}% of the CPU time during the rounds; the figures "
                  "are slower and noisier for it" if steal > 0.02 else "")
    if steal_note:
        print(steal_note)
    load_note = " ".join(note for note in (warning, steal_note) if note)
    if not args.no_results:
        lines = ["## setup_latency.py: init mode, process start to exit", "",
                 *machine_lines(info), "",
                 f"{ours.n} measured runs each (+{args.warmup} warm-up each), {ordering} order, a fresh lab per "
                 "run, every run verified (TCP from the client lands on the right server from 192.0.2.99). "
                 "Destination: the demo's 3 port rules + fallback.", "",
                 md_table(headers, rows), "",
                 "```", verdict, "```", "",
                 "Ours, where the time goes (medians of separate runs, not in the ratio):", "",
                 md_table(["", "time"], ours_rows), "",
                 "Largest imports (`python -X importtime`, cumulative): "
                 + ", ".join(f"{name} {secs(value)}" for name, value in imports), ""]
        if ref_rows:
            lines += [f"Reference, per command (medians of {len(traces)} traced runs):", "",
                      md_table(["", "time", "share"], ref_rows), ""]
        if dominant:
            lines += [dominant, ""]
        if dual_report:
            lines += [f"Dual-stack (`--dual-stack`): ours-dual is the same console script with both families "
                      "(`EGRESS_SOURCE=192.0.2.99/24,2001:db8:2::99/64`, `EGRESS_GATEWAY=192.0.2.1,2001:db8:2::1`, "
                      "the demo's rules for IPv4 and IPv6, 10 NAT rules) in a dual-stack lab; after every run TCP "
                      "over IPv4 and IPv6 landed on the right servers from 192.0.2.99 and 2001:db8:2::99. Rounds "
                      f"rotate the order of {', '.join(contenders)} (every order equally often over 6 rounds).", "",
                      md_table(dual_report[0], dual_report[1]), "", "```", dual_report[2], "```", "",
                      "Ours-dual, where its extra time goes (medians of separate runs in fresh dual-stack labs, "
                      "not in the ratio):", "", md_table(["", "wall", "CPU"], dual_rows), "",
                      f"Profiled init runs (cProfile in fresh labs, medians of {component_rounds} each; the call "
                      "counts are exact, the times inflated by the profiler):", "",
                      md_table(["", "ours: calls, cumulative", "ours-dual: calls, cumulative"], prof_rows), ""]
        if load_note:
            lines += [load_note, ""]
        if ab_rows:
            lines += [f"A/B against `--baseline` {baseline.facts if baseline else ''}:", "",
                      md_table(AB_HEADERS, ab_rows), ""]
        write_results("setup_latency", "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "labs torn down")
