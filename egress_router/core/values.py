"""Parsers of single values: IPv4 and IPv6 addresses, ports, interface names, counts, seconds, flags (pure).

Each takes the text as the environment holds it and the variable's name, and returns the value or
raises ConfigError naming the variable and the text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from ipaddress import AddressValueError, IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .errors import ConfigError

_DIGITS = re.compile(r"[0-9]+")
_BROADCAST = IPv4Address("255.255.255.255")
_IFNAME_BAD = re.compile(r"[/:\s]")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
MAX_WORKERS = 256
# 'auto' stops here: four workers carry ~70k requests/s, more than an egress router for a handful of services
# needs, while one per CPU of a 64-CPU node without a CPU limit would cost ~2 GiB. A number asks for more.
AUTO_WORKERS_CAP = 4


def parse_ipv4(value: str, variable: str, *, line: int | None = None, text: str | None = None,
               what: str = "an IPv4 address") -> IPv4Address:
    """Parse a dotted-quad IPv4 address, rejecting ones that can never be a useful endpoint."""
    address = _ipv4(value)
    if address is None:
        raise ConfigError(variable, f"{value!r} is not {what}", line=line, text=text)
    problem = unusable_reason(address)
    if problem:
        raise ConfigError(variable, f"{value} is {problem}", line=line, text=text)
    return address


@lru_cache(maxsize=4096)
def _ipv4(value: str) -> IPv4Address | None:
    """Long rule lists repeat a few destinations: parse each spelling once."""
    try:
        return IPv4Address(value)
    except (AddressValueError, ValueError):
        return None


def unusable_reason(address: IPv4Address) -> str | None:
    """Why `address` cannot be a host on the network, or None if it can."""
    if address.is_unspecified:
        return "the unspecified address"
    if address == _BROADCAST:
        return "the broadcast address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_multicast:
        return "a multicast address"
    return None


def looks_ipv6(value: str) -> bool:
    """Whether a field is meant as an IPv6 address (two colons at least; '10.0.0.1:80' is not)."""
    return value.count(":") >= 2


def parse_ip(value: str, variable: str, *, line: int | None = None, text: str | None = None,
             what: str | None = None, link_local: bool = False) -> IPv4Address | IPv6Address:
    """An IPv4 or an IPv6 address, told apart by their spelling (see parse_ipv4 and parse_ipv6)."""
    if looks_ipv6(value):
        return parse_ipv6(value, variable, line=line, text=text, what=what or "an IPv6 address",
                          link_local=link_local)
    return parse_ipv4(value, variable, line=line, text=text, what=what or "an IPv4 address")


def parse_ipv6(value: str, variable: str, *, line: int | None = None, text: str | None = None,
               what: str = "an IPv6 address", link_local: bool = False) -> IPv6Address:
    """Parse an IPv6 address, rejecting ones that can never be a useful endpoint; a link-local one only
    where `link_local` (a gateway: it is on the egress interface, so it needs no zone)."""
    if "%" in value:
        raise ConfigError(variable, f"{value!r} has a zone index: leave it out (the egress interface is the zone)",
                          line=line, text=text)
    address = _ipv6(value)
    if address is None:
        raise ConfigError(variable, f"{value!r} is not {what}", line=line, text=text)
    problem = unusable_reason6(address, link_local=link_local)
    if problem:
        raise ConfigError(variable, f"{value} is {problem}", line=line, text=text)
    return address


@lru_cache(maxsize=4096)
def _ipv6(value: str) -> IPv6Address | None:
    try:
        return IPv6Address(value)
    except (AddressValueError, ValueError):
        return None


def unusable_reason6(address: IPv6Address, *, link_local: bool = False) -> str | None:
    """Why `address` cannot be an IPv6 host on the network (here), or None if it can."""
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "the loopback address"
    if address.is_multicast:
        return "a multicast address"
    if address.ipv4_mapped is not None:
        return f"an IPv4-mapped address: write it as {address.ipv4_mapped}"
    if address.is_link_local and not link_local:
        return "a link-local address, which is never routed: give a global or unique local address"
    return None


def parse_port(value: str, variable: str, *, line: int, text: str, what: str) -> int:
    """A port field of a rule line (1-65535)."""
    if len(value) > 5 or not _DIGITS.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise ConfigError(variable, f"{what} {value!r} is not a port number (1-65535)", line=line, text=text)
    return int(value)


def check_ifname(variable: str, name: str, *, wildcard: bool) -> None:
    """Reject names the kernel (or iptables, for `wildcard` names ending in '+') would refuse."""
    bare = name[:-1] if wildcard and name.endswith("+") else name
    if len(name) > 15 or not bare or bare in (".", "..") or _IFNAME_BAD.search(bare) or "+" in bare:
        raise ConfigError(variable, f"{name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")


def interface_name(value: str, variable: str) -> str:
    """An interface name (no iptables wildcard)."""
    name = value.strip()
    check_ifname(variable, name, wildcard=False)
    return name


def interface_pattern(value: str, variable: str) -> str:
    """An interface name, or an iptables wildcard such as 'veth+'."""
    name = value.strip()
    check_ifname(variable, name, wildcard=True)
    return name


def ip_networks(value: str, variable: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Networks separated by spaces or commas, e.g. '10.128.0.0/14, fd02::/112' (a lone address is a /32 or
    a /128)."""
    networks: list[IPv4Network | IPv6Network] = []
    for text in re.split(r"[\s,]+", value.strip()):
        if not text:
            continue
        kind: type[IPv4Network] | type[IPv6Network] = IPv6Network if looks_ipv6(text) else IPv4Network
        family = "IPv6" if kind is IPv6Network else "IPv4"
        try:
            network: IPv4Network | IPv6Network = kind(text)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                wider = kind(text, strict=False)
                raise ConfigError(variable, f"{text!r} has host bits set; did you mean {wider}?") from None
            raise ConfigError(variable, f"{text!r} is not an {family} network (address/prefix)") from None
        if network.prefixlen == 0:
            raise ConfigError(variable, f"{text!r} is every address: the default route is what the router "
                              "replaces; list the cluster's own networks")
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def whole_number(low: int, high: int) -> _Number:
    """A parser of whole numbers from `low` to `high`."""
    return _Number(low, high)


class _Number:
    __slots__ = ("low", "high")

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def __call__(self, value: str, variable: str) -> int:
        text = value.strip()
        if not re.fullmatch(r"[0-9]{1,9}", text) or not self.low <= int(text) <= self.high:
            raise ConfigError(variable, f"{text!r} is not a whole number from {self.low} to {self.high}")
        return int(text)


def port_or_off(value: str, variable: str) -> int:
    """A TCP port, or 0 for 'off' (or '0'): the admin port turned off."""
    text = value.strip()
    if text.lower() in ("off", "0"):
        return 0
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ConfigError(variable, f"{text!r} is neither a port from 1 to 65535 nor 'off'")
    return int(text)


def seconds(minimum: float = 0.001) -> _Seconds:
    """A parser of a number of seconds, at least `minimum`."""
    return _Seconds(minimum)


class _Seconds:
    __slots__ = ("minimum",)

    def __init__(self, minimum: float):
        self.minimum = minimum

    def __call__(self, value: str, variable: str) -> float:
        text = value.strip()
        if not re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,6})?", text) or float(text) < self.minimum:
            raise ConfigError(variable, f"{text!r} is not a number of seconds (at least {self.minimum:g})")
        return float(text)


def flag(value: str, variable: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(variable, f"{text!r} is not one of 1, 0, true, false, yes, no, on, off")


def worker_count(value: str, variable: str) -> int | None:
    """A number of processes, or None for 'auto' (one per CPU available, decided where the proxy runs)."""
    text = value.strip()
    if text.lower() == "auto":
        return None
    if not re.fullmatch(r"[0-9]{1,3}", text) or not 1 <= int(text) <= MAX_WORKERS:
        raise ConfigError(variable, f"{text!r} is neither a whole number from 1 to {MAX_WORKERS} nor 'auto'")
    return int(text)


def one_of(choices: tuple[str, ...]) -> _Choice:
    """A parser that accepts one of `choices` (exactly as written)."""
    return _Choice(choices)


class _Choice:
    __slots__ = ("choices",)

    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def __call__(self, value: str, variable: str) -> str:
        text = value.strip()
        if text not in self.choices:
            raise ConfigError(variable, f"{text!r} is not one of {', '.join(self.choices)}")
        return text


def non_empty(value: str, variable: str) -> bool:
    """EGRESS_ROUTER_DEBUG: any non-empty value turns it on."""
    return bool(value)


def text(value: str, variable: str) -> str:
    """The text as given (multiline grammars are parsed where their rules are needed)."""
    return value


def path(value: str, variable: str) -> str:
    """A file path (relative ones are taken from the working directory)."""
    stripped = value.strip()
    if "\0" in stripped or "\n" in stripped:
        raise ConfigError(variable, f"{stripped!r} is not a file path")
    return stripped
