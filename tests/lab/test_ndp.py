"""Unsolicited neighbour advertisements on a real LAN: what the gateway's neighbour cache makes of them."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from egress_router.lab import Lab
from egress_router.net.arp import mac_bytes
from egress_router.net.ndp import announce
from tests.lab.conftest import require_lab

GATEWAY_IP6 = "2001:db8:2::1"
SOURCE_IP6 = "2001:db8:2::99"
OLD_MAC = "02:00:5e:00:53:01"
ETH_P_IPV6 = 0x86DD
REPO = Path(__file__).resolve().parents[2]


class NdpLab(Lab):
    """gw (lan0) ──veth── node (lan0, the node NIC) ── macvlan0 in router, the shape of the full lab's LAN."""

    roles = ("gw", "node", "router")

    def build(self) -> None:
        self.create_namespaces()
        with self.iproute("node") as ipr:
            ipr.link("add", ifname="lan0", kind="veth", peer={"ifname": "lan0", "net_ns_fd": self.path("gw")})
            parent = self._up(ipr, "lan0")
            ipr.link("add", ifname="mvtmp", kind="macvlan", link=parent, macvlan_mode="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="mvtmp")[0], net_ns_fd=self.path("router"), ifname="macvlan0")
        with self.iproute("gw") as ipr:
            self._up(ipr, "lo")
            self._up(ipr, "lan0")
        with self.iproute("router") as ipr:
            self._up(ipr, "lo")
            self._up(ipr, "macvlan0")
        self.exec("gw", ["ip", "-6", "addr", "add", f"{GATEWAY_IP6}/64", "dev", "lan0", "nodad"], check=True)
        # as the router adds its reserved source: no duplicate address detection, usable at once
        self.exec("router", ["ip", "-6", "addr", "add", f"{SOURCE_IP6}/64", "dev", "macvlan0", "nodad"], check=True)
        self.settle()

    def mac(self) -> str:
        with self.iproute("router") as ipr:
            mac: str = ipr.get_links(ipr.link_lookup(ifname="macvlan0")[0])[0].get("IFLA_ADDRESS")
        return mac

    def announce(self) -> None:
        with self.entered("router"):
            announce("macvlan0", self.mac(), IPv6Address(SOURCE_IP6))

    def neighbour(self) -> str:
        return self.exec("gw", ["ip", "-6", "neigh", "show", SOURCE_IP6, "dev", "lan0"], check=True).stdout.strip()


@pytest.fixture
def ndplab() -> Iterator[NdpLab]:
    require_lab()
    built = NdpLab()
    with built:  # torn down on exit, also when the test or the build fails
        yield built


def wait_for(lab: NdpLab, text: str, timeout: float = 5.0) -> str:
    """The gateway's entry for the reserved address once it holds `text` (the advertisement is handled
    in the receiving namespace's softirq, not necessarily before sendmsg returns)."""
    deadline = time.monotonic() + timeout
    while text not in (entry := lab.neighbour()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway entry {entry!r} never held {text!r}")
        time.sleep(0.01)
    return entry


def test_failover_a_stale_entry_at_the_old_mac_is_overridden(ndplab: NdpLab) -> None:
    ndplab.exec("gw", ["ip", "-6", "neigh", "replace", SOURCE_IP6, "lladdr", OLD_MAC, "dev", "lan0", "nud", "stale"],
                check=True)
    assert f"lladdr {OLD_MAC}" in ndplab.neighbour()
    ndplab.announce()
    entry = wait_for(ndplab, f"lladdr {ndplab.mac()}")
    # RFC 4861 7.2.6: unsolicited, Override set, other address: the new address, state STALE (no
    # traffic has confirmed it yet, and none was sent)
    assert entry.split()[-1] == "STALE"
    assert OLD_MAC not in entry


def accept_untracked(lab: NdpLab) -> None:
    """RFC 9131 on the gateway: Linux creates an entry from an untracked advertisement only on an
    interface that forwards (a router) and has accept_untracked_na set."""
    lab.sysctl("gw", "net.ipv6.conf.all.forwarding", "1")
    lab.sysctl("gw", "net.ipv6.conf.lan0.accept_untracked_na", "1")


def test_without_an_entry_a_gateway_that_accepts_untracked_advertisements_creates_one(ndplab: NdpLab) -> None:
    assert ndplab.neighbour() == ""
    accept_untracked(ndplab)
    ndplab.announce()
    entry = wait_for(ndplab, f"lladdr {ndplab.mac()}")
    assert entry.split()[-1] == "STALE"


def icmpv6_checksum(source: bytes, destination: bytes, message: bytes) -> int:
    """RFC 8200 section 8.1: the one's complement sum over the pseudo-header and the message."""
    pseudo = source + destination + struct.pack("!IxxxB", len(message), socket.IPPROTO_ICMPV6)
    data = pseudo + message + b"\x00" * (len(message) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def capture_advertisements(lab: NdpLab, timeout: float = 5.0) -> list[bytes]:
    """The IPv6 frames carrying a neighbour advertisement that gw's lan0 receives while announce() runs."""
    with lab.entered("gw"):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
    with sock:
        sock.bind(("lan0", ETH_P_IPV6))
        lab.announce()
        found: list[bytes] = []
        deadline = time.monotonic() + timeout
        # the kernel sends its own IPv6 traffic too (MLD reports, router solicitations): keep reading
        # until the advertisement has come, then take whatever else is already queued
        while True:
            sock.settimeout(max(0.0, deadline - time.monotonic()) if not found else 0.0)
            try:
                frame, address = sock.recvfrom(2048)
            except (TimeoutError, BlockingIOError):
                break
            if address[2] == socket.PACKET_OUTGOING:  # what gw itself sends
                continue
            if len(frame) > 54 and frame[20] == socket.IPPROTO_ICMPV6 and frame[54] == 136:
                found.append(frame)
    return found


def test_the_advertisement_on_the_wire(ndplab: NdpLab) -> None:
    frames = capture_advertisements(ndplab)
    assert len(frames) == 1, "one advertisement per announce()"
    frame, mac = frames[0], ndplab.mac()
    assert frame[0:6] == bytes.fromhex("333300000001")  # all-nodes multicast, RFC 2464 mapping
    assert frame[6:12] == mac_bytes(mac)
    assert struct.unpack("!H", frame[12:14])[0] == ETH_P_IPV6
    ip6 = frame[14:54]
    version, payload_length, next_header, hop_limit = ip6[0] >> 4, *struct.unpack("!HBB", ip6[4:8])
    source, destination = ip6[8:24], ip6[24:40]
    assert (version, next_header, hop_limit) == (6, 58, 255)
    assert IPv6Address(source) == IPv6Address(SOURCE_IP6)
    assert IPv6Address(destination) == IPv6Address("ff02::1")
    message = frame[54:54 + payload_length]
    assert len(message) == payload_length == 32
    kind, code, checksum, flags = struct.unpack("!BBHI", message[0:8])
    assert (kind, code) == (136, 0)
    assert flags == 0x20000000  # Override only: not a router, not solicited
    assert IPv6Address(message[8:24]) == IPv6Address(SOURCE_IP6)
    assert message[24:26] == b"\x02\x01"  # Target Link-Layer Address, 8 bytes
    assert message[26:32] == mac_bytes(mac)
    assert checksum != 0  # the kernel filled it in
    zeroed = message[:2] + b"\x00\x00" + message[4:]
    assert icmpv6_checksum(source, destination, zeroed) == checksum


CHILD = """
import sys
from ipaddress import IPv6Address
from egress_router.net.ndp import announce
try:
    announce("macvlan0", sys.argv[1], IPv6Address(sys.argv[2]))
except OSError as exc:
    print(type(exc).__name__, exc.errno)
else:
    print("sent")
"""


def announce_in_child(lab: NdpLab, drop: list[str]) -> str:
    argv = [*lab.enter_argv("router"), *drop, sys.executable, "-c", CHILD, lab.mac(), SOURCE_IP6]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def test_without_net_raw_announce_raises_permission_error(ndplab: NdpLab) -> None:
    accept_untracked(ndplab)  # so that an advertisement that did go out would show in the gateway's cache
    drop = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", "--"]
    assert announce_in_child(ndplab, drop) == "PermissionError 1"  # EPERM, raised to the caller
    assert ndplab.neighbour() == ""
    # the same child with its capabilities does send: the failure above is the missing NET_RAW
    assert announce_in_child(ndplab, []) == "sent"
    wait_for(ndplab, f"lladdr {ndplab.mac()}")
