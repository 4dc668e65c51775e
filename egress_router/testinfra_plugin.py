"""The pytest plugin (entry point pytest11): assert a router's live state on testinfra hosts via `egress-router verify`.

Works wherever testinfra can run a command next to the router's network namespace: `docker://` and
`kubectl://` hosts run it in the router container (or a debug container sharing the pod's network),
`local://` in a namespace given by name (`ip netns exec`). The image has no `ip`; verify reads with
netlink and iptables-save only, so the image itself answers. Loaded in every pytest run of an
environment that has egress-router installed: it only adds the `egress_router` fixture, imports
nothing heavy, and needs testinfra only when the fixture is used.

A high-availability replica is compared with its role's part of the plan (the role its running router wrote,
or the one `role=` gives, as `verify --role`); `assert_role` asserts which role a replica has.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

DEFAULT_COMMAND = "egress-router"


@dataclass(frozen=True, slots=True)
class RouterState:
    """What `egress-router verify --output json` answered on a host."""

    where: str  # the host, as testinfra names it (and the namespace, for local ones)
    converged: bool
    differences: tuple[dict[str, str], ...]
    error: str | None
    summary: str
    exit_status: int
    role: str | None = None  # a high-availability replica's: "active" or "standby" (None: no high availability)

    def lines(self) -> list[str]:
        """One line per difference, as `egress-router verify` prints them."""
        return [f"{d['kind']}: {d['step']}" + (f" ({d['detail']})" if d.get("detail") else "")
                for d in self.differences]

    def failure(self) -> str:
        """The readable assertion message: what is wrong, one difference per line."""
        if self.error is not None:
            return f"egress-router verify on {self.where} cannot tell: {self.error}"
        role = f", the {self.role} replica," if self.role else ""
        return "\n".join([f"egress router on {self.where}{role} is not as configured: {self.summary}",
                          *(f"  {line}" for line in self.lines())])


def verify_command(env: Mapping[str, str] | None = None, *, command: str = DEFAULT_COMMAND,
                   netns: str | None = None, role: str | None = None) -> str:
    """The shell command that runs verify on a host.

    `env` None: verify sees the environment of the process it runs in (`docker exec`/`kubectl exec` give it
    the container's own). A mapping: exactly those variables (and the host's PATH), nothing inherited, so
    the assertion is about that configuration and no other. Every value is shell-quoted (multi-line rule
    lists included); one shell command line holds at most 128 KiB on Linux: for larger rule lists name a
    file in the container (EGRESS_DESTINATION_FILE) or assert the container's own environment.
    `role` ("active" or "standby"): a high-availability replica compared with that role's part of the plan, not
    the running router's (`verify --role`).
    """
    argv = [command, "verify", "--output", "json", *(["--role", role] if role is not None else [])]
    prefix = ""
    if netns is not None:
        prefix = f"ip netns exec {shlex.quote(netns)} "
    if env is None:
        return prefix + shlex.join(argv)
    assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in sorted(env.items()))
    return f'{prefix}env -i "PATH=$PATH" {assignments} {shlex.join(argv)}'


def host_name(host: Any) -> str:
    backend = getattr(host, "backend", None)
    try:
        return str(backend.get_pytest_id()) if backend is not None else str(host)
    except Exception:  # a backend without a pytest id: its repr still says which host
        return repr(host)


def router_state(host: Any, env: Mapping[str, str] | None = None, *, command: str = DEFAULT_COMMAND,
                 netns: str | None = None, role: str | None = None) -> RouterState:
    """Run verify on a testinfra `host` and parse its answer; an AssertionError if it gave none (not installed,
    no shell, a crash): that is a broken test set-up, not a router state. `role`: see verify_command."""
    where = host_name(host) + (f" (network namespace {netns})" if netns else "")
    result = host.run(verify_command(env, command=command, netns=netns, role=role))
    try:
        document = json.loads(result.stdout)
        state = RouterState(where, bool(document["converged"]), tuple(document["differences"]), document["error"],
                            str(document.get("summary", "")), int(result.rc), document.get("role"))
    except (ValueError, KeyError, TypeError):
        output = " ".join(f"{result.stdout} {result.stderr}".split()) or "no output"
        raise AssertionError(f"egress-router verify on {where} gave no answer (exit status {result.rc}): "
                             f"{output[:2000]}") from None
    return state


def assert_converged(host: Any, env: Mapping[str, str] | None = None, *, command: str = DEFAULT_COMMAND,
                     netns: str | None = None, role: str | None = None) -> RouterState:
    """Fail (AssertionError, one difference per line) unless the router's live state on `host` matches `env`
    (None: the environment verify runs with there); a high-availability replica's, its role's part of the plan
    (`role` None: the role its running router is in). Returns the state for further checks."""
    __tracebackhide__ = True
    state = router_state(host, env, command=command, netns=netns, role=role)
    if not state.converged:
        raise AssertionError(state.failure())
    return state


def assert_role(host: Any, role: str, env: Mapping[str, str] | None = None, *, command: str = DEFAULT_COMMAND,
                netns: str | None = None) -> RouterState:
    """Fail unless the high-availability replica on `host` is in `role` ("active" or "standby"; a starting
    replica counts as a standby), as its running router says; whether it holds that part is assert_converged's."""
    __tracebackhide__ = True
    state = router_state(host, env, command=command, netns=netns)
    if state.error is not None:
        raise AssertionError(state.failure())
    if state.role != role:
        found = f"the {state.role} replica" if state.role else "not a high-availability replica (EGRESS_HA_PEERS unset)"
        raise AssertionError(f"egress router on {state.where} is {found}, not the {role} one")
    return state


def nat_rules(env: Mapping[str, str], interface: str | None = None, version: int = 4) -> dict[str, list[str]]:
    """The nat-table rules `env` plans, as testinfra's `host.iptables.rules("nat", CHAIN, version=VERSION)` returns
    them (`-N` first): chain -> rules, for checking a host that has iptables but no egress-router (the interface:
    EGRESS_INTERFACE, else macvlan0; a router that found another macvlan link by itself needs it given).
    `version` 6: the ip6tables rules of a dual-stack or IPv6 router ({} where it has no IPv6 source)."""
    from .core.nat import nat_rules as planned
    from .core.variables import DEFAULT_INTERFACE
    from .sources import load_config

    config = load_config(env)
    egress = config.family(version)
    if config.destinations is None or egress is None:
        return {}
    nat = planned(config.destinations.family(version), config.pod_interface,
                  interface or config.interface or DEFAULT_INTERFACE, egress.source.ip, admin_port=config.metrics_port)
    return {chain: [f"-N {chain}", *(f"-A {chain} {spec}" for spec in specs)] for chain, specs in nat.chains}


class EgressRouter:
    """The `egress_router` fixture: the helpers, bound to the test's testinfra `host` unless given another."""

    def __init__(self, host: Any, command: str = DEFAULT_COMMAND):
        self.host = host
        self.command = command

    def state(self, env: Mapping[str, str] | None = None, *, host: Any = None, netns: str | None = None,
              role: str | None = None) -> RouterState:
        return router_state(host or self.host, env, command=self.command, netns=netns, role=role)

    def assert_converged(self, env: Mapping[str, str] | None = None, *, host: Any = None,
                         netns: str | None = None, role: str | None = None) -> RouterState:
        __tracebackhide__ = True
        return assert_converged(host or self.host, env, command=self.command, netns=netns, role=role)

    def assert_role(self, role: str, env: Mapping[str, str] | None = None, *, host: Any = None,
                    netns: str | None = None) -> RouterState:
        __tracebackhide__ = True
        return assert_role(host or self.host, role, env, command=self.command, netns=netns)

    def assert_nat_rules(self, env: Mapping[str, str], *, interface: str | None = None, host: Any = None) -> None:
        """Our nat chains on the host hold exactly what `env` plans, in iptables and (IPv6) ip6tables (no egress-router
        needed on the host)."""
        __tracebackhide__ = True
        target = host or self.host
        planned = [(family, chain, wanted) for family in (4, 6)
                   for chain, wanted in nat_rules(env, interface, family).items()]
        for version, chain, wanted in planned:
            found = list(target.iptables.rules("nat", chain, version=version))
            if found != wanted:
                tool = "ip6tables " if version == 6 else ""
                raise AssertionError("\n".join([f"{tool}nat chain {chain} on {host_name(target)} differs:",
                                                *(f"  missing: {rule}" for rule in wanted if rule not in found),
                                                *(f"  extra: {rule}" for rule in found if rule not in wanted)]
                                               + (["  (the same rules in another order)"]
                                                  if sorted(found) == sorted(wanted) else [])))


@pytest.fixture
def egress_router(host: Any) -> EgressRouter:
    """Assert egress routers on the testinfra `host` (--hosts docker://..., kubectl://..., local://):

        def test_router(host, egress_router):
            egress_router.assert_converged({"EGRESS_SOURCE": "192.0.2.99/24", ...})
    """
    return EgressRouter(host)
