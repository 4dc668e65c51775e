"""Redirect mode for real: namespaces, a macvlan, iptables and packets through them."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.lab import (
    CLIENT_IP,
    DEMO_TRAFFIC,
    GATEWAY_LAN_IP,
    ROUTER_POD_IP,
    SOURCE_IP,
    Lab,
    router_command,
)
from tests.demo_rules import demo_dnat_rules, demo_snat_rules
from tests.lab.inprocess import failed_apply, without_qdisc

EXPECTED_LANDING = {
    ("tcp", 80): "203.0.113.10:80",
    ("tcp", 8080): "203.0.113.11:80",
    ("udp", 53): "203.0.113.10:5353",
    ("tcp", 7000): "203.0.113.12:7000",
    ("udp", 7001): "203.0.113.12:7001",
}


def run_ok(lab: Lab, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = lab.run_router(env)
    assert result.returncode == 0, result.stderr
    return result


def nat_rules(lab: Lab, chain: str) -> list[str]:
    out = lab.exec("router", ["iptables", "-t", "nat", "-S", chain], check=True).stdout
    return [line for line in out.splitlines() if line.startswith("-A ")]


def test_tcp_udp_and_fallback_land_on_the_right_port_from_the_reserved_ip(served: Lab) -> None:
    run_ok(served, served.router_env())
    for proto, port in DEMO_TRAFFIC:
        reply = served.request(proto, ROUTER_POD_IP, port)
        assert reply.landed == EXPECTED_LANDING[(proto, port)], (proto, port)
        assert reply.peer_ip == SOURCE_IP, (proto, port)


def test_ports_without_a_rule_are_not_redirected_when_there_is_no_fallback(served: Lab) -> None:
    run_ok(served, served.router_env("80 tcp 203.0.113.10\n"))
    assert served.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP
    with pytest.raises(ConnectionRefusedError):  # 7000 reaches the router pod itself, where nothing listens
        served.request("tcp", ROUTER_POD_IP, 7000)


def test_source_without_prefix_is_a_host_address_and_still_routes(served: Lab) -> None:
    run_ok(served, served.router_env(source=SOURCE_IP))
    with served.iproute("router") as ipr:
        index = ipr.link_lookup(ifname="macvlan0")[0]
        addrs = [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    assert addrs == [(SOURCE_IP, 32)]
    routes = served.exec("router", ["ip", "route", "show"], check=True).stdout.splitlines()
    host_route = [r for r in routes if r.startswith(f"{GATEWAY_LAN_IP} ")]
    assert len(host_route) == 1 and "dev macvlan0" in host_route[0] and "scope link" in host_route[0]
    assert not [r for r in routes if r.startswith("192.0.2.0/24")]  # only the gateway is on-link
    assert served.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP


def test_default_route_is_replaced_and_other_defaults_removed(lab: Lab) -> None:
    lab.exec("router", ["ip", "route", "add", "default", "via", CLIENT_IP, "metric", "100"], check=True)
    run_ok(lab, lab.router_env())
    defaults = lab.exec("router", ["ip", "route", "show", "default"], check=True).stdout.strip().splitlines()
    assert len(defaults) == 1 and defaults[0].startswith(f"default via {GATEWAY_LAN_IP} dev macvlan0"), defaults


def test_forwarding_was_off_and_is_turned_on(lab: Lab) -> None:
    assert lab.read_sysctl("router", "net.ipv4.ip_forward") == "0"
    result = run_ok(lab, lab.router_env())
    assert lab.read_sysctl("router", "net.ipv4.ip_forward") == "1"
    assert "Enabled IPv4 forwarding" in result.stderr


def arp_capture(lab: Lab) -> socket.socket:
    with lab.entered("gateway"):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind(("lan0", 0x0806))
    return sock


def read_frames(sock: socket.socket, wait: float = 0.5) -> list[bytes]:
    frames = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        frames.append(sock.recv(2048))
    return frames


def test_gateway_learns_the_new_mac_from_the_announcement_before_any_traffic(lab: Lab) -> None:
    # Failover: the gateway still has the reserved IP at the MAC of the node that held it before.
    old_mac = "02:00:5e:00:53:01"
    lab.exec("gateway", ["ip", "neigh", "replace", SOURCE_IP, "lladdr", old_mac, "dev", "lan0", "nud", "stale"],
             check=True)
    capture = arp_capture(lab)
    with capture:
        run_ok(lab, lab.router_env())
        frames = read_frames(capture)
    with lab.iproute("router") as ipr:
        new_mac = ipr.get_links(ipr.link_lookup(ifname="macvlan0")[0])[0].get("IFLA_ADDRESS")
    neigh = lab.exec("gateway", ["ip", "neigh", "show", SOURCE_IP, "dev", "lan0"], check=True).stdout
    assert f"lladdr {new_mac}" in neigh
    # Both announcement forms went out: reply form (target MAC = own) and request form (target MAC zero).
    own, ip = bytes.fromhex(new_mac.replace(":", "")), socket.inet_aton(SOURCE_IP)
    seen = set()
    for frame in frames:
        op, sha, spa, tha, tpa = struct.unpack("!6xH6s4s6s4s", frame[14:42])
        if sha == own and spa == ip == tpa:
            seen.add((op, tha == own, tha == bytes(6)))
    assert (2, True, False) in seen
    assert (1, False, True) in seen


def test_second_run_changes_nothing(lab: Lab) -> None:
    run_ok(lab, lab.router_env())
    lab.settle()  # macvlan0's operational state follows its set-up asynchronously (kernel linkwatch)
    before = lab.snapshot("router")
    again = run_ok(lab, lab.router_env())
    lab.settle()
    assert lab.snapshot("router") == before
    assert "NAT rules already in place" in again.stderr
    assert "network already configured" in again.stderr


def test_rerun_with_a_changed_configuration_converges(served: Lab) -> None:
    run_ok(served, served.router_env())
    changed = "8080 tcp 203.0.113.12 7000\n"
    run_ok(served, served.router_env(changed, source=f"{SOURCE_IP}/25"))
    assert nat_rules(served, DNAT_CHAIN) == [
        f"-A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 203.0.113.12:7000"]
    addrs = served.exec("router", ["ip", "-4", "-o", "addr", "show", "macvlan0"], check=True).stdout
    assert f"{SOURCE_IP}/25" in addrs and f"{SOURCE_IP}/24" not in addrs
    assert served.request("tcp", ROUTER_POD_IP, 8080).landed == "203.0.113.12:7000"


MESH = [
    "*nat",
    ":MESH-INBOUND - [0:0]",
    "-A MESH-INBOUND -p tcp -m tcp --dport 15000 -j REDIRECT --to-ports 15006",
    "-A PREROUTING -p tcp -j MESH-INBOUND",
    "-A OUTPUT -p tcp -m tcp --dport 15001 -j RETURN",
    "COMMIT",
    "*filter",
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    "COMMIT",
]


def test_another_owners_nat_rules_survive(served: Lab) -> None:
    served.exec("router", ["iptables-restore", "--noflush"], stdin="\n".join(MESH) + "\n", check=True)
    run_ok(served, served.router_env())
    run_ok(served, served.router_env("80 tcp 203.0.113.10\n"))
    save = served.exec("router", ["iptables-save"], check=True).stdout
    for line in MESH:
        if line.startswith("-A"):
            assert line in save.splitlines(), line
    assert served.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP


def test_legacy_mode_stays_up_then_exits_promptly_on_sigterm(lab: Lab) -> None:
    process = lab.spawn("router", router_command(), env=lab.router_env(mode="legacy"))
    assert process.stderr is not None
    deadline = time.monotonic() + 20
    log = ""
    while "Ready:" not in log and time.monotonic() < deadline:
        log += process.stderr.readline()
    assert "Ready:" in log
    time.sleep(0.3)
    assert process.poll() is None  # stays up
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=5) == 0
    assert time.monotonic() - sent < 1.0
    assert "Received SIGTERM" in process.stderr.read()


def test_multus_style_interface_is_found_when_macvlan0_is_absent(served: Lab) -> None:
    served.exec("router", ["ip", "link", "set", "macvlan0", "name", "net1"], check=True)
    result = run_ok(served, served.router_env())
    assert "using net1, the only macvlan interface" in result.stderr
    assert served.request("udp", ROUTER_POD_IP, 53).peer_ip == SOURCE_IP


def test_proxy_modes_configure_the_network_only(lab: Lab) -> None:
    env = lab.router_env(mode="http-proxy")
    del env["EGRESS_DESTINATION"]
    result = run_ok(lab, env)
    assert "no NAT" in result.stderr
    save = lab.exec("router", ["iptables-save", "-t", "nat"], check=True).stdout
    assert DNAT_CHAIN not in save
    assert f"default via {GATEWAY_LAN_IP} dev macvlan0" in lab.exec("router", ["ip", "route"], check=True).stdout


def test_rules_addresses_and_routes_through_testinfra(lab: Lab) -> None:
    import testinfra
    from pyroute2 import netns

    run_ok(lab, lab.router_env())
    host = testinfra.get_host("local://")
    netns.pushns(lab.ns["router"])
    try:
        assert host.iptables.rules("nat", DNAT_CHAIN) == demo_dnat_rules()
        assert host.iptables.rules("nat", SNAT_CHAIN) == demo_snat_rules("macvlan0", SOURCE_IP)
        assert f"-A PREROUTING -j {DNAT_CHAIN}" in host.iptables.rules("nat", "PREROUTING")
        assert f"-A POSTROUTING -j {SNAT_CHAIN}" in host.iptables.rules("nat", "POSTROUTING")
        macvlan = host.interface("macvlan0")
        assert macvlan.exists
        assert SOURCE_IP in macvlan.addresses
        assert "UP" in macvlan.link[0]["flags"]
        routes = {(r["dst"], r.get("gateway")) for r in macvlan.routes()}
        assert ("default", GATEWAY_LAN_IP) in routes
        assert (GATEWAY_LAN_IP, None) in routes
        assert host.run("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    finally:
        netns.popns()


# ------------------------------------------------------------------ bad input changes nothing

def fake_failing_restore(tmp_path: Path) -> str:
    """A PATH whose iptables-nft-restore fails as a kernel without a needed module would."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "iptables-nft-restore"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'iptables-restore: line 4 failed' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}:{os.environ.get('PATH', '')}"


INVALID = {
    "bad source": ({"EGRESS_SOURCE": "192.0.2.300"}, "EGRESS_SOURCE"),
    "source prefix": ({"EGRESS_SOURCE": "192.0.2.99/33"}, "EGRESS_SOURCE"),
    "missing gateway": ({"EGRESS_GATEWAY": ""}, "EGRESS_GATEWAY"),
    "bad rule line": ({"EGRESS_DESTINATION": "80 tcp 203.0.113.10\n8080 tcp 10.0.0\n"},
                      "EGRESS_DESTINATION line 2: '8080 tcp 10.0.0'"),
    "rule after fallback": ({"EGRESS_DESTINATION": "203.0.113.12\n80 tcp 203.0.113.10"}, "EGRESS_DESTINATION line 2"),
    "duplicate port": ({"EGRESS_DESTINATION": "80 tcp 203.0.113.10\n80 TCP 203.0.113.11"},
                       "EGRESS_DESTINATION line 2"),
    "mode typo": ({"EGRESS_ROUTER_MODE": "int"}, "EGRESS_ROUTER_MODE"),
    "missing egress interface": ({"EGRESS_INTERFACE": "macvlan9"}, "EGRESS_INTERFACE"),
    "missing pod interface": ({"EGRESS_POD_INTERFACE": "eth9"}, "EGRESS_POD_INTERFACE"),
    "no iptables": ({"PATH": "/usr/bin:/bin"}, "iptables-nft-save and iptables-nft-restore not found on PATH"),
    "iptables choice": ({"EGRESS_IPTABLES": "nftables"}, "EGRESS_IPTABLES: 'nftables' is not one of"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_configuration_leaves_the_namespace_exactly_as_it_was(lab: Lab, case: str) -> None:
    changes, expected = INVALID[case]
    env = lab.router_env()
    env.update(changes)
    before = lab.snapshot("router")
    result = lab.run_router(env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert lab.snapshot("router") == before


def test_missing_macvlan_says_how_to_get_one_and_changes_nothing(lab: Lab) -> None:
    lab.exec("router", ["ip", "link", "del", "macvlan0"], check=True)
    before = lab.snapshot("router")
    result = lab.run_router(lab.router_env())
    assert result.returncode == 1
    assert "assign-macvlan" in result.stderr and "Multus" in result.stderr
    assert lab.snapshot("router") == before


def test_missing_net_admin_capability_changes_nothing(lab: Lab) -> None:
    before = lab.snapshot("router")
    argv = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--", *router_command()]
    result = lab.exec("router", argv, env=lab.router_env())
    assert result.returncode == 1
    assert result.stderr.startswith("error: missing the NET_ADMIN capability")
    assert lab.snapshot("router") == before


def test_a_failed_nat_transaction_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    lab.exec("router", ["ip", "route", "add", "default", "via", CLIENT_IP, "metric", "100"], check=True)
    before = lab.snapshot("router")
    env = lab.router_env(PATH=fake_failing_restore(tmp_path))
    result = lab.run_router(env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: iptables-nft-restore failed: iptables-restore: line 4 failed")
    assert "(the rule was '-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 80 -j DNAT" in lines[0]
    assert lines[0].endswith("; nothing was changed")
    assert lab.snapshot("router") == before


def test_nat_rollback_restores_the_previous_rules_for_real(lab: Lab) -> None:
    """The undo used when a network step fails after the NAT transaction, run through iptables."""
    from egress_router.core.config import load
    from egress_router.core.plan import build_plan
    from egress_router.net import iptables as nat

    lab.exec("router", ["iptables-restore", "--noflush"], stdin="\n".join(MESH) + "\n", check=True)
    run_ok(lab, lab.router_env("80 tcp 203.0.113.10"))  # a previous configuration is in place
    save, restore_tool = nat.find_tools()
    for_real = lab.exec("router", [save], check=True).stdout
    before = nat.parse_save(for_real)
    plan = build_plan(load(lab.router_env()), "macvlan0").nat
    assert plan is not None
    with lab.entered("router"):
        nat.apply(plan, restore_tool, before)
        assert nat.read_state(save).chains[DNAT_CHAIN] != before.chains[DNAT_CHAIN]
        nat.roll_back(restore_tool, before)
        assert nat.read_state(save) == before
    fresh = Lab()
    with fresh:
        empty = nat.parse_save(fresh.exec("router", [save, "-t", "nat"], check=True).stdout)
        fresh_plan = build_plan(load(fresh.router_env()), "macvlan0").nat
        assert fresh_plan is not None
        with fresh.entered("router"):
            nat.apply(fresh_plan, restore_tool, empty)
            nat.roll_back(restore_tool, empty)
            assert nat.read_state(save) == empty


def test_read_only_proc_sys_is_reported_before_anything_changes(lab: Lab) -> None:
    """As in a container with NET_ADMIN but not privileged: /proc/sys is mounted read-only."""
    before = lab.snapshot("router")
    script = "mount --bind /proc/sys /proc/sys && mount -o remount,ro,bind /proc/sys && exec \"$@\""
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *router_command()]
    result = lab.exec("router", argv, env=lab.router_env())
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: IPv4 forwarding is off and /proc/sys is read-only")
    assert "net.ipv4.ip_forward=1" in result.stderr
    assert lab.snapshot("router") == before


@pytest.mark.parametrize(("choice", "existing", "backend"), [
    ("nft", None, "nft"),
    ("legacy", None, "legacy"),
    ("auto", "legacy", "legacy"),  # a mesh init container wrote its rules with iptables-legacy: follow it
    ("auto", None, "nft"),
])
def test_iptables_backend_choice_writes_to_that_backend_only(served: Lab, choice: str, existing: str | None,
                                                             backend: str) -> None:
    if existing:
        served.exec("router", [f"iptables-{existing}-restore", "--noflush"], stdin="\n".join(MESH) + "\n", check=True)
    env = served.router_env(EGRESS_IPTABLES=choice)
    run_ok(served, env)
    assert served.request("tcp", ROUTER_POD_IP, 8080).landed == "203.0.113.11:80"
    assert served.request("udp", ROUTER_POD_IP, 7001).peer_ip == SOURCE_IP
    save = served.exec("router", [f"iptables-{backend}-save", "-t", "nat"], check=True).stdout
    assert save.count(f"-A PREROUTING -j {DNAT_CHAIN}") == 1
    assert f"-A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source {SOURCE_IP}" in save
    other = "legacy" if backend == "nft" else "nft"
    assert DNAT_CHAIN not in served.exec("router", [f"iptables-{other}-save"], check=True).stdout
    again = run_ok(served, env)
    assert "NAT rules already in place" in again.stderr


@pytest.mark.parametrize("failing", ["default route", "forwarding"])
def test_a_network_step_failing_after_nat_puts_everything_back(lab: Lab, failing: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The undo path, in-process in the router namespace, with one real step made to fail (the main table's
    default route comes after the return path's steps: they are undone too)."""
    from egress_router.net import apply as net_apply
    from egress_router.net.rtnl import NetlinkError, Route, Rtnl

    lab.exec("router", ["ip", "route", "add", "default", "via", CLIENT_IP, "metric", "100"], check=True)
    lab.exec("router", ["iptables-restore", "--noflush"], stdin="\n".join(MESH) + "\n", check=True)
    before = lab.snapshot("router")
    if failing == "default route":
        real_route = Rtnl.route

        def route(self: Rtnl, command: str, wanted: Route) -> None:
            if command == "replace" and wanted.dst_len == 0 and wanted.table == 254:
                raise NetlinkError(101, "Network is unreachable")
            real_route(self, command, wanted)

        monkeypatch.setattr(Rtnl, "route", route)
    else:
        def write(path: str, value: str) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(net_apply, "write_sysctl", write)
    assert failed_apply(lab).endswith("; the changes made before it were undone")
    assert without_qdisc(lab.snapshot("router")) == without_qdisc(before)
    assert "qdisc noop" in before


def test_every_step_holds_after_a_run_and_drift_names_what_was_undone(served: Lab) -> None:
    """Each step reads whether it is in place (net.apply's `holds`): none drifts after a run; remove the
    address, the default route, forwarding and our NAT chains by hand and exactly those steps drift; applying
    the same plan again converges (and the traffic lands again)."""
    from egress_router import router
    from egress_router.core.config import load
    from egress_router.core.nat import NatRules
    from egress_router.core.steps import Address, Announce, LinkUp, PolicyRule, Route, Sysctl
    from egress_router.net import apply as net_apply

    env = served.router_env()
    run_ok(served, env)
    with served.entered("router"):
        prepared = router.prepare(load(env))
        try:
            assert net_apply.drift(prepared.plan, prepared.context) == []
            served.exec("router", ["ip", "address", "flush", "dev", "macvlan0"], check=True)
            served.exec("router", ["iptables", "-t", "nat", "-F", DNAT_CHAIN], check=True)
            served.sysctl("router", "net.ipv4.ip_forward", "0")
            drifted = net_apply.drift(prepared.plan, prepared.context)
            # both routes too: the kernel drops a device's routes together with its last IPv4 address
            assert [type(step) for step in drifted] == [NatRules, Address, Route, Route, Sysctl], drifted
            # what goes through the pod interface (the return path) is untouched and still holds
            untouched = (LinkUp, Announce, PolicyRule)
            assert drifted == [step for step in prepared.plan.steps if not isinstance(step, untouched)
                               and getattr(step, "interface", "macvlan0") == "macvlan0"
                               and getattr(step, "key", "net.ipv4.ip_forward") == "net.ipv4.ip_forward"]
        finally:
            prepared.rtnl.close()
    again = run_ok(served, env)
    assert "Added address 192.0.2.99/24 to macvlan0" in again.stderr
    with served.entered("router"):
        prepared = router.prepare(load(env))
        try:
            assert net_apply.drift(prepared.plan, prepared.context) == []
        finally:
            prepared.rtnl.close()
    assert served.request("tcp", ROUTER_POD_IP, 80).landed == "203.0.113.10:80"
