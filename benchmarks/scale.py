#!/usr/bin/env python3
"""Scale: a 10,000-line EGRESS_DESTINATION (tcp ports 10000-19999 to 203.0.113.10, plus a fallback).

Run as root from the repository:  .venv/bin/python benchmarks/scale.py [--rounds N] [--quick]

  (a) validation only: the in-process parse/load/render times, and `egress-router validate` as a process
  (b) our init mode in a fresh lab: wall time to exit; then iptables-save must show 10,000 port
      rules (+ the fallback) in EGRESS-ROUTER-DNAT, and real TCP requests to a handful of the
      ports (and one fallback port) must land from 192.0.2.99
  (c) the legacy per-rule approach (benchmarks/reference/legacy-egress-router.sh) on 1,000 lines,
      and on 10,000 lines only if 1,000 took under --ref-threshold seconds, with a hard timeout
      (its process group is killed if exceeded; what it had applied by then is reported)

A limit met on the way: Linux refuses an environment string over 128 KiB (MAX_ARG_STRLEN), and
10,000 such lines are ~230 KB, so no process (no container either) can receive them in one
EGRESS_DESTINATION variable. The 10,000-line runs therefore hand the text over from a file inside
the process, not through execve: ours through a `python -c` wrapper that calls
egress_router.container.run_container() with the text in its env mapping (children such as
iptables-restore do not inherit it), the reference through a `bash -c` wrapper that reads the file
into a non-exported variable and sources the script. The 1,000-line runs use the real variable.
"""

from __future__ import annotations

import argparse
import errno
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    PYTHON,
    REFERENCE,
    WORK,
    BenchError,
    Deadline,
    Stats,
    busy_warning,
    check_tools,
    count_lines,
    in_namespace,
    load_average,
    machine_info,
    machine_lines,
    md_table,
    nat_payload,
    require_root,
    run_benchmark,
    secs,
    settle_background,
    text_table,
    timed_run,
    write_results,
)

from egress_router.core.config import load
from egress_router.core.nat import DNAT_CHAIN
from egress_router.core.redirect import parse_destinations
from egress_router.lab import ROUTER_POD_IP, SOURCE_IP, Lab, router_command

FIRST_PORT = 10000
TARGET_IP = "203.0.113.10"
FALLBACK_IP = "203.0.113.12"
FALLBACK_PORT = 20000 + 999  # not redirected by any port rule at any size used here
TARGET_SECONDS = 1.0
OURS_TIMEOUT = 120.0
ENV_STRING_LIMIT = 128 * 1024  # MAX_ARG_STRLEN, including "NAME=" and the NUL

OURS_WRAPPER = """\
import os, sys
from egress_router.container import run_container
env = dict(os.environ)
with open(sys.argv[1], encoding="utf-8") as handle:
    env["EGRESS_DESTINATION"] = handle.read()
sys.exit(run_container(env))
"""
VALIDATE_WRAPPER = """\
import os, sys
with open(sys.argv[1], encoding="utf-8") as handle:
    os.environ["EGRESS_DESTINATION"] = handle.read()
from egress_router.cli import main
main(["validate"])
"""
READY = re.compile(r"\(init mode, ([0-9.]+) s since start\)")
REFERENCE_WRAPPER = 'EGRESS_DESTINATION=$(< "$1"); . "$2"'


def destination(lines: int) -> str:
    rules = "".join(f"{FIRST_PORT + i} tcp {TARGET_IP}\n" for i in range(lines))
    return rules + f"{FALLBACK_IP}\n"


def fits_in_env(text: str) -> bool:
    return len("EGRESS_DESTINATION=") + len(text.encode()) + 1 <= ENV_STRING_LIMIT


def spot_ports(lines: int) -> list[int]:
    last = FIRST_PORT + lines - 1
    return sorted({FIRST_PORT, FIRST_PORT + 1, FIRST_PORT + lines // 2, last - 1, last})


def best_of(action: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- (a) validation

def validation(lines: int, repeats: int, files: dict[int, Path]) -> tuple[list[list[str]], str]:
    text = destination(lines)
    env = {"EGRESS_SOURCE": f"{SOURCE_IP}/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": text,
           "EGRESS_ROUTER_MODE": "init"}
    parse = Stats.of(best_of(lambda: parse_destinations(text), repeats))
    whole = Stats.of(best_of(lambda: load(env), repeats))
    payload = Stats.of(best_of(lambda: nat_payload(env), repeats))
    rows = [[f"parse_destinations, {lines:,} lines (in process)", secs(parse.median), secs(parse.low)],
            ["config.load (whole environment)", secs(whole.median), secs(whole.low)],
            ["load + plan + iptables-restore payload", secs(payload.median), secs(payload.low)]]
    # as a process: `egress-router validate`, through the real variable where it fits, else the wrapper
    for count, path in sorted(files.items()):
        body = path.read_text()
        base = {k: v for k, v in env.items() if k != "EGRESS_DESTINATION"}
        runs = []
        for _ in range(repeats):
            if fits_in_env(body):
                run = timed_run([*router_command(), "validate"], base | {"EGRESS_DESTINATION": body}, timeout=60)
                how = "env"
            else:
                run = timed_run([PYTHON, "-c", VALIDATE_WRAPPER, str(path)], base, timeout=60)
                how = "file wrapper"
            if not run.ok or f"{count} port rule(s)" not in run.stdout:
                raise BenchError(f"validate of {count} lines failed: {run.describe()}")
            runs.append(run.seconds)
        stats = Stats.of(runs)
        rows.append([f"egress-router validate, {count:,} lines ({how}), process", secs(stats.median),
                     secs(stats.low)])
    # the limit itself
    try:
        timed_run(["true"], {"EGRESS_DESTINATION": text}, timeout=10)
        limit = f"a {len(text):,}-byte EGRESS_DESTINATION was accepted by execve"
    except OSError as exc:
        if exc.errno != errno.E2BIG:
            raise
        per_line = len(f"{FIRST_PORT} tcp {TARGET_IP}\n")
        limit = (f"execve with the {lines:,}-line EGRESS_DESTINATION ({len(text):,} bytes) fails: "
                 f"{exc.strerror} (E2BIG; one environment string may be at most 128 KiB), so at most "
                 f"~{(ENV_STRING_LIMIT - 20) // per_line:,} lines of this width fit in the real variable")
    return rows, limit


# ---------------------------------------------------------------- (b)/(c) init runs in a fresh lab

def nat_rules(lab: Lab) -> str:
    done = lab.exec("router", ["iptables-save", "-t", "nat"], timeout=60)
    if done.returncode != 0:
        raise BenchError(f"iptables-save in the router namespace failed: {done.stderr.strip()}")
    return done.stdout


def spot_check(lab: Lab, who: str, lines: int) -> int:
    """Real TCP requests through the router to a handful of ports; returns how many were checked."""
    wanted = [(port, f"{TARGET_IP}:{port}") for port in spot_ports(lines)]
    wanted.append((FALLBACK_PORT, f"{FALLBACK_IP}:{FALLBACK_PORT}"))
    lab.serve([("tcp", landed.split(":")[0], port) for port, landed in wanted])
    for port, landed in wanted:
        try:
            reply = lab.request("tcp", ROUTER_POD_IP, port, timeout=5)
        except OSError as exc:
            raise BenchError(f"{who}: tcp to router port {port} failed: {exc}") from None
        if reply.landed != landed or reply.peer_ip != SOURCE_IP:
            raise BenchError(f"{who}: tcp to router port {port} landed on {reply.landed} from {reply.peer_ip}, "
                             f"expected {landed} from {SOURCE_IP}")
    return len(wanted)


def run_ours(lines: int, path: Path) -> dict[str, Any]:
    text = path.read_text()
    with Lab() as lab:
        if fits_in_env(text):
            how, program = "env", router_command()
            env = lab.router_env(text)
        else:
            how, program = "file wrapper", [PYTHON, "-c", OURS_WRAPPER, str(path)]
            env = lab.router_env("unused")
            del env["EGRESS_DESTINATION"]
        run = timed_run(in_namespace(lab, "router", program), env, timeout=OURS_TIMEOUT)
        if not run.ok:
            raise BenchError(f"ours ({lines} lines) failed: {run.describe()}")
        saved = nat_rules(lab)
        port_rules = count_lines(saved, f"-A {DNAT_CHAIN} ", "--dport")
        fallback = count_lines(saved, f"-A {DNAT_CHAIN} ", f"--to-destination {FALLBACK_IP}")
        if port_rules != lines or fallback != 1:
            raise BenchError(f"ours ({lines} lines): {DNAT_CHAIN} has {port_rules} port rules and {fallback} "
                             f"fallback rule(s), expected {lines} and 1")
        checked = spot_check(lab, "ours", lines)
    ready = READY.search(run.stderr)
    return {"run": run, "how": how, "rules": port_rules, "checked": checked,
            "in_process": float(ready.group(1)) if ready else None}


def run_reference(lines: int, path: Path, arping: str, timeout: float) -> dict[str, Any]:
    text = path.read_text()
    pidfile, trace = WORK / "scale-bg.pid", WORK / "scale-trace.txt"
    pidfile.unlink(missing_ok=True)
    trace.unlink(missing_ok=True)
    with Lab() as lab:
        env = lab.router_env("unused", ARPING=arping, LEGACY_BG_PIDFILE=str(pidfile), LEGACY_TRACE=str(trace))
        if fits_in_env(text):
            how, program = "env", [str(REFERENCE)]
            env["EGRESS_DESTINATION"] = text
        else:
            how, program = "file wrapper", ["bash", "-c", REFERENCE_WRAPPER, "legacy", str(path), str(REFERENCE)]
            del env["EGRESS_DESTINATION"]
        run = timed_run(in_namespace(lab, "router", program), env, timeout=timeout)
        settle_background(lab, pidfile)
        saved = nat_rules(lab)
        port_rules = count_lines(saved, "-A PREROUTING ", "--dport")
        result: dict[str, Any] = {"run": run, "how": how, "rules": port_rules, "checked": 0, "per_call": None}
        if run.returncode is None:
            return result  # killed at the timeout: report how far it got
        if not run.ok:
            raise BenchError(f"reference ({lines} lines) failed: {run.describe()}")
        fallback = count_lines(saved, "-A PREROUTING ", f"--to-destination {FALLBACK_IP}")
        if port_rules != lines or fallback != 1:
            raise BenchError(f"reference ({lines} lines): PREROUTING has {port_rules} port rules and {fallback} "
                             f"fallback rule(s), expected {lines} and 1")
        result["checked"] = spot_check(lab, "reference", lines)
    entries = [(label, float(start), float(end)) for label, start, end in
               (line.split() for line in trace.read_text().splitlines())]
    trace.unlink()
    calls = [end - start for label, start, end in entries if label == "iptables"]
    script = [end - start for label, start, end in entries if label == "script"]
    if len(calls) >= 200 and script:
        result["per_call"] = {
            "first": statistics.median(calls[:100]), "last": statistics.median(calls[-100:]),
            "iptables": sum(calls), "calls": len(calls), "script": script[0],
            "arping": sum(end - start for label, start, end in entries if label == "arping"),
            "ip": sum(end - start for label, start, end in entries if label == "ip"),
        }
    return result


def restore_alone(lines: int) -> tuple[float, float]:
    """iptables-restore of our payload for `lines` rules, then iptables-save, timed alone in a fresh lab."""
    env = {"EGRESS_SOURCE": f"{SOURCE_IP}/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_ROUTER_MODE": "init",
           "EGRESS_DESTINATION": destination(lines)}
    payload = WORK / "scale-payload.txt"
    payload.write_text(nat_payload(env), encoding="ascii")
    with Lab() as lab:
        restore = timed_run(in_namespace(lab, "router", ["iptables-restore", "--noflush", "--wait", "10"]), None,
                            timeout=OURS_TIMEOUT, stdin_path=payload)
        save = timed_run(in_namespace(lab, "router", ["iptables-save", "-t", "nat"]), None, timeout=OURS_TIMEOUT)
    payload.unlink()
    if not restore.ok or not save.ok or count_lines(save.stdout, f"-A {DNAT_CHAIN} ", "--dport") != lines:
        raise BenchError(f"iptables-restore/-save alone failed: {restore.describe()}\n{save.describe()}")
    return restore.seconds, save.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 round, and no 10,000-line reference run")
    parser.add_argument("--lines", type=int, default=10_000, help="the big size (default 10000, at most 50000)")
    parser.add_argument("--ref-lines", type=int, default=1_000, help="the reference's first size (default 1000)")
    parser.add_argument("--ref-threshold", type=float, default=20.0,
                        help="run the reference on --lines only if --ref-lines took less (s, default 20)")
    parser.add_argument("--ref-timeout", type=float, default=300.0,
                        help="hard timeout for one reference run on --lines (s, default 300)")
    parser.add_argument("--ref-big-rounds", type=int, default=1, help="reference runs on --lines (default 1)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop starting new runs after this")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    rounds = 1 if args.quick else max(1, min(args.rounds, 50))
    big, small = max(2, min(args.lines, 50_000)), max(2, min(args.ref_lines, args.lines))
    if big + FIRST_PORT > FALLBACK_PORT:
        sys.exit(f"--lines may be at most {FALLBACK_PORT - FIRST_PORT}")

    require_root()
    arping = check_tools()
    assert arping is not None
    WORK.mkdir(exist_ok=True)
    info = machine_info(arping)
    deadline = Deadline(args.max_seconds)
    warning = busy_warning(info)
    print("\n".join(machine_lines(info)))
    if warning:
        print(warning)
    files = {}
    for count in (small, big):
        files[count] = WORK / f"destination-{count}.txt"
        files[count].write_text(destination(count), encoding="utf-8")
    print(f"\ndestinations: tcp {FIRST_PORT}-{FIRST_PORT + big - 1} -> {TARGET_IP}, fallback {FALLBACK_IP}; "
          f"{big:,} lines = {len(destination(big)):,} bytes, {small:,} lines = {len(destination(small)):,} bytes")

    # (a)
    print("\n(a) validation only")
    valid_rows, limit = validation(big, max(3, rounds), files)
    print(text_table(["", "median", "min"], valid_rows))
    print(limit)

    # (b) + (c), small size: alternating ours / reference
    results: dict[tuple[str, int], list[dict[str, Any]]] = {("ours", small): [], ("reference", small): [],
                                                            ("ours", big): [], ("reference", big): []}
    print(f"\n(b)/(c) init mode in a fresh lab, {small:,} lines, {rounds} round(s), alternating")
    for index in range(rounds):
        if deadline.passed():
            break
        for who in (("ours", "reference") if index % 2 == 0 else ("reference", "ours")):
            outcome = run_ours(small, files[small]) if who == "ours" else \
                run_reference(small, files[small], arping, timeout=max(args.ref_timeout, 60))
            results[(who, small)].append(outcome)
            print(f"  {who:<9} {secs(outcome['run'].seconds):>9}  ({outcome['how']}, {outcome['rules']:,} port "
                  f"rules, {outcome['checked']} ports checked by TCP)", flush=True)
    ref_small = [r["run"].seconds for r in results[("reference", small)] if r["run"].ok]
    run_big_ref = (not args.quick and ref_small and statistics.median(ref_small) < args.ref_threshold)
    why_not = ("--quick" if args.quick else
               f"{small:,} lines took {secs(statistics.median(ref_small))} (threshold {args.ref_threshold:.0f} s)"
               if ref_small else "no successful small run")
    print(f"\n(b)/(c) init mode in a fresh lab, {big:,} lines, {rounds} round(s) of ours; reference: "
          + (f"{min(args.ref_big_rounds, rounds)} run(s), hard timeout {args.ref_timeout:.0f} s" if run_big_ref
             else f"not run ({why_not})"))
    ref_big_left = min(args.ref_big_rounds, rounds) if run_big_ref else 0
    for index in range(rounds):
        if deadline.passed():
            break
        order = ["ours", "reference"] if index % 2 == 0 else ["reference", "ours"]
        if ref_big_left <= 0:
            order.remove("reference")
        for who in order:
            if who == "ours":
                outcome = run_ours(big, files[big])
            else:
                ref_big_left -= 1
                outcome = run_reference(big, files[big], arping, timeout=args.ref_timeout)
            results[(who, big)].append(outcome)
            status = "" if outcome["run"].ok else f"  KILLED at the timeout, {outcome['rules']:,} rules applied by then"
            print(f"  {who:<9} {secs(outcome['run'].seconds):>9}  ({outcome['how']}, {outcome['rules']:,} port "
                  f"rules, {outcome['checked']} ports checked by TCP){status}", flush=True)

    tools = restore_alone(big) if not deadline.passed() else None
    for path in files.values():
        path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- report
    def cell(who: str, lines: int) -> tuple[str, float | None]:
        outcomes = results[(who, lines)]
        done = [o["run"].seconds for o in outcomes if o["run"].ok]
        killed = [o for o in outcomes if o["run"].returncode is None]
        if killed:
            o = killed[0]
            return (f"killed at {secs(o['run'].seconds)} with {o['rules']:,}/{lines:,} rules applied "
                    f"(measured)", None)
        if not done:
            return "not run", None
        stats = Stats.of(done)
        spread = f" (min {secs(stats.low)}, max {secs(stats.high)}, n={stats.n})" if stats.n > 1 else " (n=1)"
        return secs(stats.median) + spread, stats.median

    rows, medians = [], {}
    for lines in (small, big):
        ours_text, ours_median = cell("ours", lines)
        ref_text, ref_median = cell("reference", lines)
        medians[lines] = (ours_median, ref_median)
        ratio = f"{ours_median / ref_median:.3f}" if ours_median and ref_median else "-"
        how = {o["how"] for o in results[("ours", lines)] + results[("reference", lines)]}
        rows.append([f"{lines:,} lines ({', '.join(sorted(how))})", ours_text, ref_text, ratio])
    headers = ["init mode, wall to exit (median)", "ours (one iptables-restore)", "reference (iptables per rule)",
               "ours/ref"]
    print()
    print(text_table(headers, rows))
    notes = []
    big_ours = medians[big][0]
    if big_ours is not None:
        notes.append(f"target: ours under {TARGET_SECONDS:.0f} s for {big:,} lines: "
                     f"{'MET' if big_ours < TARGET_SECONDS else 'NOT MET'} (median {secs(big_ours)})")
    in_proc = [o["in_process"] for o in results[("ours", big)] if o["in_process"] is not None]
    if in_proc:
        notes.append(f"ours at {big:,} lines, the router's own 'Ready ... s' figure (router.run(): pyroute2 "
                     f"import + work, after the destination was parsed): median {statistics.median(in_proc):.2f} s")
    if tools:
        notes.append(f"alone, in a fresh lab (not in the ratio): iptables-restore --noflush of our {big:,}-line "
                     f"payload {secs(tools[0])}, then iptables-save -t nat of the result {secs(tools[1])}")
    for lines in (small, big):
        per_call = [o["per_call"] for o in results[("reference", lines)] if o["per_call"]]
        if per_call:
            p = per_call[0]
            rest = p["script"] - p["iptables"] - p["arping"] - p["ip"]
            notes.append(f"reference at {lines:,} lines, traced first run (bash EPOCHREALTIME): {p['calls']:,} "
                         f"iptables processes took {secs(p['iptables'])} in all, one call {secs(p['first'])} "
                         f"(median of the first 100) and {secs(p['last'])} (of the last 100); arping "
                         f"{secs(p['arping'])}; ip {secs(p['ip'])}; bash's own time (reading and "
                         f"regex-checking the lines, the loop, bookkeeping between commands) {secs(rest)}")
    if not run_big_ref:
        notes.append(f"reference at {big:,} lines: not run ({why_not}); nothing extrapolated")
    notes.append(limit)
    print("\n".join(notes))

    info["load average at end"] = load_average()
    print(f"load average at start {info['load average at start']}, at end {info['load average at end']}")
    if not args.no_results:
        body = ["## scale.py: a 10,000-line EGRESS_DESTINATION", "", *machine_lines(info), "",
                f"Destination: tcp ports {FIRST_PORT}-{FIRST_PORT + big - 1} to {TARGET_IP}, plus the fallback "
                f"{FALLBACK_IP}. A fresh lab per init run; after each, iptables-save must show every port rule and "
                "the fallback, and TCP requests to a handful of the ports (and one fallback port) must land from "
                f"{SOURCE_IP}. Rounds alternate ours/reference.", "",
                "(a) Validation only:", "", md_table(["", "median", "min"], valid_rows), "",
                "(b)/(c) Init mode:", "", md_table(headers, rows), "",
                *[f"- {note}" for note in notes], ""]
        write_results("scale", "\n".join(body))
    return 0


if __name__ == "__main__":
    run_benchmark(main, "labs torn down")
