"""`egress-router verify` for real: never-configured, converged and drifted namespaces, text and JSON, exit 0/1/2."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from egress_router.core.nat import DNAT_CHAIN, MARK_CHAIN, SNAT_CHAIN
from egress_router.lab import CLIENT_IP, GATEWAY_LAN_IP, SOURCE_IP, Lab, router_command
from egress_router.podlab import LAYOUTS, PodLab

VERIFY = [*router_command(), "verify"]
DEFAULT_ROUTE = f"ip route replace default via {GATEWAY_LAN_IP} dev macvlan0"
DEMO_DNAT = (
    "-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 203.0.113.10",
    "-i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.11:80",
    "-i eth0 -p udp -m udp --dport 53 -j DNAT --to-destination 203.0.113.10:5353",
    "-i eth0 -j DNAT --to-destination 203.0.113.12",
)


def verify(lab: Lab, env: dict[str, str], *args: str, argv: list[str] | None = None,
           etc: bool = False) -> subprocess.CompletedProcess[str]:
    return lab.exec("router", [*(argv or []), *VERIFY, *args], env=env, etc=etc)


def verify_json(lab: Lab, env: dict[str, str], expected_status: int, **kwargs: Any) -> dict[str, Any]:
    result = verify(lab, env, "--output", "json", **kwargs)
    assert result.returncode == expected_status, (result.stdout, result.stderr)
    assert result.stderr == ""
    document: dict[str, Any] = json.loads(result.stdout)
    assert set(document) == {"converged", "differences", "error", "summary"}
    assert document["converged"] is (expected_status == 0)
    return document


def difference_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines before the summary, which is always the last."""
    lines = result.stdout.splitlines()
    assert lines and lines[-1].startswith("not converged: "), result.stdout
    return lines[:-1]


def configure(lab: Lab, env: dict[str, str]) -> None:
    result = lab.run_router(env)
    assert result.returncode == 0, result.stderr


def assert_converged(lab: Lab, env: dict[str, str], etc: bool = False) -> str:
    result = verify(lab, env, etc=etc)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("converged: all "), result.stdout
    return lines[0]


# ---------------------------------------------------------------- never configured, converged

def test_a_never_configured_namespace_lists_every_step_and_is_left_as_it_was(lab: Lab) -> None:
    env = lab.router_env()
    before = lab.snapshot("router")
    result = verify(lab, env)
    assert result.returncode == 1 and result.stderr == "", result
    lines = difference_lines(result)
    assert f"missing: iptables -t nat -N {DNAT_CHAIN} (the chain and its 4 rule(s))" in lines
    assert f"missing: iptables -t nat -N {SNAT_CHAIN} (the chain and its 1 rule(s))" in lines
    assert f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}" in lines
    assert f"missing: iptables -t mangle -A OUTPUT -j {MARK_CHAIN}" in lines
    assert f"missing: ip address add {SOURCE_IP}/24 dev macvlan0" in lines
    assert "differs: ip link set macvlan0 up (macvlan0 is down)" in lines
    assert f"differs: {DEFAULT_ROUTE} (found default via {CLIENT_IP} dev eth0)" in lines
    assert "differs: sysctl -w net.ipv4.ip_forward=1 (found 0)" in lines
    assert f"missing: ip route replace default via {CLIENT_IP} dev eth0 onlink table 7910 proto 245" in lines
    assert result.stdout.splitlines()[-1].startswith("not converged: 9 of ")
    assert lab.snapshot("router") == before
    document = verify_json(lab, env, 1)
    assert [d["kind"] + ": " + d["step"] + (f" ({d['detail']})" if d["detail"] else "")
            for d in document["differences"]] == lines
    assert document["error"] is None
    assert lab.snapshot("router") == before


def test_a_converged_namespace_is_one_summary_line_and_exit_0(lab: Lab) -> None:
    env = lab.router_env()
    configure(lab, env)
    line = assert_converged(lab, env)
    assert line == (f"converged: all 11 steps hold (init mode: {SOURCE_IP}/24 on macvlan0 via {GATEWAY_LAN_IP}, "
                    "5 NAT rules)")
    document = verify_json(lab, env, 0)
    assert document == {"converged": True, "differences": [], "error": None, "summary": line}


def test_the_configuration_comes_from_the_rule_file_as_the_container_reads_it(lab: Lab, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text("80 tcp 203.0.113.10\n")
    env = lab.router_env(EGRESS_DESTINATION_FILE=str(rules))
    del env["EGRESS_DESTINATION"]
    configure(lab, env)
    assert_converged(lab, env)
    rules.write_text("80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n")  # edited, not applied yet
    result = verify(lab, env)
    assert difference_lines(result) == [
        f"missing: iptables -t nat -A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 8080 -j DNAT "
        "--to-destination 203.0.113.11:80"]
    assert result.returncode == 1


def test_the_options_mirror_the_variables_and_win_over_them(lab: Lab) -> None:
    env = lab.router_env()
    configure(lab, env)
    result = verify(lab, env, "--destination", "80 tcp 203.0.113.10")
    assert result.returncode == 1
    assert [line for line in difference_lines(result) if line.startswith("extra: ")] == [
        f"extra: iptables -t nat -D {DNAT_CHAIN} {spec}" for spec in DEMO_DNAT[1:]]


# ---------------------------------------------------------------- drift

Drift = Callable[[Lab], None]


def run(*argv: str) -> Drift:
    def change(lab: Lab) -> None:
        lab.exec("router", list(argv), check=True)

    return change


def forwarding_off(lab: Lab) -> None:
    lab.sysctl("router", "net.ipv4.ip_forward", "0")


DRIFTS: dict[str, tuple[Drift, list[str]]] = {
    "default route deleted": (run("ip", "route", "del", "default"), [f"missing: {DEFAULT_ROUTE}"]),
    "default route changed": (run("ip", "route", "replace", "default", "via", CLIENT_IP, "dev", "eth0"),
                              [f"differs: {DEFAULT_ROUTE} (found default via {CLIENT_IP} dev eth0)"]),
    "another default route": (run("ip", "route", "add", "default", "via", CLIENT_IP, "metric", "50"),
                              [f"extra: ip route del default via {CLIENT_IP} dev eth0 metric 50 (besides "
                               f"{DEFAULT_ROUTE})"]),
    "nat chain flushed": (run("iptables", "-t", "nat", "-F", DNAT_CHAIN),
                          [f"missing: iptables -t nat -A {DNAT_CHAIN} {spec}" for spec in DEMO_DNAT]),
    "nat table flushed": (run("iptables", "-t", "nat", "-F"),
                          [f"missing: iptables -t nat -A {DNAT_CHAIN} {spec}" for spec in DEMO_DNAT]
                          + [f"missing: iptables -t nat -A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source {SOURCE_IP}",
                             f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}",
                             f"missing: iptables -t nat -A POSTROUTING -j {SNAT_CHAIN}"]),
    "rule changed": (run("iptables", "-t", "nat", "-R", DNAT_CHAIN, "1", "-i", "eth0", "-p", "tcp", "--dport", "80",
                         "-j", "DNAT", "--to-destination", "203.0.113.66"),
                     [f"missing: iptables -t nat -A {DNAT_CHAIN} {DEMO_DNAT[0]}",
                      f"extra: iptables -t nat -D {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 80 -j DNAT "
                      "--to-destination 203.0.113.66"]),
    "jump deleted": (run("iptables", "-t", "nat", "-D", "PREROUTING", "-j", DNAT_CHAIN),
                     [f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}"]),
    "jump doubled": (run("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", SNAT_CHAIN),
                     [f"extra: iptables -t nat -D POSTROUTING -j {SNAT_CHAIN} (2 copies of the jump)"]),
    "mangle jump deleted": (run("iptables", "-t", "mangle", "-D", "OUTPUT", "-j", MARK_CHAIN),
                            [f"missing: iptables -t mangle -A OUTPUT -j {MARK_CHAIN}"]),
    # the kernel removes a device's routes with its last IPv4 address
    "address removed": (run("ip", "address", "flush", "dev", "macvlan0"),
                        [f"missing: ip address add {SOURCE_IP}/24 dev macvlan0",
                         f"missing: ip route replace {GATEWAY_LAN_IP}/32 dev macvlan0 scope link",
                         f"missing: {DEFAULT_ROUTE}"]),
    "link down": (run("ip", "link", "set", "macvlan0", "down"),
                  ["differs: ip link set macvlan0 up (macvlan0 is down)",
                   f"missing: ip route replace {GATEWAY_LAN_IP}/32 dev macvlan0 scope link",
                   f"missing: {DEFAULT_ROUTE}"]),
    "policy rule deleted": (run("ip", "rule", "del", "priority", "7910"),
                            ["missing: ip rule add fwmark 0x2000000/0x2000000 lookup 7910 priority 7910"]),
    "stale route of ours": (run("ip", "route", "add", "192.0.2.128/25", "via", CLIENT_IP, "dev", "eth0",
                                "proto", "245"),
                            [f"extra: ip route del 192.0.2.128/25 via {CLIENT_IP} dev eth0 proto 245 (added by an "
                             "earlier configuration, no longer configured)"]),
    "forwarding off": (forwarding_off, ["differs: sysctl -w net.ipv4.ip_forward=1 (found 0)"]),
}


@pytest.mark.parametrize("case", list(DRIFTS))
def test_each_drift_is_one_line_per_difference_and_a_run_converges_it_again(lab: Lab, case: str) -> None:
    drift, expected = DRIFTS[case]
    env = lab.router_env()
    configure(lab, env)
    drift(lab)
    before = lab.snapshot("router")
    result = verify(lab, env)
    assert result.returncode == 1 and result.stderr == "", result
    assert difference_lines(result) == expected
    document = verify_json(lab, env, 1)
    assert [f"{d['kind']}: {d['step']}" for d in document["differences"]] == [line.split(" (")[0] for line in expected]
    assert lab.snapshot("router") == before  # verify changed nothing
    configure(lab, env)
    assert_converged(lab, env)


def test_a_flushed_chain_of_many_rules_is_summarized_after_ten_lines(lab: Lab) -> None:
    destination = "".join(f"{port} tcp 203.0.113.10\n" for port in range(1000, 1200))
    env = lab.router_env(destination)
    configure(lab, env)
    lab.exec("router", ["iptables", "-t", "nat", "-F", DNAT_CHAIN], check=True)
    lines = difference_lines(verify(lab, env))
    assert len(lines) == 11
    assert lines[0] == f"missing: iptables -t nat -A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 1000 -j DNAT " \
                       "--to-destination 203.0.113.10"
    assert lines[-1] == f"differs: iptables -t nat chain {DNAT_CHAIN} (190 more: 200 rule(s) missing, 0 not " \
                        "configured in all)"


# ---------------------------------------------------------------- cannot tell: exit 2

def test_without_net_admin_it_cannot_tell(lab: Lab) -> None:
    env = lab.router_env()
    configure(lab, env)
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
    result = verify(lab, env, argv=drop)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: cannot read the iptables rules without the NET_ADMIN capability (run verify with the router "
        "container's privileges: securityContext.capabilities.add NET_ADMIN, docker run --cap-add NET_ADMIN)"]
    document = verify_json(lab, env, 2, argv=drop)
    assert document["differences"] == [] and document["error"].startswith("cannot read the iptables rules")


CANNOT_TELL = {
    "bad rule line": ({"EGRESS_DESTINATION": "80 tcp 203.0.113.10\n8080 tcp 10.0.0\n"},
                      "error: EGRESS_DESTINATION line 2: '8080 tcp 10.0.0': '10.0.0' is not an IPv4 address"),
    "missing gateway": ({"EGRESS_GATEWAY": ""}, "error: EGRESS_GATEWAY"),
    "unreadable rule file": ({"EGRESS_DESTINATION": "", "EGRESS_DESTINATION_FILE": "/nonexistent/rules"},
                             "error: EGRESS_DESTINATION_FILE=/nonexistent/rules: cannot read it: No such file"),
    "missing egress interface": ({"EGRESS_INTERFACE": "macvlan9"}, "error: EGRESS_INTERFACE: interface 'macvlan9'"),
    "missing pod interface": ({"EGRESS_POD_INTERFACE": "eth9"}, "error: EGRESS_POD_INTERFACE: interface 'eth9'"),
    "no iptables": ({"PATH": "/usr/bin:/bin"}, "error: iptables-nft-save and iptables-nft-restore not found"),
}


@pytest.mark.parametrize("case", list(CANNOT_TELL))
def test_a_bad_configuration_or_a_missing_piece_is_one_error_line_and_exit_2(lab: Lab, case: str) -> None:
    changes, expected = CANNOT_TELL[case]
    env = lab.router_env()
    configure(lab, env)
    env.update(changes)
    if not env["EGRESS_DESTINATION"]:
        del env["EGRESS_DESTINATION"]
    if case == "no iptables":  # the console script itself is found by its absolute path
        assert VERIFY[0].startswith("/")
    result = verify(lab, env)
    assert result.returncode == 2 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    document = verify_json(lab, env, 2)
    assert document["error"] == lines[0].removeprefix("error: ")


def test_a_usage_error_is_exit_2_too(lab: Lab) -> None:
    result = verify(lab, lab.router_env(), "--output", "yaml")
    assert result.returncode == 2 and "Invalid value for '--output'" in result.stderr


# ---------------------------------------------------------------- other modes and pod networks

def test_a_proxy_mode_with_egress_source_verifies_its_network_and_without_it_there_is_nothing_to(lab: Lab) -> None:
    env = lab.router_env(mode="http-proxy")
    del env["EGRESS_DESTINATION"]
    configure(lab, env)
    line = assert_converged(lab, env)
    assert "(http-proxy mode: 192.0.2.99/24 on macvlan0 via 192.0.2.1)" in line
    proxy_only = {k: v for k, v in env.items() if not k.startswith("EGRESS_")}
    proxy_only["EGRESS_HTTP_PROXY_DESTINATION"] = "203.0.113.10\n"
    result = verify(lab, proxy_only)
    assert (result.returncode, result.stdout) == (0, "converged: nothing to verify (EGRESS_SOURCE is unset, the "
                                                     "network is not configured (proxy only))\n")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rp_filter", [0, 1])
def test_every_pod_network_layout_verifies_converged_after_a_run(make_podlab: Callable[..., PodLab], layout: str,
                                                                 rp_filter: int) -> None:
    """The return path is planned from the pod interface's next hop, which a run keeps in table 7910: verify
    reads it from there, so its plan after a run is the run's plan (rp_filter 1: the run loosens it to 2)."""
    lab = make_podlab(layout, rp_filter=rp_filter)
    env = lab.router_env()
    before = verify(lab, env, etc=True)
    assert before.returncode == 1
    if rp_filter:
        assert "differs: sysctl -w net.ipv4.conf.eth0.rp_filter=2 (found 1)" in before.stdout
    configure(lab, env)
    assert_converged(lab, env, etc=True)
    lab.set_rp_filter(1)
    if rp_filter:  # strict again: the plan loosens it again
        assert "differs: sysctl -w net.ipv4.conf.eth0.rp_filter=2 (found 1)" in verify(lab, env, etc=True).stdout


# ---------------------------------------------------------------- the lock, the run time

def test_a_run_holding_the_lock_is_waited_for_not_read_half_way(lab: Lab) -> None:
    from egress_router.net import lock

    env = lab.router_env()
    configure(lab, env)
    with lab.entered("router"):
        holder = lock.acquire(1.0)
    with holder:
        waiting = lab.spawn("router", [*VERIFY], env=env)
        holder.settimeout(20)
        asker, _ = holder.accept()  # verify found the lock taken and asked who holds it: it is waiting
        asker.close()
        assert waiting.poll() is None
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and out.startswith("converged: all "), (out, err)


def test_a_lock_never_released_is_exit_2_within_the_wait(lab: Lab) -> None:
    from egress_router.net import lock
    from egress_router.verify import LOCK_WAIT_SECONDS

    env = lab.router_env()
    with lab.entered("router"):
        holder = lock.acquire(1.0)
    with holder:
        started = time.monotonic()
        result = verify(lab, env)
        took = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.startswith("error: another egress-router run (pid ") and \
        f"still holds its lock after {LOCK_WAIT_SECONDS:g} s" in result.stderr
    assert LOCK_WAIT_SECONDS <= took < LOCK_WAIT_SECONDS + 10


def test_verify_is_fast_enough_for_a_probe(lab: Lab) -> None:
    """An exec probe's timeoutSeconds defaults to 1 s; the examples give 5. Median of 5 runs, converged."""
    env = lab.router_env()
    configure(lab, env)
    times = []
    for _ in range(5):
        started = time.monotonic()
        assert_converged(lab, env)
        times.append(time.monotonic() - started)
    assert statistics.median(times) < 1.0, times


# ---------------------------------------------------------------- the probe of a running legacy router

def test_as_the_probe_of_a_live_legacy_router_beside_its_reloads_and_repairs(served: Lab, tmp_path: Path) -> None:
    """Verify in the namespace of a legacy router that reloads its rule file and repairs drift: converged after
    start, converged again once the repair ran (both take the namespace lock), following a good edit once it
    is in force; a refused edit is exit 2 for verify while the old rules still carry traffic (the README's
    caveat for probes)."""
    from tests.lab.test_live_legacy import REPAIRED_WITHIN, Router, Volume, eventually

    volume = Volume(tmp_path, "80 tcp 203.0.113.10\n")
    env = served.router_env("", mode="legacy", EGRESS_DESTINATION_FILE=volume.path)
    del env["EGRESS_DESTINATION"]
    router = Router(served, served.spawn("router", router_command(), env=env), 3.0)
    try:
        router.wait_log("Ready:")
        assert_converged(served, env)

        def converged() -> bool:
            return verify(served, env).returncode == 0

        served.exec("router", ["ip", "route", "del", "default"], check=True)
        assert eventually(converged, REPAIRED_WITHIN) is not None, router.stderr
        router.wait_log("Repaired drift: 'ip route replace default via 192.0.2.1 dev macvlan0'")
        volume.update("80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n")
        assert eventually(converged, REPAIRED_WITHIN) is not None, router.stderr
        assert "3 NAT rules" in verify(served, env).stdout  # the two redirect rules and the SNAT rule
        volume.update("80 tcp 203.0.113.10\n8080 tcp 10.0.0\n")
        router.wait_log("Reload .* rejected, the rules in force stay")
        refused = verify(served, env)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"error: EGRESS_DESTINATION_FILE={volume.path} line 2: '8080 tcp 10.0.0'")
        assert served.request("tcp", "198.51.100.1", 8080).landed == "203.0.113.11:80"
    finally:
        problems = router.stop_and_check()
    assert not problems, problems
