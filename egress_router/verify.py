"""`egress-router verify`: the plan built from the environment and files, compared with the live namespace (read-only).

The plan is built as router.prepare builds it (configuration, egress interface, pod facts); which steps do
not hold is net.apply.drift's answer, the same reads drift repair uses. This module only explains each
such step as one line (what is missing, what differs, what is left over) and never changes anything.

The namespace's lock (net.lock) is held while reading, so a run applying at that moment (an init container
re-run, a drift repair) is waited for instead of being reported as a transient difference.

A high-availability replica (EGRESS_HA_PEERS) is compared with its role's part of the plan (core.ha.replica_plan):
the role the running router wrote in its state file (readiness.py), or the one `--role` gives.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .core import ha
from .core.errors import EgressRouterError, SetupError
from .core.nat import TABLE_JUMPS, NatRules, NatState
from .core.plan import Plan, Step, build_plan
from .core.steps import MAIN_TABLE, ROUTER_PROTO, Address, Announce, LinkUp, PolicyRule, PruneRoutes, Route, Sysctl

if TYPE_CHECKING:
    from .core.config import RouterConfig
    from .core.ha import HaSettings
    from .net.apply import Context

EXIT_CONVERGED, EXIT_DIFFERS, EXIT_UNKNOWN = 0, 1, 2
LOCK_WAIT_SECONDS = 3.0  # a run holds the lock ~0.1 s; a probe's own timeout is a few seconds
RULES_SHOWN_PER_CHAIN = 10  # a flushed chain of 5,000 rules is one line per rule up to here, then a count
ROLE_LINES = MappingProxyType({ha.ACTIVE: "active replica: it holds EGRESS_SOURCE",
                               ha.STANDBY: "standby replica: EGRESS_SOURCE is held by another replica"})
ROLE_READS = 3  # the role changed while the namespace was read: read again, up to this many times in all
FOREVER = 0xFFFFFFFF  # an address's valid lifetime as the kernel reports "forever"


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the namespace is not as planned. `step` is the command that would repair it (the plan's
    steps as `render` prints them; NAT: the iptables command for the one chain, rule or jump)."""

    kind: str  # "missing", "differs" or "extra"
    step: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind}: {self.step}" + (f" ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "step": self.step, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Report:
    """What verify found: converged (no differences), differences, or an error (it cannot tell)."""

    differences: tuple[Difference, ...] = ()
    error: str | None = None
    summary: str = ""
    notes: tuple[str, ...] = ()  # e.g. the files differ from the rules the running router has in force
    role: str | None = None  # a high-availability replica's role compared with (core.ha.ACTIVE or STANDBY)
    role_line: str = ""  # ROLE_LINES[role], and where the role came from

    @property
    def converged(self) -> bool:
        return self.error is None and not self.differences

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_UNKNOWN
        return EXIT_DIFFERS if self.differences else EXIT_CONVERGED

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"converged": self.converged, "differences": [d.as_dict() for d in self.differences],
                                 "error": self.error, "summary": self.summary}
        if self.notes:
            found["notes"] = list(self.notes)
        if self.role is not None:
            found.update(role=self.role, role_line=self.role_line)
        return found

    def json(self) -> str:
        return json.dumps(self.as_dict())

    def lines(self) -> list[str]:
        """The text output (stdout): the role, one line per difference, then the summary (errors go to stderr)."""
        return ([f"note: {note}" for note in self.notes] + ([self.role_line] if self.role_line else [])
                + [d.line() for d in self.differences] + ([self.summary] if self.summary else []))


def verify(env: Mapping[str, str], role: str | None = None) -> Report:
    """Build the plan for `env` and compare it with the current network namespace; never raises for a user
    error (bad configuration, missing privileges, interface or tool): that is the report's error.

    `role` (ACTIVE or STANDBY): a high-availability replica's role to compare with; None: the running router's."""
    try:
        config, notes = configuration(env)
        if role is not None and config.ha is None:
            return Report(error=f"--role {role} is for a high-availability replica: EGRESS_HA_PEERS is unset")
        if config.mode == "unit-test" or not config.configures_network:
            why = "unit-test mode changes nothing" if config.mode == "unit-test" else \
                "EGRESS_SOURCE is unset, the network is not configured (proxy only)"
            return Report(summary=f"converged: nothing to verify ({why})")
        from .net.lock import namespace_lock

        for _ in range(ROLE_READS):
            chosen, line = (None, "") if config.ha is None else replica_role(config.ha, role)
            with namespace_lock(LOCK_WAIT_SECONDS):
                report = compare(config, chosen)
            # the router writes its new role just after changing the namespace: a change meanwhile, read again
            if config.ha is None or replica_role(config.ha, role)[0] == chosen:
                break
        report = dataclasses.replace(report, role=chosen, role_line=line)
        return dataclasses.replace(report, notes=notes) if notes else report
    except EgressRouterError as exc:
        return Report(error=str(exc))
    except OSError as exc:  # a read the kernel refused (netlink, /proc/sys): nothing to conclude from
        return Report(error=f"cannot read the network state: {exc.strerror or exc}")


def configuration(env: Mapping[str, str]) -> tuple[RouterConfig, tuple[str, ...]]:
    """The configuration to verify: from the files as they are, unless a router running in this container
    recorded other content as in force (it refused an edit, or has not applied it yet): then that one."""
    from . import inforce
    from .core.errors import ConfigError
    from .sources import load_files, read_files, watched_paths

    in_force = inforce.read() if watched_paths(env) else None
    if in_force is None or set(in_force) != set(watched_paths(env)):
        return load_files(env, read_files(env)), ()
    try:
        files = read_files(env)
        if files == in_force:
            return load_files(env, files), ()
        load_files(env, files)
        why = "the running router has not applied them (yet)"
    except ConfigError as exc:
        why = f"the running router refuses them: {exc}"
    return load_files(env, in_force), (f"the files differ from the rules in force ({why}); verified against "
                                       "the rules in force",)


def replica_role(settings: HaSettings, chosen: str | None = None) -> tuple[str, str]:
    """(role, the line that says it): `chosen` when given, else what the running router last wrote in its state
    file (any state but active is a standby's part: a starting replica holds what a standby holds); a SetupError
    when no router runs (no state file, the router stopped or its process is gone)."""
    from . import readiness

    if chosen is not None:
        return chosen, f"{ROLE_LINES[chosen]} (--role {chosen}, not read from a running router)"
    path = Path(settings.state_dir) / readiness.STATE_FILE
    found = readiness.read_state(path.parent)
    if found is None:
        why = f"no state in {path}"
    elif found[0] == "stopped":
        why = f"the router that wrote {path} stopped"
    elif not readiness.running(found[1]):
        why = f"the router that wrote {path} (pid {found[1]}) is gone"
    else:
        state = found[0]
        role = ha.ACTIVE if state == ha.ACTIVE else ha.STANDBY
        return role, ROLE_LINES[role] + ("" if state == role else f" (the router says {state})")
    raise SetupError(f"no high-availability router runs here ({why}; EGRESS_HA_STATE_DIR): which part of the plan "
                     "this replica holds is its role; give --role active or --role standby to compare with that one")


def compare(config: RouterConfig, role: str | None = None) -> Report:
    """router.prepare's reads, then drift; the differences of every step that does not hold. `role`: a
    high-availability replica's, whose part of the plan is compared (core.ha.replica_plan)."""
    from . import router
    from .net import apply as net_apply
    from .net import iptables, links

    if config.configures_nat:
        links.check_pod_interface(config.pod_interface)
    rtnl = links.open_rtnl()
    try:
        interface = links.resolve_interface(rtnl, config)
        whole = build_plan(config, interface, links.pod_facts(rtnl, config.pod_interface, versions=config.versions))
        plan = whole if role is None else ha.replica_plan(whole, role)
        tools = {}
        if plan.nats:
            if not router.effective_capabilities() & (1 << router.CAP_NET_ADMIN):
                raise SetupError("cannot read the iptables rules without the NET_ADMIN capability (run verify "
                                 "with the router container's privileges: securityContext.capabilities.add "
                                 "NET_ADMIN, docker run --cap-add NET_ADMIN)")
            tools = iptables.find_family_tools(config.iptables, tuple(nat.version for nat in plan.nats))
        context = net_apply.Context(rtnl, tools=tools)
        drifted = net_apply.drift(plan, context)
        differences = [d for step in drifted for d in explain(step, context)]
        lifetimes = [] if role != ha.ACTIVE else [
            found for step in plan.steps if isinstance(step, Address) and step.lifetime is not None
            and step not in drifted and (found := lifetime_difference(step, address_lifetime(context, step)))]
        extra = [] if role != ha.STANDBY else standby_extras(whole, present_addresses(context, whole))
    finally:
        rtnl.close()
    return Report((*differences, *lifetimes, *extra),
                  summary=summary(config.mode, plan, len(drifted) + len(lifetimes), len(extra)))


def summary(mode: str, plan: Plan, drifted: int, held: int = 0) -> str:
    """`held`: reserved addresses on a standby, which holds none."""
    what = f"{' and '.join(map(str, plan.addresses))} on {plan.interface} via {' and '.join(map(str, plan.gateways))}"
    nat_count = sum(len(rules) for nat in plan.nats for _, rules in nat.chains)
    if nat_count:
        what += f", {nat_count} NAT rules"
    checked = len(plan.steps)
    if not drifted and not held:
        return f"converged: all {checked} steps hold ({mode} mode: {what})"
    besides = f", and {held} reserved address(es) held, which a standby must not" if held else ""
    return f"not converged: {drifted} of {checked} steps do not hold{besides} ({mode} mode: {what})"


def explain(step: Step, context: Context) -> list[Difference]:
    """The differences of one step that does not hold; never none (then the step itself is the line)."""
    found = EXPLAINERS[type(step)](context, step)
    if found:
        return found
    shown = str(step) if isinstance(step, NatRules) else step.render().splitlines()[0].split("  # ")[0]
    return [Difference("differs", shown, "did not hold, then changed while it was read again")]


# ---------------------------------------------------------------- addresses and links

def address_differences(context: Context, step: Address) -> list[Difference]:
    present = context.rtnl.addresses(context.index(step.interface))
    others = [f"{ip}/{prefix}" for ip, prefix in present if ip == str(step.address.ip)]
    if others:
        return [Difference("differs", step.render(), f"found {', '.join(others)}")]
    return [Difference("missing", step.render())]


def address_lifetime(context: Context, step: Address) -> int | None:
    """The seconds the kernel keeps `step`'s address unless renewed (None: forever, or not there)."""
    from .net import rtnl

    wanted = (str(step.address.ip), step.address.network.prefixlen)
    found = context.rtnl.request(context.rtnl.messages.ifaddrmsg, rtnl.RTM_GETADDR, rtnl.F_REQUEST | rtnl.F_DUMP,
                                 {"family": rtnl.FAMILIES[step.address.version]})
    index = context.index(step.interface)
    for msg in found:
        if msg["index"] == index and (msg.get("IFA_ADDRESS"), msg["prefixlen"]) == wanted:
            cacheinfo = msg.get("IFA_CACHEINFO")
            valid = FOREVER if cacheinfo is None else int(cacheinfo["ifa_valid"])
            return None if valid == FOREVER else valid
    return None


def lifetime_difference(step: Address, valid: int | None) -> Difference | None:
    """An active replica's reserved address must lapse unless renewed (pure): without its lifetime (`valid` None:
    forever) or with a longer one, a replica that dies with its network namespace left would answer for it on the
    LAN long after another one took over."""
    if step.lifetime is None or (valid is not None and valid <= step.lifetime):
        return None
    found = "valid forever" if valid is None else f"valid for {valid} s"
    return Difference("differs", step.render(), f"found {step.address} {found}: a replica that dies would keep "
                      "answering for it")


def present_addresses(context: Context, plan: Plan) -> list[tuple[str, int]]:
    from .net.rtnl import FAMILIES

    index = context.index(plan.interface)
    return [found for version in sorted({a.version for a in plan.addresses})
            for found in context.rtnl.addresses(index, FAMILIES[version])]


def standby_extras(plan: Plan, present: Sequence[tuple[str, int]]) -> list[Difference]:
    """The reserved addresses found on a standby's egress interface (pure): only the active replica holds them,
    whatever their prefix."""
    return [Difference("extra", f"ip address del {ip}/{prefix} dev {plan.interface}",
                       "a standby holds no reserved address: the active replica does")
            for address in plan.addresses for ip, prefix in present if ip == str(address.ip)]


def link_differences(context: Context, step: LinkUp) -> list[Difference]:
    return [Difference("differs", step.render(), f"{step.interface} is down")]


# ---------------------------------------------------------------- routes

def shown_route(route: Any) -> str:
    """A kernel route as `ip route` prints it (the parts we compare)."""
    from .net.rtnl import RTN_UNREACHABLE

    where = "default" if not route.dst_len else f"{route.dst}/{route.dst_len}"
    # a standby's default routes (high availability)
    text = ("unreachable " if getattr(route, "type", None) == RTN_UNREACHABLE else "") + where
    text += f" via {route.gateway}" if route.gateway else ""
    if route.oif is not None:
        try:
            text += f" dev {socket.if_indextoname(route.oif)}"
        except OSError:
            text += f" dev #{route.oif}"
    if route.gateway is None and route.scope:
        text += " scope link"
    text += " onlink" if route.onlink else ""
    text += f" metric {route.priority}" if route.priority else ""
    return text + (f" table {route.table}" if route.table != MAIN_TABLE else "")


def route_differences(context: Context, step: Route) -> list[Difference]:
    from .net.apply import kernel_route, same_destination

    wanted = kernel_route(context, step)
    present = same_destination(context, wanted)
    if not present:
        return [Difference("missing", step.render())]
    if wanted in present:  # a sole route with company: the others are what differs
        return [Difference("extra", f"ip route del {shown_route(route)}", f"besides {step.render()}")
                for route in present if route != wanted]
    return [Difference("differs", step.render(), "found " + "; ".join(shown_route(r) for r in present))]


def prune_differences(context: Context, step: PruneRoutes) -> list[Difference]:
    from .net.apply import stale_routes

    return [Difference("extra", f"ip route del {shown_route(route)} proto {ROUTER_PROTO}",
                       "added by an earlier configuration, no longer configured")
            for route in stale_routes(context, step)]


def rule_differences(context: Context, step: PolicyRule) -> list[Difference]:
    same = [r for r in context.rtnl.rules() if r.priority == step.priority]
    if same:
        found = "; ".join(f"fwmark {r.fwmark or 0:#x}/{r.fwmask or 0:#x} lookup {r.table}" for r in same)
        return [Difference("differs", step.render(), f"found priority {step.priority}: {found}")]
    return [Difference("missing", step.render())]


# ---------------------------------------------------------------- sysctls, announcements

def sysctl_differences(context: Context, step: Sysctl) -> list[Difference]:
    from .net.apply import read_sysctl

    return [Difference("differs", step.render(), f"found {read_sysctl(step.path)}")]


def announce_differences(context: Context, step: Announce) -> list[Difference]:
    return []  # an announcement leaves nothing behind; it always holds


# ---------------------------------------------------------------- NAT

def nat_differences(context: Context, step: NatRules) -> list[Difference]:
    from .net import iptables

    assert step.version in context.tools, "found in compare, before drift read the tables"
    return table_differences(step, iptables.read_state(context.tools[step.version][0]))


def table_differences(step: NatRules, state: NatState) -> list[Difference]:
    """Our chains and the jumps to them, compared with the tables as read (pure)."""
    found: list[Difference] = []
    tool = step.tool
    for table, wanted in step.tables().items():
        current = state.table(table)
        for chain, rules in wanted.items():
            if chain not in current:
                found.append(Difference("missing", f"{tool} -t {table} -N {chain}",
                                        f"the chain and its {len(rules)} rule(s)"))
            elif current[chain] != rules:
                found += chain_differences(table, chain, rules, current[chain], tool)
        for builtin, target in TABLE_JUMPS[table].items():
            count = state.jump_count(builtin, target, table)
            if count == 0:
                found.append(Difference("missing", f"{tool} -t {table} -A {builtin} -j {target}"))
            elif count > 1:
                found.append(Difference("extra", f"{tool} -t {table} -D {builtin} -j {target}",
                                        f"{count} copies of the jump"))
    return found


def chain_differences(table: str, chain: str, wanted: list[str], current: list[str], tool: str = "iptables"
                      ) -> list[Difference]:
    missing = [rule for rule in wanted if rule not in current]
    extra = [rule for rule in current if rule not in wanted]
    if not missing and not extra:
        return [Difference("differs", f"{tool} -t {table} chain {chain}",
                           f"the same {len(wanted)} rule(s) in another order or with duplicates")]
    found = [Difference("missing", f"{tool} -t {table} -A {chain} {rule}") for rule in missing]
    found += [Difference("extra", f"{tool} -t {table} -D {chain} {rule}") for rule in extra]
    if len(found) > RULES_SHOWN_PER_CHAIN:
        shown = found[:RULES_SHOWN_PER_CHAIN]
        shown.append(Difference("differs", f"{tool} -t {table} chain {chain}",
                                f"{len(found) - len(shown)} more: {len(missing)} rule(s) missing, "
                                f"{len(extra)} not configured in all"))
        return shown
    return found


EXPLAINERS: Mapping[type, Callable[[Context, Any], list[Difference]]] = MappingProxyType({
    NatRules: nat_differences,
    Address: address_differences,
    LinkUp: link_differences,
    Route: route_differences,
    PolicyRule: rule_differences,
    PruneRoutes: prune_differences,
    Sysctl: sysctl_differences,
    Announce: announce_differences,
})
