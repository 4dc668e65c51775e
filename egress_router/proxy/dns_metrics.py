"""The DNS proxy's metrics (its admin port's /metrics), from the counters its workers share."""

from __future__ import annotations

from ..core.exposition import Family, labelled, single
from .metrics import (
    ALLOWED,
    BYTES_DOWN,
    BYTES_UP,
    OPEN,
    REJECTED,
    RELOAD_FAILURES,
    RELOADS,
    UPSTREAM_ERRORS,
    UPSTREAM_TIMEOUTS,
    SharedCounters,
    by,
)


def dns_families(shared: SharedCounters) -> list[Family]:
    total = shared.total
    return [
        labelled("egress_router_dns_proxy_connections_total", "counter", "Client connections, by result: relayed "
                 "(a backend connected), rejected (the connection limit).",
                 by("result", relayed=total(ALLOWED), rejected=total(REJECTED))),
        labelled("egress_router_dns_proxy_backend_errors_total", "counter", "Backend connection attempts that "
                 "failed, by kind.", by("kind", unreachable=total(UPSTREAM_ERRORS), timeout=total(UPSTREAM_TIMEOUTS))),
        labelled("egress_router_dns_proxy_bytes_total", "counter", "Bytes relayed by connections that ended, by "
                 "direction.", by("direction", upstream=total(BYTES_UP), downstream=total(BYTES_DOWN))),
        single("egress_router_dns_proxy_open_connections", "gauge", "Client connections open now.", total(OPEN)),
        labelled("egress_router_dns_proxy_reloads_total", "counter", "Reloads of the forwards, by result.",
                 by("result", applied=total(RELOADS), failed=total(RELOAD_FAILURES))),
    ]
