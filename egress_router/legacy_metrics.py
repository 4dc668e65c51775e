"""Legacy mode's admin port: its health (the plan holds), readiness and metrics (what the live loop did)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .admin import Admin
from .core.exposition import Family, labelled, single

if TYPE_CHECKING:
    from .live import Live


def legacy_admin(live: Live, extra: Callable[[Live], list[Family]] | None = None) -> Admin:
    def health() -> str | None:
        return live.problem  # the last drift repair's failure, until a repair succeeds

    def collect() -> list[Family]:
        return live_families(live) + (extra(live) if extra is not None else [])

    return Admin("legacy", collect, health=health)


def live_families(live: Live) -> list[Family]:
    counts, announced = live.counts, live.context.announced
    return [
        labelled("egress_router_announcements_total", "counter", "Announcements of the reserved addresses sent: "
                 "gratuitous ARP (family 4), unsolicited neighbour advertisements (family 6).",
                 [((("family", str(version)),), announced.get(version, 0)) for version in live.config.versions]),
        labelled("egress_router_reloads_total", "counter", "Reloads of the redirect rules (a rule file changed, or "
                 "SIGHUP), by result: applied, or failed (the rules in force stay).",
                 [((("result", "applied"),), counts.reloads), ((("result", "failed"),), counts.reload_failures)]),
        single("egress_router_drift_repairs_total", "counter", "Parts of the plan found changed by someone else "
               "and re-applied.", counts.repairs),
        single("egress_router_drift_repair_failures_total", "counter", "Drift repairs that failed (tried again at "
               "the next check).", counts.repair_failures),
        single("egress_router_drift_check_interval_seconds", "gauge", "Seconds between drift checks (0: none).",
               live.config.drift_seconds),
    ]


CONNTRACK = "/proc/sys/net/netfilter/nf_conntrack_count", "/proc/sys/net/netfilter/nf_conntrack_max"


def redirect_families(live: Live) -> list[Family]:
    """The kernel's side: connection tracking entries against the table's limit (per network namespace)."""
    families = []
    for path, name, help_text in zip(CONNTRACK, ("egress_router_conntrack_entries", "egress_router_conntrack_limit"),
                                     ("Connection tracking entries in the router's network namespace.",
                                      "The connection tracking table's limit (nf_conntrack_max)."), strict=True):
        try:
            with open(path, encoding="ascii") as file:
                families.append(single(name, "gauge", help_text, int(file.read())))
        except (OSError, ValueError):
            continue  # no conntrack module loaded yet: no entries to report
    return families
