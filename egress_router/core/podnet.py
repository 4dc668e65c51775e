"""The pod-network return path: what arrives through the pod interface leaves through it (pure).

Replacing the pod's default route with the LAN gateway's would send replies to clients, kubelet
probes and the router's own DNS queries out of the macvlan, where no pod network is. So, before it
is replaced, the pod interface's next hop is kept in a table of our own; connections that arrive on
the pod interface are marked (core.nat.mark_specs) and a policy rule routes their other packets by
that table; the nameservers (and EGRESS_CLUSTER_CIDRS) get routes through the same next hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from .nat import POD_MARK
from .steps import MAIN_TABLE, PolicyRule, PruneRoutes, Route, Sysctl

RETURN_TABLE = 7910  # the routing table the router owns (ip route show table 7910)
RETURN_PRIORITY = 7910  # its policy rule's priority: before the main table (32766), after local (0)
DEFAULT = IPv4Network("0.0.0.0/0")
DEFAULT6 = IPv6Network("::/0")


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
    # the same for IPv6 (a dual-stack pod network): its next hop is often link-local (fe80::...)
    known6: bool = False
    gateway6: IPv6Address | None = None
    nameservers6: tuple[IPv6Address, ...] = ()

    def known_for(self, version: int) -> bool:
        return self.known6 if version == 6 else self.known


def parse_nameservers(text: str) -> tuple[IPv4Address, ...]:
    """The IPv4 `nameserver` addresses of a resolv.conf (see nameservers)."""
    return tuple(address for address in nameservers(text, 4) if isinstance(address, IPv4Address))


def parse_nameservers6(text: str) -> tuple[IPv6Address, ...]:
    """The IPv6 `nameserver` addresses of a resolv.conf (see nameservers)."""
    return tuple(address for address in nameservers(text, 6) if isinstance(address, IPv6Address))


def nameservers(text: str, version: int) -> list[IPv4Address | IPv6Address]:
    """The `nameserver` addresses of one family in a resolv.conf, in order, without duplicates, loopback or
    link-local ones (a resolver on the pod's own loopback needs no route; a link-local one is on-link)."""
    found: list[IPv4Address | IPv6Address] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ip_address(fields[1])
            except ValueError:
                continue  # junk (or a zone index): not ours to route
            if address.version != version or address.is_loopback or address.is_unspecified or \
                    address.is_link_local or address in found:
                continue
            found.append(address)
    return found


def return_path_steps(pod_interface: str, facts: PodFacts, cluster_cidrs: tuple[IPv4Network | IPv6Network, ...],
                      version: int = 4) -> list[Route | PolicyRule | Sysctl | PruneRoutes]:
    """The routing steps of the return path of one family (the mark rules are in that family's iptables step)."""
    gateway: IPv4Address | IPv6Address | None = facts.gateway6 if version == 6 else facts.gateway
    # A gateway outside every prefix of the interface (Calico, Cilium: /32 pod addresses) needs onlink; an
    # IPv6 link-local one is on the link by definition.
    onlink = gateway is not None and not gateway.is_link_local

    def via_pod(destination: IPv4Network | IPv6Network, table: int = MAIN_TABLE, sole: bool = False) -> Route:
        return Route(pod_interface, destination, gateway, sole=sole, table=table, onlink=onlink, owned=True)

    steps: list[Route | PolicyRule | Sysctl | PruneRoutes] = [
        via_pod(DEFAULT6 if version == 6 else DEFAULT, RETURN_TABLE, sole=True),
        PolicyRule(RETURN_PRIORITY, POD_MARK, POD_MARK, RETURN_TABLE, version),
    ]
    if version == 6:
        nameservers6 = tuple(ip_network(ns) for ns in facts.nameservers6)
        kept6 = tuple(dict.fromkeys((*nameservers6, *(n for n in cluster_cidrs if n.version == 6))))
        steps += [via_pod(network) for network in kept6]
        steps.append(PruneRoutes(pod_interface, kept6, 6))
        return steps
    if facts.strict_rp_filter:
        # Strict reverse-path filtering looks the client's address up in the main table, where the
        # default route now leaves through the egress interface, and drops what arrives on the pod
        # interface. Loose mode there (the effective value is the larger of `all` and the interface's).
        steps.append(Sysctl(f"net.ipv4.conf.{pod_interface}.rp_filter", "2"))
    kept = tuple(dict.fromkeys((*(IPv4Network(ns) for ns in facts.nameservers),
                                *(n for n in cluster_cidrs if n.version == 4))))
    steps += [via_pod(network) for network in kept]
    steps.append(PruneRoutes(pod_interface, kept))
    return steps
