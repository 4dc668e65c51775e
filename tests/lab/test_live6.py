"""Legacy mode and the read-only tools with IPv6: announcements at once and after 2 s, NET_RAW missing, reloads of
IPv6 rules (UDP flows re-pointed), IPv6 drift repaired, `verify` and the testinfra plugin on a dual-stack router."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.lab import (
    DEST_IPS,
    DEST_IPS6,
    GATEWAY_LAN_IP,
    GATEWAY_LAN_IP6,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    SOURCE_IP6,
    Lab,
    router_command,
)
from egress_router.testinfra_plugin import EgressRouter, assert_converged, nat_rules
from tests.lab.reloadlib import in_force_after
from tests.lab.test_live_legacy import REPAIRED_WITHIN, Router, Volume, eventually, legacy_routers
from tests.lab.test_testinfra_plugin import inside, local_host
from tests.lab.test_verify import assert_converged as assert_verified
from tests.lab.test_verify import configure, difference_lines, verify, verify_json

A, B, C = DEST_IPS
A6, B6, C6 = DEST_IPS6
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>: the kernel's receive time of each frame, as a cmsg
NA_OVERRIDE, NA_SOLICITED = 0x20000000, 0x40000000
NO_NET_RAW = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--"]
REANNOUNCED = (1.5, 4.0)  # the second announcement: 2 s after the first, within these bounds on a loaded machine
# the IPv4 rules beside the IPv6 ones in every dual-stack rule file here; a reload of IPv6 rules leaves them alone
RULES4 = f"80 tcp {A}\n53 udp {A} 5353\n"


# ---------------------------------------------------------------- capture on the gateway's lan0

@dataclass(frozen=True, slots=True)
class Frame:
    at: float  # the kernel's receive time (CLOCK_REALTIME, seconds)
    data: bytes


class Capture:
    """Every frame the gateway's lan0 receives from the LAN (not what the gateway sends), with kernel timestamps."""

    def __init__(self, lab: Lab):
        with lab.entered("gateway"):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(("lan0", ETH_P_ALL))
        self.frames: list[Frame] = []

    def close(self) -> None:
        self.sock.close()

    def read(self, until: Callable[[list[Frame]], bool], timeout: float) -> list[Frame]:
        """Read until `until(frames)` holds or `timeout` passes; all frames received so far."""
        deadline = time.monotonic() + timeout
        while not until(self.frames) and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _, address = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except TimeoutError:
                break
            if address[2] == socket.PACKET_OUTGOING:
                continue
            stamps = [struct.unpack("@qq", payload[:16]) for level, kind, payload in ancillary
                      if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS]
            at = stamps[0][0] + stamps[0][1] / 1e9 if stamps else time.time()
            self.frames.append(Frame(at, data))
        return self.frames


def advertisements(frames: list[Frame], target: str = SOURCE_IP6) -> list[Frame]:
    """Unsolicited neighbour advertisements of `target` with the override flag (RFC 4861 4.4)."""
    found = []
    for frame in frames:
        data = frame.data
        if len(data) < 78 or struct.unpack("!H", data[12:14])[0] != ETH_P_IPV6 or data[20] != socket.IPPROTO_ICMPV6:
            continue
        if data[54] != 136 or IPv6Address(data[62:78]) != IPv6Address(target):
            continue
        flags = struct.unpack("!I", data[58:62])[0]
        if flags & NA_OVERRIDE and not flags & NA_SOLICITED:
            found.append(frame)
    return found


def arp_announcements(frames: list[Frame], ip: str = SOURCE_IP, op: int = 2) -> list[Frame]:
    """Gratuitous ARP of `ip` (sender and target address both `ip`), reply form (op 2) or request form (op 1)."""
    packed = IPv4Address(ip).packed
    return [frame for frame in frames if len(frame.data) >= 42
            and struct.unpack("!HxxxxxxH", frame.data[12:22]) == (ETH_P_ARP, op)
            and frame.data[28:32] == packed == frame.data[38:42]]


@pytest.fixture
def capture(lab6: Lab) -> Iterator[Capture]:
    opened = Capture(lab6)
    try:
        yield opened
    finally:
        opened.close()


# ---------------------------------------------------------------- a legacy router in the dual-stack lab

StartRouter = Callable[..., Router]


@pytest.fixture
def start_router6(lab6: Lab) -> Iterator[StartRouter]:
    yield from legacy_routers(lab6, lambda destination="", **extra: lab6.router_env6(destination, **extra))


def landed6(lab: Lab, proto: str, port: int) -> str | None:
    """The destination address a connection (TCP) or datagram (UDP) to the router's IPv6 port lands on."""
    try:
        reply = lab.request(proto, ROUTER_POD_IP6, port, timeout=1.0)
    except (OSError, ValueError):
        return None
    return reply.landed[1:reply.landed.index("]")]


def sh(lab: Lab, role: str, *argv: str) -> str:
    return lab.exec(role, list(argv), check=True).stdout


def router_mac(lab: Lab) -> bytes:
    with lab.iproute("router") as ipr:
        mac: str = ipr.get_links(ipr.link_lookup(ifname="macvlan0")[0])[0].get("IFLA_ADDRESS")
    return bytes.fromhex(mac.replace(":", ""))


# ---------------------------------------------------------------- 1, 2: announcements

def test_legacy_mode_announces_both_sources_at_once_and_again_after_2_s(served6: Lab, capture: Capture,
                                                                        start_router6: StartRouter) -> None:
    # the gateway creates an entry from an untracked advertisement only if it forwards (it does) and accepts them
    served6.sysctl("gateway", "net.ipv6.conf.lan0.accept_untracked_na", "1")
    start_router6(RULES4 + f"80 tcp {A6}\n")

    def complete(frames: list[Frame]) -> bool:
        return len(advertisements(frames)) >= 2 and len(arp_announcements(frames)) >= 2

    frames = capture.read(complete, timeout=10.0)
    capture.read(lambda _: False, timeout=0.5)  # anything that would follow a second round (there must be none)
    nas, arps, requests = advertisements(frames), arp_announcements(frames), arp_announcements(frames, op=1)
    assert len(nas) == 2, f"{len(nas)} unsolicited advertisement(s) of {SOURCE_IP6} with the override flag"
    assert len(arps) == len(requests) == 2, (len(arps), len(requests))  # each round: reply and request form
    mac = router_mac(served6)
    for na in nas:
        assert na.data[6:12] == mac and na.data[38:54] == IPv6Address("ff02::1").packed
        assert na.data[78:80] == b"\x02\x01" and na.data[80:86] == mac  # target link-layer address option
    for name, pair in (("advertisement", nas), ("ARP announcement", arps)):
        gap = pair[1].at - pair[0].at
        print(f"second {name} {gap:.2f} s after the first")
        assert REANNOUNCED[0] <= gap <= REANNOUNCED[1], (name, gap)
    # the gateway took the router's MAC for the source from the advertisement, before any traffic to it
    entry = sh(served6, "gateway", "ip", "-6", "neigh", "show", SOURCE_IP6, "dev", "lan0")
    assert f"lladdr {bytes.hex(mac, ':')}" in entry, entry
    reply = served6.request("tcp", ROUTER_POD_IP6, 80)
    assert (reply.landed, reply.peer_ip) == (f"[{A6}]:80", SOURCE_IP6)


def test_without_net_raw_both_announcements_are_skipped_with_one_warning_each(served6: Lab,
                                                                              capture: Capture) -> None:
    served6.sysctl("gateway", "net.ipv6.conf.lan0.accept_untracked_na", "1")  # an advertisement would show
    env = served6.router_env6()
    result = served6.exec("router", [*NO_NET_RAW, *router_command()], env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if "NET_RAW" in line]
    assert warnings == [
        f"No NET_RAW capability: the gratuitous ARP announcement is skipped, so neighbours learn {SOURCE_IP}'s new "
        "MAC only when their ARP entries expire; add NET_RAW",
        f"No NET_RAW capability: the unsolicited neighbour advertisement is skipped, so neighbours learn "
        f"{SOURCE_IP6}'s new MAC only when their neighbour entries expire; add NET_RAW"], result.stderr
    assert all(f"[warning] {line}" in result.stderr for line in warnings)
    assert "Could not send" not in result.stderr  # skipped, not tried and failed
    frames = capture.read(lambda frames: bool(advertisements(frames) or arp_announcements(frames)), timeout=1.0)
    assert advertisements(frames) == [] and arp_announcements(frames, op=1) == arp_announcements(frames) == []
    assert sh(served6, "gateway", "ip", "-6", "neigh", "show", SOURCE_IP6, "dev", "lan0") == ""
    reply = served6.request("tcp", ROUTER_POD_IP6, 80)  # the router works all the same
    assert (reply.landed, reply.peer_ip) == (f"[{A6}]:80", SOURCE_IP6)
    # the same run with NET_RAW does announce, and the capture sees it: the silence above is the capability's
    again = served6.run_router(env)
    assert again.returncode == 0 and "NET_RAW" not in again.stderr, again.stderr
    frames = capture.read(lambda frames: bool(advertisements(frames)) and bool(arp_announcements(frames)), timeout=5)
    assert len(advertisements(frames)) == 1 and len(arp_announcements(frames)) == 1


# ---------------------------------------------------------------- 3, 4: reloads of IPv6 rules

def nat6(lab: Lab, chain: str) -> list[str]:
    return sh(lab, "router", "ip6tables", "-t", "nat", "-S", chain).splitlines()


def nat4(lab: Lab) -> list[str]:
    """The IPv4 nat table without iptables-save's comment lines (they carry the time) and counters."""
    return [line.split(" [")[0] for line in sh(lab, "router", "iptables-save", "-t", "nat").splitlines()
            if not line.startswith("#")]


def test_a_configmap_swap_of_ipv6_rules_is_in_force_and_leaves_ipv4_alone(served6: Lab, start_router6: StartRouter,
                                                                         tmp_path: Path) -> None:
    before = RULES4 + f"80 tcp {A6}\n8080 tcp {B6} 80\n53 udp {A6} 5353\n"
    after = RULES4 + f"80 tcp {B6}\n53 udp {A6} 5353\n7000 tcp {C6}\n"  # ~80, -8080, +7000
    volume = Volume(tmp_path, before)
    router = start_router6(EGRESS_DESTINATION_FILE=volume.path)
    assert (landed6(served6, "tcp", 80), landed6(served6, "tcp", 8080), landed6(served6, "tcp", 7000)) == (A6, B6, None)
    ipv4_nat = nat4(served6)
    seen = len(router.lines())
    swapped = volume.update(after)
    in_force_after(swapped, lambda: landed6(served6, "tcp", 80) == B6, "IPv6 80 -> B6", lambda: router.stderr)
    assert landed6(served6, "tcp", 7000) == C6  # added
    assert landed6(served6, "tcp", 8080) is None  # removed: nothing redirects it (the router itself refuses it)
    assert landed6(served6, "udp", 53) == A6  # unchanged
    line = router.wait_log(r"Reloaded EGRESS_DESTINATION_FILE=", after=seen)
    assert "+1 -1 ~1 rule(s) (5 now)" in line and "(reload 1)" in line, line
    env = {**served6.router_env6(""), "EGRESS_DESTINATION_FILE": volume.path}
    del env["EGRESS_DESTINATION"]
    planned = nat_rules(env, version=6)
    assert set(planned) == {DNAT_CHAIN, SNAT_CHAIN}
    for chain, rules in planned.items():
        assert nat6(served6, chain) == rules, chain
    assert f"-A {DNAT_CHAIN} -i eth0 -p tcp -m tcp --dport 7000 -j DNAT --to-destination {C6}" in planned[DNAT_CHAIN]
    # IPv4: the same rules, and its traffic as before
    assert nat4(served6) == ipv4_nat
    reply = served6.request("tcp", ROUTER_POD_IP, 80)
    assert (reply.landed, reply.peer_ip) == (f"{A}:80", SOURCE_IP)
    reply = served6.request("tcp", ROUTER_POD_IP6, 7000)
    assert (reply.landed, reply.peer_ip) == (f"[{C6}]:7000", SOURCE_IP6)
    assert_verified(served6, env)


def test_a_udp_flow_over_ipv6_follows_a_changed_rule_at_once(served6: Lab, start_router6: StartRouter,
                                                             tmp_path: Path) -> None:
    """A client port that keeps sending: its conntrack entry would keep the old IPv6 destination until it pauses
    for the UDP timeout; the reload deletes it (IPv6 entries are in their own family's table dump)."""
    volume = Volume(tmp_path, RULES4 + f"53 udp {A6} 5353\n7000 tcp {C6}\n")
    router = start_router6(EGRESS_DESTINATION_FILE=volume.path)
    ipv4 = served6.request("udp", ROUTER_POD_IP, 53)  # an IPv4 flow of an unchanged rule beside it
    with served6.entered("client"):
        flow = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with flow:
        flow.bind(("::", 40053))
        flow.settimeout(1.0)
        flow.connect((ROUTER_POD_IP6, 53))

        def answer() -> str | None:
            flow.send(b"hello\n")
            try:
                landed = flow.recv(4096).decode().split()[0]
            except TimeoutError:  # UDP: an answer in flight while its entry is deleted is lost, the next is not
                return None
            return landed[1:landed.index("]")]

        assert answer() == A6
        seen = len(router.lines())
        swapped = volume.update(RULES4 + f"53 udp {C6} 7001\n7000 tcp {C6}\n")
        in_force_after(swapped, lambda: answer() == C6, "the IPv6 UDP flow re-pointed", lambda: router.stderr)
        line = router.wait_log(r"Reloaded ", after=seen)
        assert "+0 -0 ~1 rule(s) (4 now)" in line and "1 UDP flow(s) re-pointed" in line, line
    assert served6.request("udp", ROUTER_POD_IP, 53).landed == ipv4.landed == f"{A}:5353"


# ---------------------------------------------------------------- 5: drift repair

DRIFTS6 = {
    "the IPv6 default route deleted": (["ip", "-6", "route", "del", "default"],
                                       f"'ip -6 route replace default via {GATEWAY_LAN_IP6} dev macvlan0"),
    "the ip6tables DNAT chain flushed": (["ip6tables", "-t", "nat", "-F", DNAT_CHAIN],
                                         f"the 3 IPv6 NAT rules ({DNAT_CHAIN}, {SNAT_CHAIN}) and 2 IPv6 "),
    "router advertisements accepted": (["sysctl", "-qw", "net.ipv6.conf.macvlan0.accept_ra=1"],
                                       "'sysctl -w net.ipv6.conf.macvlan0.accept_ra=0'"),
}


@pytest.mark.parametrize("drift", list(DRIFTS6))
def test_ipv6_drift_is_repaired(served6: Lab, start_router6: StartRouter, drift: str) -> None:
    argv, repaired = DRIFTS6[drift]
    router = start_router6(RULES4 + f"80 tcp {A6}\n53 udp {A6} 5353\n", EGRESS_ROUTER_DRIFT_SECONDS="0.2")
    converged = served6.snapshot("router")
    assert landed6(served6, "tcp", 80) == A6
    seen = len(router.lines())
    sh(served6, "router", *argv)  # (a repair every 0.2 s may undo it before a snapshot could show it: the log says)
    took = eventually(lambda: served6.snapshot("router") == converged, REPAIRED_WITHIN)
    assert took is not None, f"not repaired within {REPAIRED_WITHIN} s:\n{router.stderr}"
    print(f"{drift}: repaired after {took:.2f} s")
    line = router.wait_log(r"Repaired drift: ", after=seen)
    assert repaired in line and "(repair 1)" in line, line
    assert len([line for line in router.lines()[seen:] if "Repaired drift: " in line]) == 1, router.stderr
    # one line per repaired step: the appliers' own lines (an iptables-restore, a route) stay muted
    assert not [line for line in router.lines()[seen:] if "[info] Applied" in line or "[info] Added" in line], \
        router.stderr
    for proto, port, server in (("tcp", 80, f"[{A6}]:80"), ("udp", 53, f"[{A6}]:5353")):
        reply = served6.request(proto, ROUTER_POD_IP6, port)
        assert (reply.landed, reply.peer_ip) == (server, SOURCE_IP6), proto
    assert served6.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP


# ---------------------------------------------------------------- 6: verify and the testinfra plugin

DEMO_DNAT6 = (f"-i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination {A6}",
              f"-i eth0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination [{B6}]:80",
              f"-i eth0 -p udp -m udp --dport 53 -j DNAT --to-destination [{A6}]:5353",
              f"-i eth0 -j DNAT --to-destination {C6}")
DEFAULT_ROUTE6 = f"ip -6 route replace default via {GATEWAY_LAN_IP6} dev macvlan0 src {SOURCE_IP6}"


def test_verify_a_dual_stack_router_converged_then_broken_in_ipv6(lab6: Lab) -> None:
    env = lab6.router_env6()
    configure(lab6, env)
    line = assert_verified(lab6, env)
    assert f"{SOURCE_IP}/24 and {SOURCE_IP6}/64 on macvlan0" in line, line
    assert verify_json(lab6, env, 0)["differences"] == []
    sh(lab6, "router", "ip6tables", "-t", "nat", "-F", DNAT_CHAIN)
    sh(lab6, "router", "ip", "-6", "route", "del", "default")
    before = lab6.snapshot("router")
    result = verify(lab6, env)
    assert result.returncode == 1 and result.stderr == "", result
    lines = difference_lines(result)
    assert lines == [f"missing: ip6tables -t nat -A {DNAT_CHAIN} {spec}" for spec in DEMO_DNAT6] + [
        f"missing: {DEFAULT_ROUTE6}"], result.stdout
    assert not any(line.startswith(("missing: iptables ", "missing: ip route")) for line in lines)  # IPv4 holds
    document = verify_json(lab6, env, 1)
    assert [f"{d['kind']}: {d['step']}" for d in document["differences"]] == lines
    assert lab6.snapshot("router") == before  # verify changed nothing
    configure(lab6, env)
    assert_verified(lab6, env)


def egress_env6(lab: Lab) -> dict[str, str]:
    return {name: value for name, value in lab.router_env6().items() if name.startswith("EGRESS_")}


def test_the_testinfra_plugin_on_a_dual_stack_router(lab6: Lab) -> None:
    env = egress_env6(lab6)
    configure(lab6, {**lab6.router_env6(), **env})
    host = local_host()
    state = assert_converged(host, env, command=router_command()[0], netns=lab6.ns["router"])
    assert state.converged and state.summary.startswith("converged: all ")
    helper = EgressRouter(local_host())
    with inside(lab6):
        helper.assert_nat_rules(env)
        assert local_host().iptables.rules("nat", DNAT_CHAIN, version=6) == nat_rules(env, version=6)[DNAT_CHAIN]
        sh(lab6, "router", "ip6tables", "-t", "nat", "-D", DNAT_CHAIN, "2")
        with pytest.raises(AssertionError) as nat_failed:
            helper.assert_nat_rules(env)
    assert str(nat_failed.value).splitlines() == [
        f"ip6tables nat chain {DNAT_CHAIN} on local differs:", f"  missing: -A {DNAT_CHAIN} {DEMO_DNAT6[1]}"]
    sh(lab6, "router", "ip6tables", "-t", "nat", "-F", DNAT_CHAIN)
    with pytest.raises(AssertionError) as failed:
        assert_converged(host, env, command=router_command()[0], netns=lab6.ns["router"])
    message = str(failed.value).splitlines()
    assert message[0].startswith(f"egress router on local (network namespace {lab6.ns['router']}) is not as "
                                 "configured: not converged: 1 of "), message
    assert f"{SOURCE_IP}/24 and {SOURCE_IP6}/64 on macvlan0 via {GATEWAY_LAN_IP} and {GATEWAY_LAN_IP6}" in message[0]
    assert message[1:] == [f"  missing: ip6tables -t nat -A {DNAT_CHAIN} {spec}" for spec in DEMO_DNAT6], message
    # the IPv4 rules still check out: only the ip6tables chain is named
    with inside(lab6), pytest.raises(AssertionError) as still:
        helper.assert_nat_rules(env)
    assert str(still.value).startswith(f"ip6tables nat chain {DNAT_CHAIN} on local differs:")



def test_the_ipv6_address_removed_is_added_again_and_announced(served6: Lab, capture: Capture,
                                                              start_router6: StartRouter) -> None:
    router = start_router6(RULES4 + f"80 tcp {A6}\n", EGRESS_ROUTER_DRIFT_SECONDS="0.2")
    capture.read(lambda frames: len(advertisements(frames)) >= 2, timeout=10.0)  # the start's two rounds
    converged = served6.snapshot("router")
    seen, announced = len(router.lines()), len(advertisements(capture.frames))
    sh(served6, "router", "ip", "-6", "address", "del", f"{SOURCE_IP6}/64", "dev", "macvlan0")
    took = eventually(lambda: served6.snapshot("router") == converged, REPAIRED_WITHIN)
    assert took is not None, f"not repaired within {REPAIRED_WITHIN} s:\n{router.stderr}"
    repairs = [line for line in router.lines()[seen:] if "Repaired drift: " in line]
    print("\n".join(repairs))
    assert any(f"'ip address add {SOURCE_IP6}/64 dev macvlan0 nodad'" in line for line in repairs), router.stderr
    frames = capture.read(lambda frames: len(advertisements(frames)) > announced, timeout=5.0)
    assert len(advertisements(frames)) == announced + 1, "the re-added address is announced once"
    assert "tentative" not in sh(served6, "router", "ip", "-6", "address", "show", "dev", "macvlan0")
    reply = served6.request("tcp", ROUTER_POD_IP6, 80)
    assert (reply.landed, reply.peer_ip) == (f"[{A6}]:80", SOURCE_IP6)
