"""The EGRESS_DESTINATION grammar: parse it into rules and format rules back into it (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from .errors import ConfigError
from .lines import FIELD_SEPARATOR, rule_lines
from .values import parse_ipv4, parse_port

PROTOCOLS = ("tcp", "udp", "sctp")

GRAMMAR_HELP = """\
One rule per line:
  <port> <proto> <ip>                connections to local <port> go to <ip>, same port
  <port> <proto> <ip> <remote_port>  ... to <remote_port> instead
  <ip>                               the fallback: every other port goes to <ip>
                                     (optional; must be the last rule)
<proto> is tcp, udp or sctp (any case). Ports are 1-65535; a port may appear once per
protocol. Blank lines and # comments are ignored; fields are separated by spaces or tabs."""


@dataclass(frozen=True, slots=True)
class PortRule:
    """Connections to local `port`/`proto` are redirected to `ip`:`remote_port` (same port if None)."""

    port: int
    proto: str
    ip: IPv4Address
    remote_port: int | None = None
    line: int = field(default=0, compare=False)

    @property
    def target_port(self) -> int:
        return self.port if self.remote_port is None else self.remote_port


@dataclass(frozen=True, slots=True)
class Destinations:
    """The parsed EGRESS_DESTINATION: port rules in order, then an optional fallback address."""

    rules: tuple[PortRule, ...] = ()
    fallback: IPv4Address | None = None

    def __len__(self) -> int:
        return len(self.rules) + (self.fallback is not None)

    def targets(self) -> dict[tuple[str, int], tuple[IPv4Address, int]]:
        """(proto, router port) -> (address, port) each rule redirects to (the fallback: see `target`)."""
        return {(rule.proto, rule.port): (rule.ip, rule.target_port) for rule in self.rules}

    def target(self, proto: str, port: int, targets: dict[tuple[str, int], tuple[IPv4Address, int]] | None = None
               ) -> tuple[IPv4Address, int] | None:
        """Where a connection to the router's `port`/`proto` goes: its rule's target, else the fallback's
        same port, else nowhere (None). Pass `targets()` when asking many times."""
        found = (self.targets() if targets is None else targets).get((proto, port))
        if found is not None:
            return found
        return None if self.fallback is None else (self.fallback, port)


def parse_destinations(text: str, variable: str = "EGRESS_DESTINATION") -> Destinations:
    """Parse the multiline destination grammar (see GRAMMAR_HELP); raise ConfigError on the first bad line."""
    rules: list[PortRule] = []
    seen: dict[tuple[int, str], int] = {}
    fallback: IPv4Address | None = None
    fallback_line = 0
    for number, content, shown in rule_lines(text):
        fields = FIELD_SEPARATOR.split(content)
        if fallback is not None:
            raise ConfigError(
                variable,
                f"nothing may follow the fallback address on line {fallback_line}; it must be the last rule",
                line=number, text=shown)
        if len(fields) == 1:
            fallback = parse_ipv4(fields[0], variable, line=number, text=shown,
                                  what="an IPv4 address (a lone value is the fallback address)")
            fallback_line = number
            continue
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
        ip = parse_ipv4(fields[2], variable, line=number, text=shown)
        remote_port = None
        if len(fields) == 4:
            remote_port = parse_port(fields[3], variable, line=number, text=shown, what="remote port")
        earlier = seen.get((port, proto))
        if earlier is not None:
            raise ConfigError(variable, f"{proto} port {port} is already redirected on line {earlier}",
                              line=number, text=shown)
        seen[(port, proto)] = number
        rules.append(PortRule(port, proto, ip, remote_port, line=number))
    if not rules and fallback is None:
        raise ConfigError(variable, "no rules: give at least one '<port> <proto> <ip>' line or a fallback IP")
    return Destinations(tuple(rules), fallback)


def format_destinations(destinations: Destinations) -> str:
    """The canonical text of `destinations` in the same grammar (parse(format(d)) == d)."""
    lines = []
    for rule in destinations.rules:
        remote = "" if rule.remote_port is None else f" {rule.remote_port}"
        lines.append(f"{rule.port} {rule.proto} {rule.ip}{remote}")
    if destinations.fallback is not None:
        lines.append(str(destinations.fallback))
    return "\n".join(lines)
