"""Read-only look-ups before a plan is built: the egress and pod interfaces, whether forwarding can be set."""

from __future__ import annotations

import logging
import os
import socket

from ..core.config import RouterConfig
from ..core.errors import SetupError
from ..core.variables import DEFAULT_INTERFACE
from .rtnl import Rtnl

log = logging.getLogger(__name__)

FORWARDING = "/proc/sys/net/ipv4/ip_forward"
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


def forwarding_enabled() -> bool:
    with open(FORWARDING, encoding="ascii") as handle:
        return handle.read().strip() == "1"


def can_enable_forwarding() -> bool:
    return os.access(FORWARDING, os.W_OK)
