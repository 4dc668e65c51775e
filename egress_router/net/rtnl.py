"""A small synchronous rtnetlink client: pyroute2's message classes over a plain netlink socket.

pyroute2 defines and encodes/decodes every rtnetlink message (ifinfmsg, ifaddrmsg, rtmsg); this
module only sends them and collects the answers. pyroute2's IPRoute would do the same, but in
0.9 it runs on an asyncio core whose import alone costs 100-200 ms, most of an init container's
runtime; the message classes cost about a quarter of that (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from .pyroute import load_pyroute2_modules

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_MULTI, F_ACK, F_DUMP = 0x1, 0x2, 0x4, 0x300
F_REPLACE, F_EXCL, F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
FR_ACT_TO_TBL = 1
RTNH_F_ONLINK = 0x4
IFF_UP = 0x1
MAIN_TABLE = 254
RTN_UNICAST, RTN_UNREACHABLE = 1, 7
ROUTE_TYPES = {"unicast": RTN_UNICAST, "unreachable": RTN_UNREACHABLE}
KNOWN_TYPES = frozenset(ROUTE_TYPES.values())
RTPROT_STATIC = 4
SCOPE_UNIVERSE, SCOPE_LINK, SCOPE_NOWHERE = 0, 253, 255
IFA_F_NODAD = 0x02
IP6_RT_PRIO_USER = 1024  # the metric the kernel gives an IPv6 route added without one
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def compat_table(table: int) -> int:
    """The 8-bit table field of a message: the table itself, or RT_TABLE_COMPAT with the real one in an
    attribute (RTA_TABLE / FRA_TABLE), which the kernel reads first."""
    return table if table < 256 else 252


class NetlinkError(OSError):
    """The kernel refused a request (errno and its text)."""


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    flags: int
    mac: str | None
    kind: str | None
    operstate: str | None

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True, slots=True)
class Route:
    """The fields of a unicast route that we compare, add and delete (`family`: socket.AF_INET or AF_INET6)."""

    dst: str | None
    dst_len: int
    gateway: str | None
    oif: int | None
    priority: int | None
    scope: int
    proto: int = field(default=RTPROT_STATIC, compare=False)  # kept so an undo re-adds a route as it was
    table: int = MAIN_TABLE
    onlink: bool = False
    family: int = socket.AF_INET
    prefsrc: str | None = None
    type: int = RTN_UNICAST  # or RTN_UNREACHABLE (no gateway, no interface)


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy routing rule of the form `fwmark MARK/MASK lookup TABLE priority PRIORITY`."""

    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    family: int = socket.AF_INET


class Rtnl:
    """One NETLINK_ROUTE socket in the current network namespace; requests are answered in order."""

    def __init__(self) -> None:
        self.messages = load_pyroute2_modules()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport
    def request(self, cls: Any, msg_type: int, flags: int, fields: dict[str, Any],
                attrs: list[tuple[str, Any]] | None = None) -> list[Any]:
        """Send one message; return the decoded answers of a dump, or [] once the kernel acks."""
        msg = cls()
        for key, value in fields.items():
            msg[key] = value
        msg["attrs"] = [[name, value] for name, value in attrs or []]
        self.seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = self.seq
        msg.encode()
        self.sock.send(msg.data)
        return self._collect(cls, dump=bool(flags & F_DUMP))

    def _collect(self, cls: Any, *, dump: bool) -> list[Any]:
        answers: list[Any] = []
        while True:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_type, flags, seq, _ = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise NetlinkError(0, "malformed netlink answer")
                chunk = data[offset:offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue  # a late answer to an earlier request
                if msg_type == NLMSG_DONE:
                    return answers
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", chunk, _HEADER.size)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return answers
                msg = cls(chunk)
                msg.decode()
                answers.append(msg)
                if not dump and not flags & F_MULTI:
                    return answers

    # ------------------------------------------------------------ links
    def links(self) -> list[Link]:
        result = []
        for msg in self.request(self.messages.ifinfmsg, RTM_GETLINK, F_REQUEST | F_DUMP, {"family": 0}):
            info = msg.get("IFLA_LINKINFO")
            result.append(Link(msg["index"], msg.get("IFLA_IFNAME"), msg["flags"], msg.get("IFLA_ADDRESS"),
                               info.get("IFLA_INFO_KIND") if info is not None else None, msg.get("IFLA_OPERSTATE")))
        return result

    def link(self, index: int) -> Link:
        for link in self.links():
            if link.index == index:
                return link
        raise NetlinkError(19, f"no link with index {index}")

    def set_up(self, index: int, up: bool) -> None:
        self.request(self.messages.ifinfmsg, RTM_NEWLINK, F_REQUEST | F_ACK,
                     {"family": 0, "index": index, "flags": IFF_UP if up else 0, "change": IFF_UP})

    # ------------------------------------------------------------ addresses
    def addresses(self, index: int, family: int = socket.AF_INET) -> list[tuple[str, int]]:
        found = self.request(self.messages.ifaddrmsg, RTM_GETADDR, F_REQUEST | F_DUMP, {"family": family})
        return [(msg.get("IFA_ADDRESS"), msg["prefixlen"]) for msg in found if msg["index"] == index]

    def address(self, add: bool, index: int, ip: str, prefixlen: int, family: int = socket.AF_INET,
                lifetime: int | None = None, *, renew: bool = False) -> None:
        """Add or remove an address; an IPv6 one is added without duplicate address detection (nodad).
        `lifetime`: seconds until the kernel removes it by itself; `renew`: the address is there, its lifetime
        starts again (NLM_F_REPLACE)."""
        msg_type, flags = (RTM_NEWADDR, F_REPLACE if renew else F_CREATE | F_EXCL) if add else (RTM_DELADDR, 0)
        attrs: list[tuple[str, Any]] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)]
        if family == socket.AF_INET6:
            attrs = [("IFA_ADDRESS", ip)]
        if add and lifetime is not None:
            attrs.append(("IFA_CACHEINFO", {"ifa_preferred": lifetime, "ifa_valid": lifetime, "cstamp": 0,
                                            "tstamp": 0}))
        self.request(self.messages.ifaddrmsg, msg_type, F_REQUEST | F_ACK | flags,
                     {"family": family, "prefixlen": prefixlen, "index": index, "scope": SCOPE_UNIVERSE,
                      "flags": IFA_F_NODAD if family == socket.AF_INET6 else 0}, attrs)

    # ------------------------------------------------------------ routes
    def routes(self, table: int = MAIN_TABLE, family: int = socket.AF_INET) -> list[Route]:
        """Unicast and unreachable routes of one routing table (the main table unless told) and family (IPv4
        unless told)."""
        found = self.request(self.messages.rtmsg, RTM_GETROUTE, F_REQUEST | F_DUMP, {"family": family})
        # an IPv6 unreachable route is dumped with the loopback as its interface: none, as it is added
        return [Route(m.get("RTA_DST"), m["dst_len"], m.get("RTA_GATEWAY"),
                      m.get("RTA_OIF") if m["type"] == RTN_UNICAST else None, m.get("RTA_PRIORITY"),
                      m["scope"], m["proto"], table, bool(m["flags"] & RTNH_F_ONLINK), family, m.get("RTA_PREFSRC"),
                      m["type"])
                for m in found if m.get("RTA_TABLE", m["table"]) == table and m["type"] in KNOWN_TYPES]

    def route(self, command: str, route: Route) -> None:
        """command: 'replace', 'add' or 'del'."""
        msg_type, flags = {"replace": (RTM_NEWROUTE, F_CREATE | F_REPLACE), "add": (RTM_NEWROUTE, F_CREATE | F_EXCL),
                           "del": (RTM_DELROUTE, 0)}[command]
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table)]
        if route.dst_len:
            attrs.append(("RTA_DST", route.dst))
        if route.gateway is not None:
            attrs.append(("RTA_GATEWAY", route.gateway))
        if route.oif is not None:
            attrs.append(("RTA_OIF", route.oif))
        if route.priority is not None:
            attrs.append(("RTA_PRIORITY", route.priority))
        if route.prefsrc is not None and command != "del":
            attrs.append(("RTA_PREFSRC", route.prefsrc))
        # A delete matches any protocol and scope (as `ip route del` does); the rest is ours to set.
        proto, scope = (0, SCOPE_NOWHERE) if command == "del" else (route.proto, route.scope)
        self.request(self.messages.rtmsg, msg_type, F_REQUEST | F_ACK | flags,
                     {"family": route.family, "dst_len": route.dst_len, "table": compat_table(route.table),
                      "proto": proto, "scope": scope, "type": route.type,
                      "flags": RTNH_F_ONLINK if route.onlink else 0}, attrs)

    # ------------------------------------------------------------ policy rules
    def rules(self, family: int = socket.AF_INET) -> list[Rule]:
        """Policy rules of one family that look a table up (fwmark match kept; other selectors are not ours)."""
        found = self.request(self.messages.fibmsg, RTM_GETRULE, F_REQUEST | F_DUMP, {"family": family})
        return [Rule(m.get("FRA_PRIORITY", 0), m.get("FRA_TABLE", m["table"]), m.get("FRA_FWMARK"), m.get("FRA_FWMASK"),
                     family) for m in found if m["action"] == FR_ACT_TO_TBL]

    def rule(self, add: bool, rule: Rule) -> None:
        attrs: list[tuple[str, Any]] = [("FRA_PRIORITY", rule.priority), ("FRA_TABLE", rule.table)]
        if rule.fwmark is not None:
            attrs.append(("FRA_FWMARK", rule.fwmark))
        if rule.fwmask is not None:
            attrs.append(("FRA_FWMASK", rule.fwmask))
        msg_type, flags = (RTM_NEWRULE, F_CREATE | F_EXCL) if add else (RTM_DELRULE, 0)
        self.request(self.messages.fibmsg, msg_type, F_REQUEST | F_ACK | flags,
                     {"family": rule.family, "table": compat_table(rule.table),
                      "action": FR_ACT_TO_TBL}, attrs)
