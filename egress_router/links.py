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
from .netlink import iproute_class, netlink_error
from .plan import Plan

log = logging.getLogger(__name__)

MAIN_TABLE = 254
SCOPE_LINK = 253
FORWARDING = "/proc/sys/net/ipv4/ip_forward"
MULTUS_HINT = ("the pod needs a macvlan interface: add the annotation "
               "pod.network.openshift.io/assign-macvlan: \"true\" (OpenShift), attach a macvlan "
               "NetworkAttachmentDefinition with Multus, or set EGRESS_INTERFACE")


def open_iproute() -> Any:
    return iproute_class()()


# ---------------------------------------------------------------- read-only look-ups

def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link_kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def resolve_interface(ipr: Any, config: RouterConfig) -> str:
    """The egress interface: EGRESS_INTERFACE, else macvlan0, else the only macvlan link."""
    if config.interface is not None:
        if link_index(ipr, config.interface) is None:
            raise SetupError(f"EGRESS_INTERFACE: interface {config.interface!r} does not exist "
                             "in this network namespace")
        return config.interface
    if link_index(ipr, DEFAULT_INTERFACE) is not None:
        return DEFAULT_INTERFACE
    macvlans = sorted(link.get("IFLA_IFNAME") for link in ipr.get_links() if link_kind(link) == "macvlan")
    if len(macvlans) == 1:
        log.info("No %s here; using %s, the only macvlan interface (set EGRESS_INTERFACE to choose)",
                 DEFAULT_INTERFACE, macvlans[0])
        return str(macvlans[0])
    if macvlans:
        raise SetupError(f"no interface {DEFAULT_INTERFACE} and several macvlan interfaces "
                         f"({', '.join(macvlans)}): set EGRESS_INTERFACE to the egress one")
    raise SetupError(f"interface {DEFAULT_INTERFACE} does not exist in this network namespace: {MULTUS_HINT}")


def check_pod_interface(ipr: Any, name: str) -> None:
    if name.endswith("+"):
        return
    if link_index(ipr, name) is None:
        raise SetupError(f"EGRESS_POD_INTERFACE: interface {name!r} does not exist in this network "
                         "namespace (set EGRESS_POD_INTERFACE to the pod's cluster interface)")


def mac_address(ipr: Any, name: str) -> str:
    index = link_index(ipr, name)
    link = ipr.get_links(index)[0]
    return str(link.get("IFLA_ADDRESS"))


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
    except netlink_error() as exc:
        code = getattr(exc, "code", 0)
        code = code if isinstance(code, int) else 0
        raise SetupError(f"{what} failed: {os.strerror(code) if code else exc}") from None
    except OSError as exc:
        raise SetupError(f"{what} failed: {exc.strerror or exc}") from None


def apply(ipr: Any, plan: Plan, undo: Undo) -> int:
    """Converge links, routes and forwarding to `plan`; returns the number of changes made."""
    index = link_index(ipr, plan.interface)
    if index is None:
        raise SetupError(f"interface {plan.interface!r} disappeared")
    changes = 0
    changes += ensure_address(ipr, plan, index, undo)
    changes += ensure_link_up(ipr, plan, index, undo)
    changes += ensure_gateway_route(ipr, plan, index, undo)
    changes += ensure_default_route(ipr, plan, index, undo)
    changes += ensure_forwarding(undo)
    return changes


def ensure_address(ipr: Any, plan: Plan, index: int, undo: Undo) -> int:
    ip, prefix = str(plan.address.ip), plan.address.network.prefixlen
    present = [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    if (ip, prefix) in present:
        log.debug("Address %s already on %s", plan.address, plan.interface)
        return 0
    for other_ip, other_prefix in present:
        if other_ip == ip:  # same address, other prefix: a changed configuration
            _step(f"removing {ip}/{other_prefix} from {plan.interface}",
                  partial(ipr.addr, "del", index=index, address=ip, prefixlen=other_prefix))
            undo.push(f"remove {ip}/{other_prefix}",
                      partial(ipr.addr, "add", index=index, address=ip, prefixlen=other_prefix))
            log.info("Removed address %s/%s from %s (the configured prefix changed)", ip, other_prefix,
                     plan.interface)
        else:
            log.warning("%s also has address %s/%s; left as it is", plan.interface, other_ip, other_prefix)
    _step(f"adding address {plan.address} to {plan.interface}",
          lambda: ipr.addr("add", index=index, address=ip, prefixlen=prefix))
    undo.push(f"add address {plan.address}", lambda: ipr.addr("del", index=index, address=ip, prefixlen=prefix))
    log.info("Added address %s to %s", plan.address, plan.interface)
    return 1


def ensure_link_up(ipr: Any, plan: Plan, index: int, undo: Undo) -> int:
    link = ipr.get_links(index)[0]
    if link["flags"] & 1:  # IFF_UP
        log.debug("%s is already up", plan.interface)
        return 0
    _step(f"setting {plan.interface} up", lambda: ipr.link("set", index=index, state="up"))
    undo.push(f"set {plan.interface} up", lambda: ipr.link("set", index=index, state="down"))
    log.info("Set %s up", plan.interface)
    return 1


@dataclass(frozen=True, slots=True)
class Route:
    """The fields of a main-table IPv4 route we compare and restore."""

    dst: str | None
    dst_len: int
    gateway: str | None
    oif: int | None
    priority: int | None
    scope: int

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"dst": f"{self.dst or '0.0.0.0'}/{self.dst_len}", "table": MAIN_TABLE,
                                "scope": self.scope}
        for key in ("gateway", "oif", "priority"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        return spec


def main_routes(ipr: Any) -> list[Route]:
    routes = []
    for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if msg["type"] != 1:  # RTN_UNICAST only
            continue
        routes.append(Route(msg.get("RTA_DST"), msg["dst_len"], msg.get("RTA_GATEWAY"), msg.get("RTA_OIF"),
                            msg.get("RTA_PRIORITY"), msg["scope"]))
    return routes


def ensure_gateway_route(ipr: Any, plan: Plan, index: int, undo: Undo) -> int:
    gateway = str(plan.gateway)
    wanted = Route(gateway, 32, None, index, None, SCOPE_LINK)
    existing = [r for r in main_routes(ipr) if r.dst == gateway and r.dst_len == 32]
    if wanted in existing:
        log.debug("Route %s dev %s already present", plan.gateway_route, plan.interface)
        return 0
    _step(f"adding route {plan.gateway_route} dev {plan.interface}",
          lambda: ipr.route("replace", **wanted.spec()))
    undo.push(f"add route {plan.gateway_route}", lambda: _restore_routes(ipr, wanted, existing))
    log.info("Added route %s dev %s", plan.gateway_route, plan.interface)
    return 1


def ensure_default_route(ipr: Any, plan: Plan, index: int, undo: Undo) -> int:
    gateway = str(plan.gateway)
    wanted = Route(None, 0, gateway, index, None, 0)
    defaults = [r for r in main_routes(ipr) if r.dst_len == 0]
    if defaults == [wanted]:
        log.debug("Default route via %s dev %s already present", gateway, plan.interface)
        return 0
    # Replace first, then remove the other defaults: there is never a moment without one.
    _step(f"setting the default route via {gateway} dev {plan.interface}",
          lambda: ipr.route("replace", **wanted.spec()))
    undo.push(f"set default route via {gateway}", lambda: _restore_routes(ipr, wanted, defaults))
    for old in [r for r in main_routes(ipr) if r.dst_len == 0 and r != wanted]:
        _step(f"removing the old default route ({_describe(old)})", partial(ipr.route, "del", **old.spec()))
        log.info("Removed old default route %s", _describe(old))
    log.info("Added route default via %s dev %s", gateway, plan.interface)
    return 1


def _describe(route: Route) -> str:
    text = f"via {route.gateway}" if route.gateway else "(no gateway)"
    return text + (f" metric {route.priority}" if route.priority else "")


def _restore_routes(ipr: Any, ours: Route, previous: list[Route]) -> None:
    current = main_routes(ipr)
    if ours in current and ours not in previous:
        ipr.route("del", **ours.spec())
    for route in previous:
        if route not in main_routes(ipr):
            ipr.route("add", **route.spec())


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
