"""Listening sockets of the proxies: what to listen on, binding with SO_REUSEPORT, whether someone else holds a port."""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from ..core.errors import SetupError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Listen:
    family: socket.AddressFamily
    host: str
    port: int


def listen_spec(port: int) -> list[Listen]:
    return [Listen(socket.AF_INET, "0.0.0.0", port), Listen(socket.AF_INET6, "::", port)]


def bind(spec: Listen, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_all(specs: list[Listen]) -> list[socket.socket]:
    """Bind every spec; IPv6 is skipped (with a log line) where the namespace has no IPv6."""
    sockets = []
    try:
        for spec in specs:
            try:
                sockets.append(bind(spec))
            except OSError as exc:
                if spec.family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.info("No IPv6 in this network namespace; listening on IPv4 only")
                    continue
                family = "IPv6" if spec.family == socket.AF_INET6 else "IPv4"
                raise SetupError(f"cannot listen on port {spec.port} ({family}): {exc.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def probe_ports(specs: list[Listen]) -> None:
    """SO_REUSEPORT would let us share a port someone else holds; binding without it first says so."""
    for spec in specs:
        try:
            with socket.socket(spec.family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if spec.family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((spec.host, spec.port))
        except OSError as exc:
            if spec.family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise SetupError(f"cannot listen on port {spec.port}: {exc.strerror} (is another proxy "
                             "running?)") from None
