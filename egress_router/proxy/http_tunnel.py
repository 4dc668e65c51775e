"""CONNECT tunnels of the HTTP proxy: the client connection's tunnel half (TunnelSide) and the upstream's."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from ..core.hosts import Address
from . import metrics
from .http_flow import BUFFER_LIMIT, BUFFERED, UPSTREAM_FULL, WRITE_FULL, FlowControl
from .http_rules import TUNNEL_ESTABLISHED, Host, ProxyError, host_text, parse_connect_target
from .server import reset

if TYPE_CHECKING:
    from .http import ClientConnection
    from .http_reader import Request


class TunnelSide(FlowControl):
    """What a client connection does for a CONNECT: open the tunnel, relay, half-close, end."""

    __slots__ = ("current", "tunnel", "client_eof", "upstream_eof", "last")
    current: Request | None  # the request being answered (a CONNECT: the tunnel's)
    tunnel: asyncio.Transport | None
    client_eof: bool  # half-closes
    upstream_eof: bool
    last: float  # the worker's clock when data last came

    if TYPE_CHECKING:
        def fail(self, exc: ProxyError) -> None: ...
        def close(self) -> None: ...
        def access_log(self, request: Request, verdict: str, note: str = "", level: int = logging.INFO) -> None: ...

    def start_tunnel(self, request: Request) -> None:
        host, request.port = parse_connect_target(request.url)
        request.host_text = host_text(host)
        request.tunnel = True
        addresses = self.worker.addresses_for(host)
        request.task = self.worker.loop.create_task(self.open_tunnel(request, host, addresses))

    def hold_for_tunnel(self, request: Request, data: bytes) -> None:
        """Bytes sent before the tunnel is open: kept for it, up to BUFFER_LIMIT (then the client waits)."""
        if request.body is not None:
            request.body.append(data)
            request.buffered += len(data)
            if request.buffered >= BUFFER_LIMIT:
                self.hold(BUFFERED)

    async def open_tunnel(self, request: Request, host: Host, addresses: list[Address] | None) -> None:
        try:
            transport, relay, address = await self.worker.open_upstream(
                host, request.port, addresses, lambda: TunnelUpstream(cast("ClientConnection", self)))
        except ProxyError as exc:
            if not self.closing:
                self.fail(exc)
                self.flush()
            return
        if self.closing or self.transport is None:
            transport.close()
            return
        worker = self.worker
        worker.counters.add(metrics.ALLOWED)
        worker.counters.add(metrics.TUNNELS)
        worker.counters.observe(metrics.CONNECT, worker.loop.time() - request.started)
        self.tunnel = transport
        self.flush()
        self.transport.write(TUNNEL_ESTABLISHED)
        request.status = 200
        request.head_down, request.peer_ip = len(TUNNEL_ESTABLISHED), str(address)
        for chunk in request.body or ():
            transport.write(chunk)
            worker.counters.add(metrics.BYTES_UP, len(chunk))
        request.body = None
        if self.client_eof and transport.can_write_eof():  # the client half-closed before the tunnel was open
            transport.write_eof()
        self.release(WRITE_FULL)  # the two directions of a tunnel wait for each other no more
        self.feeding(transport)
        request.host_text = f"{request.host_text}:{request.port}"

    def tunnel_data(self, data: bytes) -> None:
        self.last = self.worker.now
        if self.transport is not None:
            self.transport.write(data)
            self.worker.counters.add(metrics.BYTES_DOWN, len(data))
            if self.current is not None:
                self.current.bytes_down += len(data)

    def tunnel_upstream_eof(self) -> bool:
        self.upstream_eof = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        return not self.client_eof

    def tunnel_closed(self) -> None:
        self.log_tunnel()
        self.tunnel = None
        self.close()

    def log_tunnel(self) -> None:
        request = self.current
        if request is not None and request.tunnel and self.worker.settings.access_log:
            self.access_log(request, "allowed")
            request.tunnel = False  # logged once


class TunnelUpstream(asyncio.Protocol):
    """The upstream side of a CONNECT tunnel: bytes go straight to the client."""

    __slots__ = ("client", "transport")

    def __init__(self, client: ClientConnection):
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.client.tunnel_data(data)

    def eof_received(self) -> bool:
        return self.client.tunnel_upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reset(self.client.transport)  # the destination reset: the client must not see a clean end
        self.client.tunnel_closed()

    def pause_writing(self) -> None:
        self.client.hold(UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.client.release(UPSTREAM_FULL)
