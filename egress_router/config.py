"""The environment contract: EGRESS_* variables -> a validated, frozen RouterConfig (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from .destinations import Destinations, parse_destinations, parse_ipv4
from .errors import ConfigError
from .proxy.settings import (
    DNS_VARIABLES,
    HTTP_VARIABLES,
    DnsProxySettings,
    HttpProxySettings,
    dns_proxy_requested,
    http_proxy_requested,
    load_dns_proxy,
    load_http_proxy,
)

MODES = ("init", "legacy", "unit-test", "http-proxy", "dns-proxy")
DEFAULT_MODE = "legacy"
NAT_MODES = ("init", "legacy", "unit-test")
DEFAULT_INTERFACE = "macvlan0"
DEFAULT_POD_INTERFACE = "eth0"
IPTABLES_CHOICES = ("nft", "legacy", "auto")
DEFAULT_IPTABLES = "nft"

# name -> (default, meaning); the single list behind --help, the README table and typo warnings.
VARIABLES: dict[str, tuple[str, str]] = {
    "EGRESS_SOURCE": ("(required)", "reserved IPv4 source address, optionally with /prefix "
                      "(a proxy-only container may leave it and EGRESS_GATEWAY unset)"),
    "EGRESS_GATEWAY": ("(required)", "IPv4 address of the LAN gateway"),
    "EGRESS_DESTINATION": ("(required in init, legacy, unit-test)", "redirect rules, one per line"),
    "EGRESS_ROUTER_MODE": (DEFAULT_MODE, "one of " + ", ".join(MODES)),
    "EGRESS_ROUTER_DEBUG": ("(empty)", "non-empty turns on debug logging"),
    "EGRESS_INTERFACE": (DEFAULT_INTERFACE, "egress (macvlan) interface; if unset and macvlan0 is "
                         "missing, the only macvlan link is used"),
    "EGRESS_POD_INTERFACE": (DEFAULT_POD_INTERFACE, "cluster-side interface whose traffic is redirected"),
    "EGRESS_IPTABLES": (DEFAULT_IPTABLES, "iptables backend for the NAT rules: nft (iptables-nft-save/-restore), "
                        "legacy (iptables-legacy-*), or auto: the backend that already has rules in the pod's "
                        "network namespace, else nft"),
    **HTTP_VARIABLES,
    **DNS_VARIABLES,
}



def variable_modes(name: str) -> str:
    """The modes in which a variable of VARIABLES has an effect (for --help and the README's table)."""
    if name.startswith("EGRESS_HTTP_PROXY_"):
        return "http-proxy"
    if name.startswith("EGRESS_DNS_PROXY_"):
        return "dns-proxy"
    if name == "EGRESS_PROXY_GRACE_SECONDS":
        return "http-proxy, dns-proxy"
    if name in ("EGRESS_DESTINATION", "EGRESS_POD_INTERFACE"):
        return ", ".join(NAT_MODES)
    if name == "EGRESS_IPTABLES":
        return "init, legacy"
    if name in ("EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_INTERFACE"):
        return "all that configure the network (proxy modes: when EGRESS_SOURCE is set)"
    return "all"


_IFNAME_BAD = re.compile(r"[/:\s]")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Everything the router was asked to do, validated."""

    mode: str
    source: IPv4Interface | None  # None: a proxy-only container, the network is not touched
    source_has_prefix: bool
    gateway: IPv4Address | None
    destinations: Destinations | None
    interface: str | None  # None: macvlan0, or the only macvlan link if macvlan0 is missing
    pod_interface: str
    debug: bool
    warnings: tuple[str, ...] = ()
    http_proxy: HttpProxySettings | None = None
    dns_proxy: DnsProxySettings | None = None
    iptables: str = DEFAULT_IPTABLES  # nft, legacy or auto (see nat.find_tools)

    @property
    def configures_nat(self) -> bool:
        return self.mode in NAT_MODES

    @property
    def configures_network(self) -> bool:
        return self.source is not None


def load(env: Mapping[str, str]) -> RouterConfig:
    """Validate the environment; raise ConfigError naming the first bad variable."""
    mode = select_mode(env)
    http_proxy = load_http_proxy(env) if http_proxy_requested(env) else None
    dns_proxy = load_dns_proxy(env) if dns_proxy_requested(env) else None
    source: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    has_prefix = False
    if (http_proxy or dns_proxy) is not None and not env.get("EGRESS_SOURCE", "").strip():
        if env.get("EGRESS_GATEWAY", "").strip():
            raise ConfigError("EGRESS_GATEWAY", "is set but EGRESS_SOURCE is not: set both to configure the "
                              "network before the proxy starts, or neither to run the proxy alone")
    else:
        source, has_prefix = parse_source(require(env, "EGRESS_SOURCE"))
        gateway = parse_gateway(require(env, "EGRESS_GATEWAY"), source, has_prefix)
    destinations = None
    if mode in NAT_MODES:
        destinations = parse_destinations(require(env, "EGRESS_DESTINATION"))
    interface = env.get("EGRESS_INTERFACE", "").strip() or None
    if interface is not None:
        check_ifname("EGRESS_INTERFACE", interface, wildcard=False)
    pod_interface = env.get("EGRESS_POD_INTERFACE", "").strip() or DEFAULT_POD_INTERFACE
    check_ifname("EGRESS_POD_INTERFACE", pod_interface, wildcard=True)
    if interface is not None and interface == pod_interface:
        raise ConfigError("EGRESS_POD_INTERFACE", f"{pod_interface!r} is also the egress interface (EGRESS_INTERFACE)")
    iptables = select_iptables(env)
    return RouterConfig(
        mode=mode,
        source=source,
        source_has_prefix=has_prefix,
        gateway=gateway,
        destinations=destinations,
        interface=interface,
        pod_interface=pod_interface,
        debug=bool(env.get("EGRESS_ROUTER_DEBUG", "")),
        warnings=unknown_variable_warnings(env),
        http_proxy=http_proxy,
        dns_proxy=dns_proxy,
        iptables=iptables,
    )


def select_mode(env: Mapping[str, str]) -> str:
    """EGRESS_ROUTER_MODE; unset with EGRESS_HTTP_PROXY_DESTINATION set means http-proxy (the legacy proxy
    container set only the latter)."""
    mode = env.get("EGRESS_ROUTER_MODE", "").strip()
    if mode and mode not in MODES:
        raise ConfigError("EGRESS_ROUTER_MODE", f"{mode!r} is not one of {', '.join(MODES)}")
    http, dns = http_proxy_requested(env), dns_proxy_requested(env)
    if http and dns:
        raise ConfigError("EGRESS_DNS_PROXY_DESTINATION", "is set together with EGRESS_HTTP_PROXY_DESTINATION: "
                          "run the two proxies in two containers")
    for requested, variable, wanted in ((http, "EGRESS_HTTP_PROXY_DESTINATION", "http-proxy"),
                                        (dns, "EGRESS_DNS_PROXY_DESTINATION", "dns-proxy")):
        if requested:
            if mode and mode != wanted:
                raise ConfigError(variable, f"is set, but EGRESS_ROUTER_MODE is {mode!r}: this proxy runs with "
                                  f"EGRESS_ROUTER_MODE={wanted} or unset")
            return wanted
    return mode or DEFAULT_MODE


def select_iptables(env: Mapping[str, str]) -> str:
    """EGRESS_IPTABLES: which iptables backend writes the NAT rules; blank means the default (nft)."""
    value = env.get("EGRESS_IPTABLES", "").strip()
    if value and value not in IPTABLES_CHOICES:
        raise ConfigError("EGRESS_IPTABLES", f"{value!r} is not one of {', '.join(IPTABLES_CHOICES)}")
    return value or DEFAULT_IPTABLES


def require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value.strip():
        raise ConfigError(name, "is not set" if name not in env else "is empty")
    return value


def parse_source(value: str) -> tuple[IPv4Interface, bool]:
    text = value.strip()
    address_text, slash, prefix_text = text.partition("/")
    address = parse_ipv4(address_text, "EGRESS_SOURCE")
    if not slash:
        return IPv4Interface(f"{address}/32"), False
    if not re.fullmatch(r"[0-9]{1,2}", prefix_text) or int(prefix_text) > 32:
        raise ConfigError("EGRESS_SOURCE", f"{prefix_text!r} in {text!r} is not a prefix length (0-32)")
    source = IPv4Interface(f"{address}/{int(prefix_text)}")
    if source.network.prefixlen <= 30 and address in (source.network.network_address,
                                                       source.network.broadcast_address):
        which = "network" if address == source.network.network_address else "broadcast"
        raise ConfigError("EGRESS_SOURCE", f"{text} is the {which} address of {source.network}")
    return source, True


def parse_gateway(value: str, source: IPv4Interface, has_prefix: bool) -> IPv4Address:
    text = value.strip()
    gateway = parse_ipv4(text, "EGRESS_GATEWAY")
    if gateway == source.ip:
        raise ConfigError("EGRESS_GATEWAY", f"{text} is the same address as EGRESS_SOURCE")
    net = source.network
    if has_prefix and net.prefixlen <= 30 and gateway in (net.network_address, net.broadcast_address):
        raise ConfigError("EGRESS_GATEWAY", f"{text} is the network or broadcast address of {net}")
    return gateway


def check_ifname(variable: str, name: str, *, wildcard: bool) -> None:
    """Reject names the kernel (or iptables, for `wildcard` names ending in '+') would refuse."""
    bare = name[:-1] if wildcard and name.endswith("+") else name
    if len(name) > 15 or not bare or bare in (".", "..") or _IFNAME_BAD.search(bare) or "+" in bare:
        raise ConfigError(variable, f"{name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")


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
