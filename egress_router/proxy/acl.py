"""The EGRESS_HTTP_PROXY_DESTINATION allow list: parse it, normalize request hosts, decide (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from types import MappingProxyType
from typing import Literal

from ..errors import ConfigError
from ..grammar import rule_lines

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
RuleKind = Literal["host", "domain", "network", "any"]

VARIABLE = "EGRESS_HTTP_PROXY_DESTINATION"

GRAMMAR_HELP = """\
One rule per line, tried in order; the first rule that matches decides:
  www.example.com     that host exactly (any case, trailing dot ignored)
  *.example.com       example.com itself and every name under it
  192.0.2.10          that address; 192.0.2.0/24, 2001:db8::5, 2001:db8::/32 work too
  !<rule>             deny instead of allow (e.g. !10.0.0.0/8, !*.internal.example)
  *                   allow everything else (optional; must be the last rule)
A destination no rule matches is denied. Names are also checked against the addresses they
resolve to, so '!10.0.0.0/8' then '*' refuses a name that resolves into 10.0.0.0/8.
Blank lines and # comments are ignored."""

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
# WHATWG's "ends in a number": a URL parser would read such a host as an IPv4 address in
# some other notation, so it must never be taken for a name either.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}")
_MAPPED = IPv6Network("::ffff:0:0/96")
_MAX_NAME = 253
_MAX_SHOWN = 64


class HostError(ValueError):
    """A request's host is neither a valid DNS name nor a canonical IP literal; str() says why."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of the list: allow (or deny) a host, a domain and its subdomains, a network, or anything."""

    allow: bool
    kind: RuleKind
    name: str = ""  # the host for "host", the parent domain for "domain" (lower case, no trailing dot)
    network: Network | None = None
    line: int = field(default=0, compare=False)

    def __str__(self) -> str:
        """The rule in canonical grammar form."""
        bang = "" if self.allow else "!"
        if self.kind == "any":
            return f"{bang}*"
        if self.kind == "domain":
            return f"{bang}*.{self.name}"
        if self.kind == "network":
            assert self.network is not None
            if self.network.prefixlen == self.network.max_prefixlen:
                return f"{bang}{self.network.network_address}"
            return f"{bang}{self.network}"
        return f"{bang}{self.name}"


@dataclass(frozen=True, slots=True)
class AccessList:
    """The parsed allow list; its lookups are precomputed so a request costs a few dict probes."""

    rules: tuple[Rule, ...]
    # index of the first matching host/domain rule for a normalized name (cached per name)
    _first_name_rule: Callable[[str], int | None] = field(init=False, repr=False, compare=False)
    # per prefix length: (mask, network as int -> index of its first rule), for each family
    _v4: tuple[tuple[int, Mapping[int, int]], ...] = field(init=False, repr=False, compare=False)
    _v6: tuple[tuple[int, Mapping[int, int]], ...] = field(init=False, repr=False, compare=False)
    _any: int | None = field(init=False, repr=False, compare=False)
    # name rules at or after this index can no longer decide on the name alone
    _name_boundary: int = field(init=False, repr=False, compare=False)
    _name_default: bool | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts: dict[str, int] = {}
        domains: dict[str, int] = {}
        networks: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        any_index: int | None = None
        boundary = len(self.rules)
        for index, rule in enumerate(self.rules):
            if rule.kind == "host":
                hosts.setdefault(rule.name, index)
            elif rule.kind == "domain":
                domains.setdefault(rule.name, index)
            else:
                boundary = min(boundary, index)
                if rule.kind == "any":
                    if any_index is None:
                        any_index = index
                else:
                    assert rule.network is not None
                    by_mask = networks[rule.network.version].setdefault(int(rule.network.netmask), {})
                    by_mask.setdefault(int(rule.network.network_address), index)
        if boundary == len(self.rules):
            default: bool | None = False
        elif self.rules[boundary].kind == "any":
            default = self.rules[boundary].allow
        else:
            default = None
        setattr_ = object.__setattr__
        setattr_(self, "_first_name_rule", _name_matcher(MappingProxyType(hosts), MappingProxyType(domains)))
        setattr_(self, "_v4", _frozen_tables(networks[4]))
        setattr_(self, "_v6", _frozen_tables(networks[6]))
        setattr_(self, "_any", any_index)
        setattr_(self, "_name_boundary", boundary)
        setattr_(self, "_name_default", default)

    def name_verdict(self, name: str) -> bool | None:
        """Allow/deny for a normalized name when no address can change it; None: resolve, then allowed_addresses."""
        index = self._first_name_rule(name)
        if index is not None and index < self._name_boundary:
            return self.rules[index].allow
        return self._name_default

    def address_allowed(self, name: str | None, address: Address) -> bool:
        """Whether connecting to `address` (for the normalized `name`, None for an IP literal) is allowed."""
        best = self._any
        if name is not None:
            index = self._first_name_rule(name)
            if index is not None and (best is None or index < best):
                best = index
        index = self._first_address_rule(address)
        if index is not None and (best is None or index < best):
            best = index
        return best is not None and self.rules[best].allow

    def allowed_addresses(self, name: str | None, addresses: Sequence[Address]) -> list[Address]:
        """The addresses (in order) that `name` may be connected to; the proxy must use only these."""
        by_name = self._any
        if name is not None:
            index = self._first_name_rule(name)
            if index is not None and (by_name is None or index < by_name):
                by_name = index
        rules = self.rules
        allowed = []
        for address in addresses:
            best = by_name
            index = self._first_address_rule(address)
            if index is not None and (best is None or index < best):
                best = index
            if best is not None and rules[best].allow:
                allowed.append(address)
        return allowed

    def matching_rule(self, name: str | None, address: Address | None) -> Rule | None:
        """The rule that decides for this name and/or address (None: no rule matched, denied); for logs."""
        candidates = [self._any]
        if name is not None:
            candidates.append(self._first_name_rule(name))
        if address is not None:
            candidates.append(self._first_address_rule(address))
        found = [index for index in candidates if index is not None]
        return self.rules[min(found)] if found else None

    def describe(self) -> str:
        """One line for the logs, e.g. '3 allow rules, 1 deny rule, default deny'."""
        allows = sum(1 for rule in self.rules if rule.allow and rule.kind != "any")
        denies = sum(1 for rule in self.rules if not rule.allow and rule.kind != "any")
        default = "deny" if self._any is None else ("allow" if self.rules[self._any].allow else "deny")
        return f"{_count(allows, 'allow rule')}, {_count(denies, 'deny rule')}, default {default}"

    def _first_address_rule(self, address: Address) -> int | None:
        if isinstance(address, IPv6Address):
            # A dual-stack socket connecting to ::ffff:a.b.c.d reaches the IPv4 host a.b.c.d, so it
            # is judged as that host (a resolver may return such AAAA records).
            mapped = address.ipv4_mapped
            tables = self._v4 if mapped is not None else self._v6
            value = int(mapped if mapped is not None else address)
        else:
            tables = self._v4
            value = int(address)
        best: int | None = None
        for mask, table in tables:
            index = table.get(value & mask)
            if index is not None and (best is None or index < best):
                best = index
        return best


def parse_access_list(text: str, variable: str = VARIABLE) -> AccessList:
    """Parse the allow list grammar (see GRAMMAR_HELP); raise ConfigError on the first bad line."""
    rules: list[Rule] = []
    any_line = 0
    for number, content, shown in rule_lines(text):
        if any_line:
            raise ConfigError(variable, f"nothing may follow '*' (line {any_line}): it must be the last rule",
                              line=number, text=shown)
        try:
            rule = _parse_rule(content, number)
        except HostError as err:
            raise ConfigError(variable, str(err), line=number, text=shown) from None
        if rule.kind == "any":
            any_line = number
        rules.append(rule)
    if not rules:
        raise ConfigError(variable, "no rules: give at least one host, *.domain, address or network to allow")
    return AccessList(tuple(rules))


def _parse_rule(content: str, line: int) -> Rule:
    """One rule's text (comment and surrounding blanks removed); HostError says what is wrong with it."""
    if any(char.isspace() for char in content):
        raise HostError(f"{_shown(content)} has spaces inside; write one rule per line")
    allow = not content.startswith("!")
    body = content if allow else content[1:]
    if not body:
        raise HostError("'!' must be followed by the host, domain or network to deny")
    if body.startswith("!"):
        raise HostError(f"{_shown(content)}: one '!' is enough to deny")
    if body == "*":
        if not allow:
            raise HostError("'!*' is not needed: whatever no rule allows is denied already")
        return Rule(True, "any", line=line)
    if body.startswith("*."):
        parent = body[2:]
        if not parent:
            raise HostError("'*.' must be followed by a domain, e.g. '*.example.com'")
        if "*" in parent:
            raise HostError(f"wildcard in {_shown(body)}: '*' may only appear as a leading '*.' or alone")
        return Rule(allow, "domain", _parse_name(parent), line=line)
    if "*" in body:
        raise HostError(f"wildcard in {_shown(body)}: '*' may only appear as a leading '*.' or alone")
    if "://" in body:
        raise HostError(f"{_shown(body)} is a URL; write only its host, e.g. 'www.example.com'")
    if body.count(":") == 1:  # IPv6 needs at least two: this is a host with a port
        raise HostError(f"{_shown(body)} is not an IPv6 address, and rules have no port: write the host alone")
    if "/" in body:
        return Rule(allow, "network", network=_parse_network(body), line=line)
    if body.startswith("["):
        raise HostError(f"{_shown(body)}: write IPv6 addresses without brackets")
    if ":" in body:
        address = _parse_ipv6(body)
        if address.ipv4_mapped is not None:
            raise HostError(f"{body} is an IPv4-mapped IPv6 address; write it as IPv4: {address.ipv4_mapped}")
        return Rule(allow, "network", network=IPv6Network(address), line=line)
    if _DOTTED_QUAD.fullmatch(body):
        return Rule(allow, "network", network=IPv4Network(body), line=line)
    return Rule(allow, "host", _parse_name(body), line=line)


def _parse_network(body: str) -> Network:
    address_text, _, prefix_text = body.partition("/")
    address: Address
    if ":" in address_text:
        address = _parse_ipv6(address_text)
    elif _DOTTED_QUAD.fullmatch(address_text):
        address = IPv4Address(address_text)
    else:
        raise HostError(f"{_shown(address_text)} in {_shown(body)} is not an IPv4 or IPv6 address"
                        + _ipv4_hint(address_text))
    limit = address.max_prefixlen
    if not _PREFIX.fullmatch(prefix_text):
        raise HostError(f"{_shown(prefix_text)} in {_shown(body)} is not a prefix length (0-{limit})")
    prefix = int(prefix_text)
    if prefix > limit:
        raise HostError(f"prefix length /{prefix} in {_shown(body)} is out of range for IPv{address.version} "
                        f"(0-{limit})")
    network = ip_network((address, prefix), strict=False)
    if network.network_address != address:
        raise HostError(f"{address}/{prefix} has host bits set; did you mean {network}?")
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        ipv4 = IPv4Network((mapped, prefix - 96))
        raise HostError(f"{_shown(body)} is IPv4-mapped IPv6; write it as IPv4: {ipv4}")
    return network


def normalize_host(host: str) -> str | IPv4Address | IPv6Address:
    """A request's host (no port; IPv6 bracketed or not) as a lower-case name without trailing dot or an address.

    Only canonical literals are accepted: any other spelling of an address (decimal, hex, octal,
    shortened, zone ids) is refused, since resolvers and libraries disagree on what it means and
    that disagreement is how allow lists get bypassed. ::ffff:a.b.c.d comes back as IPv4.
    """
    if len(host) > _MAX_NAME + 2:  # no valid host is longer; keep junk out of the cache
        raise HostError(f"host is too long ({len(host)} characters; at most {_MAX_NAME})")
    return _normalize_host(host)


@lru_cache(maxsize=4096)
def _normalize_host(host: str) -> str | IPv4Address | IPv6Address:
    """Clients repeat a handful of hosts: parse each spelling once."""
    if not host:
        raise HostError("empty host")
    if host.startswith("["):
        if not host.endswith("]"):
            raise HostError(f"{_shown(host)} has no closing ']'")
        address = _parse_ipv6(host[1:-1])
    elif ":" in host:
        address = _parse_ipv6(host)
    elif _DOTTED_QUAD.fullmatch(host):
        return IPv4Address(host)
    else:
        return _parse_name(host)
    mapped = address.ipv4_mapped
    return address if mapped is None else mapped


def _parse_ipv6(text: str) -> IPv6Address:
    if "%" in text:
        raise HostError(f"{_shown(text)} has a zone id ('%...'); zone ids are not allowed")
    if not _IPV6_CHARS.fullmatch(text):
        raise HostError(f"{_shown(text)} is not an IPv6 address")
    try:
        return IPv6Address(text)
    except ValueError:
        raise HostError(f"{_shown(text)} is not an IPv6 address") from None


def _parse_name(text: str) -> str:
    """A valid DNS name, lower case, without its trailing dot; HostError otherwise."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise HostError(f"{_shown(text)} is not a host name" if text else "empty host name")
    if len(name) > _MAX_NAME:
        raise HostError(f"host name is too long ({len(name)} characters; at most {_MAX_NAME})")
    if not _NAME.fullmatch(name):
        raise HostError(f"{_shown(text)} is not a valid host name: {_name_problem(name)}")
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        raise HostError(f"{_shown(text)} is not a dotted-quad IPv4 address (nor a host name: its last label "
                        "is a number)" + _ipv4_hint(text))
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
            return f"label {_shown(label)} is longer than 63 characters"
        if label.startswith("-") or label.endswith("-"):
            return f"label {_shown(label)} starts or ends with '-'"
    return "labels are 1-63 letters, digits, '-' or '_'"


def _ipv4_hint(text: str) -> str:
    """Name the likely slip in an address someone meant as IPv4."""
    if text.endswith(".") and _DOTTED_QUAD.fullmatch(text[:-1]):
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


def _name_matcher(hosts: Mapping[str, int], domains: Mapping[str, int]) -> Callable[[str], int | None]:
    """A per-list, per-name cached lookup of the first host or domain rule matching a name."""

    @lru_cache(maxsize=4096)
    def first(name: str) -> int | None:
        best = hosts.get(name)
        if not domains:
            return best
        suffix = name
        while True:
            index = domains.get(suffix)
            if index is not None and (best is None or index < best):
                best = index
            dot = suffix.find(".")
            if dot < 0:
                return best
            suffix = suffix[dot + 1:]

    return first


def _frozen_tables(by_mask: dict[int, dict[int, int]]) -> tuple[tuple[int, Mapping[int, int]], ...]:
    return tuple((mask, MappingProxyType(table)) for mask, table in by_mask.items())


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _shown(text: str) -> str:
    """Quote user text for a reason, shortened so a huge token cannot flood a log line."""
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "..."
    return repr(text)
