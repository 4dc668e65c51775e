"""Applies a plan's steps to the current network namespace, in order, with one undo for all of them.

Each step type has one entry in APPLIERS: `holds` reads whether the step is already in place (also
what `verify`-style checks use) and `apply` changes only what differs, recording the inverse of every
change in the Undo. If a step fails, the changes made before it are undone, newest first, so nothing
is left half-applied; a second run with the same plan changes nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv6Address
from types import MappingProxyType
from typing import Any

from ..core.errors import SetupError
from ..core.nat import NatRules, NatState, restore_payload
from ..core.plan import Plan, Step
from ..core.steps import ROUTER_PROTO, Address, Announce, LinkUp, PolicyRule, PruneRoutes, Route, Sysctl
from . import arp, iptables
from .rtnl import (
    FAMILIES,
    IP6_RT_PRIO_USER,
    ROUTE_TYPES,
    RTN_UNREACHABLE,
    RTPROT_STATIC,
    SCOPE_LINK,
    SCOPE_UNIVERSE,
    Rtnl,
)
from .rtnl import Route as KernelRoute
from .rtnl import Rule as KernelRule

log = logging.getLogger(__name__)


@dataclass
class Undo:
    """Inverse actions of the changes made so far, run newest first."""

    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def push(self, description: str, action: Callable[[], Any]) -> None:
        self.actions.append((description, action))

    def run(self) -> list[str]:
        """Undo everything recorded; returns what could not be undone (empty: all of it was)."""
        failed = []
        while self.actions:
            description, action = self.actions.pop()
            try:
                action()
                log.info("Undid: %s", description)
            except Exception as exc:  # keep undoing the rest; say what could not be undone
                log.error("Could not undo %s: %s", description, exc)
                failed.append(f"{description} ({getattr(exc, 'strerror', None) or exc})")
        return failed


@dataclass
class Context:
    """What the steps need from the system, read before the first change (see router.prepare)."""

    rtnl: Rtnl
    # NAT, per family (4: iptables, 6: ip6tables): the backend's save and restore tools, and our tables
    # as read before the first change
    tools: dict[int, tuple[str, str]] = field(default_factory=dict)
    nat_before: dict[int, NatState] = field(default_factory=dict)
    can_announce: bool = False  # NET_RAW: gratuitous ARP and neighbour advertisements can be sent
    changes: int = 0  # network changes made (NAT not counted)
    nat_rule_count: int = 0  # our NAT rules after apply (both families)
    announced: dict[int, int] = field(default_factory=dict)  # announcements sent, per family (the metrics)

    def index(self, interface: str) -> int:
        try:
            return socket.if_nametoindex(interface)
        except OSError:
            raise SetupError(f"interface {interface!r} disappeared") from None


def attempt(what: str, action: Callable[[], Any]) -> Any:
    """Run one change; an OSError becomes a SetupError saying what failed."""
    try:
        return action()
    except OSError as exc:
        raise SetupError(f"{what} failed: {exc.strerror or exc}") from None


def apply(plan: Plan, context: Context) -> None:
    """Apply every step in order; on failure undo the changes made so far and raise one SetupError."""
    undo = Undo()
    try:
        for step in plan.steps:
            APPLIERS[type(step)].apply(context, step, undo)
    except SetupError as exc:
        if not undo.actions:
            raise SetupError(f"{exc}; nothing was changed") from None
        log.error("Setup failed; undoing the %d change(s) made so far", len(undo.actions))
        failed = undo.run()
        if failed:
            raise SetupError(f"{exc}; undoing the changes made before it failed too, for: {'; '.join(failed)}: "
                             "the namespace is partly configured, run again to converge") from None
        raise SetupError(f"{exc}; the changes made before it were undone") from None
    except BaseException:
        undo.run()
        raise


def drift(plan: Plan, context: Context) -> list[Step]:
    """The steps that do not hold now (read-only)."""
    return [step for step in plan.steps if not APPLIERS[type(step)].holds(context, step)]


# ---------------------------------------------------------------- NAT

def nat_holds(context: Context, step: NatRules) -> bool:
    save_tool = context.tools[step.version][0]
    return restore_payload(step, iptables.read_state(save_tool)) is None


def nat_apply(context: Context, step: NatRules, undo: Undo) -> None:
    assert step.version in context.tools and step.version in context.nat_before, "read in prepare"
    restore_tool, before = context.tools[step.version][1], context.nat_before[step.version]
    count, changed = iptables.apply(step, restore_tool, before)
    context.nat_rule_count += count
    if changed:
        tables = tuple(step.tables())
        undo.push(f"apply {iptables.describe(step)}", lambda: iptables.roll_back(restore_tool, before, tables))


# ---------------------------------------------------------------- addresses and links

def address_holds(context: Context, step: Address) -> bool:
    wanted = (str(step.address.ip), step.address.network.prefixlen)
    return wanted in context.rtnl.addresses(context.index(step.interface), FAMILIES[step.address.version])


def address_apply(context: Context, step: Address, undo: Undo) -> None:
    rtnl, index, family = context.rtnl, context.index(step.interface), FAMILIES[step.address.version]
    ip, prefix = str(step.address.ip), step.address.network.prefixlen
    present = rtnl.addresses(index, family)
    if (ip, prefix) in present:
        log.debug("Address %s already on %s", step.address, step.interface)
        return
    for other_ip, other_prefix in present:
        if other_ip == ip:  # same address, other prefix: a changed configuration
            attempt(f"removing {ip}/{other_prefix} from {step.interface}",
                    partial(rtnl.address, False, index, ip, other_prefix, family))
            undo.push(f"remove {ip}/{other_prefix}", partial(rtnl.address, True, index, ip, other_prefix, family))
            log.info("Removed address %s/%s from %s (the configured prefix changed)", ip, other_prefix,
                     step.interface)
        elif not other_ip.startswith("fe80:"):  # the kernel's own link-local address is expected
            log.warning("%s also has address %s/%s; left as it is", step.interface, other_ip, other_prefix)
    attempt(f"adding address {step.address} to {step.interface}",
            partial(rtnl.address, True, index, ip, prefix, family) if step.lifetime is None else
            partial(rtnl.address, True, index, ip, prefix, family, lifetime=step.lifetime))
    undo.push(f"add address {step.address}", partial(rtnl.address, False, index, ip, prefix, family))
    log.info("Added address %s to %s", step.address, step.interface)
    context.changes += 1


def link_up_holds(context: Context, step: LinkUp) -> bool:
    return context.rtnl.link(context.index(step.interface)).up


def link_up_apply(context: Context, step: LinkUp, undo: Undo) -> None:
    index = context.index(step.interface)
    if context.rtnl.link(index).up:
        log.debug("%s is already up", step.interface)
        return
    attempt(f"setting {step.interface} up", partial(context.rtnl.set_up, index, True))
    undo.push(f"set {step.interface} up", partial(context.rtnl.set_up, index, False))
    log.info("Set %s up", step.interface)
    context.changes += 1


# ---------------------------------------------------------------- routes

def kernel_route(context: Context, step: Route) -> KernelRoute:
    network = step.destination
    dst = None if network.prefixlen == 0 else str(network.network_address)
    gateway = None if step.gateway is None else str(step.gateway)
    v6 = network.version == 6
    # IPv6 routes have no scope, and the kernel gives them metric 1024 when none is asked for
    scope = SCOPE_LINK if step.gateway is None and not v6 else SCOPE_UNIVERSE
    if step.kind != "unicast":
        return KernelRoute(dst, network.prefixlen, None, None, IP6_RT_PRIO_USER if v6 else None, SCOPE_UNIVERSE,
                           ROUTER_PROTO if step.owned else RTPROT_STATIC, table=step.table,
                           family=FAMILIES[network.version], type=ROUTE_TYPES[step.kind])
    return KernelRoute(dst, network.prefixlen, gateway, context.index(step.interface),
                       IP6_RT_PRIO_USER if v6 else None, scope, ROUTER_PROTO if step.owned else RTPROT_STATIC,
                       table=step.table, onlink=step.onlink and gateway is not None, family=FAMILIES[network.version],
                       prefsrc=None if step.source is None else str(step.source))


def same_destination(context: Context, wanted: KernelRoute) -> list[KernelRoute]:
    return [r for r in context.rtnl.routes(wanted.table, wanted.family)
            if r.dst == wanted.dst and r.dst_len == wanted.dst_len]


def route_holds(context: Context, step: Route) -> bool:
    wanted = kernel_route(context, step)
    present = same_destination(context, wanted)
    return present == [wanted] if step.sole else wanted in present


def route_apply(context: Context, step: Route, undo: Undo) -> None:
    rtnl, wanted = context.rtnl, kernel_route(context, step)
    shown = step.render().removeprefix("ip route replace ").removeprefix("ip -6 route replace ")
    previous = same_destination(context, wanted)
    if (previous == [wanted]) if step.sole else (wanted in previous):
        log.debug("Route %s already present", shown)
        return
    # Replace first, then remove the others: there is never a moment without a route.
    attempt(f"{'setting' if step.sole else 'adding'} route {shown}", partial(rtnl.route, "replace", wanted))
    undo.push(f"add route {shown}", partial(restore_routes, rtnl, wanted, previous))
    if step.sole:
        for old in [r for r in same_destination(context, wanted) if r != wanted]:
            attempt(f"removing the old route ({describe(old)})", partial(rtnl.route, "del", old))
            log.info("Removed old %s route %s", "default" if not old.dst_len else old.dst, describe(old))
    log.info("Added route %s", shown)
    context.changes += 1


def stale_routes(context: Context, step: PruneRoutes) -> list[KernelRoute]:
    index = context.index(step.interface)
    keep = {(str(n.network_address), n.prefixlen) for n in step.keep}
    unspecified = "::" if step.version == 6 else "0.0.0.0"
    return [r for r in context.rtnl.routes(family=FAMILIES[step.version]) if r.proto == ROUTER_PROTO and r.oif == index
            and (r.dst or unspecified, r.dst_len) not in keep]


def prune_holds(context: Context, step: PruneRoutes) -> bool:
    return not stale_routes(context, step)


def prune_apply(context: Context, step: PruneRoutes, undo: Undo) -> None:
    for route in stale_routes(context, step):
        shown = f"{route.dst}/{route.dst_len} via {route.gateway or '(on link)'} dev {step.interface}"
        attempt(f"removing the route {shown} (no longer configured)", partial(context.rtnl.route, "del", route))
        undo.push(f"remove route {shown}", partial(context.rtnl.route, "add", route))
        log.info("Removed route %s: the configuration no longer asks for it", shown)
        context.changes += 1


# ---------------------------------------------------------------- policy rules

def kernel_rule(step: PolicyRule) -> KernelRule:
    return KernelRule(step.priority, step.table, step.mark, step.mask, FAMILIES[step.version])


def rule_holds(context: Context, step: PolicyRule) -> bool:
    wanted = kernel_rule(step)
    return wanted in context.rtnl.rules(wanted.family)


def rule_apply(context: Context, step: PolicyRule, undo: Undo) -> None:
    wanted = kernel_rule(step)
    if wanted in context.rtnl.rules(wanted.family):
        log.debug("Policy rule %s already present", step.render())
        return
    rendered = step.render().removeprefix("ip rule add ").removeprefix("ip -6 rule add ")
    attempt(f"adding the policy rule '{rendered}'",
            partial(context.rtnl.rule, True, wanted))
    undo.push(f"add policy rule priority {step.priority}", partial(context.rtnl.rule, False, wanted))
    log.info("Added policy rule %s", rendered)
    context.changes += 1


def describe(route: KernelRoute) -> str:
    text = "unreachable" if route.type == RTN_UNREACHABLE else \
        f"via {route.gateway}" if route.gateway else "(no gateway)"
    return text + (f" metric {route.priority}" if route.priority else "")


def restore_routes(rtnl: Rtnl, ours: KernelRoute, previous: list[KernelRoute]) -> None:
    if ours not in previous and ours in rtnl.routes(ours.table, ours.family):
        rtnl.route("del", ours)
    current = rtnl.routes(ours.table, ours.family)
    for route in previous:
        if route not in current:
            rtnl.route("add", route)


# ---------------------------------------------------------------- sysctls

def read_sysctl(path: str) -> str:
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


def write_sysctl(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def sysctl_holds(context: Context, step: Sysctl) -> bool:
    return read_sysctl(step.path) == step.value


def sysctl_apply(context: Context, step: Sysctl, undo: Undo) -> None:
    old = read_sysctl(step.path)
    if old == step.value:
        log.debug("%s is already %s", step.key, step.value)
        return
    attempt(f"setting {step.key}={step.value}", partial(write_sysctl, step.path, step.value))
    undo.push(f"set {step.key}={step.value}", partial(write_sysctl, step.path, old))
    log.info("%s (%s=%s, was %s)", sysctl_meaning(step), step.key, step.value, old)
    context.changes += 1


def sysctl_meaning(step: Sysctl) -> str:
    """What a setting is for, in the log line that says it was changed."""
    if step.key == "net.ipv4.ip_forward":
        return "Enabled IPv4 forwarding"
    if step.key == "net.ipv6.conf.all.forwarding":
        return "Enabled IPv6 forwarding"
    if step.key.endswith(".accept_ra"):
        return (f"Turned off router advertisements on {step.key.split('.')[3]}: they would add a second default "
                "route and addresses")
    if step.key.endswith(".disable_ipv6"):
        return f"Turned on IPv6 on {step.key.split('.')[3]}"
    if step.key.endswith(".rp_filter"):
        return (f"Set loose reverse-path filtering on {step.key.split('.')[3]}: replies to its clients leave "
                "by the policy route, which strict filtering does not consult")
    return "Set"


# ---------------------------------------------------------------- announcements

def announce_holds(context: Context, step: Announce) -> bool:
    return True  # an announcement leaves no state behind to check


def announce_apply(context: Context, step: Announce, undo: Undo) -> None:
    """Send it (nothing to undo); a failure only warns: neighbours then learn the MAC when entries expire."""
    if not context.can_announce:
        return
    kind = "unsolicited neighbour advertisement" if step.address.version == 6 else "gratuitous ARP announcement"
    try:
        mac = context.rtnl.link(context.index(step.interface)).mac or ""
        if isinstance(step.address, IPv6Address):
            from . import ndp  # only IPv6 routers pay for its import

            ndp.announce(step.interface, mac, step.address)
        else:
            arp.announce(step.interface, mac, step.address)
        context.announced[step.address.version] = context.announced.get(step.address.version, 0) + 1
    except (OSError, ValueError, SetupError) as exc:
        log.warning("Could not send the %s on %s: %s", kind, step.interface, getattr(exc, "strerror", None) or exc)


def announce(plan: Plan, context: Context) -> None:
    """Repeat the plan's announcements (legacy mode does, once switches have settled)."""
    for step in plan.steps:
        if isinstance(step, Announce):
            announce_apply(context, step, Undo())


@dataclass(frozen=True, slots=True)
class Applier:
    holds: Callable[[Context, Any], bool]
    apply: Callable[[Context, Any, Undo], None]


APPLIERS: Mapping[type, Applier] = MappingProxyType({
    NatRules: Applier(nat_holds, nat_apply),
    Address: Applier(address_holds, address_apply),
    LinkUp: Applier(link_up_holds, link_up_apply),
    Route: Applier(route_holds, route_apply),
    PolicyRule: Applier(rule_holds, rule_apply),
    PruneRoutes: Applier(prune_holds, prune_apply),
    Sysctl: Applier(sysctl_holds, sysctl_apply),
    Announce: Applier(announce_holds, announce_apply),
})
