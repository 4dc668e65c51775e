"""Unsolicited neighbour advertisements, byte by byte (building them needs no privileges)."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest

from egress_router.net.ndp import (
    FLAG_OVERRIDE,
    FLAG_ROUTER,
    FLAG_SOLICITED,
    ICMPV6_NEIGHBOR_ADVERTISEMENT,
    OPTION_TARGET_LINK_LAYER_ADDRESS,
    advertisement,
)

MAC = "02:42:ac:11:00:02"
MAC_RAW = bytes([0x02, 0x42, 0xAC, 0x11, 0x00, 0x02])
IP = IPv6Address("2001:db8:2::99")


def test_length_is_header_target_and_one_option() -> None:
    assert len(advertisement(MAC, IP)) == 4 + 4 + 16 + 8


def test_type_code_and_zero_checksum() -> None:
    kind, code, checksum = struct.unpack("!BBH", advertisement(MAC, IP)[0:4])
    assert kind == 136 == ICMPV6_NEIGHBOR_ADVERTISEMENT
    assert code == 0
    assert checksum == 0  # the kernel fills it in for raw ICMPv6 sockets


def test_flags_override_only() -> None:
    (flags,) = struct.unpack("!I", advertisement(MAC, IP)[4:8])
    assert flags & FLAG_OVERRIDE
    assert not flags & FLAG_SOLICITED
    assert not flags & FLAG_ROUTER
    assert flags == 0x20000000  # the 29 reserved bits are zero as well


def test_target_is_the_address() -> None:
    assert IPv6Address(advertisement(MAC, IP)[8:24]) == IP


def test_target_link_layer_address_option() -> None:
    option = advertisement(MAC, IP)[24:32]
    assert option[0] == 2 == OPTION_TARGET_LINK_LAYER_ADDRESS
    assert option[1] == 1  # length in units of 8 bytes: type, length, 6-byte MAC
    assert option[2:] == MAC_RAW


def test_exact_bytes() -> None:
    expected = bytes.fromhex(
        "88" "00" "0000"  # Neighbor Advertisement, code 0, checksum left to the kernel
        "20000000"  # R=0 S=0 O=1
        "20010db8000200000000000000000099"  # target 2001:db8:2::99
        "02" "01" "0242ac110002"  # Target Link-Layer Address, 1 x 8 bytes, our MAC
    )
    assert advertisement(MAC, IP) == expected


@pytest.mark.parametrize(("ip", "packed"), [("fe80::1", "fe800000000000000000000000000001"),
                                            ("2001:db8:203::10", "20010db8020300000000000000000010")])
def test_target_is_packed_in_network_order(ip: str, packed: str) -> None:
    assert advertisement(MAC, IPv6Address(ip))[8:24] == bytes.fromhex(packed)


def test_upper_case_mac_is_the_same_message() -> None:
    assert advertisement(MAC.upper(), IP) == advertisement(MAC, IP)


@pytest.mark.parametrize("mac", ["", "02:42:ac:11:00", "02:42:ac:11:00:02:03", "0242ac110002", "02:42:ac:11:00:zz"])
def test_a_bad_mac_is_rejected(mac: str) -> None:
    with pytest.raises(ValueError):
        advertisement(mac, IP)
