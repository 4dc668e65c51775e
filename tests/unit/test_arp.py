"""Gratuitous ARP frames, byte by byte (building them needs no privileges)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from egress_router.net.arp import ARP_REPLY, ARP_REQUEST, ETH_P_ARP, announcement, mac_bytes

MAC = "02:42:ac:11:00:02"
MAC_RAW = bytes([0x02, 0x42, 0xAC, 0x11, 0x00, 0x02])
IP = IPv4Address("192.0.2.99")


def fields(frame: bytes) -> dict[str, object]:
    """Decode an Ethernet + ARP (IPv4 over Ethernet) frame."""
    assert len(frame) == 42
    dst, src, ethertype = frame[0:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    return {
        "dst": dst, "src": src, "ethertype": ethertype, "htype": htype, "ptype": ptype, "hlen": hlen,
        "plen": plen, "op": op, "sha": frame[22:28], "spa": IPv4Address(frame[28:32]),
        "tha": frame[32:38], "tpa": IPv4Address(frame[38:42]),
    }


@pytest.mark.parametrize("reply", [True, False])
def test_common_layout(reply: bool) -> None:
    frame = announcement(MAC, IP, reply=reply)
    assert len(frame) == 42
    f = fields(frame)
    assert f["dst"] == b"\xff" * 6
    assert f["src"] == MAC_RAW
    assert f["ethertype"] == 0x0806 == ETH_P_ARP
    assert (f["htype"], f["ptype"], f["hlen"], f["plen"]) == (1, 0x0800, 6, 4)
    assert f["sha"] == MAC_RAW
    assert f["spa"] == IP
    assert f["tpa"] == IP


def test_reply_form() -> None:
    f = fields(announcement(MAC, IP, reply=True))
    assert f["op"] == 2 == ARP_REPLY
    assert f["tha"] == MAC_RAW


def test_request_form() -> None:
    f = fields(announcement(MAC, IP, reply=False))
    assert f["op"] == 1 == ARP_REQUEST
    assert f["tha"] == b"\x00" * 6


def test_exact_bytes_of_the_reply() -> None:
    expected = bytes.fromhex(
        "ffffffffffff" "0242ac110002" "0806"  # Ethernet: broadcast, our MAC, ARP
        "0001" "0800" "06" "04" "0002"  # Ethernet/IPv4, reply
        "0242ac110002" "c0000263"  # sender: our MAC, 192.0.2.99
        "0242ac110002" "c0000263"  # target: our MAC, 192.0.2.99
    )
    assert announcement(MAC, IP, reply=True) == expected


def test_exact_bytes_of_the_request() -> None:
    expected = bytes.fromhex(
        "ffffffffffff" "0242ac110002" "0806"
        "0001" "0800" "06" "04" "0001"
        "0242ac110002" "c0000263"
        "000000000000" "c0000263"
    )
    assert announcement(MAC, IP, reply=False) == expected


@pytest.mark.parametrize(("ip", "packed"), [("10.0.0.1", b"\x0a\x00\x00\x01"), ("203.0.113.254", b"\xcb\x00\x71\xfe")])
def test_ip_is_packed_in_network_order(ip: str, packed: bytes) -> None:
    frame = announcement(MAC, IPv4Address(ip), reply=True)
    assert frame[28:32] == packed
    assert frame[38:42] == packed


@pytest.mark.parametrize(
    ("mac", "raw"),
    [
        ("02:42:ac:11:00:02", MAC_RAW),
        ("02:42:AC:11:00:02", MAC_RAW),
        ("00:00:00:00:00:00", b"\x00" * 6),
        ("ff:ff:ff:ff:ff:ff", b"\xff" * 6),
        ("2:42:ac:11:0:2", MAC_RAW),
    ],
)
def test_mac_bytes(mac: str, raw: bytes) -> None:
    assert mac_bytes(mac) == raw


@pytest.mark.parametrize(
    "mac",
    [
        "",
        "02:42:ac:11:00",  # five octets
        "02:42:ac:11:00:02:03",  # seven octets
        "0242ac110002",  # no separators
        "02-42-ac-11-00-02",  # other separator
        "02:42:ac:11:00:zz",  # not hex
        "02:42:ac:11:00:",  # empty octet
        "02:42:ac:11:00:100",  # octet above 255
        "02:42:ac:11:00:-1",  # negative octet
        "::::::",
    ],
)
def test_mac_bytes_rejects(mac: str) -> None:
    with pytest.raises(ValueError):
        mac_bytes(mac)


def test_announcement_rejects_a_bad_mac() -> None:
    with pytest.raises(ValueError):
        announcement("02:42:ac:11:00", IP, reply=True)
