"""Probe frames and the second-holder filter, byte by byte (no privileges, no sockets)."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from egress_router.net.arp import announcement
from egress_router.net.arpguard import (
    ND_FILTER,
    HolderWatch,
    arp_holder,
    icmpv6_checksum,
    multicast_mac,
    neighbour_holder,
    parse_arp,
    parse_neighbour,
    probe_frame,
    solicitation_frame,
    solicited_node,
)

OURS = bytes.fromhex("0242ac110002")
THEIRS = bytes.fromhex("0242ac110003")
THEIRS_TEXT = "02:42:ac:11:00:03"
VIP = IPv4Address("192.0.2.99")
OTHER = IPv4Address("192.0.2.98")
VIP6 = IPv6Address("2001:db8:2::99")
OTHER6 = IPv6Address("2001:db8:2::98")
HOST, BROADCAST, OUTGOING = socket.PACKET_HOST, socket.PACKET_BROADCAST, socket.PACKET_OUTGOING


# ------------------------------------------------------------------ IPv4
def test_probe_exact_bytes() -> None:
    expected = bytes.fromhex(
        "ffffffffffff" "0242ac110002" "0806"  # Ethernet: broadcast, our MAC, ARP
        "0001" "0800" "06" "04" "0001"  # Ethernet/IPv4, request
        "0242ac110002" "00000000"  # sender: our MAC, 0.0.0.0 (RFC 5227 section 2.1.1)
        "000000000000" "c0000263"  # target: MAC zero, 192.0.2.99
    )
    assert probe_frame(OURS, VIP) == expected


def arp_frame(op: int, sha: bytes, spa: IPv4Address, tha: bytes, tpa: IPv4Address, *, pad: int = 0) -> bytes:
    ethernet = b"\xff" * 6 + sha + b"\x08\x06"
    return ethernet + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + sha + spa.packed + tha + tpa.packed + b"\x00" * pad


def test_parse_arp_reads_the_probe_back() -> None:
    arp = parse_arp(probe_frame(OURS, VIP))
    assert arp is not None
    assert (arp.op, arp.sender_mac, arp.sender_ip, arp.target_mac, arp.target_ip) == \
        (1, OURS, IPv4Address("0.0.0.0"), b"\x00" * 6, VIP)


REPLY_TO_PROBE = arp_frame(2, THEIRS, VIP, OURS, IPv4Address("0.0.0.0"))  # what Linux answers a probe with


@pytest.mark.parametrize(("frame", "pkttype", "found"), [
    pytest.param(REPLY_TO_PROBE, HOST, THEIRS_TEXT, id="reply-to-our-probe"),
    pytest.param(arp_frame(2, THEIRS, VIP, OURS, IPv4Address("0.0.0.0"), pad=18), HOST, THEIRS_TEXT,
                 id="padded-to-60-bytes"),
    pytest.param(announcement("02:42:ac:11:00:03", VIP, reply=True), BROADCAST, THEIRS_TEXT, id="their-garp-reply"),
    pytest.param(announcement("02:42:ac:11:00:03", VIP, reply=False), BROADCAST, THEIRS_TEXT,
                 id="their-garp-request"),
    pytest.param(arp_frame(1, THEIRS, VIP, b"\x00" * 6, IPv4Address("192.0.2.1")), BROADCAST, THEIRS_TEXT,
                 id="their-request-for-the-gateway"),
    pytest.param(REPLY_TO_PROBE, OUTGOING, None, id="outgoing"),
    pytest.param(arp_frame(2, OURS, VIP, OURS, VIP), BROADCAST, None, id="our-mac"),
    pytest.param(announcement("02:42:ac:11:00:02", VIP, reply=False), BROADCAST, None, id="our-garp"),
    pytest.param(probe_frame(THEIRS, VIP), BROADCAST, None, id="their-probe-wants-not-has"),
    pytest.param(arp_frame(2, THEIRS, OTHER, OURS, OTHER), HOST, None, id="other-address"),
    pytest.param(arp_frame(1, THEIRS, OTHER, b"\x00" * 6, VIP), BROADCAST, None, id="asking-for-it-from-elsewhere"),
    pytest.param(arp_frame(3, THEIRS, VIP, OURS, VIP), HOST, None, id="rarp-op"),
    pytest.param(REPLY_TO_PROBE[:41], HOST, None, id="truncated"),
    pytest.param(REPLY_TO_PROBE[:12] + b"\x08\x00" + REPLY_TO_PROBE[14:], HOST, None, id="not-arp-ethertype"),
    pytest.param(REPLY_TO_PROBE[:14] + b"\x00\x06" + REPLY_TO_PROBE[16:], HOST, None, id="not-ethernet-htype"),
    pytest.param(REPLY_TO_PROBE[:18] + b"\x10" + REPLY_TO_PROBE[19:], HOST, None, id="wrong-hlen"),
])
def test_arp_holder(frame: bytes, pkttype: int, found: str | None) -> None:
    assert arp_holder(frame, pkttype, VIP, OURS) == found


# ------------------------------------------------------------------ IPv6
def test_solicited_node_group_and_its_mac() -> None:
    assert solicited_node(VIP6) == IPv6Address("ff02::1:ff00:99")
    assert solicited_node(IPv6Address("fe80::1234:5678:9abc")) == IPv6Address("ff02::1:ff78:9abc")
    assert multicast_mac(IPv6Address("ff02::1:ff00:99")) == bytes.fromhex("3333ff000099")
    assert multicast_mac(IPv6Address("ff02::1")) == bytes.fromhex("333300000001")


def folded_sum(data: bytes) -> int:
    """The 16-bit one's complement sum, computed independently of the module (RFC 1071)."""
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + (data[i + 1] if i + 1 < len(data) else 0)
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_solicitation_exact_bytes() -> None:
    frame = solicitation_frame(OURS, VIP6)
    expected = bytes.fromhex(
        "3333ff000099" "0242ac110002" "86dd"  # Ethernet: the solicited-node group's MAC, ours, IPv6
        "60000000" "0018" "3a" "ff"  # version 6, 24 bytes of ICMPv6, hop limit 255
        "00000000000000000000000000000000"  # source :: (RFC 4862 section 5.4.2)
        "ff0200000000000000000001ff000099"  # destination: ff02::1:ff00:99
        "87" "00" + frame[56:58].hex() +  # Neighbor Solicitation, code 0, checksum (below)
        "00000000"  # reserved
        "20010db8000200000000000000000099"  # target; no source link-layer option from ::
    )
    assert frame == expected
    pseudo = bytes(16) + IPv6Address("ff02::1:ff00:99").packed + struct.pack("!IxxxB", 24, 58)
    assert folded_sum(pseudo + frame[54:]) == 0xFFFF  # a valid checksum sums to all ones
    assert frame[56:58] != b"\x00\x00"


def test_icmpv6_checksum_of_a_known_message() -> None:
    message = b"\x80\x00\x00\x00\x00\x01\x00\x01"  # echo request, id 1, seq 1
    source, destination = IPv6Address("2001:db8::1").packed, IPv6Address("2001:db8::2").packed
    checksum = icmpv6_checksum(source, destination, message)
    pseudo = source + destination + struct.pack("!IxxxB", len(message), 58)
    assert folded_sum(pseudo + message[:2] + struct.pack("!H", checksum) + message[4:]) == 0xFFFF
    odd = message + b"\x07"  # an odd length is padded with a zero byte
    assert icmpv6_checksum(source, destination, odd) == (~folded_sum(source + destination + struct.pack(
        "!IxxxB", len(odd), 58) + odd + b"\x00") & 0xFFFF)


def nd_frame(kind: int, eth_source: bytes, ip_source: IPv6Address, target: IPv6Address, *,
             option: bytes | None = None, hop_limit: int = 255, flags: int = 0x20000000) -> bytes:
    """An Ethernet frame carrying a neighbour solicitation (135) or advertisement (136); checksum left zero
    (the kernel checked it before a packet socket's reader could care)."""
    body = struct.pack("!BBHI", kind, 0, 0, flags if kind == 136 else 0) + target.packed + (option or b"")
    destination = IPv6Address("ff02::1")
    ipv6 = struct.pack("!IHBB", 6 << 28, len(body), 58, hop_limit) + ip_source.packed + destination.packed
    return bytes.fromhex("333300000001") + eth_source + b"\x86\xdd" + ipv6 + body


def lla(kind: int, mac: bytes) -> bytes:
    return bytes([kind, 1]) + mac


UNSPEC = IPv6Address("::")
LINK_LOCAL = IPv6Address("fe80::42:acff:fe11:3")
DEFENCE = nd_frame(136, THEIRS, LINK_LOCAL, VIP6, option=lla(2, THEIRS))  # what Linux sends to our DAD probe


@pytest.mark.parametrize(("frame", "pkttype", "found"), [
    pytest.param(DEFENCE, socket.PACKET_MULTICAST, THEIRS_TEXT, id="defence-of-the-address"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6), socket.PACKET_MULTICAST, THEIRS_TEXT, id="no-option-eth-source"),
    pytest.param(nd_frame(136, bytes.fromhex("0242ac1100ff"), VIP6, VIP6, option=lla(2, THEIRS)),
                 socket.PACKET_MULTICAST, THEIRS_TEXT, id="option-wins-over-eth-source"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6, option=bytes([14, 1]) + bytes(6) + lla(2, THEIRS)),
                 socket.PACKET_MULTICAST, THEIRS_TEXT, id="unknown-option-skipped"),
    pytest.param(nd_frame(135, THEIRS, VIP6, IPv6Address("2001:db8:2::1"), option=lla(1, THEIRS)), HOST,
                 THEIRS_TEXT, id="solicitation-from-the-address"),
    pytest.param(DEFENCE, OUTGOING, None, id="outgoing"),
    pytest.param(nd_frame(136, OURS, VIP6, VIP6, option=lla(2, OURS)), socket.PACKET_MULTICAST, None, id="ours"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6, option=lla(2, OURS)), socket.PACKET_MULTICAST, None,
                 id="our-mac-in-the-option"),
    pytest.param(nd_frame(136, THEIRS, OTHER6, OTHER6, option=lla(2, THEIRS)), socket.PACKET_MULTICAST, None,
                 id="other-target"),
    pytest.param(nd_frame(136, THEIRS, VIP6, OTHER6, option=lla(2, THEIRS)), socket.PACKET_MULTICAST, None,
                 id="from-the-address-about-another"),
    pytest.param(solicitation_frame(THEIRS, VIP6), socket.PACKET_MULTICAST, None, id="their-dad-wants-not-has"),
    pytest.param(nd_frame(135, THEIRS, OTHER6, VIP6, option=lla(1, THEIRS)), socket.PACKET_MULTICAST, None,
                 id="someone-resolving-the-address"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6, hop_limit=254), socket.PACKET_MULTICAST, None, id="hop-limit-254"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6, option=bytes([2, 0]) + THEIRS), socket.PACKET_MULTICAST, None,
                 id="zero-length-option"),
    pytest.param(nd_frame(136, THEIRS, VIP6, VIP6, option=bytes([2, 2]) + THEIRS), socket.PACKET_MULTICAST, None,
                 id="option-past-the-end"),
    pytest.param(DEFENCE[:77], socket.PACKET_MULTICAST, None, id="truncated"),
    pytest.param(DEFENCE[:54] + b"\x80" + DEFENCE[55:], socket.PACKET_MULTICAST, None, id="echo-request"),
    pytest.param(DEFENCE[:20] + b"\x11" + DEFENCE[21:], socket.PACKET_MULTICAST, None, id="udp"),
    pytest.param(DEFENCE[:12] + b"\x08\x00" + DEFENCE[14:], socket.PACKET_MULTICAST, None, id="ipv4-ethertype"),
])
def test_neighbour_holder(frame: bytes, pkttype: int, found: str | None) -> None:
    assert neighbour_holder(frame, pkttype, VIP6, OURS) == found


def test_parse_neighbour_reads_our_solicitation_back() -> None:
    nd = parse_neighbour(solicitation_frame(OURS, VIP6))
    assert nd is not None
    assert (nd.kind, nd.ethernet_source, nd.ip_source, nd.target, nd.link_layer) == (135, OURS, UNSPEC, VIP6, None)


def run_bpf(program: tuple[tuple[int, int, int, int], ...], frame: bytes) -> int:
    """A classic BPF interpreter for the instructions the filter uses: the bytes it would accept."""
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x28:  # ldh [k]
            if k + 2 > len(frame):
                return 0
            accumulator = struct.unpack("!H", frame[k:k + 2])[0]
        elif code == 0x30:  # ldb [k]
            if k + 1 > len(frame):
                return 0
            accumulator = frame[k]
        elif code == 0x15:  # jeq #k, jt, jf
            pc += jt if accumulator == k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not interpreted")


@pytest.mark.parametrize(("frame", "accepted"), [
    pytest.param(DEFENCE, True, id="advertisement"),
    pytest.param(solicitation_frame(OURS, VIP6), True, id="solicitation"),
    pytest.param(DEFENCE[:54] + b"\x80" + DEFENCE[55:], False, id="echo-request"),
    pytest.param(DEFENCE[:54] + bytes([133]) + DEFENCE[55:], False, id="router-solicitation"),
    pytest.param(DEFENCE[:20] + b"\x00" + DEFENCE[21:], False, id="hop-by-hop-header-mld"),
    pytest.param(DEFENCE[:20] + b"\x11" + DEFENCE[21:], False, id="udp"),
    pytest.param(DEFENCE[:12] + b"\x08\x06" + DEFENCE[14:], False, id="arp-ethertype"),
    pytest.param(DEFENCE[:40], False, id="short"),
])
def test_the_socket_filter_keeps_neighbour_discovery_only(frame: bytes, accepted: bool) -> None:
    assert (run_bpf(ND_FILTER, frame) > 0) == accepted


def test_holder_watch_keeps_a_holder_through_fewer_silent_probes_than_its_misses() -> None:
    watch = HolderWatch(misses=3)
    other = {"02:00:00:00:00:02"}
    assert watch.update(0.0, set()) == "none" and watch.since is None
    assert watch.update(0.1, other) == "new" and watch.since == 0.1
    # one answer late or lost, then two: the holder is still the one first seen at 0.1
    assert [watch.update(t, s) for t, s in ((0.2, set()), (0.3, other), (0.4, set()), (0.5, set()))] == \
        ["missed", "seen", "missed", "missed"]
    assert watch.update(0.6, other) == "seen" and watch.since == 0.1
    # three in a row: gone, and a holder seen again later is new, its wait counted from then
    assert [watch.update(t, set()) for t in (0.7, 0.8, 0.9)] == ["missed", "missed", "gone"]
    assert watch.since is None and watch.update(1.0, set()) == "none"
    assert watch.update(1.1, other) == "new" and watch.since == 1.1
