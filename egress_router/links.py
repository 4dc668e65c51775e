"""The network edge (pyroute2): egress interface, address, link, routes, IPv4 forwarding.

Each step reads the current state first and changes only what differs, so a second run with the
same plan changes nothing. Each change it makes is recorded with its inverse, so a failure later
in the run can put the namespace back the way it was (nothing is left half-applied).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .config import DEFAULT_INTERFACE, RouterConfig
from .errors import SetupError
from .plan import Plan
from .rtnl import SCOPE_LINK, SCOPE_UNIVERSE, Link, Route, Rtnl

log = logging.getLogger(__name__)

FORWARDING = "/proc/sys/net/ipv4/ip_forward"
MULTUS_HINT = ("the pod needs a macvlan interface: add the annotation "
               "pod.network.openshift.io/assign-macvlan: \"true\" (OpenShift), attach a macvlan "
               "NetworkAttachmentDefinition with Multus, or set EGRESS_INTERFACE")


def open_rtnl() -> Rtnl:
    return Rtnl()


# ---------------------------------------------------------------- read-only look-ups

def link_index(name: str) -> int | None:
    """The interface's index in the current network namespace (an ioctl: no netlink dump needed)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def resolve_interface(rtnl: Rtnl, config: RouterConfig) -> str:
    """The egress interface: EGRESS_INTERFACE, else macvlan0, else the only macvlan link."""
    if config.interface is not None:
        if link_index(config.interface) is None:
            raise SetupError(f"EGRESS_INTERFACE: interface {config.interface!r} does not exist "
                             "in this network namespace")
        return config.interface
    if link_index(DEFAULT_INTERFACE) is not None:
        return DEFAULT_INTERFACE
    macvlans = sorted(link.name for link in rtnl.links() if link.kind == "macvlan")
    if len(macvlans) == 1:
        log.info("No %s here; using %s, the only macvlan interface (set EGRESS_INTERFACE to choose)",
                 DEFAULT_INTERFACE, macvlans[0])
        return macvlans[0]
    if macvlans:
        raise SetupError(f"no interface {DEFAULT_INTERFACE} and several macvlan interfaces "
                         f"({', '.join(macvlans)}): set EGRESS_INTERFACE to the egress one")
    raise SetupError(f"interface {DEFAULT_INTERFACE} does not exist in this network namespace: {MULTUS_HINT}")


def check_pod_interface(name: str) -> None:
    if name.endswith("+"):
        return
    if link_index(name) is None:
        raise SetupError(f"EGRESS_POD_INTERFACE: interface {name!r} does not exist in this network "
                         "namespace (set EGRESS_POD_INTERFACE to the pod's cluster interface)")


def forwarding_enabled() -> bool:
    with open(FORWARDING, encoding="ascii") as handle:
        return handle.read().strip() == "1"


def can_enable_forwarding() -> bool:
    return os.access(FORWARDING, os.W_OK)


# ---------------------------------------------------------------- applying, with undo

@dataclass
class Undo:
    """Inverse actions of the changes made so far, run newest first."""

    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def push(self, description: str, action: Callable[[], Any]) -> None:
        self.actions.append((description, action))

    def run(self) -> None:
        while self.actions:
            description, action = self.actions.pop()
            try:
                action()
                log.info("Undid: %s", description)
            except Exception as exc:  # keep undoing the rest; say what could not be undone
                log.error("Could not undo %s: %s", description, exc)


def _step(what: str, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except OSError as exc:
        raise SetupError(f"{what} failed: {exc.strerror or exc}") from None


def apply(rtnl: Rtnl, plan: Plan, undo: Undo) -> tuple[int, str]:
    """Converge links, routes and forwarding to `plan`; returns (changes made, the interface's MAC)."""
    index = link_index(plan.interface)
    if index is None:
        raise SetupError(f"interface {plan.interface!r} disappeared")
    link = rtnl.link(index)
    changes = 0
    changes += ensure_address(rtnl, plan, index, undo)
    changes += ensure_link_up(rtnl, plan, link, undo)
    changes += ensure_gateway_route(rtnl, plan, index, undo)
    changes += ensure_default_route(rtnl, plan, index, undo)
    changes += ensure_forwarding(undo)
    return changes, link.mac or ""


def ensure_address(rtnl: Rtnl, plan: Plan, index: int, undo: Undo) -> int:
    ip, prefix = str(plan.address.ip), plan.address.network.prefixlen
    present = rtnl.addresses(index)
    if (ip, prefix) in present:
        log.debug("Address %s already on %s", plan.address, plan.interface)
        return 0
    for other_ip, other_prefix in present:
        if other_ip == ip:  # same address, other prefix: a changed configuration
            _step(f"removing {ip}/{other_prefix} from {plan.interface}",
                  partial(rtnl.address, False, index, ip, other_prefix))
            undo.push(f"remove {ip}/{other_prefix}", partial(rtnl.address, True, index, ip, other_prefix))
            log.info("Removed address %s/%s from %s (the configured prefix changed)", ip, other_prefix,
                     plan.interface)
        else:
            log.warning("%s also has address %s/%s; left as it is", plan.interface, other_ip, other_prefix)
    _step(f"adding address {plan.address} to {plan.interface}", partial(rtnl.address, True, index, ip, prefix))
    undo.push(f"add address {plan.address}", partial(rtnl.address, False, index, ip, prefix))
    log.info("Added address %s to %s", plan.address, plan.interface)
    return 1


def ensure_link_up(rtnl: Rtnl, plan: Plan, link: Link, undo: Undo) -> int:
    if link.up:
        log.debug("%s is already up", plan.interface)
        return 0
    _step(f"setting {plan.interface} up", partial(rtnl.set_up, link.index, True))
    undo.push(f"set {plan.interface} up", partial(rtnl.set_up, link.index, False))
    log.info("Set %s up", plan.interface)
    return 1


def ensure_gateway_route(rtnl: Rtnl, plan: Plan, index: int, undo: Undo) -> int:
    gateway = str(plan.gateway)
    wanted = Route(gateway, 32, None, index, None, SCOPE_LINK)
    existing = [r for r in rtnl.routes() if r.dst == gateway and r.dst_len == 32]
    if wanted in existing:
        log.debug("Route %s dev %s already present", plan.gateway_route, plan.interface)
        return 0
    _step(f"adding route {plan.gateway_route} dev {plan.interface}", partial(rtnl.route, "replace", wanted))
    undo.push(f"add route {plan.gateway_route}", partial(_restore_routes, rtnl, wanted, existing))
    log.info("Added route %s dev %s", plan.gateway_route, plan.interface)
    return 1


def ensure_default_route(rtnl: Rtnl, plan: Plan, index: int, undo: Undo) -> int:
    gateway = str(plan.gateway)
    wanted = Route(None, 0, gateway, index, None, SCOPE_UNIVERSE)
    defaults = [r for r in rtnl.routes() if r.dst_len == 0]
    if defaults == [wanted]:
        log.debug("Default route via %s dev %s already present", gateway, plan.interface)
        return 0
    # Replace first, then remove the other defaults: there is never a moment without one.
    _step(f"setting the default route via {gateway} dev {plan.interface}", partial(rtnl.route, "replace", wanted))
    undo.push(f"set default route via {gateway}", partial(_restore_routes, rtnl, wanted, defaults))
    for old in [r for r in rtnl.routes() if r.dst_len == 0 and r != wanted]:
        _step(f"removing the old default route ({_describe(old)})", partial(rtnl.route, "del", old))
        log.info("Removed old default route %s", _describe(old))
    log.info("Added route default via %s dev %s", gateway, plan.interface)
    return 1


def _describe(route: Route) -> str:
    text = f"via {route.gateway}" if route.gateway else "(no gateway)"
    return text + (f" metric {route.priority}" if route.priority else "")


def _restore_routes(rtnl: Rtnl, ours: Route, previous: list[Route]) -> None:
    if ours not in previous and ours in rtnl.routes():
        rtnl.route("del", ours)
    current = rtnl.routes()
    for route in previous:
        if route not in current:
            rtnl.route("add", route)


def ensure_forwarding(undo: Undo) -> int:
    if forwarding_enabled():
        log.debug("IPv4 forwarding already enabled")
        return 0
    _step("enabling IPv4 forwarding", lambda: _write_forwarding("1"))
    undo.push("enable IPv4 forwarding", lambda: _write_forwarding("0"))
    log.info("Enabled IPv4 forwarding (net.ipv4.ip_forward=1)")
    return 1


def _write_forwarding(value: str) -> None:
    with open(FORWARDING, "w", encoding="ascii") as handle:
        handle.write(value)
