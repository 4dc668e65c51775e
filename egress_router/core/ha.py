"""High availability (pure): the replicas, keepalived's configuration, and which steps only the active one holds.

Every replica applies the plan's prepared steps at start (NAT rules, sysctls, the link, the pod-network return
path, forwarding) and an `unreachable` default route per family: a standby sends nothing out, neither what a
client forwards to it nor its proxies' own connections. The active replica also holds the held steps: the
reserved addresses (with a short lifetime it keeps renewing, so a replica that dies with its network namespace
left behind stops answering for the address by itself), the routes through the egress interface (the kernel
removes those with the interface's last address anyway) and the announcements. keepalived elects the active
replica (VRRPv3, unicast adverts between the replicas' pod addresses); the router acts on its state lines.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import TYPE_CHECKING

from .errors import ConfigError
from .steps import Address, Announce, Route

if TYPE_CHECKING:  # plan.py imports config.py, which imports this module
    from .plan import Plan, Step

IPAddress = IPv4Address | IPv6Address
INSTANCE = "egress"
ACTIVE, STANDBY = "active", "standby"
ROLES = (ACTIVE, STANDBY)  # a replica's part: what it holds (a starting one holds what a standby holds)
STATES = ("MASTER", "BACKUP", "FAULT", "STOP")
TOP_PRIORITY, PRIORITY_STEP, LOWEST_PRIORITY = 250, 40, 10
# seconds (the kernel counts whole seconds): how long a dead replica's address outlives it; renewed 4 times a
# second by a thread of its own, it lapses only if the whole process stalls for a second
ADDRESS_LIFETIME = 1
RENEW_SECONDS = 0.25  # how often the active replica renews it
# Of two holders (the heartbeat path cut), the lower MAC gives way once the other has shown this long: longer than
# a dead replica's address outlives it, and within the 3 s that two holders may be seen on the LAN
YIELD_AFTER = ADDRESS_LIFETIME + 0.5
MAX_ADVERT = 40.95
PLACEHOLDER = "127.0.0.99/32"
VRRP_PROTOCOL = 112  # VRRPv3 carries the interval in centiseconds, 12 bits
_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?",
                   re.IGNORECASE)
_SEPARATOR = re.compile(r"[\s,]+")


@dataclass(frozen=True, slots=True)
class HaSettings:
    """EGRESS_HA_*: the replicas (their pod addresses, or the headless Service that names them), the VRRP id and
    the advert interval."""

    addresses: tuple[IPAddress, ...]  # () when `service` names them
    service: str | None
    vrid: int
    advert: float
    state_dir: str = "/run/egress-router"


def parse_peers(value: str, variable: str) -> tuple[tuple[IPAddress, ...], str | None]:
    """Addresses of one family (any number), or one DNS name; anything else is an error naming the text."""
    words = [word for word in _SEPARATOR.split(value.strip()) if word]
    addresses: list[IPAddress] = []
    names: list[str] = []
    for word in words:
        try:
            addresses.append(ip_address(word))
        except ValueError:
            if not _NAME.fullmatch(word) or word.replace(".", "").isdigit():
                raise ConfigError(variable, f"{word!r} is neither an IP address nor a DNS name") from None
            names.append(word.rstrip(".").lower())
    if names and (addresses or len(names) > 1):
        raise ConfigError(variable, f"{value.strip()!r}: give one headless Service name or the replicas' addresses, "
                          "not both or several names")
    if len({a.version for a in addresses}) > 1:
        raise ConfigError(variable, f"{value.strip()!r}: the replicas' addresses must be of one family (the "
                          "heartbeats use one)")
    if len(set(addresses)) != len(addresses):
        repeated = next(a for a in addresses if addresses.count(a) > 1)
        raise ConfigError(variable, f"{repeated} is given twice")
    for address in addresses:
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            raise ConfigError(variable, f"{address} is not a pod address")
    return tuple(addresses), names[0] if names else None


def check_advert(seconds: float, variable: str) -> float:
    if seconds > MAX_ADVERT:
        raise ConfigError(variable, f"{seconds:g} is over VRRPv3's longest advert interval ({MAX_ADVERT:g} s)")
    return round(seconds, 2)


def priority(own: IPAddress, replicas: Sequence[IPAddress]) -> int:
    """This replica's VRRP priority: distinct per replica by the order of their addresses, so that backups never time
    out at the same moment and both become active (equal priorities do, with three replicas: see the HA notes);
    `nopreempt` keeps a higher one that comes back from taking over."""
    ordered = sorted({*replicas, own}, key=lambda a: (a.version, a.packed))
    return max(LOWEST_PRIORITY, TOP_PRIORITY - PRIORITY_STEP * ordered.index(own))


def keepalived_config(*, own: IPAddress, peers: Sequence[IPAddress], interface: str, vrid: int, advert: float,
                      fifo: str, guard: str, startup_delay: int = 0, egress: str | None = None) -> str:
    """keepalived.conf for one replica: VRRPv3 unicast on the pod interface, everyone a BACKUP that does not preempt,
    no addresses of keepalived's own (the router adds and removes them on its state lines), and a track file the
    router writes to step down (a second holder seen on the LAN); the egress interface tracked, so that its link
    going down puts keepalived in FAULT (a priority-0 goodbye: another replica takes over at once)."""
    others = [peer for peer in peers if peer != own]
    lines = [
        "# written by egress-router from EGRESS_HA_*: do not edit, it is rewritten on every start and peer change",
        "track_file egress_guard {",
        f"    file {guard}",
        "}",
        "global_defs {",
        f"    router_id egress-router-{own}",
        f"    notify_fifo {fifo}",
        "    max_auto_priority -1",
        *([f"    vrrp_startup_delay {startup_delay}"] if startup_delay else []),
        "}",
        f"vrrp_instance {INSTANCE} {{",
        "    state BACKUP",
        f"    interface {interface}",
        f"    virtual_router_id {vrid}",
        "    version 3",
        f"    priority {priority(own, peers)}",
        f"    advert_int {advert:g}",
        "    nopreempt",
        f"    unicast_src_ip {own}",
        "    unicast_peer {",
        # one per line: keepalived silently takes only the first of several on one line
        *(f"        {peer}" for peer in sorted(others, key=lambda a: a.packed)),
        "    }",
        "    track_file {",
        "        egress_guard weight 0",
        "    }",
        *(["    track_interface {", f"        {egress}", "    }"] if egress else []),
        # keepalived refuses an instance without an address of its own: a loopback one, harmless
        "    virtual_ipaddress {",
        f"        {PLACEHOLDER} dev lo",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def fifo_state(line: str) -> str | None:
    """The state of a notify_fifo line ('INSTANCE "egress" MASTER 250'); None for other events (MASTER_RX_LOWER_PRI)
    and other lines."""
    parts = line.split()
    if len(parts) >= 3 and parts[0] == "INSTANCE" and parts[1] == f'"{INSTANCE}"' and parts[2] in STATES:
        return parts[2]
    return None


def held_step(step: object, interface: str) -> bool:
    """What only the active replica holds: the reserved addresses, the routes through the egress interface, the
    announcements."""
    if isinstance(step, (Address, Announce)):
        return step.interface == interface
    return isinstance(step, Route) and step.interface == interface


def standby_routes(versions: Sequence[int]) -> tuple[Route, ...]:
    """A standby's default route per family: unreachable, so that nothing leaves by the pod network instead."""
    return tuple(Route("", ip_network("::/0" if version == 6 else "0.0.0.0/0"), sole=True, kind="unreachable")
                 for version in versions)


def active_steps(plan: Plan) -> tuple[Step, ...]:
    """`plan`'s steps as the active replica holds them: all of them, the reserved addresses with their lifetime."""
    return tuple(dataclasses.replace(step, lifetime=ADDRESS_LIFETIME) if isinstance(step, Address) and
                 held_step(step, plan.interface) else step for step in plan.steps)


def standby_defaults(plan: Plan) -> tuple[Route, ...]:
    """The unreachable default routes a standby holds instead of the egress ones: one per family of `plan`."""
    return standby_routes([address.version for address in plan.addresses])


def replica_plan(plan: Plan, role: str) -> Plan:
    """`plan` as a replica in `role` (ACTIVE or STANDBY) must hold it: active, every step (the reserved addresses
    with their lifetime); standby, the prepared steps without the held ones and with unreachable default routes.
    What `verify` compares with, and what drift repair converges to."""
    if role == ACTIVE:
        return dataclasses.replace(plan, steps=active_steps(plan))
    if role != STANDBY:
        raise ValueError(f"a replica's role is {' or '.join(ROLES)}, not {role!r}")
    prepared = tuple(step for step in plan.steps if not held_step(step, plan.interface))
    return dataclasses.replace(plan, steps=prepared + standby_defaults(plan))
