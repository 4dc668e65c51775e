"""The EGRESS_DESTINATION grammar: parse it into rules and format rules back into it (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from .errors import ConfigError
from .lines import FIELD_SEPARATOR, rule_lines
from .values import parse_ip, parse_port

PROTOCOLS = ("tcp", "udp", "sctp")
FAMILIES = (4, 6)
Address = IPv4Address | IPv6Address

GRAMMAR_HELP = """\
One rule per line:
  <port> <proto> <ip>                connections to local <port> go to <ip>, same port
  <port> <proto> <ip> <remote_port>  ... to <remote_port> instead
  <ip>                               the fallback: every other port goes to <ip>
                                     (optional; after all port rules; one per family)
<ip> is IPv4 or IPv6 (IPv6 needs an IPv6 EGRESS_SOURCE). <proto> is tcp, udp or sctp (any
case). Ports are 1-65535; a port may appear once per protocol and family. Blank lines and
# comments are ignored; fields are separated by spaces or tabs."""


@dataclass(frozen=True, slots=True)
class PortRule:
    """Connections to local `port`/`proto` are redirected to `ip`:`remote_port` (same port if None)."""

    port: int
    proto: str
    ip: Address
    remote_port: int | None = None
    line: int = field(default=0, compare=False)

    @property
    def target_port(self) -> int:
        return self.port if self.remote_port is None else self.remote_port

    @property
    def target(self) -> str:
        """The DNAT target as iptables writes it: 'ip', 'ip:port', '[ipv6]:port'."""
        if self.remote_port is None:
            return str(self.ip)
        return f"[{self.ip}]:{self.remote_port}" if self.ip.version == 6 else f"{self.ip}:{self.remote_port}"


@dataclass(frozen=True, slots=True)
class Destinations:
    """The parsed EGRESS_DESTINATION: port rules in order, then an optional fallback address per family."""

    rules: tuple[PortRule, ...] = ()
    fallback: IPv4Address | None = None
    fallback6: IPv6Address | None = None

    def __len__(self) -> int:
        return len(self.rules) + (self.fallback is not None) + (self.fallback6 is not None)

    @property
    def versions(self) -> tuple[int, ...]:
        """The address families the rules send to (4, 6 or both)."""
        found: set[int] = {rule.ip.version for rule in self.rules}
        found.update(version for version, address in ((4, self.fallback), (6, self.fallback6)) if address)
        return tuple(sorted(found))

    def family(self, version: int) -> Destinations:
        """The rules of one address family (what one of iptables and ip6tables holds)."""
        return Destinations(tuple(rule for rule in self.rules if rule.ip.version == version),
                            self.fallback if version == 4 else None, self.fallback6 if version == 6 else None)

    @property
    def fallbacks(self) -> tuple[Address, ...]:
        return tuple(address for address in (self.fallback, self.fallback6) if address is not None)

    def targets(self) -> dict[tuple[str, int], tuple[Address, int]]:
        """(proto, router port) -> (address, port) each rule of one family's part (see `family`) redirects to
        (the fallback: see `target`)."""
        return {(rule.proto, rule.port): (rule.ip, rule.target_port) for rule in self.rules}

    def target(self, proto: str, port: int, targets: dict[tuple[str, int], tuple[Address, int]] | None = None
               ) -> tuple[Address, int] | None:
        """Where a connection to the router's `port`/`proto` goes, in one family's part (see `family`): its
        rule's target, else the fallback's same port, else nowhere (None). Pass `targets()` when asking many
        times."""
        found = (self.targets() if targets is None else targets).get((proto, port))
        if found is not None:
            return found
        fallback = self.fallback if self.fallback is not None else self.fallback6
        return None if fallback is None else (fallback, port)


def parse_destinations(text: str, variable: str = "EGRESS_DESTINATION", families: tuple[int, ...] = FAMILIES,
                       sources: str = "") -> Destinations:
    """Parse the multiline destination grammar (see GRAMMAR_HELP); raise ConfigError on the first bad line.

    `families`: the address families EGRESS_SOURCE configures (a rule to another family is an error;
    `sources` says what is configured, in that error)."""
    rules: list[PortRule] = []
    seen: dict[tuple[int, str, int], int] = {}
    fallbacks: dict[int, tuple[Address, int]] = {}  # version -> (address, line)
    for number, content, shown in rule_lines(text):
        fields = FIELD_SEPARATOR.split(content)
        if len(fields) == 1:
            try:
                fallback = parse_ip(fields[0], variable, line=number, text=shown,
                                    what="an IP address (a lone value is the fallback address)")
            except ConfigError:
                if fallbacks:
                    raise follows_fallback(variable, fallbacks, number, shown) from None
                raise
            earlier = fallbacks.get(fallback.version)
            if earlier is not None:
                raise ConfigError(variable, f"a second IPv{fallback.version} fallback: the one on line {earlier[1]} "
                                  "is the fallback (one per family)", line=number, text=shown)
            check_family(fallback, families, variable, number, shown, sources)
            fallbacks[fallback.version] = (fallback, number)
            continue
        if fallbacks:
            raise follows_fallback(variable, fallbacks, number, shown)
        if len(fields) not in (3, 4):
            raise ConfigError(
                variable,
                f"expected '<port> <proto> <ip> [<remote_port>]' or a lone fallback IP, got {len(fields)} fields",
                line=number, text=shown)
        port = parse_port(fields[0], variable, line=number, text=shown, what="port")
        proto = fields[1].lower()
        if proto not in PROTOCOLS:
            raise ConfigError(variable, f"protocol {fields[1]!r} is not one of tcp, udp, sctp",
                              line=number, text=shown)
        ip = parse_ip(fields[2], variable, line=number, text=shown)
        remote_port = None
        if len(fields) == 4:
            remote_port = parse_port(fields[3], variable, line=number, text=shown, what="remote port")
        key = (port, proto, ip.version)
        earlier_line = seen.get(key)
        if earlier_line is not None:
            family = "IPv6 " if ip.version == 6 else ""
            raise ConfigError(variable, f"{family}{proto} port {port} is already redirected on line {earlier_line}",
                              line=number, text=shown)
        check_family(ip, families, variable, number, shown, sources)
        seen[key] = number
        rules.append(PortRule(port, proto, ip, remote_port, line=number))
    if not rules and not fallbacks:
        raise ConfigError(variable, "no rules: give at least one '<port> <proto> <ip>' line or a fallback IP")
    v4 = next((a for a, _ in fallbacks.values() if isinstance(a, IPv4Address)), None)
    v6 = next((a for a, _ in fallbacks.values() if isinstance(a, IPv6Address)), None)
    return Destinations(tuple(rules), v4, v6)


def follows_fallback(variable: str, fallbacks: dict[int, tuple[Address, int]], line: int, text: str) -> ConfigError:
    first = min(number for _, number in fallbacks.values())
    return ConfigError(variable, f"nothing but the other family's fallback may follow the fallback address on line "
                       f"{first}; port rules come first", line=line, text=text)


def check_family(ip: Address, families: tuple[int, ...], variable: str, line: int, text: str, sources: str) -> None:
    if ip.version not in families:
        configured = f" (it is {sources})" if sources else ""
        raise ConfigError(variable, f"{ip} is an IPv{ip.version} destination, but EGRESS_SOURCE has no IPv{ip.version} "
                          f"address{configured}", line=line, text=text)


def format_destinations(destinations: Destinations) -> str:
    """The canonical text of `destinations` in the same grammar (parse(format(d)) == d)."""
    lines = []
    for rule in destinations.rules:
        remote = "" if rule.remote_port is None else f" {rule.remote_port}"
        lines.append(f"{rule.port} {rule.proto} {rule.ip}{remote}")
    lines += [str(address) for address in destinations.fallbacks]
    return "\n".join(lines)
