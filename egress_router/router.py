"""Setting the network up: check everything, apply the plan, then exit or stay up (legacy mode).

Order matters for "nothing half-applied": every check that can fail without changing anything
(configuration, privileges, interfaces, tools, the current nat table) runs first; then the plan's
steps in order (NAT first, all or nothing), each change recorded with its undo (net.apply).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .core.config import RouterConfig
from .core.errors import SetupError
from .core.plan import IP6_FORWARD, IP_FORWARD, Plan, build_plan
from .core.podnet import PodFacts
from .core.steps import Sysctl
from .live import SIGNALS, Live
from .net import apply as apply_steps
from .net import iptables, links
from .net.lock import namespace_lock
from .net.rtnl import Rtnl

if TYPE_CHECKING:
    from .ha import Role

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def effective_capabilities() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything checked and read before the first change: the plan and what its steps need."""

    plan: Plan
    context: apply_steps.Context
    facts: PodFacts | None = None  # the pod interface's next hop and nameservers, as read before the plan

    @property
    def rtnl(self) -> Rtnl:
        return self.context.rtnl


def prepare(config: RouterConfig) -> Prepared:
    """All read-only checks and reads; raises SetupError before anything is changed."""
    caps = effective_capabilities()
    if not caps & (1 << CAP_NET_ADMIN):
        raise SetupError("missing the NET_ADMIN capability: run the container privileged, or add NET_ADMIN "
                         "and NET_RAW to securityContext.capabilities.add (docker run --cap-add)")
    if config.configures_nat:
        links.check_pod_interface(config.pod_interface)
    rtnl = links.open_rtnl()
    try:
        interface = links.resolve_interface(rtnl, config)
        facts = pod_facts(rtnl, config)
        plan = build_plan(config, interface, facts)
        versions = tuple(nat.version for nat in plan.nats)
        tools = iptables.find_family_tools(config.iptables, versions) if versions else {}
        check_sysctls(plan)
        nat_before = {version: iptables.read_state(tools[version][0]) for version in versions}
    except BaseException:
        rtnl.close()
        raise
    can_announce = bool(caps & (1 << CAP_NET_RAW))
    if not can_announce:
        for address in plan.addresses:
            kind, cache = ("unsolicited neighbour advertisement", "neighbour") if address.version == 6 else \
                ("gratuitous ARP announcement", "ARP")
            log.warning("No NET_RAW capability: the %s is skipped, so neighbours learn %s's new MAC only when "
                        "their %s entries expire; add NET_RAW", kind, address.ip, cache)
    context = apply_steps.Context(rtnl, tools=tools, nat_before=nat_before, can_announce=can_announce)
    return Prepared(plan, context, facts)


def pod_facts(rtnl: Rtnl, config: RouterConfig) -> PodFacts:
    """The pod interface's next hop and nameservers; says so when no return path can be planned."""
    facts = links.pod_facts(rtnl, config.pod_interface, versions=config.versions)
    if 6 in config.versions and not facts.known6 and not config.pod_interface.endswith("+"):
        log.info("No IPv6 route goes through %s: no IPv6 return path is set up (IPv6 clients cannot reach "
                 "the router through it)", config.pod_interface)
    if 4 in config.versions and not facts.known:
        why = (f"EGRESS_POD_INTERFACE {config.pod_interface!r} is a pattern, not one interface"
               if config.pod_interface.endswith("+") else f"no route goes through {config.pod_interface}")
        log.warning("No pod-network return path: %s, so replies to clients outside its own subnet, kubelet "
                    "probes and DNS queries may leave through the egress interface%s", why,
                    " (EGRESS_CLUSTER_CIDRS is not used either)" if config.cluster_cidrs else "")
    return facts


def check_sysctls(plan: Plan) -> None:
    """Every kernel setting the plan must change can be written (/proc/sys is read-only in containers
    that are not privileged)."""
    for step in plan.steps:
        if isinstance(step, Sysctl) and step.key.startswith("net.ipv6.") and not os.path.exists(step.path):
            raise SetupError(f"{step.path} does not exist: this kernel or network namespace has no IPv6 (booted "
                             "with ipv6.disable=1?), so an IPv6 EGRESS_SOURCE cannot be configured")
        if isinstance(step, Sysctl) and links.read_sysctl(step.path) != step.value and \
                not os.access(step.path, os.W_OK):
            if step.key in (IP_FORWARD, IP6_FORWARD):
                family = "IPv6" if step.key == IP6_FORWARD else "IPv4"
                raise SetupError(f"{family} forwarding is off and /proc/sys is read-only here: run the container "
                                 f"privileged, or set the sysctl {step.key}=1 for the pod "
                                 f"(securityContext.sysctls; docker run --sysctl {step.key}=1)")
            raise SetupError(f"{step.key} must be {step.value} and /proc/sys is read-only here: run the "
                             f"container privileged, or set the sysctl {step.key}={step.value} for the pod "
                             f"(securityContext.sysctls; docker run --sysctl {step.key}={step.value})")


def apply(prepared: Prepared) -> None:
    """Apply the plan's steps in order (NAT first, in one transaction); all or nothing."""
    apply_steps.apply(prepared.plan, prepared.context)


def seconds_since_process_start() -> float:
    """Wall time since this process was started (kernel start time, so it includes Python start-up)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def configure(config: RouterConfig, env: Mapping[str, str]) -> None:
    """Apply the plan; in legacy mode then stay up until SIGTERM/SIGINT, reloading and repairing (live.py).

    Runs in one network namespace take turns (net.lock): kubelet may restart an init container while
    the first run is still applying, and two interleaved runs could undo each other's work.
    """
    stay_up = config.mode == "legacy"
    if stay_up:
        # Block the stop and reload signals now, so a stop during setup waits until setup is complete
        # (and a SIGHUP does not kill the process).
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    # the admin port is opened before any change: a port in use is an error with nothing changed
    admin_socket = open_admin_port(config.metrics_port) if stay_up and config.metrics_port else None
    prepared, role = set_up(config)
    try:
        plan, context = prepared.plan, prepared.context
        # legacy mode: the rule files are watched from before "Ready", so an edit made after it is noticed
        live = Live(env, config, plan, prepared.facts, context, role) if stay_up else None
        if live is not None and admin_socket is not None:
            from .admin import serve_in_thread
            from .legacy_metrics import RedirectMetrics, legacy_admin

            serve_in_thread(admin_socket, legacy_admin(live, RedirectMetrics()))
            log.info("Admin port %d: /healthz, /ready, /metrics", config.metrics_port)
        log_ready(config, prepared, role)
        if live is not None:
            received = live.run()
            log.info("Received %s; exiting", signal.Signals(received).name)
    finally:
        prepared.rtnl.close()


def log_ready(config: RouterConfig, prepared: Prepared, role: Role | None) -> None:
    plan, context = prepared.plan, prepared.context
    nat_part = f"{context.nat_rule_count} NAT rules" if any(nat.chains for nat in plan.nats) \
        else "no NAT (proxy mode)"
    state = f"{context.changes} network change(s)" if context.changes else "network already configured"
    held = " and ".join(map(str, plan.addresses))
    log.info("Ready: %s on %s via %s, %s, %s (%s mode, %.2f s since start)",
             held if role is None else f"a replica for {held} (holding it only once elected)", plan.interface,
             " and ".join(map(str, plan.gateways)), nat_part, state, config.mode, seconds_since_process_start())


def set_up(config: RouterConfig) -> tuple[Prepared, Role | None]:
    """Every check, then the plan applied under the namespace's lock; with high availability (the router stays
    up), the standby's part of it and the replica's Role. The caller closes the prepared netlink socket."""
    if config.ha is not None:
        from .ha import check_can_run

        check_can_run(config.ha.state_dir)
    role = None
    with namespace_lock():
        prepared = prepare(config)
        try:
            if config.ha is not None:
                role = standby_role(config, prepared)
                apply(dataclasses.replace(prepared, plan=role.view(prepared.plan)))  # a standby's part, at first
            else:
                apply(prepared)
        except BaseException:
            prepared.rtnl.close()
            raise
    return prepared, role


def standby_role(config: RouterConfig, prepared: Prepared) -> Role:
    """High availability: this replica's part, a standby until keepalived elects it; the reserved addresses an
    earlier run left (a crash keeps the pod's network namespace) are removed first."""
    from .ha import Role, own_address

    assert config.ha is not None
    settings = config.ha
    versions = [settings.addresses[0].version] if settings.addresses else [4, 6]
    own = None
    for version in versions:
        try:
            own = own_address(prepared.rtnl, config.pod_interface, version)
            break
        except SetupError:
            if version == versions[-1]:
                raise
    assert own is not None
    role = Role(settings, prepared.plan, prepared.context, own, config.pod_interface)
    role.release_stale()
    return role


def open_admin_port(port: int) -> socket.socket:
    from .admin import bind  # only a router with an admin port pays for the server's imports

    return bind(port)

