"""Init mode with IPv6 for real, as a cluster admin would check it: dual-stack and IPv6-only routers in the lab."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.lab import (
    DEMO_DESTINATION6,
    DEMO_LANDING,
    DEMO_LANDING6,
    DEMO_TRAFFIC,
    DEMO_TRAFFIC6,
    GATEWAY_LAN_IP6,
    GATEWAY_LINK_LOCAL,
    LAN_PREFIX6,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    SOURCE_IP6,
    Lab,
)

MARK_CHAIN = "EGRESS-ROUTER-MARK"
OLD_MAC = "02:00:5e:00:53:01"
ETH_P_IPV6 = 0x86DD
NA_OVERRIDE = 0x20000000
NA_SOLICITED = 0x40000000
# the demo's IPv6 rules alone (an IPv6-only router): port rules, then the IPv6 fallback
DESTINATION6_ONLY = """\
80   tcp 2001:db8:203::10
8080 tcp 2001:db8:203::11 80
53   udp 2001:db8:203::10 5353
2001:db8:203::12
"""
# the dual-stack demo without its IPv6 fallback: only IPv4 has one
ONLY_IPV4_FALLBACK = "".join(line + "\n" for line in DEMO_DESTINATION6.splitlines()
                             if not line.startswith("2001:db8:203::12"))


def run_ok(lab: Lab, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = lab.run_router(env)
    assert result.returncode == 0, result.stderr
    return result


def ipv6_only_env(lab: Lab, destination: str = DESTINATION6_ONLY, **extra: str) -> dict[str, str]:
    return lab.router_env(destination, source=f"{SOURCE_IP6}/{LAN_PREFIX6}", EGRESS_GATEWAY=GATEWAY_LINK_LOCAL,
                          **extra)


def sh(lab: Lab, role: str, command: str) -> str:
    return lab.exec(role, command.split(), check=True).stdout


def macvlan_mac(lab: Lab) -> str:
    with lab.iproute("router") as ipr:
        mac: str = ipr.get_links(ipr.link_lookup(ifname="macvlan0")[0])[0].get("IFLA_ADDRESS")
    return mac


def global_ipv6(lab: Lab, role: str, interface: str) -> list[str]:
    out = sh(lab, role, f"ip -6 -o addr show dev {interface} scope global")
    return [line.split()[3] for line in out.splitlines()]


def eventually(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll an observable condition with a deadline (the kernel acts in its softirq, not before we look)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)


# ------------------------------------------------------------------ traffic of both families

def test_dual_stack_tcp_and_udp_of_both_families_land_from_the_reserved_sources(served6: Lab) -> None:
    run_ok(served6, served6.router_env6())
    for proto, port in DEMO_TRAFFIC:
        reply = served6.request(proto, ROUTER_POD_IP, port)
        assert (reply.landed, reply.peer_ip) == (DEMO_LANDING[(proto, port)], SOURCE_IP), (4, proto, port)
    for proto, port in DEMO_TRAFFIC6:
        reply = served6.request(proto, ROUTER_POD_IP6, port)
        assert (reply.landed, reply.peer_ip) == (DEMO_LANDING6[(proto, port)], SOURCE_IP6), (6, proto, port)


def test_ipv6_only_router_with_a_link_local_gateway_touches_no_ipv4(served6: Lab) -> None:
    ipv4_before = [sh(served6, "router", "iptables-save"), sh(served6, "router", "ip -4 -o addr show"),
                   sh(served6, "router", "ip -4 route show table all")]
    assert served6.read_sysctl("router", "net.ipv4.ip_forward") == "0"
    result = run_ok(served6, ipv6_only_env(served6))
    for proto, port in DEMO_TRAFFIC6:
        reply = served6.request(proto, ROUTER_POD_IP6, port)
        assert (reply.landed, reply.peer_ip) == (DEMO_LANDING6[(proto, port)], SOURCE_IP6), (proto, port)
    defaults = sh(served6, "router", "ip -6 -o route show default").splitlines()
    assert len(defaults) == 1 and defaults[0].startswith(f"default via {GATEWAY_LINK_LOCAL} dev macvlan0"), defaults
    assert DNAT_CHAIN in sh(served6, "router", "ip6tables-save")
    # no IPv4 NAT rule, no IPv4 address, no IPv4 route, IPv4 forwarding as it was
    assert [sh(served6, "router", "iptables-save"), sh(served6, "router", "ip -4 -o addr show"),
            sh(served6, "router", "ip -4 route show table all")] == ipv4_before
    assert "EGRESS-ROUTER" not in ipv4_before[0]
    assert "macvlan0" not in ipv4_before[1]
    assert served6.read_sysctl("router", "net.ipv4.ip_forward") == "0"
    assert "IPv4 forwarding" not in result.stderr and "Announced 192.0.2.99" not in result.stderr
    with pytest.raises(ConnectionRefusedError):  # IPv4 is not redirected: the router pod itself answers
        served6.request("tcp", ROUTER_POD_IP, 80)


# ------------------------------------------------------------------ fallback per family

def test_each_family_has_its_own_fallback(served6: Lab) -> None:
    run_ok(served6, served6.router_env6())
    for proto, port in (("tcp", 7000), ("udp", 7001)):
        assert served6.request(proto, ROUTER_POD_IP, port).landed == f"203.0.113.12:{port}"
        assert served6.request(proto, ROUTER_POD_IP6, port).landed == f"[2001:db8:203::12]:{port}"


def test_with_only_an_ipv4_fallback_an_unruled_ipv6_port_is_not_redirected(served6: Lab) -> None:
    run_ok(served6, served6.router_env6(ONLY_IPV4_FALLBACK))
    assert served6.request("tcp", ROUTER_POD_IP, 7000).landed == "203.0.113.12:7000"
    assert served6.request("tcp", ROUTER_POD_IP6, 80).landed == "[2001:db8:203::10]:80"  # ruled ports still are
    with pytest.raises(ConnectionRefusedError):  # 7000 reaches the router pod itself, where nothing listens
        served6.request("tcp", ROUTER_POD_IP6, 7000)
    dnat6 = sh(served6, "router", f"ip6tables -t nat -S {DNAT_CHAIN}")
    assert "2001:db8:203::12" not in dnat6


# ------------------------------------------------------------------ neighbour advertisement

def na_capture(lab: Lab) -> socket.socket:
    """A packet socket on the gateway's lan0 for IPv6 frames (opened before the run: nothing is missed)."""
    with lab.entered("gateway"):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
    sock.bind(("lan0", ETH_P_IPV6))
    return sock


def advertisements(sock: socket.socket, target: str, quiet: float = 0.3) -> list[int]:
    """The flags of the neighbour advertisements for `target` the gateway received: what is queued, then
    whatever else arrives until the line has been quiet for `quiet` seconds (a second one would be late)."""
    found: list[int] = []
    sock.settimeout(quiet)
    while True:
        try:
            frame, address = sock.recvfrom(2048)
        except TimeoutError:
            return found
        if address[2] == socket.PACKET_OUTGOING:
            continue
        # Ethernet (14) + IPv6 (40) without extension headers, then ICMPv6 type 136 and its target
        if len(frame) >= 78 and frame[20] == socket.IPPROTO_ICMPV6 and frame[54] == 136 \
                and IPv6Address(frame[62:78]) == IPv6Address(target):
            found.append(struct.unpack("!I", frame[58:62])[0])


def gateway_neighbour(lab: Lab) -> str:
    return sh(lab, "gateway", f"ip -6 neigh show {SOURCE_IP6} dev lan0").strip()


def check_one_unsolicited_override(flags: list[int]) -> None:
    assert len(flags) == 1, [hex(f) for f in flags]
    assert flags[0] & NA_OVERRIDE and not flags[0] & NA_SOLICITED, hex(flags[0])


def test_failover_the_gateways_stale_entry_gets_the_new_mac_before_any_traffic(lab6: Lab) -> None:
    sh(lab6, "gateway", f"ip -6 neigh replace {SOURCE_IP6} lladdr {OLD_MAC} dev lan0 nud stale")
    assert f"lladdr {OLD_MAC}" in gateway_neighbour(lab6)
    with na_capture(lab6) as capture:
        run_ok(lab6, lab6.router_env6())
        mac = macvlan_mac(lab6)
        eventually("the gateway's entry holds macvlan0's MAC", lambda: f"lladdr {mac}" in gateway_neighbour(lab6))
        flags = advertisements(capture, SOURCE_IP6)
    assert OLD_MAC not in gateway_neighbour(lab6)
    check_one_unsolicited_override(flags)


def test_without_an_entry_a_gateway_accepting_untracked_advertisements_creates_one(lab6: Lab) -> None:
    assert lab6.read_sysctl("gateway", "net.ipv6.conf.all.forwarding") == "1"  # the gateway is a router
    lab6.sysctl("gateway", "net.ipv6.conf.lan0.accept_untracked_na", "1")
    assert gateway_neighbour(lab6) == ""
    with na_capture(lab6) as capture:
        run_ok(lab6, lab6.router_env6())
        mac = macvlan_mac(lab6)
        eventually("the gateway made an entry at macvlan0's MAC", lambda: f"lladdr {mac}" in gateway_neighbour(lab6))
        flags = advertisements(capture, SOURCE_IP6)
    check_one_unsolicited_override(flags)


# ------------------------------------------------------------------ idempotence

def test_second_run_changes_nothing(lab6: Lab) -> None:
    run_ok(lab6, lab6.router_env6())
    lab6.settle()  # macvlan0's operational state follows its set-up asynchronously (kernel linkwatch)
    before = lab6.snapshot("router")
    again = run_ok(lab6, lab6.router_env6())
    lab6.settle()
    assert lab6.snapshot("router") == before
    assert "IPv6 NAT rules already in place" in again.stderr
    assert "network already configured" in again.stderr


def test_second_ipv6_only_run_changes_nothing(lab6: Lab) -> None:
    run_ok(lab6, ipv6_only_env(lab6))
    lab6.settle()
    before = lab6.snapshot("router")
    again = run_ok(lab6, ipv6_only_env(lab6))
    lab6.settle()
    assert lab6.snapshot("router") == before
    assert "IPv6 NAT rules already in place" in again.stderr


# ------------------------------------------------------------------ invalid mixes change nothing

V4, V6 = f"{SOURCE_IP}/24", f"{SOURCE_IP6}/{LAN_PREFIX6}"
INVALID: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "ipv6 rule without an ipv6 source": (
        {"EGRESS_SOURCE": V4, "EGRESS_GATEWAY": "192.0.2.1",
         "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n443 tcp 2001:db8:203::10\n"},
        ("EGRESS_DESTINATION line 2", "no IPv6 address")),
    "two ipv4 gateways": ({"EGRESS_GATEWAY": "192.0.2.1,192.0.2.2,2001:db8:2::1"}, ("EGRESS_GATEWAY", "two IPv4")),
    "two ipv6 gateways": ({"EGRESS_GATEWAY": f"192.0.2.1,2001:db8:2::1,{GATEWAY_LINK_LOCAL}"},
                          ("EGRESS_GATEWAY", "two IPv6")),
    "ipv4 gateway for an ipv6-only source": (
        {"EGRESS_SOURCE": V6, "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": DESTINATION6_ONLY},
        ("EGRESS_GATEWAY", "no IPv4 address")),
    "ipv6 gateway for an ipv4-only source": (
        {"EGRESS_SOURCE": V4, "EGRESS_GATEWAY": GATEWAY_LINK_LOCAL, "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n"},
        ("EGRESS_GATEWAY", "no IPv6 address")),
    "three sources": ({"EGRESS_SOURCE": f"{V4},{V6},2001:db8:2::98/64"}, ("EGRESS_SOURCE", "3 addresses")),
    "two ipv6 sources": ({"EGRESS_SOURCE": f"{V6} 2001:db8:2::98/64", "EGRESS_GATEWAY": GATEWAY_LAN_IP6,
                          "EGRESS_DESTINATION": DESTINATION6_ONLY}, ("EGRESS_SOURCE", "two IPv6")),
    "link-local source": ({"EGRESS_SOURCE": f"{V4},fe80::99/64"}, ("EGRESS_SOURCE", "link-local")),
    "second ipv6 fallback": ({"EGRESS_DESTINATION": DEMO_DESTINATION6 + "2001:db8:203::11\n"},
                             ("EGRESS_DESTINATION line 10", "second IPv6 fallback")),
    "port rule after an ipv6 fallback": (
        {"EGRESS_DESTINATION": "2001:db8:203::12\n80 tcp 2001:db8:203::10\n"},
        ("EGRESS_DESTINATION line 2", "port rules come first")),
    "same ipv6 port and protocol twice": (
        {"EGRESS_DESTINATION": "80 tcp 2001:db8:203::10\n80 tcp 2001:db8:203::11\n"},
        ("EGRESS_DESTINATION line 2", "tcp port 80")),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_mix_exits_with_one_line_and_changes_nothing(lab6: Lab, case: str) -> None:
    changes, expected = INVALID[case]
    env = lab6.router_env6()
    env.update(changes)
    before = lab6.snapshot("router")
    result = lab6.run_router(env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(part in lines[0] for part in expected), lines[0]
    assert "Traceback" not in result.stderr
    assert lab6.snapshot("router") == before


def test_the_same_port_in_each_family_is_not_a_duplicate(served6: Lab) -> None:
    """The counterpart of the duplicate case above: the uniqueness is per protocol and family."""
    run_ok(served6, served6.router_env6("80 tcp 203.0.113.10\n80 tcp 2001:db8:203::10\n"))
    assert served6.request("tcp", ROUTER_POD_IP, 80).landed == "203.0.113.10:80"
    assert served6.request("tcp", ROUTER_POD_IP6, 80).landed == "[2001:db8:203::10]:80"


# ------------------------------------------------------------------ both ip6tables backends

MESH6 = [
    "*nat",
    ":MESH-INBOUND - [0:0]",
    "-A MESH-INBOUND -p tcp -m tcp --dport 15000 -j REDIRECT --to-ports 15006",
    "-A PREROUTING -p tcp -j MESH-INBOUND",
    "COMMIT",
]


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_ipv6_nat_in_the_chosen_backend_only_and_another_owners_rules_survive(served6: Lab, backend: str) -> None:
    other = "legacy" if backend == "nft" else "nft"
    served6.exec("router", [f"ip6tables-{backend}-restore", "--noflush"], stdin="\n".join(MESH6) + "\n", check=True)
    env = served6.router_env6(EGRESS_IPTABLES=backend)
    run_ok(served6, env)
    again = run_ok(served6, env)
    assert "IPv6 NAT rules already in place" in again.stderr
    save = sh(served6, "router", f"ip6tables-{backend}-save").splitlines()
    for line in MESH6:
        if line.startswith("-A"):
            assert save.count(line) == 1, line
    for jump in (f"-A PREROUTING -j {DNAT_CHAIN}", f"-A POSTROUTING -j {SNAT_CHAIN}",
                 f"-A PREROUTING -j {MARK_CHAIN}"):
        assert save.count(jump) == 1, jump
    assert f"-A {SNAT_CHAIN} -o macvlan0 -j SNAT --to-source {SOURCE_IP6}" in save
    assert f"-A {DNAT_CHAIN} -i eth0 -j DNAT --to-destination 2001:db8:203::12" in save
    assert "EGRESS-ROUTER" not in sh(served6, "router", f"ip6tables-{other}-save")
    assert "EGRESS-ROUTER" not in sh(served6, "router", f"iptables-{other}-save")  # IPv4 followed the choice too
    assert DNAT_CHAIN in sh(served6, "router", f"iptables-{backend}-save")
    for proto, port in DEMO_TRAFFIC6:
        reply = served6.request(proto, ROUTER_POD_IP6, port)
        assert (reply.landed, reply.peer_ip) == (DEMO_LANDING6[(proto, port)], SOURCE_IP6), (proto, port)


def test_auto_follows_a_mesh_whose_ipv6_rules_are_in_legacy(served6: Lab) -> None:
    """EGRESS_IPTABLES=auto picks one backend by the rules of both families: another owner's ip6tables-legacy
    rules put ours, IPv4 and IPv6, in legacy too."""
    served6.exec("router", ["ip6tables-legacy-restore", "--noflush"], stdin="\n".join(MESH6) + "\n", check=True)
    result = run_ok(served6, served6.router_env6(EGRESS_IPTABLES="auto"))
    assert "Using the iptables legacy backend" in result.stderr
    for tool in ("ip6tables", "iptables"):
        assert DNAT_CHAIN in sh(served6, "router", f"{tool}-legacy-save"), tool
        assert "EGRESS-ROUTER" not in sh(served6, "router", f"{tool}-nft-save"), tool
    assert served6.request("tcp", ROUTER_POD_IP6, 8080).landed == "[2001:db8:203::11]:80"


# ------------------------------------------------------------------ undo, and IPv6 turned off

def failing_ip6tables_restore(tmp_path: Path) -> str:
    """A PATH whose ip6tables-nft-restore fails (iptables-nft-* and ip6tables-nft-save stay the real ones)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ip6tables-nft-restore"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'ip6tables-restore: line 3 failed' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}:{os.environ.get('PATH', '')}"


def test_a_failed_ipv6_transaction_undoes_the_ipv4_one(lab6: Lab, tmp_path: Path) -> None:
    before = lab6.snapshot("router")
    result = lab6.run_router(lab6.router_env6(PATH=failing_ip6tables_restore(tmp_path)))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "ip6tables-nft-restore failed: ip6tables-restore: line 3 failed" in errors[0]
    assert errors[0].endswith("the changes made before it were undone"), errors[0]
    assert "Traceback" not in result.stderr
    # the IPv4 transaction went in first, and was taken out again
    assert "Applied 5 NAT rules" in result.stderr and "Undid: apply 5 NAT rules" in result.stderr
    assert lab6.snapshot("router") == before
    assert DNAT_CHAIN not in sh(lab6, "router", "iptables-save")  # the IPv4 rules were in, and are out again


def test_ipv6_disabled_on_the_egress_interface_is_turned_on_and_the_run_converges(served6: Lab) -> None:
    served6.sysctl("router", "net.ipv6.conf.macvlan0.disable_ipv6", "1")
    result = run_ok(served6, served6.router_env6())
    assert served6.read_sysctl("router", "net.ipv6.conf.macvlan0.disable_ipv6") == "0"
    assert "net.ipv6.conf.macvlan0.disable_ipv6=0, was 1" in result.stderr
    assert global_ipv6(served6, "router", "macvlan0") == [f"{SOURCE_IP6}/{LAN_PREFIX6}"]
    reply = served6.request("udp", ROUTER_POD_IP6, 53)
    assert (reply.landed, reply.peer_ip) == ("[2001:db8:203::10]:5353", SOURCE_IP6)
    served6.settle()
    before = served6.snapshot("router")
    again = run_ok(served6, served6.router_env6())
    served6.settle()
    assert served6.snapshot("router") == before
    assert "network already configured" in again.stderr


# ------------------------------------------------------------------ router advertisements

LAN6 = IPv6Network("2001:db8:2::/64")


def router_advertisement(mac: str) -> bytes:
    """RFC 4861 4.2: an RA (lifetime 1800 s) with the source link-layer option and a prefix information
    option for the LAN with the on-link and autonomous flags (the kernel fills in the checksum)."""
    header = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    source_lla = struct.pack("!BB6s", 1, 1, bytes.fromhex(mac.replace(":", "")))
    prefix = struct.pack("!BBBBIII16s", 3, 4, LAN6.prefixlen, 0xC0, 86400, 14400, 0, LAN6.network_address.packed)
    return header + source_lla + prefix


def received_ras(lab: Lab) -> int:
    for line in sh(lab, "router", "cat /proc/net/dev_snmp6/macvlan0").splitlines():
        name, value = line.split()
        if name == "Icmp6InRouterAdvertisements":
            return int(value)
    raise AssertionError("no Icmp6InRouterAdvertisements counter for macvlan0")


def send_ra(lab: Lab, count: int = 2, timeout: float = 10.0) -> None:
    """Send the RA from fe80::1 on the gateway's lan0 until macvlan0 has counted `count` more: RAs reach
    macvlan0 in order on one queue, so the last one counted means the ones before it were handled. (For
    a moment after macvlan0 came up, multicast from the LAN does not reach it yet: hence the resending.)"""
    with lab.iproute("gateway") as ipr:
        index = ipr.link_lookup(ifname="lan0")[0]
        mac = ipr.get_links(index)[0].get("IFLA_ADDRESS")
    wanted = received_ras(lab) + count
    with lab.entered("gateway"):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    with sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.bind((GATEWAY_LINK_LOCAL, 0, 0, index))
        deadline = time.monotonic() + timeout
        while received_ras(lab) < wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"macvlan0 did not count {count} router advertisements within {timeout} s")
            sock.sendto(router_advertisement(mac), ("ff02::1", 0, 0, index))
            time.sleep(0.05)  # pacing of the resends (each loop also reads the counter)


def ipv6_defaults(lab: Lab) -> list[str]:
    return sh(lab, "router", "ip -6 -o route show default").splitlines()


def test_a_router_advertisement_adds_no_second_default_route_and_no_address(lab6: Lab) -> None:
    # as an attachment may leave it: accept_ra=2 takes RAs even on a forwarding interface (forwarding,
    # which the router turns on, alone would make the kernel ignore them with the default accept_ra=1)
    lab6.sysctl("router", "net.ipv6.conf.macvlan0.accept_ra", "2")
    result = run_ok(lab6, lab6.router_env6())
    assert "net.ipv6.conf.macvlan0.accept_ra=0, was 2" in result.stderr
    send_ra(lab6)
    defaults = ipv6_defaults(lab6)
    assert len(defaults) == 1 and defaults[0].startswith(f"default via {GATEWAY_LAN_IP6} dev macvlan0"), defaults
    assert "proto ra" not in sh(lab6, "router", "ip -6 route show table all")
    assert global_ipv6(lab6, "router", "macvlan0") == [f"{SOURCE_IP6}/{LAN_PREFIX6}"]
    # the same RA once accept_ra=2 is set by hand (it overrides forwarding): it is a valid RA, so the
    # assertions above can fail
    lab6.sysctl("router", "net.ipv6.conf.macvlan0.accept_ra", "2")
    send_ra(lab6)
    eventually("the RA added a default route", lambda: any("proto ra" in r for r in ipv6_defaults(lab6)))
    eventually("the RA autoconfigured an address", lambda: len(global_ipv6(lab6, "router", "macvlan0")) > 1)
    assert any(f"via {GATEWAY_LINK_LOCAL} dev macvlan0" in r and "proto ra" in r for r in ipv6_defaults(lab6))
    autoconf = [a for a in global_ipv6(lab6, "router", "macvlan0") if a != f"{SOURCE_IP6}/{LAN_PREFIX6}"]
    assert all(IPv6Address(a.split("/")[0]) in LAN6 for a in autoconf), autoconf

