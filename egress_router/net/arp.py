"""Gratuitous ARP: tell the LAN that the reserved IP now lives at this interface's MAC.

Frames are built here (pure) and sent on an AF_PACKET socket (edge), the way ifup does with
`arping -A` then `arping -U`: a reply-form announcement (target MAC = own MAC, which Linux
neighbours accept as gratuitous) and a request-form one (target MAC zero, RFC 5227). Both go out
at once, so the init container is not held up; long-running modes repeat them a little later.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
_MAC = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}")


def mac_bytes(mac: str) -> bytes:
    if not _MAC.fullmatch(mac):
        raise ValueError(f"{mac!r} is not a MAC address")
    return bytes(int(part, 16) for part in mac.split(":"))


def announcement(mac: str, ip: IPv4Address, *, reply: bool) -> bytes:
    """An Ethernet broadcast frame announcing `ip` at `mac` (reply or request form)."""
    own, addr = mac_bytes(mac), ip.packed
    ethernet = BROADCAST + own + struct.pack("!H", ETH_P_ARP)
    op = ARP_REPLY if reply else ARP_REQUEST
    target_mac = own if reply else b"\x00" * 6
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + own + addr + target_mac + addr
    return ethernet + arp


def announce(interface: str, mac: str, ip: IPv4Address) -> None:
    """Send both announcements on `interface`; raises OSError if the socket cannot be used."""
    # Protocol 0 and sendto() instead of bind(): a send-only socket needs no receive hook, and
    # binding one makes the kernel wait for an RCU grace period (tens of milliseconds).
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        for reply in (True, False):
            sock.sendto(announcement(mac, ip, reply=reply), (interface, ETH_P_ARP))
    log.info("Announced %s at %s on %s (gratuitous ARP, reply and request form)", ip, mac, interface)
