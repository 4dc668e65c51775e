"""The environment contract: EGRESS_* variables -> a validated, frozen RouterConfig (pure).

Every variable is read through its entry in core.variables; this module only adds what relates
several of them (the mode chosen from the proxy variables, the gateway checked against the source).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from types import MappingProxyType
from typing import Any

from . import variables as v
from .allowlist import AccessList, parse_access_list
from .errors import ConfigError
from .forwards import Forward, parse_dns_destinations
from .ha import HaSettings, check_advert, parse_peers
from .redirect import Destinations, parse_destinations
from .values import looks_ipv6, parse_ip
from .variables import DEFAULT_IPTABLES, DEFAULT_MODE, MODES, NAT_MODES, unknown_variable_warnings

__all__ = ["DEFAULT_MODE", "MODES", "NAT_MODES", "DnsProxySettings", "Egress", "HttpProxySettings", "RouterConfig",
           "load", "rule_files"]

NO_FILES: Mapping[str, str] = MappingProxyType({})
HEADER_LIMIT = 64 * 1024  # bytes of request line + headers
# between the two addresses of EGRESS_SOURCE / EGRESS_GATEWAY: a comma, or spaces not next to a '/'
# (so that '192.0.2.99/ 24' is one bad value, not two)
LIST_SEPARATOR = re.compile(r"\s*,\s*|(?<!/)\s+(?!/)")


@dataclass(frozen=True, slots=True)
class HttpProxySettings:
    """The HTTP proxy's allow list and limits (defaults: core.variables)."""

    acl: AccessList
    port: int
    workers: int | None  # None: one per CPU available to the process, at most 4 ('auto')
    access_log: str  # '' (off), 'text' or 'squid'
    connect_timeout: float
    max_connections: int
    idle_timeout: float
    tunnel_idle_timeout: float
    grace_seconds: float
    header_limit: int = HEADER_LIMIT
    metrics_port: int = 0  # the admin port (0: none, so /metrics is answered on the proxy port)


@dataclass(frozen=True, slots=True)
class DnsProxySettings:
    """The DNS-name based TCP proxy's forwards and limits (defaults: core.variables)."""

    forwards: tuple[Forward, ...]
    debug: bool
    workers: int | None  # None: one per CPU available to the process, at most 4 ('auto')
    connect_timeout: float
    idle_timeout: float
    max_connections: int
    ttl_min: float
    ttl_max: float
    grace_seconds: float
    tries: int = 3  # backends tried for one client connection
    metrics_port: int = 0  # the admin port (0: none)
    check_interval: float = 2.0  # seconds between active TCP checks of a failed backend (back at the first success)


@dataclass(frozen=True, slots=True)
class Egress:
    """One address family's way out: the reserved source (with its prefix) and the LAN gateway."""

    source: IPv4Interface | IPv6Interface
    has_prefix: bool  # False: EGRESS_SOURCE gave no prefix (a /32 or /128 host address)
    gateway: IPv4Address | IPv6Address

    @property
    def version(self) -> int:
        return self.source.version


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router was asked to do, validated."""

    mode: str
    egress: tuple[Egress, ...]  # one per family, IPv4 first; (): a proxy-only container, the network is untouched
    destinations: Destinations | None
    interface: str | None  # None: macvlan0, or the only macvlan link if macvlan0 is missing
    pod_interface: str
    debug: bool
    warnings: tuple[str, ...] = ()
    http_proxy: HttpProxySettings | None = None
    dns_proxy: DnsProxySettings | None = None
    iptables: str = DEFAULT_IPTABLES  # nft, legacy or auto (see net.iptables.find_tools)
    cluster_cidrs: tuple[IPv4Network | IPv6Network, ...] = ()  # reached through the pod interface (core.podnet)
    drift_seconds: float = 2.0  # legacy mode: seconds between drift checks (0: none)
    metrics_port: int = 0  # the admin port (/healthz, /ready, /metrics) of a mode that stays up; 0: none
    ha: HaSettings | None = None  # high availability (core.ha): None, one replica

    @property
    def configures_nat(self) -> bool:
        return self.mode in NAT_MODES

    @property
    def configures_network(self) -> bool:
        return bool(self.egress)

    def family(self, version: int) -> Egress | None:
        return next((egress for egress in self.egress if egress.version == version), None)

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(egress.version for egress in self.egress)

    @property
    def source(self) -> IPv4Interface | None:
        """The IPv4 source (None: no IPv4 egress)."""
        found = self.family(4)
        return found.source if found is not None else None  # type: ignore[return-value]

    @property
    def gateway(self) -> IPv4Address | None:
        found = self.family(4)
        return found.gateway if found is not None else None  # type: ignore[return-value]

    @property
    def source_has_prefix(self) -> bool:
        found = self.family(4)
        return found is not None and found.has_prefix

    @property
    def source6(self) -> IPv6Interface | None:
        """The IPv6 source (None: no IPv6 egress)."""
        found = self.family(6)
        return found.source if found is not None else None  # type: ignore[return-value]

    @property
    def gateway6(self) -> IPv6Address | None:
        found = self.family(6)
        return found.gateway if found is not None else None  # type: ignore[return-value]


def load(env: Mapping[str, str], files: Mapping[str, str] = NO_FILES) -> RouterConfig:
    """Validate the environment; raise ConfigError naming the first bad variable.

    `files` holds the content of every file rule_files(env) names (path -> text), read by the caller:
    the core reads nothing itself."""
    mode = select_mode(env)
    http_proxy = load_http_proxy(env, files) if given(env, v.HTTP_DESTINATION) else None
    dns_proxy = load_dns_proxy(env, files) if given(env, v.DNS_DESTINATION) else None
    egress: tuple[Egress, ...] = ()
    if (http_proxy or dns_proxy) is not None and not v.SOURCE.is_set(env):
        if v.GATEWAY.is_set(env):
            raise ConfigError(v.GATEWAY.name, "is set but EGRESS_SOURCE is not: set both to configure the "
                              "network before the proxy starts, or neither to run the proxy alone")
    else:
        sources = parse_sources(v.SOURCE.require(env))
        egress = parse_gateways(v.GATEWAY.require(env), sources)
    destinations = None
    admin_port = metrics_port(env, mode)
    if mode in NAT_MODES:
        shown = ", ".join(str(e.source.ip) for e in egress)
        text, where = rules(env, files, v.DESTINATION)
        destinations = parse_destinations(text, where, families=tuple(e.version for e in egress), sources=shown)
        check_admin_port(admin_port, destinations, where)
    interface = v.INTERFACE.read(env)
    pod_interface = v.POD_INTERFACE.read(env)
    if interface is not None and interface == pod_interface:
        raise ConfigError(v.POD_INTERFACE.name, f"{pod_interface!r} is also the egress interface (EGRESS_INTERFACE)")
    return RouterConfig(
        mode=mode,
        egress=egress,
        destinations=destinations,
        interface=interface,
        pod_interface=pod_interface,
        debug=v.DEBUG.read(env),
        warnings=unknown_variable_warnings(env) + unused_in_mode(env, mode),
        http_proxy=http_proxy,
        dns_proxy=dns_proxy,
        iptables=v.IPTABLES.read(env),
        cluster_cidrs=v.CLUSTER_CIDRS.read(env),
        drift_seconds=v.DRIFT_SECONDS.read(env),
        metrics_port=admin_port,
        ha=load_ha(env, mode, egress),
    )


def load_ha(env: Mapping[str, str], mode: str, egress: tuple[Egress, ...]) -> HaSettings | None:
    """EGRESS_HA_*: None unless EGRESS_HA_PEERS is set; only where the router stays up and owns the network."""
    if not v.HA_PEERS.is_set(env):
        return None
    if mode not in v.STAYS_UP:
        raise ConfigError(v.HA_PEERS.name, f"high availability needs a mode that stays up (legacy, http-proxy, "
                          f"dns-proxy), not {mode}: an init container exits and cannot hand the address over")
    if not egress:
        raise ConfigError(v.HA_PEERS.name, "high availability moves EGRESS_SOURCE between the replicas: set "
                          "EGRESS_SOURCE and EGRESS_GATEWAY in this container (the single-container layout)")
    addresses, service = parse_peers(v.HA_PEERS.read(env), v.HA_PEERS.name)
    advert = check_advert(v.HA_ADVERT_SECONDS.read(env), v.HA_ADVERT_SECONDS.name)
    return HaSettings(addresses, service, v.HA_VRID.read(env), advert, v.HA_STATE_DIR.read(env))


def check_admin_port(port: int, destinations: Destinations, where: str) -> None:
    """The admin port's TCP connections stay with the router (core.nat.admin_exemption): no rule may redirect it."""
    if clash := next((rule for rule in destinations.rules if rule.proto == "tcp" and rule.port == port), None):
        raise ConfigError(where, f"TCP port {port} is the admin port (EGRESS_METRICS_PORT), which stays with the "
                          "router: give the rule another port, or the admin port another number",
                          line=clash.line, text=f"{clash.port} tcp {clash.ip}" + (
                              f" {clash.remote_port}" if clash.remote_port is not None else ""))


def unused_in_mode(env: Mapping[str, str], mode: str) -> tuple[str, ...]:
    if v.METRICS_PORT.is_set(env) and mode not in v.STAYS_UP:
        return (f"EGRESS_METRICS_PORT has no effect in {mode} mode: the container exits once it is done",)
    return ()


def metrics_port(env: Mapping[str, str], mode: str) -> int:
    """EGRESS_METRICS_PORT for `mode`: the proxies' default is on, legacy mode's off, and a mode that exits
    has none (one set there only gets a warning: unused_in_mode)."""
    port = v.METRICS_PORT.read(env)
    if mode not in v.STAYS_UP:
        return 0
    if port is None:
        return v.DEFAULT_METRICS_PORT if mode in v.PROXY_MODES else 0
    return port


def select_mode(env: Mapping[str, str]) -> str:
    """EGRESS_ROUTER_MODE; unset with EGRESS_HTTP_PROXY_DESTINATION set means http-proxy (the legacy proxy
    container set only the latter)."""
    mode = v.MODE.read(env) if v.MODE.is_set(env) else ""
    http, dns = given(env, v.HTTP_DESTINATION), given(env, v.DNS_DESTINATION)
    if http and dns:
        raise ConfigError(v.DNS_DESTINATION.name, "is set together with EGRESS_HTTP_PROXY_DESTINATION: "
                          "run the two proxies in two containers")
    for requested, variable, wanted in ((http, v.HTTP_DESTINATION.name, "http-proxy"),
                                        (dns, v.DNS_DESTINATION.name, "dns-proxy")):
        if requested:
            if mode and mode != wanted:
                raise ConfigError(variable, f"is set, but EGRESS_ROUTER_MODE is {mode!r}: this proxy runs with "
                                  f"EGRESS_ROUTER_MODE={wanted} or unset")
            return wanted
    return mode or DEFAULT_MODE


def load_http_proxy(env: Mapping[str, str], files: Mapping[str, str] = NO_FILES) -> HttpProxySettings:
    """Validate the HTTP proxy variables; raise ConfigError naming the first bad one."""
    port, admin = v.HTTP_PORT.read(env), metrics_port(env, "http-proxy")
    if port == admin:
        raise ConfigError(v.METRICS_PORT.name, f"{admin} is also the HTTP proxy's port (EGRESS_HTTP_PROXY_PORT): "
                          "choose another, or off")
    return HttpProxySettings(
        acl=parse_access_list(*rules(env, files, v.HTTP_DESTINATION)),
        port=port,
        workers=v.HTTP_WORKERS.read(env),
        access_log=v.HTTP_ACCESS_LOG.read(env),
        connect_timeout=v.HTTP_CONNECT_TIMEOUT.read(env),
        max_connections=v.HTTP_MAX_CONNECTIONS.read(env),
        idle_timeout=v.HTTP_IDLE_TIMEOUT.read(env),
        tunnel_idle_timeout=v.HTTP_TUNNEL_IDLE_TIMEOUT.read(env),
        grace_seconds=v.GRACE.read(env),
        metrics_port=admin,
    )


def load_dns_proxy(env: Mapping[str, str], files: Mapping[str, str] = NO_FILES) -> DnsProxySettings:
    """Validate the DNS proxy variables; raise ConfigError naming the first bad one."""
    forwards = parse_dns_destinations(*rules(env, files, v.DNS_DESTINATION))
    ttl_min, ttl_max = v.DNS_TTL_MIN.read(env), v.DNS_TTL_MAX.read(env)
    if ttl_max < ttl_min:
        raise ConfigError(v.DNS_TTL_MAX.name, f"{ttl_max:g} is below EGRESS_DNS_PROXY_TTL_MIN ({ttl_min:g})")
    admin = metrics_port(env, "dns-proxy")
    if clash := next((f for f in forwards if f.port == admin), None):
        raise ConfigError(v.METRICS_PORT.name, f"{admin} is also a forward's port (EGRESS_DNS_PROXY_DESTINATION "
                          f"line {clash.line}: {clash.port} -> {clash.target()}): choose another, or off")
    return DnsProxySettings(
        forwards=forwards,
        debug=v.DNS_DEBUG.read(env),
        workers=v.DNS_WORKERS.read(env),
        connect_timeout=v.DNS_CONNECT_TIMEOUT.read(env),
        idle_timeout=v.DNS_IDLE_TIMEOUT.read(env),
        max_connections=v.DNS_MAX_CONNECTIONS.read(env),
        ttl_min=ttl_min,
        ttl_max=ttl_max,
        grace_seconds=v.GRACE.read(env),
        metrics_port=admin,
    )


def given(env: Mapping[str, str], grammar: v.Variable[Any]) -> bool:
    """Whether the rules of `grammar` are given, inline or in a file."""
    return grammar.is_set(env) or v.RULE_FILES[grammar.name].is_set(env)


def rule_files(env: Mapping[str, str]) -> tuple[str, ...]:
    """The paths of the rule files the environment names, for the caller to read and pass to load()."""
    return tuple(dict.fromkeys(file.read(env) for file in v.RULE_FILES.values() if file.is_set(env)))


def rules(env: Mapping[str, str], files: Mapping[str, str], grammar: v.Variable[Any]) -> tuple[str, str]:
    """The rules of one grammar and the name its errors give: the variable, or the file variable with its path
    (`EGRESS_DESTINATION_FILE=/etc/egress/rules line 3: ...`). Inline and file together is an error."""
    file = v.RULE_FILES[grammar.name]
    if not file.is_set(env):
        return grammar.require(env), grammar.name
    if grammar.is_set(env):
        raise ConfigError(file.name, f"is set together with {grammar.name}: give the rules in one of them")
    path = file.read(env)
    where = f"{file.name}={path}"
    if path not in files:
        raise ConfigError(where, "was not read")
    if not files[path].strip():
        raise ConfigError(where, "is empty")
    return files[path], where


def parse_sources(value: str) -> list[tuple[IPv4Interface | IPv6Interface, bool]]:
    """EGRESS_SOURCE: one address, or one of each family separated by a comma or spaces; each with its prefix
    and whether one was given. IPv4 first."""
    items = [item for item in LIST_SEPARATOR.split(value.strip()) if item]
    if len(items) > 2:
        raise ConfigError(v.SOURCE.name, f"{value.strip()!r} gives {len(items)} addresses: give one, or one IPv4 and "
                          "one IPv6 address")
    found = [parse_source(item) for item in items]
    if len(found) == 2 and found[0][0].version == found[1][0].version:
        raise ConfigError(v.SOURCE.name, f"{value.strip()!r} gives two IPv{found[0][0].version} addresses: give one "
                          "per family (an IPv4 and an IPv6 address)")
    return sorted(found, key=lambda item: item[0].version)


def parse_source(value: str) -> tuple[IPv4Interface | IPv6Interface, bool]:
    text = value.strip()
    address_text, slash, prefix_text = text.partition("/")
    address = parse_ip(address_text, v.SOURCE.name)
    bits = address.max_prefixlen
    kind: type[IPv4Interface] | type[IPv6Interface] = IPv4Interface if address.version == 4 else IPv6Interface
    if not slash:
        return kind(f"{address}/{bits}"), False
    if not re.fullmatch(r"[0-9]{1,3}", prefix_text) or int(prefix_text) > bits:
        raise ConfigError(v.SOURCE.name, f"{prefix_text!r} in {text!r} is not a prefix length (0-{bits})")
    source = kind(f"{address}/{int(prefix_text)}")
    net = source.network
    if address.version == 4 and net.prefixlen <= 30 and address in (net.network_address, net.broadcast_address):
        which = "network" if address == net.network_address else "broadcast"
        raise ConfigError(v.SOURCE.name, f"{text} is the {which} address of {net}")
    if address.version == 6 and net.prefixlen <= 126 and address == net.network_address:
        raise ConfigError(v.SOURCE.name, f"{text} is the subnet-router anycast address of {net}")
    return source, True


def parse_gateways(value: str, sources: list[tuple[IPv4Interface | IPv6Interface, bool]]) -> tuple[Egress, ...]:
    """EGRESS_GATEWAY: one gateway per family of EGRESS_SOURCE, matched by family."""
    items = [item for item in LIST_SEPARATOR.split(value.strip()) if item]
    by_version: dict[int, str] = {}
    for item in items:
        version = 6 if looks_ipv6(item) else 4
        if version in by_version:
            raise ConfigError(v.GATEWAY.name, f"{value.strip()!r} gives two IPv{version} gateways: give one per "
                              "family of EGRESS_SOURCE")
        by_version[version] = item
    configured = {source.version: (source, has_prefix) for source, has_prefix in sources}
    for version, item in by_version.items():
        if version not in configured:
            shown = ", ".join(str(source.ip) for source, _ in sources)
            raise ConfigError(v.GATEWAY.name, f"{item} is an IPv{version} gateway, but EGRESS_SOURCE ({shown}) has no "
                              f"IPv{version} address")
    egress = []
    for version, (source, has_prefix) in sorted(configured.items()):
        if version not in by_version:
            raise ConfigError(v.GATEWAY.name, f"no IPv{version} gateway for the IPv{version} source {source.ip} "
                              "(give one per family, e.g. '192.0.2.1,2001:db8:2::1')")
        egress.append(Egress(source, has_prefix, parse_gateway(by_version[version], source, has_prefix)))
    return tuple(egress)


def parse_gateway(value: str, source: IPv4Interface | IPv6Interface, has_prefix: bool) -> IPv4Address | IPv6Address:
    text = value.strip()
    gateway = parse_ip(text, v.GATEWAY.name, link_local=True)
    if gateway.version != source.version:
        raise ConfigError(v.GATEWAY.name, f"{text} is an IPv{gateway.version} gateway for the IPv{source.version} "
                          f"source {source.ip}")
    if gateway == source.ip:
        raise ConfigError(v.GATEWAY.name, f"{text} is the same address as EGRESS_SOURCE")
    net = source.network
    if gateway.version == 4 and has_prefix and net.prefixlen <= 30 and \
            gateway in (net.network_address, net.broadcast_address):
        raise ConfigError(v.GATEWAY.name, f"{text} is the network or broadcast address of {net}")
    return gateway
