"""The pytest plugin against a lab namespace: through testinfra's local backend, and as an ops team runs it (pytest in
a subprocess with a generated test file), passing and failing readably."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.lab import GATEWAY_LAN_IP, SOURCE_IP, Lab, router_command
from egress_router.testinfra_plugin import EgressRouter, assert_converged, nat_rules, router_state

DEFAULT_ROUTE = f"ip route replace default via {GATEWAY_LAN_IP} dev macvlan0"
# a rule list whose comments a shell would expand or cut if it were not quoted
AWKWARD = "# partner's \"API\" $HOME `id` \\ ; & |\n80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n203.0.113.12\n"


def egress_env(lab: Lab, **changes: str) -> dict[str, str]:
    return {name: value for name, value in lab.router_env(**changes).items() if name.startswith("EGRESS_")}


def configure(lab: Lab, env: dict[str, str]) -> None:
    result = lab.run_router({**os.environ, **env})
    assert result.returncode == 0, result.stderr


def local_host():  # type: ignore[no-untyped-def]
    import testinfra

    return testinfra.get_host("local://")


@contextmanager
def inside(lab: Lab) -> Iterator[None]:
    """testinfra's local backend runs commands as child processes: they start in this thread's namespace."""
    from pyroute2 import netns

    netns.pushns(lab.ns["router"])
    try:
        yield
    finally:
        netns.popns()


# ---------------------------------------------------------------- the helpers, in this process

def test_a_converged_router_passes_and_a_drifted_one_fails_listing_each_difference(lab: Lab) -> None:
    env = egress_env(lab, destination=AWKWARD)
    configure(lab, env)
    host = local_host()
    state = assert_converged(host, env, command=router_command()[0], netns=lab.ns["router"])
    assert (state.converged, state.exit_status, state.differences) == (True, 0, ())
    assert state.summary.startswith("converged: all 11 steps hold")
    lab.exec("router", ["ip", "route", "del", "default"], check=True)
    lab.sysctl("router", "net.ipv4.ip_forward", "0")
    with pytest.raises(AssertionError) as failed:
        assert_converged(host, env, command=router_command()[0], netns=lab.ns["router"])
    assert str(failed.value).splitlines() == [
        f"egress router on local (network namespace {lab.ns['router']}) is not as configured: not converged: 2 of "
        f"11 steps do not hold (init mode: {SOURCE_IP}/24 on macvlan0 via {GATEWAY_LAN_IP}, 4 NAT rules)",
        f"  missing: {DEFAULT_ROUTE}",
        "  differs: sysctl -w net.ipv4.ip_forward=1 (found 0)",
    ]


def test_the_given_configuration_replaces_the_hosts_own_environment(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    env = egress_env(lab)
    configure(lab, env)
    # the environment where the command runs: another rule list, which must not change what is asserted
    for name, value in {**env, "EGRESS_DESTINATION": "203.0.113.99"}.items():
        monkeypatch.setenv(name, value)
    assert router_state(local_host(), env, command=router_command()[0], netns=lab.ns["router"]).converged
    state = router_state(local_host(), None, command=router_command()[0], netns=lab.ns["router"])
    assert not state.converged  # None: the environment it runs with, here the other rule list
    assert f"missing: iptables -t nat -A {DNAT_CHAIN} -i eth0 -j DNAT --to-destination 203.0.113.99" in state.lines()
    assert f"extra: iptables -t nat -D {DNAT_CHAIN} -i eth0 -j DNAT --to-destination 203.0.113.12" in state.lines()


def test_cannot_tell_and_no_answer_are_failures_that_say_so(lab: Lab) -> None:
    host = local_host()
    bad = egress_env(lab, source="192.0.2.300/24")
    with pytest.raises(AssertionError) as failed:
        assert_converged(host, bad, command=router_command()[0], netns=lab.ns["router"])
    assert str(failed.value) == (f"egress-router verify on local (network namespace {lab.ns['router']}) cannot tell: "
                                 "EGRESS_SOURCE: '192.0.2.300' is not an IPv4 address")
    with pytest.raises(AssertionError) as missing:
        router_state(host, egress_env(lab), command="/nonexistent/egress-router", netns=lab.ns["router"])
    assert "gave no answer (exit status 127)" in str(missing.value)
    assert "/nonexistent/egress-router" in str(missing.value)


def test_expected_nat_rules_through_host_iptables(lab: Lab) -> None:
    env = egress_env(lab)
    configure(lab, env)
    helper = EgressRouter(local_host())
    with inside(lab):
        helper.assert_nat_rules(env)
        assert local_host().iptables.rules("nat", SNAT_CHAIN) == nat_rules(env)[SNAT_CHAIN]
        lab.exec("router", ["iptables", "-t", "nat", "-D", DNAT_CHAIN, "2"], check=True)
        with pytest.raises(AssertionError) as failed:
            helper.assert_nat_rules(env)
    assert str(failed.value).splitlines() == [
        f"nat chain {DNAT_CHAIN} on local differs:",
        f"  missing: -A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.11:80"]


# ---------------------------------------------------------------- as an ops team runs it

OPS_TEST = '''
ENV = {env!r}


def test_router(host, egress_router):
    egress_router.command = {command!r}
    state = egress_router.assert_converged(ENV, netns={netns!r})
    assert state.summary.startswith("converged: ")


def test_router_own_environment(host):
    from egress_router.testinfra_plugin import assert_converged

    assert_converged(host, command={command!r}, netns={netns!r})
'''


def run_pytest(tmp_path: Path, lab: Lab, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_ops_router.py"
    test_file.write_text(OPS_TEST.format(env=env, command=router_command()[0], netns=lab.ns["router"]))
    own = {name: value for name, value in os.environ.items() if not name.startswith(("EGRESS_", "PYTEST_"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "egress_router.testinfra_plugin", "--hosts=local://",
                           "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(test_file)],
                          cwd=tmp_path, env={**own, **env}, capture_output=True, text=True, timeout=120)


def test_an_ops_test_file_passes_then_fails_readably(lab: Lab, tmp_path: Path) -> None:
    env = egress_env(lab)
    configure(lab, env)
    passed = run_pytest(tmp_path, lab, env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "2 passed" in passed.stdout
    lab.exec("router", ["iptables", "-t", "nat", "-D", "PREROUTING", "-j", DNAT_CHAIN], check=True)
    failed = run_pytest(tmp_path, lab, env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "2 failed" in failed.stdout
    lines = failed.stdout.splitlines()
    heading = (f"AssertionError: egress router on local (network namespace {lab.ns['router']}) is not as "
               "configured: not converged: 1 of 11 steps do not hold")
    explained = [line.removeprefix("E").strip() for line in lines if line.startswith("E ")]
    assert sum(line.startswith(heading) for line in explained) == 2, failed.stdout
    # each difference on a line of its own, right after the heading
    assert [explained[explained.index(line) + 1] for line in explained if line.startswith(heading)] == [
        f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}"] * 2, failed.stdout
    assert "Traceback" not in failed.stdout


# ---------------------------------------------------------------- examples/test_router.py, as its docstring runs it

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_router.py"


def run_example(lab: Lab, tmp_path: Path, router: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`ip netns exec ROUTER-NAMESPACE pytest examples/test_router.py --hosts=local://`, with the router's own
    environment set (what test_router_own_environment reads) and the console script on PATH."""
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\n")
    own = {name: value for name, value in os.environ.items() if not name.startswith(("EGRESS_", "PYTEST_"))}
    own["PATH"] = f"{os.path.dirname(router_command()[0])}:{own.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return lab.exec("router", [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp_path),
                               "-p", "no:cacheprovider", "-q", "--hosts=local://", str(EXAMPLE)],
                    env={**own, **router}, etc=True, timeout=120)


def test_the_example_passes_on_the_router_it_describes_and_fails_readably_once_it_drifts(lab: Lab,
                                                                                          tmp_path: Path) -> None:
    import runpy

    router: dict[str, str] = runpy.run_path(str(EXAMPLE))["ROUTER"]
    configure(lab, {**router, "EGRESS_ROUTER_MODE": "init"})  # init or legacy: the same plan
    passed = run_example(lab, tmp_path, router)
    assert passed.returncode == 0 and "3 passed" in passed.stdout, passed.stdout + passed.stderr
    lab.exec("router", ["iptables", "-t", "nat", "-F", SNAT_CHAIN], check=True)
    failed = run_example(lab, tmp_path, router)
    assert failed.returncode == 1 and "3 failed" in failed.stdout, failed.stdout + failed.stderr
    explained = [line.removeprefix("E").strip() for line in failed.stdout.splitlines() if line.startswith("E ")]
    missing = f"missing: iptables -t nat -A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source 192.0.2.92"
    assert explained.count(missing) == 2, failed.stdout  # test_router and test_router_own_environment
    assert f"missing: -A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source 192.0.2.92" in explained  # test_nat_rules
