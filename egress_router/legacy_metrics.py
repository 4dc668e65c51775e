"""Legacy mode's admin port: its health (the plan holds), readiness and metrics (what the live loop did)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .admin import Admin
from .core.counters import counter_rows
from .core.errors import SetupError
from .core.exposition import Family, labelled, single
from .ha_view import families
from .net.counters import read_counters

if TYPE_CHECKING:
    from .live import Live

log = logging.getLogger(__name__)


def legacy_admin(live: Live, extra: Callable[[Live], list[Family]] | None = None) -> Admin:
    def health() -> str | None:
        return live.problem  # the last drift repair's failure, until a repair succeeds

    def ready() -> str | None:
        role = live.role
        if role is None or role.active:
            return None
        return "standby: another replica holds EGRESS_SOURCE (high availability)"

    def collect() -> list[Family]:
        return live_families(live) + ha_families(live) + (extra(live) if extra is not None else [])

    return Admin("legacy", collect, health=health, ready=ready)


def ha_families(live: Live) -> list[Family]:
    role = live.role
    if role is None:
        return []
    return families(role.active, role.transitions, role.peer_count, role.state)


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


REDIRECT_PACKETS_HELP = (
    "Connections (TCP) and flows (UDP: one per client address and port) each redirect rule sent on, counted "
    "by the rule in the router's DNAT chain: a nat-table rule sees only the first packet of a connection "
    "(connection tracking translates the rest), so this counts new connections, not their packets. protocol: "
    "tcp or udp, all for a fallback rule (every other port and protocol; its port is \"\"); port: the "
    "router's port; destination: the DNAT target as iptables prints it (ip, ip:port, [ipv6]:port). Read from "
    "the live chains at each scrape, so rules from a reload show at once; like any counter they start again "
    "from 0 when the chains are rewritten (a reload or a drift repair) or the pod restarts.")
REDIRECT_BYTES_HELP = (
    "Bytes of the first packets counted in egress_router_redirect_packets_total (the TCP SYN, the first UDP "
    "datagram, IP header included): not the bytes the connections carried.")
SNAT_PACKETS_HELP = (
    "Connections leaving through the egress interface from the reserved source address (the SNAT rule; as "
    "for the redirect counters, only each connection's first packet is counted).")
SNAT_BYTES_HELP = "Bytes of the first packets counted in egress_router_snat_packets_total."


class RedirectMetrics:
    """Redirect mode's kernel side at scrape time: the NAT rules' counters and the conntrack table's fill.

    A failed read of the counters is logged when it starts and when it ends (a scrape every few seconds
    must not flood the log) and counted every time; the scrape then answers without those series."""

    def __init__(self) -> None:
        self.read_failures = 0
        self.failing = False
        self.lock = threading.Lock()  # the admin server answers several scrapes at once, each in a thread

    def __call__(self, live: Live) -> list[Family]:
        families = self.counter_families(live)
        families.append(single("egress_router_redirect_counter_read_failures_total", "counter", "Scrapes that "
                               "could not read the NAT rules' counters (iptables-save -c failed; logged).",
                               self.read_failures))
        return families + redirect_families(live)

    def counter_families(self, live: Live) -> list[Family]:
        tools = {version: tools for version, tools in live.context.tools.items()
                 if any(nat.version == version and nat.chains for nat in live.plan.nats)}
        if not tools:
            return []
        try:
            counters = read_counters(tools)
        except SetupError as exc:
            with self.lock:
                self.read_failures += 1
                if not self.failing:
                    log.warning("Reading the NAT rules' counters for /metrics failed (the scrape answers without "
                                "them until it works again): %s", exc)
                self.failing = True
            return []
        with self.lock:
            if self.failing:
                log.info("Reading the NAT rules' counters works again")
                self.failing = False
        rows = counter_rows(counters)
        return [labelled("egress_router_redirect_packets_total", "counter", REDIRECT_PACKETS_HELP,
                         rows.redirect_packets),
                labelled("egress_router_redirect_bytes_total", "counter", REDIRECT_BYTES_HELP, rows.redirect_bytes),
                labelled("egress_router_snat_packets_total", "counter", SNAT_PACKETS_HELP, rows.snat_packets),
                labelled("egress_router_snat_bytes_total", "counter", SNAT_BYTES_HELP, rows.snat_bytes)]
