"""Unsolicited neighbour advertisements: tell the LAN that the reserved IPv6 address now lives at this MAC.

IPv6 has no ARP; its counterpart is the Neighbor Advertisement of RFC 4861. After a failover the
gateway may still hold the reserved address at the MAC of the node that had it before, and would
keep sending there until its entry times out. An advertisement to all nodes (ff02::1) with the
Override flag set and the Target Link-Layer Address option fixes that at once (RFC 4861 section
7.2.6): a receiver that has an entry for the target replaces its link-layer address and marks it
STALE, so its next packet goes to the new MAC and is confirmed by the normal reachability probe.
A receiver without an entry ignores the advertisement: Linux creates one only on an interface
that forwards and has net.ipv6.conf.<if>.accept_untracked_na set (RFC 9131, for routers). That
is harmless: a gateway without an entry resolves the address afresh when it first needs it.

The message is built here (pure) and sent on a raw ICMPv6 socket (edge). For IPPROTO_ICMPV6 raw
sockets the kernel computes and inserts the checksum itself (RFC 3542 section 3.1; Linux cannot
even turn it off), so the message carries a zero checksum field.
"""

from __future__ import annotations

import logging
import socket
import struct
from ipaddress import IPv6Address

from .arp import mac_bytes

log = logging.getLogger(__name__)

ICMPV6_NEIGHBOR_ADVERTISEMENT = 136
# the flags word: Router (bit 31), Solicited (bit 30), Override (bit 29)
FLAG_ROUTER = 0x80000000
FLAG_SOLICITED = 0x40000000
FLAG_OVERRIDE = 0x20000000
OPTION_TARGET_LINK_LAYER_ADDRESS = 2
ALL_NODES = "ff02::1"
# RFC 4861 section 7.1.2: a receiver drops a neighbour discovery message whose hop limit is not
# 255, which proves it was not forwarded by a router from elsewhere
HOP_LIMIT = 255


def advertisement(mac: str, ip: IPv6Address) -> bytes:
    """The ICMPv6 Neighbor Advertisement of `ip` at `mac`: Override set, Solicited and Router clear."""
    option = struct.pack("!BB", OPTION_TARGET_LINK_LAYER_ADDRESS, 1) + mac_bytes(mac)  # length in units of 8 bytes
    header = struct.pack("!BBHI", ICMPV6_NEIGHBOR_ADVERTISEMENT, 0, 0, FLAG_OVERRIDE)
    return header + ip.packed + option


def announce(interface: str, mac: str, ip: IPv6Address) -> None:
    """Send one unsolicited advertisement to all nodes on `interface`, from `ip`.

    Raises OSError if the socket cannot be used (PermissionError without CAP_NET_RAW); the caller
    decides whether that is worth a warning. `ip` must be usable as a source already: the router
    adds it without duplicate address detection, so it is never tentative.
    """
    message = advertisement(mac, ip)
    index = socket.if_nametoindex(interface)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        # The source address goes with the message (IPV6_PKTINFO: address, interface) rather than
        # through bind(): one call, and the reserved address rather than whatever source address
        # selection would pick for ff02::1 (the link-local one).
        pktinfo = ip.packed + struct.pack("@I", index)
        sock.sendmsg([message], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)], 0,
                     (ALL_NODES, 0, 0, index))
    log.info("Announced %s at %s on %s (unsolicited neighbour advertisement, override flag)", ip, mac, interface)
