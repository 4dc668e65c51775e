"""The container behaviour: check everything, then apply the plan, then exit or stay up.

Order matters for "nothing half-applied": every check that can fail without changing anything
(configuration, privileges, interfaces, tools, the current nat table) runs first; then the NAT
transaction (all or nothing), then the network steps, each recorded with its undo.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from . import arp, links, nat
from .config import RouterConfig
from .errors import SetupError
from .plan import Plan, build_plan
from .rtnl import Rtnl

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
REANNOUNCE_AFTER_SECONDS = 2.0  # as ifup does: a second announcement once switches have settled


def effective_capabilities() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything checked and read before the first change."""

    plan: Plan
    rtnl: Rtnl
    restore_tool: str | None
    nat_before: nat.NatState | None
    can_announce: bool


def prepare(config: RouterConfig) -> Prepared:
    """All read-only checks; raises SetupError before anything is changed."""
    caps = effective_capabilities()
    if not caps & (1 << CAP_NET_ADMIN):
        raise SetupError("missing the NET_ADMIN capability: run the container privileged, or add NET_ADMIN "
                         "and NET_RAW to securityContext.capabilities.add (docker run --cap-add)")
    tools = nat.find_tools(config.iptables) if config.configures_nat else None
    if config.configures_nat:
        links.check_pod_interface(config.pod_interface)
    if not links.forwarding_enabled() and not links.can_enable_forwarding():
        raise SetupError("IPv4 forwarding is off and /proc/sys is read-only here: run the container "
                         "privileged, or set the sysctl net.ipv4.ip_forward=1 for the pod "
                         "(securityContext.sysctls; docker run --sysctl net.ipv4.ip_forward=1)")
    nat_before = nat.read_state(tools[0]) if tools else None
    rtnl = links.open_rtnl()
    try:
        plan = build_plan(config, links.resolve_interface(rtnl, config))
    except BaseException:
        rtnl.close()
        raise
    can_announce = bool(caps & (1 << CAP_NET_RAW))
    if not can_announce:
        log.warning("No NET_RAW capability: the gratuitous ARP announcement is skipped, so neighbours "
                    "learn %s's new MAC only when their ARP entries expire; add NET_RAW", plan.address.ip)
    return Prepared(plan, rtnl, tools[1] if tools else None, nat_before, can_announce)


def apply(prepared: Prepared) -> tuple[int, int, str]:
    """Apply NAT (one transaction) then the network; returns (network changes, NAT rules, MAC).

    NAT goes first because it is the step most likely to fail (a kernel without a module, a
    broken iptables backend), and it fails whole: then nothing at all was changed. If a network
    step fails afterwards, the network changes and the NAT rules are put back as they were.
    """
    plan = prepared.plan
    undo = links.Undo()
    try:
        rules = 0
        if plan.destinations is not None:
            restore_tool, before = prepared.restore_tool, prepared.nat_before
            assert restore_tool is not None and before is not None
            rules, changed = nat.apply(plan, restore_tool, before)
            if changed:
                undo.push("apply NAT rules", lambda: nat.roll_back(restore_tool, before))
        changes, mac = links.apply(prepared.rtnl, plan, undo)
    except SetupError as exc:
        if not undo.actions:
            raise SetupError(f"{exc}; nothing was changed") from None
        log.error("Setup failed; undoing the %d change(s) made so far", len(undo.actions))
        undo.run()
        raise SetupError(f"{exc}; the changes made before it were undone") from None
    except BaseException:
        undo.run()
        raise
    return changes, rules, mac


def announce(prepared: Prepared, mac: str) -> None:
    if not prepared.can_announce:
        return
    plan = prepared.plan
    try:
        arp.announce(plan.interface, mac, plan.address.ip)
    except (OSError, ValueError) as exc:
        log.warning("Could not send the gratuitous ARP announcement on %s: %s", plan.interface,
                    getattr(exc, "strerror", None) or exc)


def seconds_since_process_start() -> float:
    """Wall time since this process was started (kernel start time, so it includes Python start-up)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run(config: RouterConfig) -> int:
    """The env-driven container behaviour for every mode but unit-test; returns the exit code."""
    stay_up = config.mode == "legacy"
    if stay_up:
        # Block the stop signals now, so a stop during setup waits until setup is complete.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    prepared = prepare(config)
    try:
        changes, rules, mac = apply(prepared)
        announce(prepared, mac)
        plan = prepared.plan
        nat_part = f"{rules} NAT rules" if plan.destinations is not None else "no NAT (proxy mode)"
        state = f"{changes} network change(s)" if changes else "network already configured"
        log.info("Ready: %s on %s via %s, %s, %s (%s mode, %.2f s since start)", plan.address, plan.interface,
                 plan.gateway, nat_part, state, config.mode, seconds_since_process_start())
        if stay_up:
            wait_for_stop(prepared, mac)
    finally:
        prepared.rtnl.close()
    return 0


def wait_for_stop(prepared: Prepared, mac: str) -> None:
    """Legacy mode: stay up until SIGTERM/SIGINT; re-announce once meanwhile."""
    stops = {signal.SIGTERM, signal.SIGINT}
    received = signal.sigtimedwait(stops, REANNOUNCE_AFTER_SECONDS)
    if received is None:
        announce(prepared, mac)
        received = signal.sigwaitinfo(stops)
    log.info("Received %s; exiting", signal.Signals(received.si_signo).name)
