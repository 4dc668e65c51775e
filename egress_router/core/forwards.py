"""The EGRESS_DNS_PROXY_DESTINATION grammar: listening ports and the hosts they forward to (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from .errors import ConfigError
from .hosts import HostError, normalize_host
from .lines import FIELD_SEPARATOR, rule_lines
from .values import parse_port

VARIABLE = "EGRESS_DNS_PROXY_DESTINATION"

GRAMMAR_HELP = """\
One rule per line:
  <port> <host>                listen on TCP <port>, forward to <host> on the same port
  <port> <host> <remote_port>  ... to <remote_port> instead
<host> is an IPv4 address, an IPv6 address or a DNS name (re-resolved as its TTL says; every
address in the answer is a backend). Each port once; blank lines and # comments are ignored."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Connections to local `port` are relayed to `host`:`remote_port`."""

    port: int
    host: str | IPv4Address | IPv6Address  # a name (lower case, no trailing dot) or an address
    remote_port: int
    line: int = field(default=0, compare=False)

    @property
    def is_name(self) -> bool:
        return isinstance(self.host, str)

    def target(self) -> str:
        host = f"[{self.host}]" if isinstance(self.host, IPv6Address) else str(self.host)
        return f"{host}:{self.remote_port}"


def parse_dns_destinations(text: str, variable: str = VARIABLE) -> tuple[Forward, ...]:
    """Parse the grammar (see GRAMMAR_HELP); raise ConfigError on the first bad line."""
    forwards: list[Forward] = []
    seen: dict[int, int] = {}
    for number, content, shown in rule_lines(text):
        fields = FIELD_SEPARATOR.split(content)
        if len(fields) not in (2, 3):
            raise ConfigError(variable, f"expected '<port> <host> [<remote_port>]', got {len(fields)} field(s)",
                              line=number, text=shown)
        port = parse_port(fields[0], variable, line=number, text=shown, what="port")
        try:
            host = normalize_host(fields[1])
        except HostError as exc:
            raise ConfigError(variable, f"{fields[1]!r} is not an IP address or host name: {exc}",
                              line=number, text=shown) from None
        if not isinstance(host, str) and (host.is_unspecified or host.is_multicast):
            raise ConfigError(variable, f"{fields[1]} cannot be connected to", line=number, text=shown)
        remote = port
        if len(fields) == 3:
            remote = parse_port(fields[2], variable, line=number, text=shown, what="remote port")
        if port in seen:
            raise ConfigError(variable, f"port {port} is already forwarded on line {seen[port]}", line=number,
                              text=shown)
        seen[port] = number
        forwards.append(Forward(port, host, remote, line=number))
    if not forwards:
        raise ConfigError(variable, "no rules: give at least one '<port> <host> [<remote_port>]' line")
    return tuple(forwards)


def format_dns_destinations(forwards: tuple[Forward, ...]) -> str:
    """The canonical text of `forwards` (parse(format(f)) == f)."""
    lines = []
    for forward in forwards:
        remote = "" if forward.remote_port == forward.port else f" {forward.remote_port}"
        lines.append(f"{forward.port} {forward.host}{remote}")
    return "\n".join(lines)

