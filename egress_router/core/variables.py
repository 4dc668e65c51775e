"""The one registry of EGRESS_* variables: name, default, meaning, modes and parser of each (pure).

Everything that knows a variable reads it from here: the loaders (core.config), `--help`, the CLI's
options (their envvar, metavar and shown default), `egress-router variables`, the README's table
(kept equal to it by a test) and the did-you-mean hint for unknown names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Generic, TypeVar

from . import values
from .errors import ConfigError

T = TypeVar("T")

MODES = ("init", "legacy", "unit-test", "http-proxy", "dns-proxy")
DEFAULT_MODE = "legacy"
NAT_MODES = ("init", "legacy", "unit-test")
PROXY_MODES = ("http-proxy", "dns-proxy")
DEFAULT_INTERFACE = "macvlan0"
DEFAULT_POD_INTERFACE = "eth0"
IPTABLES_CHOICES = ("nft", "legacy", "auto")
LOG_FORMATS = ("text", "json")
DEFAULT_IPTABLES = "nft"
DEFAULT_METRICS_PORT = 9253  # the admin port of the proxies (legacy mode: off unless set)
STAYS_UP = ("legacy", "http-proxy", "dns-proxy")
NETWORK_NOTE = "all that configure the network (proxy modes: when EGRESS_SOURCE is set)"


@dataclass(frozen=True, slots=True)
class Variable(Generic[T]):
    """One environment variable. `parse(text, name)` turns its text into a value or raises ConfigError."""

    name: str
    default: T
    shown_default: str
    meaning: str
    modes: tuple[str, ...]
    parse: Callable[[str, str], T]
    metavar: str = "TEXT"
    modes_note: str = ""  # shown instead of the list of modes where it says more
    choices: tuple[str, ...] = ()  # the values it takes, where it is one of a few (completion, --help)

    def is_set(self, env: Mapping[str, str]) -> bool:
        return bool(env.get(self.name, "").strip())

    def read(self, env: Mapping[str, str]) -> T:
        """The parsed value, or the default when the variable is unset or blank."""
        raw = env.get(self.name, "")
        return self.parse(raw, self.name) if raw.strip() else self.default

    def require(self, env: Mapping[str, str]) -> T:
        """The parsed value; unset or blank is an error."""
        if not self.is_set(env):
            raise ConfigError(self.name, "is not set" if self.name not in env else "is empty")
        return self.parse(env[self.name], self.name)

    def shown_modes(self) -> str:
        if self.modes_note:
            return self.modes_note
        return "all" if self.modes == MODES else ", ".join(self.modes)


def _workers(variable: str, mode: str, serving: str, auto: bool) -> Variable[int | None]:
    # 'auto' (one per CPU available, at most values.AUTO_WORKERS_CAP) is the DNS proxy's default: its targets
    # are set against haproxy's default of one thread per CPU. The HTTP proxy keeps one process: a proxy for a
    # handful of external services rarely needs more than the ~18k requests/s one process serves, and each
    # worker costs ~20-30 MiB.
    meaning = (f"processes serving the {serving}; 'auto': one per CPU available (cgroup quota respected), at most "
               f"{values.AUTO_WORKERS_CAP}; each costs ~20-30 MiB")
    return Variable(variable, None if auto else 1, "auto" if auto else "1", meaning, (mode,), values.worker_count,
                    "N|auto")


SOURCE: Variable[str] = Variable(
    "EGRESS_SOURCE", "", "(required)", "reserved source address, optionally with /prefix: IPv4, IPv6, or one of "
    "each separated by a comma (dual-stack); a proxy-only container may leave it and EGRESS_GATEWAY unset", MODES,
    values.text, "ADDRESS[/PREFIX][,ADDRESS6[/PREFIX]]", NETWORK_NOTE)
GATEWAY: Variable[str] = Variable(
    "EGRESS_GATEWAY", "", "(required)", "the LAN gateway, one per family of EGRESS_SOURCE (comma-separated; an "
    "IPv6 one may be link-local, e.g. fe80::1)", MODES, values.text, "ADDRESS[,ADDRESS6]", NETWORK_NOTE)
DESTINATION: Variable[str] = Variable(
    "EGRESS_DESTINATION", "", "(required in init, legacy, unit-test)", "redirect rules, one per line",
    NAT_MODES, values.text, "RULES")
DESTINATION_FILE: Variable[str] = Variable(
    "EGRESS_DESTINATION_FILE", "", "(unset)", "a file holding the redirect rules instead (e.g. a mounted ConfigMap "
    "key); legacy mode reloads it when it changes", NAT_MODES, values.path, "PATH")
CONFIG_FILE: Variable[str] = Variable(
    "EGRESS_ROUTER_CONFIG_FILE", "", "(unset)", "a file holding an EgressRouter object "
    "(network.operator.openshift.io/v1, YAML or JSON) that supplies EGRESS_SOURCE, EGRESS_GATEWAY and "
    "EGRESS_DESTINATION instead; legacy mode reloads it when it changes", NAT_MODES, values.path, "PATH")
MODE: Variable[str] = Variable(
    "EGRESS_ROUTER_MODE", DEFAULT_MODE, DEFAULT_MODE, "one of " + ", ".join(MODES), MODES, values.one_of(MODES),
    "MODE", choices=MODES)
DEBUG: Variable[bool] = Variable(
    "EGRESS_ROUTER_DEBUG", False, "(empty)", "non-empty turns on debug logging", MODES, values.non_empty, "ANY")
LOG_FORMAT: Variable[str] = Variable(
    "EGRESS_LOG_FORMAT", "text", "text", "log lines on stderr: text, or json (one object per line: time, level, "
    "logger, message, fields; errors too)", MODES, values.one_of(LOG_FORMATS), "FORMAT", choices=LOG_FORMATS)
INTERFACE: Variable[str | None] = Variable(
    "EGRESS_INTERFACE", None, DEFAULT_INTERFACE, f"egress (macvlan) interface; if unset and {DEFAULT_INTERFACE} is "
    "missing, the only macvlan link is used", MODES, values.interface_name, "NAME", NETWORK_NOTE)
POD_INTERFACE: Variable[str] = Variable(
    "EGRESS_POD_INTERFACE", DEFAULT_POD_INTERFACE, DEFAULT_POD_INTERFACE, "cluster-side interface: its traffic "
    "is redirected, and what arrives on it leaves through it", MODES, values.interface_pattern, "NAME",
    NETWORK_NOTE)
IPTABLES: Variable[str] = Variable(
    "EGRESS_IPTABLES", DEFAULT_IPTABLES, DEFAULT_IPTABLES, "iptables backend for the NAT and connection-mark "
    "rules: nft (iptables-nft-save/-restore), legacy (iptables-legacy-*), or auto: the backend that already has "
    "rules in the pod's network namespace, else nft", MODES, values.one_of(IPTABLES_CHOICES), "BACKEND",
    NETWORK_NOTE, choices=IPTABLES_CHOICES)
DRIFT_SECONDS: Variable[float] = Variable(
    "EGRESS_ROUTER_DRIFT_SECONDS", 2.0, "2", "legacy mode: how often the live state is compared with the plan and "
    "repaired where it drifted (0: never)", ("legacy",), values.seconds(minimum=0.0), "SECONDS")
CLUSTER_CIDRS: Variable[tuple[IPv4Network | IPv6Network, ...]] = Variable(
    "EGRESS_CLUSTER_CIDRS", (), "(none)", "networks the router itself reaches through the pod interface, as it "
    "does the nameservers of /etc/resolv.conf (space- or comma-separated, e.g. the service network)", MODES,
    values.ip_networks, "NETWORKS", NETWORK_NOTE)
METRICS_PORT: Variable[int | None] = Variable(
    "EGRESS_METRICS_PORT", None, f"{DEFAULT_METRICS_PORT} (legacy: off)", "the admin port: /healthz, /ready and "
    "/metrics (Prometheus) over HTTP on every address; off (or 0): none. In http-proxy mode /metrics is then "
    "served here only, not on the proxy port", STAYS_UP, values.port_or_off, "PORT|off")
HA_PEERS: Variable[str] = Variable(
    "EGRESS_HA_PEERS", "", "(unset: one replica)", "high availability: the replicas of this router, as a headless "
    "Service name (re-resolved) or their pod addresses (space- or comma-separated; this replica's own may be "
    "among them); set: exactly one replica holds EGRESS_SOURCE, elected with keepalived (VRRP) over the pod "
    "network", STAYS_UP, values.text, "NAME|ADDRESSES")
HA_VRID: Variable[int] = Variable(
    "EGRESS_HA_VRID", 51, "51", "high availability: the VRRP virtual router id of these replicas (1-255; the same "
    "on all of them, another for each group of routers whose pod networks meet)", STAYS_UP,
    values.whole_number(1, 255), "N")
HA_ADVERT_SECONDS: Variable[float] = Variable(
    "EGRESS_HA_ADVERT_SECONDS", 0.2, "0.2", "high availability: seconds between the active replica's VRRP "
    "adverts; a standby takes over about 3 of them after the last one (0.01-40)", STAYS_UP,
    values.seconds(minimum=0.01), "SECONDS")
HA_STATE_DIR: Variable[str] = Variable(
    "EGRESS_HA_STATE_DIR", "/run/egress-router", "/run/egress-router", "high availability: a writable directory "
    "for keepalived's configuration and the replica's state (`egress-router ready` reads it; an emptyDir with a "
    "read-only root filesystem)", STAYS_UP, values.path, "PATH")

HTTP_DESTINATION: Variable[str] = Variable(
    "EGRESS_HTTP_PROXY_DESTINATION", "", "(unset)", "allow list of the HTTP proxy; set: run the proxy",
    ("http-proxy",), values.text, "RULES")
HTTP_DESTINATION_FILE: Variable[str] = Variable(
    "EGRESS_HTTP_PROXY_DESTINATION_FILE", "", "(unset)", "a file holding the allow list instead; set: run the "
    "proxy, which reloads the file when it changes", ("http-proxy",), values.path, "PATH")
HTTP_PORT: Variable[int] = Variable(
    "EGRESS_HTTP_PROXY_PORT", 8080, "8080", "port the HTTP proxy listens on (IPv4 and IPv6)", ("http-proxy",),
    values.whole_number(1, 65535), "PORT")
HTTP_WORKERS = _workers("EGRESS_HTTP_PROXY_WORKERS", "http-proxy", "port", auto=False)


def access_log(value: str, variable: str) -> str:
    """'' (off), 'text' (1, true, ...: the router's own line) or 'squid' (squid's native access.log line)."""
    if value.strip().lower() == "squid":
        return "squid"
    try:
        return "text" if values.flag(value, variable) else ""
    except ConfigError:
        raise ConfigError(variable, f"{value.strip()!r} is not one of 1, 0, true, false, yes, no, on, off, "
                          "squid") from None


HTTP_ACCESS_LOG: Variable[str] = Variable(
    "EGRESS_HTTP_PROXY_ACCESS_LOG", "", "(off)", "1: one log line per request or tunnel; squid: that line in "
    "squid's native access.log format (time elapsed client code/status bytes method URL - hierarchy/peer type)",
    ("http-proxy",), access_log, "BOOL|squid")
HTTP_CONNECT_TIMEOUT: Variable[float] = Variable(
    "EGRESS_HTTP_PROXY_CONNECT_TIMEOUT", 10.0, "10", "seconds to connect upstream before answering 504",
    ("http-proxy",), values.seconds(), "SECONDS")
HTTP_MAX_CONNECTIONS: Variable[int] = Variable(
    "EGRESS_HTTP_PROXY_MAX_CONNECTIONS", 10_000, "10000", "concurrent client connections, over all workers",
    ("http-proxy",), values.whole_number(1, 10_000_000), "N")
HTTP_IDLE_TIMEOUT: Variable[float] = Variable(
    "EGRESS_HTTP_PROXY_IDLE_TIMEOUT", 120.0, "120", "seconds an idle keep-alive client connection is kept",
    ("http-proxy",), values.seconds(), "SECONDS")
HTTP_TUNNEL_IDLE_TIMEOUT: Variable[float] = Variable(
    "EGRESS_HTTP_PROXY_TUNNEL_IDLE_TIMEOUT", 900.0, "900", "seconds a tunnel or response may stall before it is "
    "closed (a request with no response yet: answered 504)", ("http-proxy",), values.seconds(), "SECONDS")
GRACE: Variable[float] = Variable(
    "EGRESS_PROXY_GRACE_SECONDS", 10.0, "10", "on SIGTERM, how long open requests and tunnels may finish",
    PROXY_MODES, values.seconds(minimum=0.0), "SECONDS")

DNS_DESTINATION: Variable[str] = Variable(
    "EGRESS_DNS_PROXY_DESTINATION", "", "(unset)", "TCP forwards, one per line: port host [remote_port]; "
    "set: run the proxy", ("dns-proxy",), values.text, "RULES")
DNS_DESTINATION_FILE: Variable[str] = Variable(
    "EGRESS_DNS_PROXY_DESTINATION_FILE", "", "(unset)", "a file holding the forwards instead; set: run the "
    "proxy, which reloads the file when it changes", ("dns-proxy",), values.path, "PATH")
DNS_DEBUG: Variable[bool] = Variable(
    "EGRESS_DNS_PROXY_DEBUG", False, "(off)", "1: one log line per connection", ("dns-proxy",), values.flag, "BOOL")
DNS_WORKERS = _workers("EGRESS_DNS_PROXY_WORKERS", "dns-proxy", "ports", auto=True)
DNS_CONNECT_TIMEOUT: Variable[float] = Variable(
    "EGRESS_DNS_PROXY_CONNECT_TIMEOUT", 10.0, "10", "seconds to connect to a backend", ("dns-proxy",),
    values.seconds(), "SECONDS")
DNS_IDLE_TIMEOUT: Variable[float] = Variable(
    "EGRESS_DNS_PROXY_IDLE_TIMEOUT", 60.0, "60", "seconds a connection may carry no data before it is closed",
    ("dns-proxy",), values.seconds(), "SECONDS")
DNS_MAX_CONNECTIONS: Variable[int] = Variable(
    "EGRESS_DNS_PROXY_MAX_CONNECTIONS", 10_000, "10000", "concurrent client connections, over all workers",
    ("dns-proxy",), values.whole_number(1, 10_000_000), "N")
DNS_TTL_MIN: Variable[float] = Variable(
    "EGRESS_DNS_PROXY_TTL_MIN", 1.0, "1", "shortest time a DNS answer is used (seconds)", ("dns-proxy",),
    values.seconds(minimum=0.0), "SECONDS")
DNS_TTL_MAX: Variable[float] = Variable(
    "EGRESS_DNS_PROXY_TTL_MAX", 30.0, "30", "longest time a DNS answer is used (seconds)", ("dns-proxy",),
    values.seconds(minimum=0.0), "SECONDS")

# In the order --help, `egress-router variables` and the README show them.
VARIABLES: Mapping[str, Variable[Any]] = {variable.name: variable for variable in (
    SOURCE, GATEWAY, DESTINATION, DESTINATION_FILE, CONFIG_FILE, MODE, DEBUG, LOG_FORMAT, INTERFACE, POD_INTERFACE,
    IPTABLES, CLUSTER_CIDRS, DRIFT_SECONDS, METRICS_PORT, HA_PEERS, HA_VRID, HA_ADVERT_SECONDS,
    HA_STATE_DIR,
    HTTP_DESTINATION, HTTP_DESTINATION_FILE, HTTP_PORT, HTTP_WORKERS, HTTP_ACCESS_LOG, HTTP_CONNECT_TIMEOUT,
    HTTP_MAX_CONNECTIONS, HTTP_IDLE_TIMEOUT, HTTP_TUNNEL_IDLE_TIMEOUT, GRACE,
    DNS_DESTINATION, DNS_DESTINATION_FILE, DNS_DEBUG, DNS_WORKERS, DNS_CONNECT_TIMEOUT, DNS_IDLE_TIMEOUT,
    DNS_MAX_CONNECTIONS, DNS_TTL_MIN, DNS_TTL_MAX,
)}

# Each multiline grammar and the variable naming a file that may hold it instead (one of the two, not both).
RULE_FILES: Mapping[str, Variable[str]] = {
    DESTINATION.name: DESTINATION_FILE,
    HTTP_DESTINATION.name: HTTP_DESTINATION_FILE,
    DNS_DESTINATION.name: DNS_DESTINATION_FILE,
}


def unknown_variable_warnings(env: Mapping[str, str]) -> tuple[str, ...]:
    """Warn about EGRESS_* variables we do not know: usually a typo that would otherwise be silently ignored."""
    unknown = sorted(name for name in env if name.startswith("EGRESS_") and name not in VARIABLES)
    if not unknown:
        return ()
    import difflib  # only on this rare path: it costs start-up time every init container pays

    warnings = []
    for name in unknown:
        close = difflib.get_close_matches(name, VARIABLES, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"{name} is not a variable egress-router knows; it is ignored{hint}")
    return tuple(warnings)
