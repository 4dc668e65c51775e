"""Read-only look-ups before a plan is built: the egress and pod interfaces, the pod interface's next hop,
the nameservers, whether forwarding can be set."""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address, IPv6Address

from ..core.config import RouterConfig
from ..core.errors import SetupError
from ..core.podnet import RETURN_TABLE, PodFacts, parse_nameservers, parse_nameservers6
from ..core.variables import DEFAULT_INTERFACE
from .rtnl import FAMILIES, Route, Rtnl

log = logging.getLogger(__name__)

MULTUS_HINT = ("the pod needs a macvlan interface: add the annotation "
               "pod.network.openshift.io/assign-macvlan: \"true\" (OpenShift), attach a macvlan "
               "NetworkAttachmentDefinition with Multus, or set EGRESS_INTERFACE")


def open_rtnl() -> Rtnl:
    return Rtnl()


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


def read_sysctl(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        raise SetupError(f"{path} does not exist (is the interface there?)") from None


RESOLV_CONF = "/etc/resolv.conf"


def pod_facts(rtnl: Rtnl, pod_interface: str, resolv_conf: str = RESOLV_CONF, versions: tuple[int, ...] = (4,)
              ) -> PodFacts:
    """The pod interface's next hop and the pod's nameservers, for each family in `versions`; a family whose
    next hop is unknown is not `known` (no return path is planned for it)."""
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        text = ""
    nameservers, nameservers6 = parse_nameservers(text), parse_nameservers6(text) if 6 in versions else ()
    index = None if pod_interface.endswith("+") else link_index(pod_interface)
    hop = next_hop(rtnl, index) if index is not None and 4 in versions else None
    hop6 = next_hop(rtnl, index, 6) if index is not None and 6 in versions else None
    return PodFacts(
        known=hop is not None,
        gateway=IPv4Address(hop.gateway) if hop is not None and hop.gateway is not None else None,
        nameservers=nameservers,
        strict_rp_filter=hop is not None and strict_rp_filter(pod_interface),
        known6=hop6 is not None,
        gateway6=IPv6Address(hop6.gateway) if hop6 is not None and hop6.gateway is not None else None,
        nameservers6=nameservers6,
    )


def strict_rp_filter(interface: str) -> bool:
    """Whether reverse-path filtering on `interface` is strict: the kernel uses the larger of `all` and it."""
    values = []
    for scope in ("all", interface):
        try:
            values.append(int(read_sysctl(f"/proc/sys/net/ipv4/conf/{scope}/rp_filter")))
        except (SetupError, ValueError):
            values.append(0)
    return max(values) == 1


def next_hop(rtnl: Rtnl, index: int, version: int = 4) -> Route | None:
    """The route whose next hop the pod interface uses, in order of trust: the one a previous run kept in
    our table; the pod's default route through it (lowest metric); any route through it with a gateway
    (OpenShift gives the router pod explicit cluster routes); a device route on it (its own subnet; for
    IPv6 not the link-local one every link has)."""
    family = FAMILIES[version]
    kept = [r for r in rtnl.routes(RETURN_TABLE, family) if r.dst_len == 0 and r.oif == index]
    if kept:
        return kept[0]
    main = [r for r in rtnl.routes(family=family) if r.oif == index]
    defaults = sorted((r for r in main if r.dst_len == 0), key=lambda r: r.priority or 0)
    if defaults:
        return defaults[0]
    via = [r for r in main if r.gateway is not None]
    if via:
        return via[0]
    return next((r for r in main if r.dst_len and r.gateway is None and not (r.dst or "").startswith("fe80:")), None)
