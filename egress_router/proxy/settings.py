"""The proxy modes' settings from the environment (pure): ports, limits, timeouts, logging."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .acl import AccessList, parse_access_list
from .dnsdest import Forward, parse_dns_destinations

HTTP_VARIABLES: dict[str, tuple[str, str]] = {
    "EGRESS_HTTP_PROXY_DESTINATION": ("(unset)", "allow list of the HTTP proxy; set: run the proxy"),
    "EGRESS_HTTP_PROXY_PORT": ("8080", "port the HTTP proxy listens on (IPv4 and IPv6)"),
    "EGRESS_HTTP_PROXY_WORKERS": ("1", "processes serving the port; 'auto': one per CPU available (cgroup quota "
                                  "respected); each costs ~20 MiB"),
    "EGRESS_HTTP_PROXY_ACCESS_LOG": ("(off)", "1: one log line per request or tunnel"),
    "EGRESS_HTTP_PROXY_CONNECT_TIMEOUT": ("10", "seconds to connect upstream before answering 504"),
    "EGRESS_HTTP_PROXY_MAX_CONNECTIONS": ("10000", "concurrent client connections, over all workers"),
    "EGRESS_HTTP_PROXY_IDLE_TIMEOUT": ("120", "seconds an idle keep-alive client connection is kept"),
    "EGRESS_HTTP_PROXY_TUNNEL_IDLE_TIMEOUT": ("900", "seconds a tunnel or response may stall before it is closed"),
    "EGRESS_PROXY_GRACE_SECONDS": ("10", "on SIGTERM, how long open requests and tunnels may finish"),
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class HttpProxySettings:
    acl: AccessList
    port: int = 8080
    workers: int | None = 1  # None: one per CPU available to the process ('auto')
    access_log: bool = False
    connect_timeout: float = 10.0
    max_connections: int = 10_000
    idle_timeout: float = 120.0
    tunnel_idle_timeout: float = 900.0
    grace_seconds: float = 10.0
    header_limit: int = 64 * 1024  # bytes of request line + headers


def http_proxy_requested(env: Mapping[str, str]) -> bool:
    return bool(env.get("EGRESS_HTTP_PROXY_DESTINATION", "").strip())


def load_http_proxy(env: Mapping[str, str]) -> HttpProxySettings:
    """Validate the HTTP proxy variables; raise ConfigError naming the first bad one."""
    text = env.get("EGRESS_HTTP_PROXY_DESTINATION", "")
    if not text.strip():
        raise ConfigError("EGRESS_HTTP_PROXY_DESTINATION", "is not set" if "EGRESS_HTTP_PROXY_DESTINATION" not in env
                          else "is empty")
    return HttpProxySettings(
        acl=parse_access_list(text),
        port=integer(env, "EGRESS_HTTP_PROXY_PORT", 8080, 1, 65535) or 8080,
        workers=worker_count(env, "EGRESS_HTTP_PROXY_WORKERS"),
        access_log=flag(env, "EGRESS_HTTP_PROXY_ACCESS_LOG"),
        connect_timeout=seconds(env, "EGRESS_HTTP_PROXY_CONNECT_TIMEOUT", 10.0),
        max_connections=integer(env, "EGRESS_HTTP_PROXY_MAX_CONNECTIONS", 10_000, 1, 10_000_000) or 10_000,
        idle_timeout=seconds(env, "EGRESS_HTTP_PROXY_IDLE_TIMEOUT", 120.0),
        tunnel_idle_timeout=seconds(env, "EGRESS_HTTP_PROXY_TUNNEL_IDLE_TIMEOUT", 900.0),
        grace_seconds=seconds(env, "EGRESS_PROXY_GRACE_SECONDS", 10.0, minimum=0.0),
    )


def worker_count(env: Mapping[str, str], name: str) -> int | None:
    """1 when unset; None for 'auto' (one per CPU available, decided where the proxy runs)."""
    # One process by default: a proxy for a handful of external services rarely needs more than the
    # ~18k requests/s one process serves, and one per CPU of a large node without a CPU limit would
    # cost ~20 MiB each for nothing.
    value = env.get(name, "").strip()
    if value.lower() == "auto":
        return None
    if not value:
        return 1
    if not re.fullmatch(r"[0-9]{1,3}", value) or not 1 <= int(value) <= 256:
        raise ConfigError(name, f"{value!r} is neither a whole number from 1 to 256 nor 'auto'")
    return int(value)


def integer(env: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", value) or not low <= int(value) <= high:
        raise ConfigError(name, f"{value!r} is not a whole number from {low} to {high}")
    return int(value)


def seconds(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.001) -> float:
    value = env.get(name, "").strip()
    if not value:
        return default
    if not re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,6})?", value) or float(value) < minimum:
        raise ConfigError(name, f"{value!r} is not a number of seconds (at least {minimum:g})")
    return float(value)


def flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, f"{value!r} is not one of 1, 0, true, false, yes, no, on, off")


DNS_VARIABLES: dict[str, tuple[str, str]] = {
    "EGRESS_DNS_PROXY_DESTINATION": ("(unset)", "TCP forwards, one per line: port host [remote_port]; "
                                     "set: run the proxy"),
    "EGRESS_DNS_PROXY_DEBUG": ("(off)", "1: one log line per connection"),
    "EGRESS_DNS_PROXY_WORKERS": ("1", "processes serving the ports; 'auto': one per CPU available (cgroup quota "
                                 "respected); each costs ~20 MiB"),
    "EGRESS_DNS_PROXY_CONNECT_TIMEOUT": ("10", "seconds to connect to a backend"),
    "EGRESS_DNS_PROXY_IDLE_TIMEOUT": ("60", "seconds a connection may carry no data before it is closed"),
    "EGRESS_DNS_PROXY_MAX_CONNECTIONS": ("10000", "concurrent client connections, over all workers"),
    "EGRESS_DNS_PROXY_TTL_MIN": ("1", "shortest time a DNS answer is used (seconds)"),
    "EGRESS_DNS_PROXY_TTL_MAX": ("30", "longest time a DNS answer is used (seconds)"),
}


@dataclass(frozen=True, slots=True)
class DnsProxySettings:
    forwards: tuple[Forward, ...]
    debug: bool = False
    workers: int | None = 1  # None: one per CPU available to the process ('auto')
    connect_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    ttl_min: float = 1.0
    ttl_max: float = 30.0
    grace_seconds: float = 10.0
    tries: int = 3  # backends tried for one client connection
    backoff: float = 5.0  # seconds a failed backend is skipped before checks may bring it back
    check_interval: float = 2.0  # active TCP check of a backend marked down


def dns_proxy_requested(env: Mapping[str, str]) -> bool:
    return bool(env.get("EGRESS_DNS_PROXY_DESTINATION", "").strip())


def load_dns_proxy(env: Mapping[str, str]) -> DnsProxySettings:
    """Validate the DNS proxy variables; raise ConfigError naming the first bad one."""
    forwards = parse_dns_destinations(env.get("EGRESS_DNS_PROXY_DESTINATION", ""))
    ttl_min = seconds(env, "EGRESS_DNS_PROXY_TTL_MIN", 1.0, minimum=0.0)
    ttl_max = seconds(env, "EGRESS_DNS_PROXY_TTL_MAX", 30.0, minimum=0.0)
    if ttl_max < ttl_min:
        raise ConfigError("EGRESS_DNS_PROXY_TTL_MAX", f"{ttl_max:g} is below EGRESS_DNS_PROXY_TTL_MIN ({ttl_min:g})")
    return DnsProxySettings(
        forwards=forwards,
        debug=flag(env, "EGRESS_DNS_PROXY_DEBUG"),
        workers=worker_count(env, "EGRESS_DNS_PROXY_WORKERS"),
        connect_timeout=seconds(env, "EGRESS_DNS_PROXY_CONNECT_TIMEOUT", 10.0),
        idle_timeout=seconds(env, "EGRESS_DNS_PROXY_IDLE_TIMEOUT", 60.0),
        max_connections=integer(env, "EGRESS_DNS_PROXY_MAX_CONNECTIONS", 10_000, 1, 10_000_000) or 10_000,
        ttl_min=ttl_min,
        ttl_max=ttl_max,
        grace_seconds=seconds(env, "EGRESS_PROXY_GRACE_SECONDS", 10.0, minimum=0.0),
    )
