"""The EGRESS_HTTP_PROXY_DESTINATION allow list: parse it, normalize request hosts, decide (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from types import MappingProxyType
from typing import Literal

from .errors import ConfigError
from .hosts import DOTTED_QUAD, Address, HostError, ipv4_hint, parse_ipv6, parse_name
from .hosts import shown as quoted
from .lines import rule_lines

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

_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}")
_MAPPED = IPv6Network("::ffff:0:0/96")


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
        raise HostError(f"{quoted(content)} has spaces inside; write one rule per line")
    allow = not content.startswith("!")
    body = content if allow else content[1:]
    if not body:
        raise HostError("'!' must be followed by the host, domain or network to deny")
    if body.startswith("!"):
        raise HostError(f"{quoted(content)}: one '!' is enough to deny")
    if body == "*":
        if not allow:
            raise HostError("'!*' is not needed: whatever no rule allows is denied already")
        return Rule(True, "any", line=line)
    if body.startswith("*."):
        parent = body[2:]
        if not parent:
            raise HostError("'*.' must be followed by a domain, e.g. '*.example.com'")
        if "*" in parent:
            raise HostError(f"wildcard in {quoted(body)}: '*' may only appear as a leading '*.' or alone")
        return Rule(allow, "domain", parse_name(parent), line=line)
    if "*" in body:
        raise HostError(f"wildcard in {quoted(body)}: '*' may only appear as a leading '*.' or alone")
    if "://" in body:
        raise HostError(f"{quoted(body)} is a URL; write only its host, e.g. 'www.example.com'")
    if body.count(":") == 1:  # IPv6 needs at least two: this is a host with a port
        raise HostError(f"{quoted(body)} is not an IPv6 address, and rules have no port: write the host alone")
    if "/" in body:
        return Rule(allow, "network", network=_parse_network(body), line=line)
    if body.startswith("["):
        raise HostError(f"{quoted(body)}: write IPv6 addresses without brackets")
    if ":" in body:
        address = parse_ipv6(body)
        if address.ipv4_mapped is not None:
            raise HostError(f"{body} is an IPv4-mapped IPv6 address; write it as IPv4: {address.ipv4_mapped}")
        return Rule(allow, "network", network=IPv6Network(address), line=line)
    if DOTTED_QUAD.fullmatch(body):
        return Rule(allow, "network", network=IPv4Network(body), line=line)
    return Rule(allow, "host", parse_name(body), line=line)


def _parse_network(body: str) -> Network:
    address_text, _, prefix_text = body.partition("/")
    address: Address
    if ":" in address_text:
        address = parse_ipv6(address_text)
    elif DOTTED_QUAD.fullmatch(address_text):
        address = IPv4Address(address_text)
    else:
        raise HostError(f"{quoted(address_text)} in {quoted(body)} is not an IPv4 or IPv6 address"
                        + ipv4_hint(address_text))
    limit = address.max_prefixlen
    if not _PREFIX.fullmatch(prefix_text):
        raise HostError(f"{quoted(prefix_text)} in {quoted(body)} is not a prefix length (0-{limit})")
    prefix = int(prefix_text)
    if prefix > limit:
        raise HostError(f"prefix length /{prefix} in {quoted(body)} is out of range for IPv{address.version} "
                        f"(0-{limit})")
    network = ip_network((address, prefix), strict=False)
    if network.network_address != address:
        raise HostError(f"{address}/{prefix} has host bits set; did you mean {network}?")
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        ipv4 = IPv4Network((mapped, prefix - 96))
        raise HostError(f"{quoted(body)} is IPv4-mapped IPv6; write it as IPv4: {ipv4}")
    return network


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
