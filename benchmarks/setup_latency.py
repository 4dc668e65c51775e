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

Then, outside the ratio, where the time goes: interpreter start-up and imports for ours, and a
per-command trace (ip, iptables, arping) of the reference.
"""

from __future__ import annotations

import argparse
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
    in_namespace,
    load_average,
    load_baseline,
    machine_info,
    machine_lines,
    md_table,
    nat_payload,
    require_root,
    round_order,
    run_benchmark,
    secs,
    settle_background,
    text_table,
    timed_run,
    write_results,
)

from egress_router.lab import DEMO_DESTINATION, ROUTER_POD_IP, SOURCE_IP, Lab, router_command

TARGET_SECONDS = 0.3
RUN_TIMEOUT = 30.0
# (router port, where it must land) for the demo destination, checked after every run
CHECKS = ((80, "203.0.113.10:80"), (8080, "203.0.113.11:80"), (7000, "203.0.113.12:7000"))
SERVERS = [("tcp", landed.split(":")[0], int(landed.split(":")[1])) for _, landed in CHECKS]
READY = re.compile(r"\(init mode, ([0-9.]+) s since start\)")
IMPORTS_CLI = "import egress_router.entry, egress_router.container, egress_router.core.config"
IMPORTS_ALL = ("import egress_router.entry, egress_router.container, egress_router.core.config, egress_router.router\n"
               "from egress_router.net.pyroute import load_pyroute2_modules\n"
               "load_pyroute2_modules()")


def lab_env(lab: Lab, arping: str, **extra: str) -> dict[str, str]:
    """One environment for both programs: the lab's EGRESS_* plus the reference's ARPING."""
    env = lab.router_env(DEMO_DESTINATION, mode="init")
    env["ARPING"] = arping
    env.update(extra)
    return env


def verify(lab: Lab, who: str) -> None:
    lab.serve(SERVERS)
    for port, landed in CHECKS:
        try:
            reply = lab.request("tcp", ROUTER_POD_IP, port)
        except OSError as exc:
            raise BenchError(f"{who}: tcp request to router port {port} failed after init: {exc}") from None
        if reply.landed != landed or reply.peer_ip != SOURCE_IP:
            raise BenchError(f"{who}: tcp to router port {port} landed on {reply.landed} from {reply.peer_ip}, "
                             f"expected {landed} from {SOURCE_IP}")


def measure(who: str, arping: str, *, trace: Path | None = None, baseline: Baseline | None = None) -> tuple[Run, str]:
    """One init-mode run of `who` (ours, reference, or baseline: the one given) in a fresh lab, verified.
    Returns the run and the background job's fate."""
    pidfile = WORK / f"bg-{who}.pid"
    pidfile.unlink(missing_ok=True)
    with Lab() as lab:
        extra = {"LEGACY_BG_PIDFILE": str(pidfile)}
        if trace is not None:
            extra["LEGACY_TRACE"] = str(trace)
        env = lab_env(lab, arping, **extra)
        program = router_command() if who == "ours" else [str(REFERENCE)]
        if who == "baseline":
            assert baseline is not None
            program, env = baseline.command(), baseline.env(env)
        run = timed_run(in_namespace(lab, "router", program), env, timeout=RUN_TIMEOUT)
        background = settle_background(lab, pidfile) if who == "reference" else "none"
        if not run.ok:
            raise BenchError(f"{who} failed: {run.describe()}")
        verify(lab, who)
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
    deadline = Deadline(args.max_seconds)
    warning = busy_warning(info)
    print("\n".join(machine_lines(info)))
    if warning:
        print(warning)
    print(f"\n{rounds} round(s) each, alternating order, fresh lab per run; warm-up {args.warmup} each")

    for _ in range(max(0, args.warmup)):
        for who in contenders:
            measure(who, arping, baseline=baseline)

    walls: dict[str, list[float]] = {who: [] for who in contenders}
    in_process: dict[str, list[float]] = {"ours": [], "baseline": []}
    killed = 0
    for index in range(rounds):
        if deadline.passed():
            print(f"time bound reached after {index} round(s)")
            break
        order = round_order(index, contenders)
        for who in order:
            run, background = measure(who, arping, baseline=baseline)
            walls[who].append(run.seconds)
            killed += background == "killed"
            if who in in_process and (found := READY.search(run.stderr)):
                in_process[who].append(float(found.group(1)))
        print(f"  round {index + 1:>3}: " + ", ".join(f"{who} {secs(walls[who][-1]):>9}" for who in order), flush=True)

    stats = {who: Stats.of(walls[who]) for who in contenders}
    ours, ref = stats["ours"], stats["reference"]
    ratio = ours.median / ref.median
    columns = [who for who in ("ours", "reference", "baseline") if who in stats]
    rows = [[label, *(secs(getattr(stats[who], key)) for who in columns)]
            for label, key in (("median", "median"), ("p90", "p90"), ("min", "low"), ("max", "high"),
                               ("mean", "mean"))]
    rows.insert(0, ["runs", *(str(stats[who].n) for who in columns)])
    headers = ["", "ours (egress-router)", "reference (legacy shell)", *(["baseline"] if baseline else [])]
    print("\ninit mode, process start to exit (verified after every run: TCP lands from 192.0.2.99)")
    print(text_table(headers, rows))
    faster = ours.median < ref.median
    under = ours.median < TARGET_SECONDS
    verdict = (f"ratio ours/reference (medians): {ratio:.2f}"
               f" ({'ours faster' if faster else 'ours slower'}, x{max(ratio, 1 / ratio):.1f})\n"
               f"target: ours under {TARGET_SECONDS:.1f} s: {'MET' if under else 'NOT MET'} "
               f"(median {secs(ours.median)}); faster than the reference: {'MET' if faster else 'NOT MET'}")
    print(verdict)
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

    info["load average at end"] = load_average()
    print(f"load average at start {info['load average at start']}, at end {info['load average at end']}")
    if not args.no_results:
        lines = ["## setup_latency.py: init mode, process start to exit", "",
                 *machine_lines(info), "",
                 f"{ours.n} measured runs each (+{args.warmup} warm-up each), alternating order, a fresh lab per "
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
        if ab_rows:
            lines += [f"A/B against `--baseline` {baseline.facts if baseline else ''}:", "",
                      md_table(AB_HEADERS, ab_rows), ""]
        write_results("setup_latency", "\n".join(lines))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "labs torn down")
