"""Host names and IP literals as clients and rules write them (strict, canonical, cached), and hosts files (pure)."""

from __future__ import annotations

import re
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address

Address = IPv4Address | IPv6Address

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
# WHATWG's "ends in a number": a URL parser would read such a host as an IPv4 address in
# some other notation, so it must never be taken for a name either.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
MAX_NAME = 253
_MAX_SHOWN = 64


class HostError(ValueError):
    """A host is neither a valid DNS name nor a canonical IP literal; str() says why."""


def normalize_host(host: str) -> str | IPv4Address | IPv6Address:
    """A request's host (no port; IPv6 bracketed or not) as a lower-case name without trailing dot or an address.

    Only canonical literals are accepted: any other spelling of an address (decimal, hex, octal,
    shortened, zone ids) is refused, since resolvers and libraries disagree on what it means and
    that disagreement is how allow lists get bypassed. ::ffff:a.b.c.d comes back as IPv4.
    """
    if len(host) > MAX_NAME + 2:  # no valid host is longer; keep junk out of the cache
        raise HostError(f"host is too long ({len(host)} characters; at most {MAX_NAME})")
    return _normalize_host(host)


@lru_cache(maxsize=4096)
def _normalize_host(host: str) -> str | IPv4Address | IPv6Address:
    """Clients repeat a handful of hosts: parse each spelling once."""
    if not host:
        raise HostError("empty host")
    if host.startswith("["):
        if not host.endswith("]"):
            raise HostError(f"{shown(host)} has no closing ']'")
        address = parse_ipv6(host[1:-1])
    elif ":" in host:
        address = parse_ipv6(host)
    elif DOTTED_QUAD.fullmatch(host):
        return IPv4Address(host)
    else:
        return parse_name(host)
    mapped = address.ipv4_mapped
    return address if mapped is None else mapped


def parse_ipv6(text: str) -> IPv6Address:
    if "%" in text:
        raise HostError(f"{shown(text)} has a zone id ('%...'); zone ids are not allowed")
    if not _IPV6_CHARS.fullmatch(text):
        raise HostError(f"{shown(text)} is not an IPv6 address")
    try:
        return IPv6Address(text)
    except ValueError:
        raise HostError(f"{shown(text)} is not an IPv6 address") from None


def parse_name(text: str) -> str:
    """A valid DNS name, lower case, without its trailing dot; HostError otherwise."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise HostError(f"{shown(text)} is not a host name" if text else "empty host name")
    if len(name) > MAX_NAME:
        raise HostError(f"host name is too long ({len(name)} characters; at most {MAX_NAME})")
    if not _NAME.fullmatch(name):
        raise HostError(f"{shown(text)} is not a valid host name: {_name_problem(name)}")
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        raise HostError(f"{shown(text)} is not a dotted-quad IPv4 address (nor a host name: its last label "
                        "is a number)" + ipv4_hint(text))
    return name.lower()


def _name_problem(name: str) -> str:
    """What is wrong with a name _NAME refused (the error path only, so it may be slow)."""
    for label in name.split("."):
        if not label:
            return "it has an empty label ('..')"
        bad = re.search(r"[^A-Za-z0-9_-]", label)
        if bad:
            return f"{bad.group()!r} is not allowed (letters, digits, '-' and '_' only)"
        if len(label) > 63:
            return f"label {shown(label)} is longer than 63 characters"
        if label.startswith("-") or label.endswith("-"):
            return f"label {shown(label)} starts or ends with '-'"
    return "labels are 1-63 letters, digits, '-' or '_'"


def ipv4_hint(text: str) -> str:
    """Name the likely slip in an address someone meant as IPv4."""
    if text.endswith(".") and DOTTED_QUAD.fullmatch(text[:-1]):
        return "; drop the trailing dot"
    parts = text.split(".")
    if any(re.fullmatch(r"0[xX][0-9A-Fa-f]*", part) for part in parts):
        return "; hexadecimal parts are not allowed"
    if not all(re.fullmatch(r"[0-9]+", part) for part in parts):
        return ""
    if any(len(part) > 1 and part.startswith("0") for part in parts):
        return "; leading zeros are not allowed (some parsers read them as octal)"
    if len(parts) != 4:
        return "; write all four parts"
    return "; each part must be 0-255"


def shown(text: str) -> str:
    """Quote user text for a reason, shortened so a huge token cannot flood a log line."""
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "..."
    return repr(text)


def parse_hosts(text: str) -> dict[str, list[Address]]:
    """A hosts file (hosts(5), what kubelet writes for hostAliases) as glibc's files backend reads it.

    An address, then names; `#` to the end of a line is a comment; a line whose first field is not
    an address (or has a zone id, `fe80::1%eth0`) is skipped. Names are compared without case and
    without a trailing dot. A name on several lines gets every address (glibc's getaddrinfo
    collects them all), IPv4 before IPv6 as our DNS answers are, each family in file order;
    ::ffff:a.b.c.d is a.b.c.d.
    """
    found: dict[str, list[Address]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "%" in fields[0]:
            continue
        try:
            address = ip_address(fields[0])
        except ValueError:
            continue
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for field in fields[1:]:
            name = field.lower().rstrip(".")
            if not name:
                continue
            known = found.setdefault(name, [])
            if address not in known:
                known.append(address)
    for known in found.values():
        known.sort(key=lambda a: a.version)  # stable: file order within a family
    return found
