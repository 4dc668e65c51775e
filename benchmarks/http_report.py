"""The report of benchmarks/http_proxy.py: the side-by-side table with issue 16's targets and verdicts, the
CPU table (who was the bottleneck), the plain GET against the direct path, the A/B table (--baseline) and
the cold probe's lines. Not part of the package."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from benchlib import AB_HEADERS, md_table, text_table
from proxybench import Results, bottleneck, cpu_per_unit, judged, ratio_digits, round_ratios

# issue 16's targets: ours/squid for the rates, ours/direct for the plain GET, ours/squid for p99 and memory
TARGETS = {"keepalive": 2.5, "close": 2.0, "connect": 2.5, "get_direct": 0.6, "p99": 1.0, "memory": 0.3}


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def report(results: Results, args: argparse.Namespace, sides: Sequence[str],
           ncpu: int) -> tuple[str, str, list[str]]:
    """The side-by-side table (text, markdown) and the CPU tables; with a baseline, also the A/B table;
    and one line per target with its verdict."""
    both = "ours" in sides and "squid" in sides
    baseline = "baseline" in sides
    verdicts: list[str] = []

    def ratio(test: str, key: str | None = None, other: str = "squid") -> float | None:
        a, b = results.median("ours", test, key), results.median(other, test, key)
        return a / b if other in sides and a is not None and b else None

    def row(label: str, test: str, key: str | None, scale: float, unit: str, digits: int, target: float | None,
            higher: bool = True) -> list[str]:
        ours = results.median("ours", test, key)
        squid = results.median("squid", test, key)
        r = ratio(test, key) if both else None
        goal = "-" if target is None else (f">= {target:g}x" if higher else f"<= {target:g}x")
        cell, line = "", ""
        if target is not None:
            per_round = round_ratios(results.values("ours", test, key), results.values("squid", test, key))
            cell, line = judged(r, per_round, target, higher)
        cells = [label, fmt(ours and ours * scale, unit, digits), fmt(squid and squid * scale, unit, digits),
                 fmt(r, "", ratio_digits(r, target)), goal, cell]
        if target is not None and r is not None:
            verdicts.append(f"{label.strip()}: ours/squid {cells[3]} (target {goal}): {line}")
        if baseline:
            base = results.median("baseline", test, key)
            cells += [fmt(base and base * scale, unit, digits), fmt(ratio(test, key, "baseline"), "", 3)]
        return cells

    rate = results.median("squid", "latency", "rate") or results.median("ours", "latency", "rate")
    rows = [
        row("keep-alive, req/s (64 connections, 1 KiB)", "keepalive", None, 1, "", 0, TARGETS["keepalive"]),
        row("Connection: close, req/s", "close", None, 1, "", 0, TARGETS["close"]),
        row(f"CONNECT tunnel, MB/s ({args.connect_mib} MiB)", "connect", None, 1, "", 0, TARGETS["connect"]),
        row(f"plain GET, MB/s ({args.get_mib} MiB body)", "get", None, 1, "", 0, None),
        get_row(results, sides, verdicts),
        row(f"p50 at ~{fmt(rate)} req/s, ms", "latency", "p50_us", 1e-3, "", 2, None, False),
        row(f"p99 at ~{fmt(rate)} req/s, ms", "latency", "p99_us", 1e-3, "", 2, TARGETS["p99"], False),
        row(f"RSS with {args.idle:,} idle connections, MiB", "memory", "rss", 1 / 1024, "", 1, TARGETS["memory"],
            False),
        row("  RSS per idle connection, KiB", "memory", "per_conn", 1, "", 1, None, False),
        row("  RSS before them (after the load), MiB", "memory", "base_rss", 1 / 1024, "", 1, None, False),
        row(f"  PSS with {args.idle:,} idle connections, MiB", "memory", "pss", 1 / 1024, "", 1, None, False),
        row("RSS right after start, MiB", "rss_fresh", None, 1 / 1024, "", 1, None, False),
        row("RSS after the close run, MiB", "close", "rss_after", 1 / 1024, "", 1, None, False),
    ]
    headers = ["", "ours", "squid", "ours/squid", "target", "", *(["baseline", "ours/baseline"] if baseline else [])]
    cpu_headers = ["test", "side", "proxy", "busiest proxy proc", "proxy user/kernel, µs per unit",
                   "proxy waited for a CPU", "load tool", "origin", "softirq", "others", "machine (all CPUs)",
                   "bottleneck"]
    cpu_rows = []
    tools = {"keepalive": "wrk", "close": "wrk", "latency": "wrk", "connect": "tunnel client", "get": "GET client"}
    for test in ("keepalive", "close", "latency", "connect", "get"):
        for side in (*sides, "origin"):
            samples = results.samples.get((side, test))
            if not samples or not samples[0].cpu:
                continue
            med = {k: statistics.median(m.cpu.get(k, 0.0) for m in samples) for k in samples[0].cpu}
            unit = "MB" if test in ("connect", "get") else "request"
            proxied = side != "origin"
            cpu_rows.append([test, side if proxied else "no proxy", fmt(med.get("proxy"), "%"),
                             fmt(med.get("proxy busiest"), "%"), cpu_per_unit(samples, unit) if proxied else "-",
                             fmt(med.get("proxy waited"), "%") if proxied else "-", fmt(med.get("tool"), "%"),
                             fmt(med.get("origin"), "%"), fmt(med.get("softirq"), "%"), fmt(med.get("others"), "%"),
                             fmt(med.get("machine"), "%"),
                             "-" if test == "latency" else bottleneck(med, tools[test], ncpu)])
    per_life = get_lines(results, sides)
    text = text_table(headers, rows) + "".join(f"\n{line}" for line in per_life) + \
        "\n\nCPU, medians, % of one core (machine: % of all CPUs)\n" + text_table(cpu_headers, cpu_rows)
    md = md_table(headers, rows) + "".join(f"\n\n{line}" for line in per_life) + \
        "\n\nCPU during the runs (medians; % of one core, machine: % of all " \
        f"{ncpu} CPUs; 'others' is everything else on the machine):\n\n" + md_table(cpu_headers, cpu_rows)
    if baseline:
        ab_rows = ab_table(results)
        title = (f"A/B: ours vs baseline, {len(results.values('ours', 'keepalive'))} alternating round(s); "
                 "ratios ours/baseline (rates: higher is better; latency, memory: lower is better)")
        text += f"\n\n{title}\n" + text_table(AB_HEADERS, ab_rows)
        md += f"\n\n{title}:\n\n" + md_table(AB_HEADERS, ab_rows)
    if not verdicts:
        verdicts.append("no verdicts (ours and squid were not both run: --only)")
    return text, md, verdicts


def get_row(results: Results, sides: Sequence[str], verdicts: list[str]) -> list[str]:
    """The plain GET against the direct path: each side's median over the median of the direct GETs."""
    direct = results.median("origin", "get")

    def over_direct(side: str) -> float | None:
        value = results.median(side, "get")
        return value / direct if side in sides and value is not None and direct else None

    target = TARGETS["get_direct"]
    ours = over_direct("ours")
    cell, line = judged(ours, per_life_ratios(results, "ours"), target)
    cells = [f"  plain GET / direct ({fmt(direct)} MB/s, router namespace)", fmt(ours, "x", 2),
             fmt(over_direct("squid"), "x", 2), "-", f">= {target:g}x direct", cell]
    if ours is not None:
        verdicts.append(f"plain GET: ours/direct {ours:.{ratio_digits(ours, target)}f} (target >= {target:g}x; "
                        f"squid/direct {fmt(over_direct('squid'), '', 2)}): {line}")
    if "baseline" in sides:
        cells += [fmt(over_direct("baseline"), "x", 2), "-"]
    return cells


def per_life_ratios(results: Results, side: str) -> list[float]:
    """The ratio of each plain GET of `side` to the direct GET of the same proxy life (the spread)."""
    return [m.value / m.extra["direct"] for m in results.samples.get((side, "get"), []) if m.extra.get("direct")]


def get_lines(results: Results, sides: Sequence[str]) -> list[str]:
    """Per side, the ratio of each plain GET to the direct GET of the same proxy life (the spread)."""
    lines = []
    for side in sides:
        ratios = per_life_ratios(results, side)
        if ratios:
            lines.append(f"plain GET / direct GET of the same life, {side}: " + ", ".join(f"{r:.2f}" for r in ratios))
    return lines


def ab_table(results: Results) -> list[list[str]]:
    """Ours against the baseline per measurement, over the rounds: medians, spread, ratios."""
    tests: list[tuple[str, str, str | None, float, int, bool]] = [
        ("keep-alive, req/s", "keepalive", None, 1.0, 0, True),
        ("Connection: close, req/s", "close", None, 1.0, 0, True),
        ("CONNECT tunnel, MB/s", "connect", None, 1.0, 0, True),
        ("plain GET, MB/s", "get", None, 1.0, 0, True),
        ("p50 latency, ms", "latency", "p50_us", 1e-3, 2, False),
        ("p99 latency, ms", "latency", "p99_us", 1e-3, 2, False),
        ("RSS with idle connections, MiB", "memory", "rss", 1 / 1024, 1, False),
    ]
    return results.ab_rows(tests)


def probe_lines(results: Results, args: argparse.Namespace) -> list[str]:
    lines = []
    for side, slices in results.probe.items():
        closes = [v for kind, v, _ in slices if kind == "close"]
        keeps = [v for kind, v, _ in slices if kind != "close"]
        lines.append(f"- {side}, fresh, Connection: close first ({args.probe_slice:g} s slices): close "
                     + ", ".join(f"{v:.0f}" for v in closes) + " req/s; then keep-alive "
                     + ", ".join(f"{v:.0f}" for v in keeps) + f" req/s; RSS at the end {slices[-1][2] / 1024:.0f} MiB")
    return lines
