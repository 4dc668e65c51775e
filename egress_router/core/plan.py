"""The plan: the steps the router applies, in order, as pure data (what `render` prints, `apply` runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from .config import RouterConfig
from .nat import NatRules, nat_rules
from .podnet import PodFacts, return_path_steps
from .redirect import Destinations
from .steps import Address, Announce, Interface, IPAddress, LinkUp, Network, PolicyRule, PruneRoutes, Route, Sysctl

Step = NatRules | Address | LinkUp | Route | PolicyRule | PruneRoutes | Sysctl | Announce

IP_FORWARD = "net.ipv4.ip_forward"
IP6_FORWARD = "net.ipv6.conf.all.forwarding"
DEFAULTS: dict[int, Network] = {4: IPv4Network("0.0.0.0/0"), 6: IPv6Network("::/0")}


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps to converge to, in the order they are applied; the rest says what they are for (logs)."""

    steps: tuple[Step, ...]
    interface: str
    addresses: tuple[Interface, ...]  # one per family, IPv4 first
    gateways: tuple[IPAddress, ...]

    @property
    def address(self) -> Interface:
        return self.addresses[0]

    @property
    def gateway(self) -> IPAddress:
        return self.gateways[0]

    @property
    def nat(self) -> NatRules | None:
        """The first iptables step (IPv4 where there is one)."""
        return next((step for step in self.steps if isinstance(step, NatRules)), None)

    @property
    def nats(self) -> tuple[NatRules, ...]:
        """The iptables steps: one per family that has rules (IPv4 first)."""
        return tuple(step for step in self.steps if isinstance(step, NatRules))

    def render(self) -> list[str]:
        """Each step as its iproute2/sysctl/arping command; the NAT step as its whole restore payload."""
        return [step.render().rstrip("\n") for step in self.steps]


def network_plan(interface: str, pod_interface: str, address: Interface, gateway: IPAddress,
                 destinations: Destinations | None, facts: PodFacts | None = None,
                 cluster_cidrs: tuple[Network, ...] = ()) -> Plan:
    """The plan of one address family (see dual_plan)."""
    return dual_plan(interface, pod_interface, ((address, gateway),), destinations, facts, cluster_cidrs)


def dual_plan(interface: str, pod_interface: str, egress: Sequence[tuple[Interface, IPAddress]],
              destinations: Destinations | None, facts: PodFacts | None = None,
              cluster_cidrs: tuple[Network, ...] = (), *, admin_port: int = 0, heartbeats: bool = False) -> Plan:
    """The steps of every mode that configures the network, for each family of `egress` (source, gateway;
    IPv4 first); NAT only with `destinations` (the TCP `admin_port` exempt from it); the pod-network return
    path (core.podnet) of each family where `facts` know the pod interface's next hop in it.

    The iptables steps go first: they are the steps most likely to fail (a kernel without a module, a
    broken iptables backend), and each fails whole, so then nothing at all has been changed (or the other
    family's is undone). The return path is in place before the default route is taken over, so replies
    and DNS never lose their way. Each kind of step is applied for every family before the next kind.
    """
    patterned = pod_interface.endswith("+")
    versions = [address.version for address, _ in egress]
    returning = {v: facts is not None and facts.known_for(v) and not patterned for v in versions}
    steps: list[Step] = []
    for address, _ in egress:
        version = address.version
        if destinations is not None or returning[version]:
            part = destinations.family(version) if destinations is not None else None
            steps.append(nat_rules(part, pod_interface, interface, address.ip, mark_pod_connections=returning[version],
                                   admin_port=admin_port, heartbeats=heartbeats))
    if 6 in versions:
        # IPv6 on the egress interface, whatever the container's default (docker turns it off); router
        # advertisements on the LAN must not add addresses or a second default route there.
        steps += [Sysctl(f"net.ipv6.conf.{interface}.disable_ipv6", "0"),
                  Sysctl(f"net.ipv6.conf.{interface}.accept_ra", "0")]
    steps += [Address(interface, address) for address, _ in egress]
    steps.append(LinkUp(interface))
    steps += [Route(interface, ip_network(gateway)) for _, gateway in egress]
    for version in versions:
        if returning[version]:
            assert facts is not None
            steps += return_path_steps(pod_interface, facts, cluster_cidrs, version)
    # The IPv6 default route names its source: the egress interface may hold other global addresses
    # (autoconfigured before accept_ra was turned off, or given by the attachment's IPAM), and the proxies'
    # own connections must leave from the reserved one.
    steps += [Route(interface, DEFAULTS[address.version], gateway, sole=True,
                    source=address.ip if address.version == 6 else None) for address, gateway in egress]
    steps += [Sysctl(IP6_FORWARD if version == 6 else IP_FORWARD, "1") for version in versions]
    steps += [Announce(interface, address.ip) for address, _ in egress]
    return Plan(tuple(steps), interface, tuple(a for a, _ in egress), tuple(g for _, g in egress))


def build_plan(config: RouterConfig, interface: str, facts: PodFacts | None = None) -> Plan:
    """`interface` is the egress interface resolved on the system (see net.links.resolve_interface);
    `facts` what the pod's namespace says (net.links.pod_facts; None: no return path is planned)."""
    assert config.egress, "no network to plan"
    return dual_plan(interface, config.pod_interface, [(e.source, e.gateway) for e in config.egress],
                     config.destinations if config.configures_nat else None, facts, config.cluster_cidrs,
                     admin_port=config.metrics_port, heartbeats=config.ha is not None)
