"""The pod-network return path: what arrives through the pod interface leaves through it (pure).

Replacing the pod's default route with the LAN gateway's would send replies to clients, kubelet
probes and the router's own DNS queries out of the macvlan, where no pod network is. So, before it
is replaced, the pod interface's next hop is kept in a table of our own; connections that arrive on
the pod interface are marked (core.nat.mark_specs) and a policy rule routes their other packets by
that table; the nameservers (and EGRESS_CLUSTER_CIDRS) get routes through the same next hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from .nat import POD_MARK
from .steps import MAIN_TABLE, PolicyRule, PruneRoutes, Route, Sysctl

RETURN_TABLE = 7910  # the routing table the router owns (ip route show table 7910)
RETURN_PRIORITY = 7910  # its policy rule's priority: before the main table (32766), after local (0)
DEFAULT = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the pod's namespace says, read before a plan is built (net.links.pod_facts).

    `gateway`: the pod interface's next hop (None: a device route, no gateway); `known` is False where
    it could not be read (no such interface, or no route through it): then there is no return path.
    """

    known: bool = False
    gateway: IPv4Address | None = None
    nameservers: tuple[IPv4Address, ...] = ()
    strict_rp_filter: bool = False  # the pod interface's effective rp_filter is 1 (max of all and it)


def parse_nameservers(text: str) -> tuple[IPv4Address, ...]:
    """The IPv4 `nameserver` addresses of a resolv.conf, in order, without duplicates or loopback ones
    (a resolver on the pod's own loopback needs no route)."""
    found: list[IPv4Address] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = IPv4Address(fields[1])
            except ValueError:
                continue  # IPv6 or junk: not ours to route (IPv6 is a later issue)
            if not address.is_loopback and not address.is_unspecified and address not in found:
                found.append(address)
    return tuple(found)


def return_path_steps(pod_interface: str, facts: PodFacts,
                      cluster_cidrs: tuple[IPv4Network, ...]) -> list[Route | PolicyRule | Sysctl | PruneRoutes]:
    """The routing steps of the return path (the mark rules are in the iptables step)."""
    gateway = facts.gateway
    onlink = gateway is not None

    def via_pod(destination: IPv4Network, table: int = MAIN_TABLE, sole: bool = False) -> Route:
        return Route(pod_interface, destination, gateway, sole=sole, table=table, onlink=onlink, owned=True)

    steps: list[Route | PolicyRule | Sysctl | PruneRoutes] = [
        via_pod(DEFAULT, RETURN_TABLE, sole=True),
        PolicyRule(RETURN_PRIORITY, POD_MARK, POD_MARK, RETURN_TABLE),
    ]
    if facts.strict_rp_filter:
        # Strict reverse-path filtering looks the client's address up in the main table, where the
        # default route now leaves through the egress interface, and drops what arrives on the pod
        # interface. Loose mode there (the effective value is the larger of `all` and the interface's).
        steps.append(Sysctl(f"net.ipv4.conf.{pod_interface}.rp_filter", "2"))
    kept = tuple(dict.fromkeys((*(IPv4Network(ns) for ns in facts.nameservers), *cluster_cidrs)))
    steps += [via_pod(network) for network in kept]
    steps.append(PruneRoutes(pod_interface, kept))
    return steps
