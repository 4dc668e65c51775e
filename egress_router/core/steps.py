"""The network steps a plan is made of: small frozen values that render their iproute2 equivalent (pure).

A step says what must hold, not how: net.apply reads whether it holds, changes what differs and
records the undo. Adding a step type is one class here and one entry in net.apply's dispatch table.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

Interface = IPv4Interface | IPv6Interface
Network = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Address:
    """`address` (with its prefix) is on `interface`; the same IP with another prefix is replaced.

    An IPv6 address is added without duplicate address detection (nodad): it is usable at once instead of
    after a second or more of probing, and it is reserved for the router like the IPv4 one, which has no
    such probe either; the neighbour advertisement (Announce) then claims it."""

    interface: str
    address: Interface
    lifetime: int | None = None  # seconds it stays unless renewed (high availability: core.ha); None: forever

    def render(self) -> str:
        nodad = " nodad" if self.address.version == 6 else ""
        lifetime = f" valid_lft {self.lifetime} preferred_lft {self.lifetime}" if self.lifetime else ""
        return f"ip address add {self.address} dev {self.interface}{nodad}{lifetime}"


@dataclass(frozen=True, slots=True)
class LinkUp:
    """`interface` is administratively up."""

    interface: str

    def render(self) -> str:
        return f"ip link set {self.interface} up"


MAIN_TABLE = 254
ROUTER_PROTO = 245  # the routing protocol number routes of the router's own carry (ip route show proto 245)


@dataclass(frozen=True, slots=True)
class Route:
    """A route to `destination` via `gateway` (None: on-link) through `interface`, in `table`.

    `sole`: it is the only route to that destination in its table afterwards (others are removed once
    it is in place, so there is never a moment without one): how the default route is taken over.
    `onlink`: the gateway is reached on the link even if no address of the interface covers it (how
    pod networks with /32 pod addresses route: Calico, Cilium).
    """

    interface: str
    destination: Network
    gateway: IPAddress | None = None
    sole: bool = False
    table: int = MAIN_TABLE
    onlink: bool = False
    owned: bool = False  # tagged with ROUTER_PROTO, so that a later plan without it removes it (PruneRoutes)
    source: IPAddress | None = None  # the preferred source of what the router itself sends by it (src)
    kind: str = "unicast"  # or "unreachable": nothing goes there (no interface, no gateway)

    def render(self) -> str:
        where = "default" if self.destination.prefixlen == 0 else str(self.destination)
        if self.kind != "unicast":
            table = f" table {self.table}" if self.table != MAIN_TABLE else ""
            return f"ip{' -6' if self.destination.version == 6 else ''} route replace {self.kind} {where}{table}"
        via = f" via {self.gateway}" if self.gateway is not None else ""
        scope = " scope link" if self.gateway is None else ""
        onlink = " onlink" if self.onlink and self.gateway is not None else ""
        table = f" table {self.table}" if self.table != MAIN_TABLE else ""
        proto = f" proto {ROUTER_PROTO}" if self.owned else ""
        src = f" src {self.source}" if self.source is not None else ""
        if self.destination.version == 6:  # IPv6 routes have no scope
            return f"ip -6 route replace {where}{via} dev {self.interface}{onlink}{table}{proto}{src}"
        return f"ip route replace {where}{via} dev {self.interface}{scope}{onlink}{table}{proto}"


@dataclass(frozen=True, slots=True)
class PruneRoutes:
    """Routes of the router's own (ROUTER_PROTO) through `interface` in the main table other than `keep` are
    removed: what a changed configuration no longer asks for (a network dropped from EGRESS_CLUSTER_CIDRS).
    Routes of anyone else are never touched."""

    interface: str
    keep: tuple[Network, ...]
    version: int = 4

    def render(self) -> str:
        kept = ", ".join(map(str, self.keep)) or "none"
        ip = "ip -6" if self.version == 6 else "ip"
        return (f"{ip} route del <each route dev {self.interface} proto {ROUTER_PROTO} but {kept}>"
                "  # only what an earlier configuration added")


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """Packets whose mark has `mark` in `mask` look up `table`, before the main table (`priority`)."""

    priority: int
    mark: int
    mask: int
    table: int
    version: int = 4

    def render(self) -> str:
        if self.version == 6:
            return f"ip -6 rule add fwmark {self.mark:#x}/{self.mask:#x} lookup {self.table} priority {self.priority}"
        return f"ip rule add fwmark {self.mark:#x}/{self.mask:#x} lookup {self.table} priority {self.priority}"


@dataclass(frozen=True, slots=True)
class Sysctl:
    """The kernel setting `key` (dotted, as sysctl writes it) has `value`."""

    key: str
    value: str

    @property
    def path(self) -> str:
        return "/proc/sys/" + self.key.replace(".", "/")

    def render(self) -> str:
        return f"sysctl -w {self.key}={self.value}"


@dataclass(frozen=True, slots=True)
class Announce:
    """Gratuitous ARP (IPv4: reply and request form) or an unsolicited neighbour advertisement (IPv6: to all
    nodes, override flag) for `address` on `interface`: nothing to hold or undo."""

    interface: str
    address: IPAddress

    def render(self) -> str:
        if self.address.version == 6:
            return (f"ndsend {self.address} {self.interface}  # unsolicited neighbour advertisement to ff02::1, "
                    "override flag")
        return f"arping -A -c 1 -I {self.interface} {self.address}  # and -U (request form)"
