"""CONNECT tunnels of the HTTP proxy: the client connection's tunnel half (TunnelSide) and the upstream's."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, cast

from ..core.hosts import Address
from . import metrics, splice
from .http_flow import BUFFER_LIMIT, BUFFERED, SPLICED, UPSTREAM_FULL, WRITE_FULL, FlowControl
from .http_rules import TUNNEL_ESTABLISHED, Host, ProxyError, host_text, parse_connect_target
from .server import reset

if TYPE_CHECKING:
    from .http import ClientConnection
    from .http_reader import Request

# A tunnel moves to the splice relay once it has carried this much (both ways): a short one (a TLS handshake and
# a small exchange) stays on its transports, which costs no dups (2 more descriptors), pipes or setup syscalls.
SPLICE_AFTER = 256 * 1024


class TunnelSide(FlowControl):
    """What a client connection does for a CONNECT: open the tunnel, relay, half-close, end."""

    __slots__ = ("current", "tunnel", "client_eof", "upstream_eof", "last", "relay")
    current: Request | None  # the request being answered (a CONNECT: the tunnel's)
    tunnel: asyncio.Transport | None
    relay: splice.Relay | None  # the open tunnel's bytes, once moved off the two transports
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

    def try_splice(self) -> None:
        """Move the open tunnel off its two transports onto a splice relay (the kernel moves the bytes from one
        socket to the other: no copy into Python and back), once nothing waits in either transport's buffer, so
        that the order of the bytes is kept, and once it has carried SPLICE_AFTER bytes; until then (and when
        splice is not there, or no descriptor is left for the dups) the transports relay.

        The relay works on dups of the two sockets while the transports stay, paused for good: the client stays
        one of the worker's connections (limits, idle timeout, drain), and the end goes through the transports'
        connection_lost as before (access log line, counters)."""
        tunnel, transport, request = self.tunnel, self.transport, self.current
        if (tunnel is None or transport is None or request is None or self.relay is not None or self.closing
                or request.bytes_up + request.bytes_down < SPLICE_AFTER or self.client_eof or self.upstream_eof
                or self.out is not None or self.paused_source is not None or self.write_full
                or transport.get_write_buffer_size() or tunnel.get_write_buffer_size() or not splice.available()):
            return
        mine, theirs = transport.get_extra_info("socket"), tunnel.get_extra_info("socket")
        if mine is None or theirs is None:
            return
        try:
            a = splice.adopt(os.dup(mine.fileno()), mine.family)
        except OSError:  # out of descriptors (EMFILE): the transports go on relaying
            return
        try:
            b = splice.adopt(os.dup(theirs.fileno()), theirs.family)
        except OSError:
            a.close()
            return
        relay = splice.Relay(self.worker.loop, a, b, self.spliced, self.splice_ended)
        self.hold(SPLICED)
        tunnel.pause_reading()
        self.relay = relay
        try:
            relay.start()
        except OSError:  # no pipe to be had (EMFILE): nothing moved, the transports go on
            self.relay = None
            a.close()
            b.close()
            self.release(SPLICED)
            tunnel.resume_reading()

    def spliced(self, direction: int, n: int) -> None:
        """Bytes the relay delivered: counted as the transports' path counts them."""
        self.last = self.worker.now
        up = direction == splice.UP
        self.worker.counters.add(metrics.BYTES_UP if up else metrics.BYTES_DOWN, n)
        request = self.current
        if request is not None:
            if up:
                request.bytes_up += n
            else:
                request.bytes_down += n

    def splice_ended(self, how: str) -> None:
        """The relay ended by itself: the transports end the way their own relaying would have ended them."""
        tunnel, transport = self.tunnel, self.transport
        if how == splice.A_FAILED:  # the client reset (or cannot be written to): so does the tunnel
            reset(tunnel)
            if transport is not None:
                transport.abort()
        elif how == splice.B_FAILED:  # the destination reset: the client must not see a clean end
            reset(transport)
            if tunnel is not None:
                tunnel.abort()
        elif tunnel is not None:  # both directions ended with their EOF, passed on
            tunnel.close()
        else:
            self.close()

    def stop_relay(self, reason: str) -> None:
        """A transport of the tunnel is closing: the relay's dups go too (the sockets close with the last)."""
        relay = self.relay
        if relay is not None:
            relay.abort(reason)

    def tunnel_data(self, data: bytes) -> None:
        self.last = self.worker.now
        if self.transport is not None:
            self.transport.write(data)
            self.worker.counters.add(metrics.BYTES_DOWN, len(data))
            if self.current is not None:
                self.current.bytes_down += len(data)
            self.try_splice()  # what the transports had buffered when the tunnel opened may be gone now

    def tunnel_upstream_eof(self) -> bool:
        self.upstream_eof = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        return not self.client_eof

    def tunnel_closed(self) -> None:
        self.stop_relay("the tunnel's upstream connection closed")
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
        self.client.last = self.client.worker.now  # the destination took what waited for it: not stalled
        self.client.release(UPSTREAM_FULL)
