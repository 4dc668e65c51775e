"""The report of benchmarks/dns_proxy.py, one comparison at a time: the side-by-side table with the targets
and their verdicts, the CPU table (who was the bottleneck), and with --baseline the A/B table. Not part of
the package."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from benchlib import AB_HEADERS, md_table, text_table
from proxybench import Results, bottleneck, cpu_per_unit, judged, ratio_digits, round_ratios

CONNECTIONS = 64  # wrk -c, as dns_proxy.py runs it

# (test, key, bound on ours/haproxy, higher is better, whose bound): issue 16's for both comparisons; the
# bulk bounds are this benchmark's own (the issue sets none)
TARGETS = (
    ("bulk1", None, 1.0, True, "benchmark"),
    ("bulk4", None, 1.0, True, "benchmark"),
    ("keepalive", None, 1.0, True, "issue 16"),
    ("close", None, 0.8, True, "issue 16"),
    ("latency", "p99_us", 1.0, False, "issue 16"),
    ("memory", "rss_per_conn", 1.0, False, "issue 16"),
)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def shape(results: Results, side: str) -> str:
    """What a side ran as: its processes and threads (counted after the warm-up of its last life)."""
    procs, threads = results.workers.get(side), results.threads.get(side)
    return "-" if procs is None else f"{procs} process(es), {threads} thread(s)"


def report(results: Results, args: argparse.Namespace, sides: Sequence[str], ncpu: int,
           title: str) -> tuple[str, str, list[str]]:
    """Text and markdown tables of one comparison, and one verdict line per target (prefixed with `title`)."""
    both = "ours" in sides and "haproxy" in sides
    baseline = "baseline" in sides
    floor = "floor" in sides and "haproxy" in sides  # the floor relay (dns_proxy.py --floor): beside, not judged
    targets = {(t, k): (bound, higher, whose) for t, k, bound, higher, whose in TARGETS}
    verdicts = []

    def row(label: str, test: str, key: str | None = None, scale: float = 1.0, digits: int = 0) -> list[str]:
        ours, ref = results.median("ours", test, key), results.median("haproxy", test, key)
        ratio = ours / ref if both and ours is not None and ref else None
        goal, verdict = "", ""
        bound_of = targets[(test, key)][0] if (test, key) in targets else None
        if (test, key) in targets:
            bound, higher, whose = targets[(test, key)]
            goal = f">= {bound:g}x" if higher else f"<= {bound:g}x"
            if ratio is not None:
                per_round = round_ratios(results.values("ours", test, key), results.values("haproxy", test, key))
                verdict, line = judged(ratio, per_round, bound, higher)
                verdicts.append(f"{title}: {label}: ours/haproxy {ratio:.{ratio_digits(ratio, bound)}f} "
                                f"({goal}, {whose}): {line}")
        cells = [label, fmt(ours and ours * scale, digits), fmt(ref and ref * scale, digits),
                 fmt(ratio, ratio_digits(ratio, bound_of)), goal, verdict]
        if baseline:
            base = results.median("baseline", test, key)
            cells += [fmt(base and base * scale, digits), fmt(ours / base if ours is not None and base else None, 3)]
        if floor:
            low = results.median("floor", test, key)
            cells += [fmt(low and low * scale, digits), fmt(low / ref if low is not None and ref else None, 2),
                      fmt(ours / low if ours is not None and low else None, 2)]
        return cells

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
    headers = ["", "ours", "haproxy", "ours/haproxy", "target", "",
               *(["baseline", "ours/baseline"] if baseline else []),
               *(["floor", "floor/haproxy", "ours/floor"] if floor else [])]
    cpu_headers = ["test", "side", "proxy", "busiest proxy thread", "proxy user/kernel, µs per unit",
                   "proxy waited for a CPU", "load tool", "backend", "softirq", "others", "machine (all CPUs)",
                   "bottleneck"]
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
            unit = "MB" if test.startswith("bulk") else "connection" if test == "close" else "request"
            cpu_rows.append([test, side if side != "direct" else "no proxy", fmt(med.get("proxy")) + "%",
                             fmt(med.get("proxy busiest")) + "%",
                             cpu_per_unit(samples, unit) if side != "direct" else "-",
                             fmt(med.get("proxy waited")) + "%" if side != "direct" else "-",
                             fmt(med.get("tool")) + "%",
                             fmt(med.get("origin")) + "%", fmt(med.get("softirq")) + "%",
                             fmt(med.get("others")) + "%", fmt(med.get("machine")) + "%", neck])
    ran = "; ".join(f"{side}: {shape(results, side)}" for side in sides)
    text = (text_table(headers, rows) + f"\nran as: {ran}\n\nCPU, medians, % of one core (machine: % of all CPUs)\n"
            + text_table(cpu_headers, cpu_rows))
    md = (md_table(headers, rows) + f"\n\nRan as: {ran}.\n\nCPU during the runs (medians; % of one core; machine: "
          f"% of all {ncpu} CPUs; 'others' is everything else on the machine):\n\n" + md_table(cpu_headers, cpu_rows))
    if baseline:
        ab_rows = ab_table(results)
        heading = (f"A/B: ours vs baseline, {len(results.values('ours', 'keepalive'))} alternating round(s); "
                   "ratios ours/baseline (rates: higher is better; latency, memory: lower is better)")
        text += f"\n\n{heading}\n" + text_table(AB_HEADERS, ab_rows)
        md += f"\n\n{heading}:\n\n" + md_table(AB_HEADERS, ab_rows)
    if not verdicts:
        verdicts.append(f"{title}: no verdicts (haproxy was not run: --only)")
    return text, md, verdicts


def ab_table(results: Results) -> list[list[str]]:
    """Ours against the baseline per measurement, over the rounds: medians, spread, ratios."""
    tests: list[tuple[str, str, str | None, float, int, bool]] = [
        ("bulk, 1 stream, Gbit/s", "bulk1", None, 1.0, 2, True),
        ("bulk, 4 streams, Gbit/s", "bulk4", None, 1.0, 2, True),
        ("keep-alive, req/s", "keepalive", None, 1.0, 0, True),
        ("Connection: close, conn/s", "close", None, 1.0, 0, True),
        ("p50 latency, ms", "latency", "p50_us", 1e-3, 2, False),
        ("p99 latency, ms", "latency", "p99_us", 1e-3, 2, False),
        ("RSS per idle connection, KiB", "memory", "rss_per_conn", 1.0, 1, False),
    ]
    return results.ab_rows(tests)
