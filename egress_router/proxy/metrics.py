"""Counters shared by all worker processes (one slot per worker in shared memory) and their Prometheus text."""

from __future__ import annotations

import mmap
from bisect import bisect_left

from ..core.exposition import DURATION_BUCKETS, Family, histogram, labelled, render, single

# Counter indexes (each worker owns one row: a single writer per cell, so no locking is needed).
ALLOWED, DENIED, BAD, TUNNELS, BYTES_UP, BYTES_DOWN, OPEN, UPSTREAM_ERRORS, UPSTREAM_TIMEOUTS, REJECTED = range(10)
# Name lookups (proxy/lookup.py): requests answered 504 because theirs timed out; lookups made, by outcome.
DNS_TIMEOUTS, LOOKUPS_ANSWERED, LOOKUPS_NOT_FOUND, LOOKUPS_FAILED, LOOKUPS_TIMED_OUT = range(10, 15)
# Rule reloads (proxy/reload.py) applied and refused; written by the deciding process only (the master, or the
# only process) into row 0, which its worker 0 never writes these cells of.
RELOADS, RELOAD_FAILURES = range(15, 17)
STANDBY = 17  # requests a standby replica refused (high availability: ha_keeper.py)
# HTTP request durations: per kind, one cell per bucket (the last: above every bound) and the sum in microseconds.
REQUEST, CONNECT = 0, 1
KINDS = ("request", "connect")
DURATIONS = 18
BUCKETS = len(DURATION_BUCKETS) + 1
SERIES = BUCKETS + 1
WIDTH = DURATIONS + len(KINDS) * SERIES


class SharedCounters:
    """Made before the workers fork; every process sees every row."""

    def __init__(self, workers: int):
        self.workers = workers
        self._map = mmap.mmap(-1, max(1, workers) * WIDTH * 8, flags=mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("Q")

    def row(self, worker: int) -> WorkerCounters:
        return WorkerCounters(self, worker * WIDTH)

    def total(self, index: int) -> int:
        # a strided view of the column, summed in C: called per accepted connection (the connection limit)
        return sum(self.cells[index:self.workers * WIDTH:WIDTH])

    def reset_row(self, worker: int) -> None:
        """A replaced worker starts with no open connections (its counts are kept)."""
        self.cells[worker * WIDTH + OPEN] = 0


class WorkerCounters:
    """One worker's row. `cells` is a view of the row alone (the same shared memory), so that the per-request
    updates index it directly, without adding the row's offset each time."""

    __slots__ = ("cells", "base", "shared")

    def __init__(self, shared: SharedCounters, base: int):
        self.shared = shared
        self.cells = shared.cells[base:base + WIDTH]
        self.base = base

    def add(self, index: int, amount: int = 1) -> None:
        self.cells[index] += amount

    def sub(self, index: int, amount: int = 1) -> None:
        cells = self.cells
        cells[index] = max(0, cells[index] - amount)

    def observe(self, kind: int, seconds: float) -> None:
        """One request of `kind` (REQUEST, CONNECT) that took `seconds`, into its duration histogram."""
        base = DURATIONS + kind * SERIES
        cells = self.cells
        cells[base + bisect_left(DURATION_BUCKETS, seconds)] += 1
        cells[base + BUCKETS] += int(seconds * 1_000_000)


def prometheus_http(shared: SharedCounters) -> str:
    """The proxy port's /metrics (when no admin port serves them)."""
    return render(http_families(shared))


def by(key: str, **values: int) -> list[tuple[tuple[tuple[str, str], ...], int]]:
    """Samples of one label: by("verdict", allowed=3) -> [((("verdict", "allowed"),), 3)]."""
    return [(((key, value),), count) for value, count in values.items()]


def http_families(shared: SharedCounters) -> list[Family]:
    total = shared.total
    families = [
        labelled("egress_router_http_requests_total", "counter", "Proxy requests and tunnels by verdict "
                 "(standby: refused by a standby replica, high availability).",
                 by("verdict", allowed=total(ALLOWED), denied=total(DENIED), bad_request=total(BAD),
                    standby=total(STANDBY))),
        single("egress_router_http_tunnels_total", "counter", "CONNECT tunnels established.", total(TUNNELS)),
        labelled("egress_router_http_bytes_total", "counter", "Bytes relayed (payload), by direction.",
                 by("direction", upstream=total(BYTES_UP), downstream=total(BYTES_DOWN))),
        single("egress_router_http_open_connections", "gauge", "Client connections open now.", total(OPEN)),
        labelled("egress_router_http_upstream_errors_total", "counter", "Upstream connections that failed, by kind.",
                 by("kind", unreachable=total(UPSTREAM_ERRORS), timeout=total(UPSTREAM_TIMEOUTS),
                    dns_timeout=total(DNS_TIMEOUTS))),
        labelled("egress_router_http_dns_lookups_total", "counter", "DNS lookups made (requests waiting for the "
                 "same name share one; cached answers make none), by result.",
                 by("result", answered=total(LOOKUPS_ANSWERED), not_found=total(LOOKUPS_NOT_FOUND),
                    failed=total(LOOKUPS_FAILED), timeout=total(LOOKUPS_TIMED_OUT))),
        single("egress_router_http_rejected_connections_total", "counter",
               "Client connections refused because the connection limit was reached.", total(REJECTED)),
        labelled("egress_router_http_reloads_total", "counter",
                 "Reloads of the allow list (its file changed, or SIGHUP), by result: applied, or failed (the list in "
                 "force stays).", by("result", applied=total(RELOADS), failed=total(RELOAD_FAILURES))),
    ]
    series = []
    for kind, name in enumerate(KINDS):
        base = DURATIONS + kind * SERIES
        counts = [total(base + bucket) for bucket in range(BUCKETS)]
        series.append(((("kind", name),), counts, total(base + BUCKETS) / 1_000_000))
    families.append(histogram(
        "egress_router_http_request_duration_seconds", "Time from a request's head to the end of its response "
        "(kind=request), or to the tunnel's 200 or refusal (kind=connect); the proxy's own pages not counted.",
        series))
    return families
