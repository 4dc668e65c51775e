"""Counters shared by all worker processes (one slot per worker in shared memory) and their Prometheus text."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

# Counter indexes (each worker owns one row: a single writer per cell, so no locking is needed).
ALLOWED, DENIED, BAD, TUNNELS, BYTES_UP, BYTES_DOWN, OPEN, UPSTREAM_ERRORS, UPSTREAM_TIMEOUTS, REJECTED = range(10)
# Name lookups (proxy/lookup.py): requests answered 504 because theirs timed out; lookups made, by outcome.
DNS_TIMEOUTS, LOOKUPS_ANSWERED, LOOKUPS_NOT_FOUND, LOOKUPS_FAILED, LOOKUPS_TIMED_OUT = range(10, 15)
# Rule reloads (proxy/reload.py) applied and refused; written by the deciding process only (the master, or the
# only process) into row 0, which its worker 0 never writes these cells of.
RELOADS, RELOAD_FAILURES = range(15, 17)
WIDTH = 17


class SharedCounters:
    """Made before the workers fork; every process sees every row."""

    def __init__(self, workers: int):
        self.workers = workers
        self._map = mmap.mmap(-1, max(1, workers) * WIDTH * 8, flags=mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("Q")

    def row(self, worker: int) -> WorkerCounters:
        return WorkerCounters(self, worker * WIDTH)

    def total(self, index: int) -> int:
        return sum(self.cells[w * WIDTH + index] for w in range(self.workers))

    def reset_row(self, worker: int) -> None:
        """A replaced worker starts with no open connections (its counts are kept)."""
        self.cells[worker * WIDTH + OPEN] = 0


class WorkerCounters:
    __slots__ = ("cells", "base", "shared")

    def __init__(self, shared: SharedCounters, base: int):
        self.shared = shared
        self.cells = shared.cells
        self.base = base

    def add(self, index: int, amount: int = 1) -> None:
        self.cells[self.base + index] += amount

    def sub(self, index: int, amount: int = 1) -> None:
        cell = self.base + index
        self.cells[cell] = max(0, self.cells[cell] - amount)


def prometheus_http(shared: SharedCounters) -> str:
    total = shared.total
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, int]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("egress_router_http_requests_total", "counter", "Proxy requests and tunnels by verdict.",
           [('{verdict="allowed"}', total(ALLOWED)), ('{verdict="denied"}', total(DENIED)),
            ('{verdict="bad_request"}', total(BAD))])
    metric("egress_router_http_tunnels_total", "counter", "CONNECT tunnels established.", [("", total(TUNNELS))])
    metric("egress_router_http_bytes_total", "counter", "Bytes relayed (payload), by direction.",
           [('{direction="upstream"}', total(BYTES_UP)), ('{direction="downstream"}', total(BYTES_DOWN))])
    metric("egress_router_http_open_connections", "gauge", "Client connections open now.", [("", total(OPEN))])
    metric("egress_router_http_upstream_errors_total", "counter", "Upstream connections that failed, by kind.",
           [('{kind="unreachable"}', total(UPSTREAM_ERRORS)), ('{kind="timeout"}', total(UPSTREAM_TIMEOUTS)),
            ('{kind="dns_timeout"}', total(DNS_TIMEOUTS))])
    metric("egress_router_http_dns_lookups_total", "counter",
           "DNS lookups made (requests waiting for the same name share one; cached answers make none), by result.",
           [('{result="answered"}', total(LOOKUPS_ANSWERED)), ('{result="not_found"}', total(LOOKUPS_NOT_FOUND)),
            ('{result="failed"}', total(LOOKUPS_FAILED)), ('{result="timeout"}', total(LOOKUPS_TIMED_OUT))])
    metric("egress_router_http_rejected_connections_total", "counter",
           "Client connections refused because the connection limit was reached.", [("", total(REJECTED))])
    metric("egress_router_http_reloads_total", "counter",
           "Reloads of the allow list (its file changed, or SIGHUP), by result: applied, or failed (the list in "
           "force stays).", [('{result="applied"}', total(RELOADS)), ('{result="failed"}', total(RELOAD_FAILURES))])
    return "\n".join(lines) + "\n"
