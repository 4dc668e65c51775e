"""Squid's native access.log line (logformat squid), for pipelines built for the legacy squid image (pure)."""

from __future__ import annotations

# Squid's result codes (the %Ss field) for what this proxy does: it never caches, so every forwarded
# request is a miss; CONNECT tunnels, refusals by the allow list, requests that could not be read.
MISS = "TCP_MISS"
TUNNEL = "TCP_TUNNEL"
DENIED = "TCP_DENIED"
INVALID = "NONE_NONE"
INVALID_URL = "error:invalid-request"  # what squid logs as the URL of a request it could not parse


def squid_line(now: float, elapsed_ms: float, client: str, action: str, status: int, size: int, method: str,
               url: str, peer: str | None, content_type: str | None) -> str:
    """`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`, as squid's FormatSquidNative.cc
    prints it ("%9ld.%03d %6ld %s %s/%03d %d %s %s %s %s/%s %s"): the time the line is written (seconds
    since the epoch, a dot, milliseconds), the milliseconds the transaction took padded to 6, the client's
    address, result code/HTTP status, bytes sent to the client (head and body), method, URL, the user (this
    proxy authenticates nobody: '-'), HIER_DIRECT/upstream address or HIER_NONE/-, and the reply's type."""
    seconds = int(now)
    millis = min(int((now - seconds) * 1000), 999)
    hierarchy = f"HIER_DIRECT/{peer}" if peer else "HIER_NONE/-"
    return (f"{seconds:9d}.{millis:03d} {int(elapsed_ms):6d} {client} {action}/{status:03d} {size} {method} "
            f"{one_field(url)} - {hierarchy} {one_field(content_type) if content_type else '-'}")


def one_field(text: str) -> str:
    """A value as one space-separated field: whitespace dropped (`text/html; charset=utf-8` ->
    `text/html;charset=utf-8`), and '-' for nothing, as squid writes an absent value."""
    return "".join(text.split()) or "-"


def logged_url(host: str, port: int, path: str) -> str:
    """The URL of a forwarded request as squid logs it: absolute, the port only when not 80, and the query
    left out (squid's default strip_query_terms on: query strings often carry tokens)."""
    authority = host if port == 80 else f"{host}:{port}"
    return f"http://{authority}{path.split('?', 1)[0]}"
