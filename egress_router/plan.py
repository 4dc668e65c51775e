"""The plan: what the router will apply, as pure data, and its human-readable rendering."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from .config import RouterConfig
from .destinations import Destinations


@dataclass(frozen=True, slots=True)
class Plan:
    """Network and NAT state to converge to; `destinations` is None when no NAT is configured."""

    interface: str
    pod_interface: str
    address: IPv4Interface
    gateway: IPv4Address
    destinations: Destinations | None

    @property
    def gateway_route(self) -> str:
        return f"{self.gateway}/32"


def build_plan(config: RouterConfig, interface: str) -> Plan:
    """`interface` is the egress interface resolved on the system (see links.resolve_interface)."""
    assert config.source is not None and config.gateway is not None, "no network to plan"
    return Plan(
        interface=interface,
        pod_interface=config.pod_interface,
        address=config.source,
        gateway=config.gateway,
        destinations=config.destinations if config.configures_nat else None,
    )


def network_commands(plan: Plan) -> list[str]:
    """The network part of the plan as the equivalent iproute2/sysctl commands (for `render`)."""
    return [
        f"ip address add {plan.address} dev {plan.interface}",
        f"ip link set {plan.interface} up",
        f"ip route replace {plan.gateway_route} dev {plan.interface} scope link",
        f"ip route replace default via {plan.gateway} dev {plan.interface}",
        "sysctl -w net.ipv4.ip_forward=1",
        f"arping -A -c 1 -I {plan.interface} {plan.address.ip}  # and -U (request form)",
    ]
