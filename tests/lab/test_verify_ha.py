"""`egress-router verify` and the testinfra plugin on high-availability replicas (the HA lab): each replica is
compared with its role's part of the plan, says its role, and a reserved address where its role has none (or none
where it must have one) is a difference naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from egress_router.halab import SOURCE, SOURCE6, HaLab
from egress_router.lab import router_command
from egress_router.readiness import read_state
from egress_router.testinfra_plugin import EgressRouter, assert_converged, assert_role
from tests.lab.conftest import HALAB_TOOLS, require_lab
from tests.lab.test_ha import Replicas, until
from tests.lab.test_ha import replicas as replicas  # the fixture
from tests.lab.test_ha_proxies import ProxyReplicas

ACTIVE_LINE = "active replica: it holds EGRESS_SOURCE"
STANDBY_LINE = "standby replica: EGRESS_SOURCE is held by another replica"
ADDRESS = f"{SOURCE}/24"
ACTIVE_ADDRESS = f"ip address add {ADDRESS} dev macvlan0 valid_lft 1 preferred_lft 1"


def verify(replicas: Replicas, i: int, *options: str) -> subprocess.CompletedProcess[str]:
    """`egress-router verify` in pod i with its router's environment (ip netns exec: the pod's resolv.conf, whose
    nameserver the plan routes)."""
    return replicas.lab.exec(replicas.lab.pod(i), [*router_command(), "verify", *options], env=replicas.env(i),
                             etc=True)


def started_with_pod1_active(replicas: Replicas) -> None:
    """pod1 active, pod0 standby. This way round because pod0's MAC is the lower one: an address added on it
    (a second holder on the LAN) never makes the active replica give way (the guard's rule), so the roles hold."""
    replicas.start(1)
    assert replicas.active() == 1
    replicas.start(0)
    assert until(lambda: replicas.ready(0) == 1 and replicas.lab.http_status(0) == 503, timeout=8) is not None, \
        replicas.logs()


def router_pid(replicas: Replicas, i: int) -> int:
    found = read_state(replicas.dir / f"pod{i}")
    assert found is not None, replicas.log(i)
    return found[1]


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The router stopped (SIGSTOP), its keepalived not: still the elected replica, but nothing repairs the
    namespace meanwhile (drift repair, the address renewal)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_the_active_and_the_standby_replica_each_converge_and_say_their_role(replicas: Replicas) -> None:
    started_with_pod1_active(replicas)
    active, standby = verify(replicas, 1), verify(replicas, 0)
    assert (active.returncode, active.stderr) == (0, ""), active.stdout + replicas.logs()
    assert active.stdout.splitlines() == [
        ACTIVE_LINE, "converged: all 11 steps hold (legacy mode: 192.0.2.99/24 on macvlan0 via 192.0.2.1, 4 NAT rules)"]
    assert (standby.returncode, standby.stderr) == (0, ""), standby.stdout + replicas.logs()
    assert standby.stdout.splitlines() == [
        STANDBY_LINE, "converged: all 8 steps hold (legacy mode: 192.0.2.99/24 on macvlan0 via 192.0.2.1, 4 NAT rules)"]
    document = json.loads(verify(replicas, 0, "--output", "json").stdout)
    assert (document["converged"], document["role"], document["role_line"]) == (True, "standby", STANDBY_LINE)
    # the whole plan is not what a standby holds: compared with the active part, its missing address is named
    as_active = verify(replicas, 0, "--role", "active")
    assert as_active.returncode == 1
    assert as_active.stdout.splitlines()[0] == f"{ACTIVE_LINE} (--role active, not read from a running router)"
    assert f"missing: {ACTIVE_ADDRESS}" in as_active.stdout.splitlines()


def test_an_address_on_the_standby_or_none_on_the_active_is_a_difference_naming_it(ha_lab: HaLab,
                                                                                  replicas: Replicas) -> None:
    started_with_pod1_active(replicas)
    ha_lab.exec(ha_lab.pod(0), ["ip", "address", "add", ADDRESS, "dev", "macvlan0"], check=True)
    extra = verify(replicas, 0)
    ha_lab.exec(ha_lab.pod(0), ["ip", "address", "del", ADDRESS, "dev", "macvlan0"], check=True)
    assert extra.returncode == 1, extra.stdout + extra.stderr
    assert extra.stdout.splitlines() == [
        STANDBY_LINE,
        f"extra: ip address del {ADDRESS} dev macvlan0 (a standby holds no reserved address: the active replica does)",
        "not converged: 0 of 8 steps do not hold, and 1 reserved address(es) held, which a standby must not (legacy "
        "mode: 192.0.2.99/24 on macvlan0 via 192.0.2.1, 4 NAT rules)"]
    assert verify(replicas, 0).returncode == 0

    with frozen(router_pid(replicas, 1)):
        ha_lab.exec(ha_lab.pod(1), ["ip", "address", "del", ADDRESS, "dev", "macvlan0"], check=True)
        missing = verify(replicas, 1)
        # added back as a plain address: no lifetime, which the kernel would keep forever after a crash
        ha_lab.exec(ha_lab.pod(1), ["ip", "address", "add", ADDRESS, "dev", "macvlan0"], check=True)
        forever = verify(replicas, 1)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    lines = missing.stdout.splitlines()
    assert (lines[0], lines[1]) == (ACTIVE_LINE, f"missing: {ACTIVE_ADDRESS}"), missing.stdout
    assert "missing: ip route replace default via 192.0.2.1 dev macvlan0" in lines  # the kernel took it along
    assert forever.returncode == 1, forever.stdout + forever.stderr
    assert f"differs: {ACTIVE_ADDRESS} (found {ADDRESS} valid forever: a replica that dies would keep answering " \
           "for it)" in forever.stdout.splitlines(), forever.stdout
    # running again, the router renews the lifetime and repairs the routes
    assert until(lambda: verify(replicas, 1).returncode == 0, timeout=8) is not None, verify(replicas, 1).stdout
    assert ha_lab.holders() == [1]


def test_with_no_router_running_verify_cannot_tell_unless_given_the_role(ha_lab: HaLab, replicas: Replicas) -> None:
    started_with_pod1_active(replicas)
    pid = router_pid(replicas, 0)
    ha_lab.kill_pod(0)  # the standby's processes gone, its namespace left with the standby's part
    gone = verify(replicas, 0)
    state_file = replicas.dir / "pod0" / "ha-state"
    assert (gone.returncode, gone.stdout) == (2, "")
    assert gone.stderr == (f"error: no high-availability router runs here (the router that wrote {state_file} (pid "
                           f"{pid}) is gone; EGRESS_HA_STATE_DIR): which part of the plan this replica holds is its "
                           "role; give --role active or --role standby to compare with that one\n")
    assert json.loads(verify(replicas, 0, "--output", "json").stdout)["error"].startswith(
        "no high-availability router runs here")
    given = verify(replicas, 0, "--role", "standby")
    assert given.returncode == 0, given.stdout + given.stderr
    assert given.stdout.splitlines()[0] == f"{STANDBY_LINE} (--role standby, not read from a running router)"
    replicas.processes[1].terminate()  # a graceful stop: the state file says so
    assert replicas.processes[1].wait(timeout=10) == 0
    stopped = verify(replicas, 1)
    assert stopped.returncode == 2 and f"the router that wrote {replicas.dir / 'pod1' / 'ha-state'} stopped" in \
        stopped.stderr, stopped.stderr


def test_dual_stack_replicas_and_an_ipv6_address_on_the_standby(tmp_path: Path) -> None:
    require_lab(HALAB_TOOLS)
    with HaLab(2, dual_stack=True) as lab:
        replicas = Replicas(lab, tmp_path)
        started_with_pod1_active(replicas)
        held = "192.0.2.99/24 and 2001:db8:2::99/64 on macvlan0 via 192.0.2.1 and 2001:db8:2::1, 8 NAT rules"
        active, standby = verify(replicas, 1), verify(replicas, 0)
        assert active.stdout.splitlines() == [ACTIVE_LINE, f"converged: all 22 steps hold (legacy mode: {held})"], \
            active.stdout + replicas.logs()
        assert standby.stdout.splitlines() == [STANDBY_LINE, f"converged: all 16 steps hold (legacy mode: {held})"], \
            standby.stdout + replicas.logs()
        lab.exec(lab.pod(0), ["ip", "address", "add", f"{SOURCE6}/64", "dev", "macvlan0", "nodad"], check=True)
        extra = verify(replicas, 0)
        assert extra.returncode == 1 and extra.stdout.splitlines()[1] == (
            f"extra: ip address del {SOURCE6}/64 dev macvlan0 (a standby holds no reserved address: the active replica "
            "does)"), extra.stdout


@pytest.mark.parametrize("mode", ["http-proxy", "dns-proxy"])
def test_proxy_mode_replicas_converge_in_their_roles(ha_lab: HaLab, tmp_path: Path, mode: str) -> None:
    """The proxies' keeper (ha_keeper.py) holds the role and writes the same state file."""
    replicas = ProxyReplicas(ha_lab, tmp_path, mode, 1)
    started_with_pod1_active(replicas)
    active, standby = verify(replicas, 1), verify(replicas, 0)
    assert active.returncode == 0 and active.stdout.splitlines()[0] == ACTIVE_LINE, active.stdout + active.stderr
    assert standby.returncode == 0 and standby.stdout.splitlines()[0] == STANDBY_LINE, standby.stdout + standby.stderr
    assert f"missing: {ACTIVE_ADDRESS}" in verify(replicas, 0, "--role", "active").stdout.splitlines()


# ---------------------------------------------------------------- the testinfra plugin

def local_host():  # type: ignore[no-untyped-def]
    import testinfra

    return testinfra.get_host("local://")


def test_the_testinfra_plugin_on_both_replicas(ha_lab: HaLab, replicas: Replicas) -> None:
    started_with_pod1_active(replicas)
    envs = {i: {name: value for name, value in replicas.env(i).items() if name.startswith("EGRESS_")}
            for i in range(2)}
    host, command = local_host(), router_command()[0]
    helper = EgressRouter(host, command)
    pods = {i: ha_lab.ns[ha_lab.pod(i)] for i in range(2)}
    assert helper.assert_converged(envs[1], netns=pods[1]).role == "active"
    assert helper.assert_converged(envs[0], netns=pods[0]).role == "standby"
    assert helper.assert_role("active", envs[1], netns=pods[1]).converged
    assert assert_role(host, "standby", envs[0], command=command, netns=pods[0]).role == "standby"
    with pytest.raises(AssertionError) as wrong:
        helper.assert_role("active", envs[0], netns=pods[0])
    assert str(wrong.value) == f"egress router on local (network namespace {pods[0]}) is the standby replica, not " \
                               "the active one"
    with pytest.raises(AssertionError) as as_active:  # a role given: that part of the plan, whatever runs
        assert_converged(host, envs[0], command=command, netns=pods[0], role="active")
    lines = str(as_active.value).splitlines()
    assert lines[0].startswith(f"egress router on local (network namespace {pods[0]}), the active replica, is not "
                               "as configured: not converged: "), lines
    assert f"  missing: {ACTIVE_ADDRESS}" in lines
    ha_lab.exec(ha_lab.pod(0), ["ip", "address", "add", ADDRESS, "dev", "macvlan0"], check=True)
    try:
        with pytest.raises(AssertionError) as extra:
            helper.assert_converged(envs[0], netns=pods[0])
    finally:
        ha_lab.exec(ha_lab.pod(0), ["ip", "address", "del", ADDRESS, "dev", "macvlan0"], check=True)
    assert str(extra.value).splitlines()[1:] == [
        f"  extra: ip address del {ADDRESS} dev macvlan0 (a standby holds no reserved address: the active replica "
        "does)"]
    assert ", the standby replica, is not as configured: not converged: 0 of 8 steps" in str(extra.value)
