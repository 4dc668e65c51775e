"""The plan: the steps the router applies, in order, as pure data (what `render` prints, `apply` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from .config import RouterConfig
from .nat import NatRules, nat_rules
from .podnet import PodFacts, return_path_steps
from .redirect import Destinations
from .steps import Address, Announce, LinkUp, PolicyRule, PruneRoutes, Route, Sysctl

Step = NatRules | Address | LinkUp | Route | PolicyRule | PruneRoutes | Sysctl | Announce

IP_FORWARD = "net.ipv4.ip_forward"


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps to converge to, in the order they are applied; the rest says what they are for (logs)."""

    steps: tuple[Step, ...]
    interface: str
    address: IPv4Interface
    gateway: IPv4Address

    @property
    def nat(self) -> NatRules | None:
        return next((step for step in self.steps if isinstance(step, NatRules)), None)

    def render(self) -> list[str]:
        """Each step as its iproute2/sysctl/arping command; the NAT step as its whole restore payload."""
        return [step.render().rstrip("\n") for step in self.steps]


def network_plan(interface: str, pod_interface: str, address: IPv4Interface, gateway: IPv4Address,
                 destinations: Destinations | None, facts: PodFacts | None = None,
                 cluster_cidrs: tuple[IPv4Network, ...] = ()) -> Plan:
    """The steps of every mode that configures the network; NAT only with `destinations`; the pod-network
    return path (core.podnet) where `facts` know the pod interface's next hop.

    The iptables step goes first: it is the step most likely to fail (a kernel without a module, a
    broken iptables backend), and it fails whole, so then nothing at all has been changed. The return
    path is in place before the default route is taken over, so replies and DNS never lose their way.
    """
    returning = facts is not None and facts.known and not pod_interface.endswith("+")
    steps: list[Step] = []
    if destinations is not None or returning:
        steps.append(nat_rules(destinations, pod_interface, interface, address.ip, mark_pod_connections=returning))
    steps += [
        Address(interface, address),
        LinkUp(interface),
        Route(interface, IPv4Network(f"{gateway}/32")),
    ]
    if returning:
        assert facts is not None
        steps += return_path_steps(pod_interface, facts, cluster_cidrs)
    steps += [
        Route(interface, IPv4Network("0.0.0.0/0"), gateway, sole=True),
        Sysctl(IP_FORWARD, "1"),
        Announce(interface, address.ip),
    ]
    return Plan(tuple(steps), interface, address, gateway)


def build_plan(config: RouterConfig, interface: str, facts: PodFacts | None = None) -> Plan:
    """`interface` is the egress interface resolved on the system (see net.links.resolve_interface);
    `facts` what the pod's namespace says (net.links.pod_facts; None: no return path is planned)."""
    assert config.source is not None and config.gateway is not None, "no network to plan"
    return network_plan(interface, config.pod_interface, config.source, config.gateway,
                        config.destinations if config.configures_nat else None, facts, config.cluster_cidrs)
