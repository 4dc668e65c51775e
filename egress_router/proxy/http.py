"""The HTTP proxy worker: absolute-form forwarding with keep-alive both ways, CONNECT tunnels, probes.

Built on asyncio protocols (uvloop when installed) and httptools' C parser: no stream objects,
no task per request on the fast path. Every request's destination is checked against the allow
list; names are resolved here and only the addresses the list allows are connected to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, cast

import httptools

from . import metrics
from .http_rules import (
    HEALTHZ,
    TUNNEL_ESTABLISHED,
    Address,
    Host,
    ProxyError,
    ends_connection,
    error_response,
    final_head,
    host_text,
    interim_head,
    local_page,
    parse_absolute_form,
    parse_connect_target,
    request_head,
    request_is_chunked,
    response_ends_at_head,
    simple_response,
)
from .metrics import SharedCounters, WorkerCounters
from .server import handle_stop_signals, reset
from .settings import HttpProxySettings

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 30.0  # a client has this long to send a complete request head
POOL_IDLE_SECONDS = 30.0  # idle upstream connections are closed after this
POOL_MAX_PER_KEY = 256
DNS_TTL = 5.0  # the system resolver gives no TTL: cache answers briefly
class Worker:
    """One process's proxy: its connections, upstream pool and DNS cache."""

    def __init__(self, settings: HttpProxySettings, shared: SharedCounters, index: int):
        self.settings = settings
        self.acl = settings.acl
        self.shared = shared
        self.counters: WorkerCounters = shared.row(index)
        self.index = index
        self.loop = asyncio.get_event_loop()
        self.now = self.loop.time()
        self.clients: set[ClientConnection] = set()
        self.pool: dict[tuple[Address, int], list[Upstream]] = {}
        self.dns: dict[str, tuple[float, list[Address]]] = {}
        self.draining = False
        self.stopped = asyncio.Event()
        self.dirty: list[Endpoint] = []  # endpoints with output waiting for the end of this callback

    def flush(self) -> None:
        """Write what this callback queued: one write per connection instead of one per piece."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for endpoint in dirty:
                endpoint.flush()

    # ------------------------------------------------------------ life cycle
    async def run(self, sockets: list[socket.socket], alone: bool = False) -> int:
        servers = [await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=4096)
                   for sock in sockets]
        handle_stop_signals(self.loop, self.stopped, self.settings.grace_seconds, alone)
        sweeper = self.loop.create_task(self.sweep())
        await self.stopped.wait()
        for server in servers:
            server.close()
        await self.drain()
        sweeper.cancel()
        return 0

    async def drain(self) -> None:
        self.draining = True
        for client in list(self.clients):
            if client.idle():
                client.close()
        deadline = self.loop.time() + self.settings.grace_seconds
        while self.clients and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.abort("the grace period ended")
        for conns in self.pool.values():
            for upstream in conns:
                upstream.close()

    async def sweep(self) -> None:
        """Once a second: the coarse clock, idle and stalled connections, stale pool entries."""
        settings = self.settings
        while True:
            await asyncio.sleep(1.0)
            self.now = now = self.loop.time()
            for client in list(self.clients):
                quiet = now - client.last
                if client.idle():
                    parsing = client.parsing
                    if parsing is not None:  # a head must be complete in time however slowly it trickles
                        if now - parsing.started > HEADER_TIMEOUT:
                            client.bad_request(f"request head not complete within {HEADER_TIMEOUT:g} s", 408)
                    elif quiet > settings.idle_timeout or self.draining:
                        client.close()
                elif quiet > settings.tunnel_idle_timeout:
                    client.abort(f"no data for {settings.tunnel_idle_timeout:g} s")
            for key, conns in list(self.pool.items()):
                keep = [u for u in conns if now - u.idle_since < POOL_IDLE_SECONDS and not u.closed]
                for upstream in conns:
                    if upstream not in keep:
                        upstream.close()
                if keep:
                    self.pool[key] = keep
                else:
                    del self.pool[key]
            for name in [n for n, (expires, _) in self.dns.items() if expires < now]:
                del self.dns[name]

    # ------------------------------------------------------------ destinations
    def addresses_for(self, host: Host) -> list[Address] | None:
        """Allowed addresses when known without a lookup; None when the name must be resolved."""
        if not isinstance(host, str):
            if not self.acl.address_allowed(None, host):
                raise ProxyError(403, f"access to {host} is denied by the egress policy", metrics.DENIED)
            return [host]
        verdict = self.acl.name_verdict(host)
        if verdict is False:
            raise ProxyError(403, f"access to {host} is denied by the egress policy", metrics.DENIED)
        cached = self.dns.get(host)
        if cached is None or cached[0] < self.now:
            return None
        return self._allowed(host, cached[1], verdict)

    def _allowed(self, host: str, addresses: list[Address], verdict: bool | None) -> list[Address]:
        allowed = addresses if verdict else self.acl.allowed_addresses(host, addresses)
        if not allowed:
            raise ProxyError(403, f"access to {host} is denied by the egress policy", metrics.DENIED)
        return allowed

    async def resolve(self, host: str, port: int) -> list[Address]:
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProxyError(502, f"cannot resolve {host}: {exc.strerror}", metrics.UPSTREAM_ERRORS) from None
        addresses: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = ip_address(str(sockaddr[0]).split("%", 1)[0])
                if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                if address not in addresses:
                    addresses.append(address)
        self.dns[host] = (self.now + DNS_TTL, addresses)
        return self._allowed(host, addresses, self.acl.name_verdict(host))

    async def open_upstream(self, host: Host, port: int, addresses: list[Address] | None,
                            factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, Any, Address]:
        """Connect to the first allowed address that answers; 502 or 504 if none does."""
        if addresses is None:
            assert isinstance(host, str)
            addresses = await self.resolve(host, port)
        timeout = self.settings.connect_timeout
        last: ProxyError | None = None
        for address in addresses:
            try:
                transport, protocol = await asyncio.wait_for(
                    self.loop.create_connection(factory, str(address), port), timeout)
                return transport, protocol, address
            except TimeoutError:
                last = ProxyError(504, f"timed out connecting to {host} ({address}) port {port}",
                                  metrics.UPSTREAM_TIMEOUTS)
            except OSError as exc:
                last = ProxyError(502, f"cannot connect to {host} ({address}) port {port}: "
                                       f"{exc.strerror or exc}", metrics.UPSTREAM_ERRORS)
        assert last is not None
        raise last

    def pooled(self, key: tuple[Address, int]) -> Upstream | None:
        conns = self.pool.get(key)
        while conns:
            upstream = conns.pop()
            if not upstream.closed:
                upstream.reused = True
                return upstream
        return None

    def release(self, upstream: Upstream) -> None:
        conns = self.pool.setdefault(upstream.key, [])
        if len(conns) >= POOL_MAX_PER_KEY or self.draining:
            upstream.close()
            return
        upstream.client = None
        upstream.idle_since = self.now
        conns.append(upstream)


class Endpoint:
    """A connection whose output is gathered during a callback and written once at its end."""

    # Subclasses use slots too, and allocate what an idle connection does not need only when it is
    # needed (output list, parser, request queue): 10,000 idle connections should cost little memory.
    __slots__ = ("out",)
    worker: Worker
    transport: asyncio.Transport | None
    out: list[bytes] | None

    def send(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = [data]
            self.worker.dirty.append(self)
        else:
            out.append(data)

    def flush(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))


class Request:
    """One request from the client, parsed and being forwarded."""

    __slots__ = ("url", "headers", "method", "version", "keep_alive", "chunked", "complete", "body",
                 "started", "host_text", "port", "upstream", "head_only", "bytes_up", "bytes_down", "status",
                 "tunnel", "sent", "local", "host")

    def __init__(self, now: float):
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.complete = False
        self.body: list[bytes] | None = []  # buffered until an upstream takes it; then None
        self.started = now
        self.host_text = ""
        self.port = 0
        self.upstream: Upstream | None = None
        self.head_only = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.status = 0
        self.tunnel = False
        self.sent = False  # response head sent to the client
        self.local = False  # answered by the proxy itself (probes, metrics)
        self.host: Host | None = None  # the normalized destination host


class ClientConnection(Endpoint, asyncio.Protocol):
    """A client of the proxy: requests one after another (pipelining kept in order), or one tunnel."""

    __slots__ = ("worker", "transport", "parser", "parsing", "current", "queue", "head_size", "last",
                 "closing", "tunnel", "client_eof", "upstream_eof", "paused")

    def __init__(self, worker: Worker):
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None  # made when the first bytes arrive
        self.parsing: Request | None = None
        self.current: Request | None = None
        self.queue: list[Request] | None = None  # pipelined requests waiting behind the current one
        self.head_size = 0
        self.last = worker.now
        self.closing = False
        self.tunnel: asyncio.Transport | None = None
        self.client_eof = False  # tunnel half-closes
        self.upstream_eof = False
        self.paused = False
        self.out = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        worker = self.worker
        if worker.shared.total(metrics.OPEN) >= worker.settings.max_connections:
            worker.counters.add(metrics.REJECTED)
            self.transport.write(error_response(503, "too many connections", close=True))
            self.transport.close()
            self.closing = True
            return
        worker.counters.add(metrics.OPEN)
        worker.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.worker.clients:
            self.worker.clients.discard(self)
            self.worker.counters.sub(metrics.OPEN)
        self.closing = True
        if self.tunnel is not None:
            if exc is not None:
                reset(self.tunnel)  # the client reset its side: so does the tunnel
            else:
                self.tunnel.close()
            self.log_tunnel()
        current = self.current
        if current is not None and current.upstream is not None:
            current.upstream.client = None
            current.upstream.close()  # mid-response: the upstream connection cannot be reused

    def data_received(self, data: bytes) -> None:
        self.last = self.worker.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            self.worker.counters.add(metrics.BYTES_UP, len(data))
            if self.current is not None:
                self.current.bytes_up += len(data)
            return
        if self.closing:
            return
        current = self.current
        if current is not None and current.tunnel:  # tunnel not open yet: hold the bytes for it
            if current.body is not None:
                current.body.append(data)
            return
        try:
            parser = self.parser
            if parser is None:
                parser = self.parser = httptools.HttpRequestParser(self)
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            self.bad_request(f"malformed request: {exc}")
        except ProxyError as exc:
            self.fail(exc)
        self.worker.flush()

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.client_eof = True
            if self.tunnel.can_write_eof():
                self.tunnel.write_eof()
            return not self.upstream_eof  # keep the other direction open (half-close)
        if self.current is not None:  # the client is done sending; let its response finish
            self.current.keep_alive = False
            for queued in self.queue or ():
                queued.keep_alive = False
            return True
        return False

    def pause_writing(self) -> None:
        upstream = self.current.upstream if self.current is not None else None
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.current.upstream if self.current is not None else None
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # ------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        self.parsing = Request(self.worker.loop.time())
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        self.parsing.headers.append((name, value))
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > self.worker.settings.header_limit:
            raise ProxyError(431, "request head too large", metrics.BAD)

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        parser = self.parser
        assert parser is not None
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive() and not self.worker.draining
        request.chunked = request_is_chunked(request.headers)
        if self.current is None:
            self.current = request
            self.start(request)
        else:
            if self.queue is None:
                self.queue = []
            self.queue.append(request)
            if not self.paused and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        if request.body is not None:
            request.body.append(body)
        else:
            self.forward_body(request, body)

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        request.complete = True
        self.parsing = None
        if request.body is None:
            self.forward_body_end(request)

    # ------------------------------------------------------------ requests
    def start(self, request: Request) -> None:
        """Decide and dispatch the current request."""
        try:
            if request.method == b"CONNECT":
                self.start_tunnel(request)
                return
            if request.url[:1] == b"/":
                self.origin_form(request)
                return
            host, port, request.url = parse_absolute_form(request.url)
            request.host = host
            request.host_text = host_text(host)
            request.port = port
            request.head_only = request.method == b"HEAD"
            addresses = self.worker.addresses_for(host)
            if addresses is not None:
                upstream = self.worker.pooled((addresses[0], port))
                if upstream is not None:
                    self.send_request(request, upstream)
                    return
            self.worker.loop.create_task(self.dispatch(request, host, port, addresses))
        except ProxyError as exc:
            self.fail(exc)

    async def dispatch(self, request: Request, host: Host, port: int,
                       addresses: list[Address] | None, *, fresh: bool = False) -> None:
        try:
            if addresses is None:
                addresses = await self.worker.resolve(host, port) if isinstance(host, str) else [host]
                upstream = None if fresh else self.worker.pooled((addresses[0], port))
                if upstream is not None:
                    self.send_request(request, upstream)
                    self.worker.flush()
                    return
            transport, upstream, address = await self.worker.open_upstream(
                host, port, addresses, lambda: Upstream(self.worker))
            upstream.key = (address, port)
            if self.closing:
                transport.close()
                return
            self.send_request(request, upstream)
        except ProxyError as exc:
            if not self.closing:
                self.fail(exc)
        self.worker.flush()

    def send_request(self, request: Request, upstream: Upstream) -> None:
        worker = self.worker
        worker.counters.add(metrics.ALLOWED)
        request.upstream = upstream
        upstream.attach(self, request)
        upstream.send(request_head(request.method, request.url, request.host_text, request.port, request.headers,
                                   request.chunked))
        body, request.body = request.body, None
        for chunk in body or ():
            self.forward_body(request, chunk)
        if request.complete:
            self.forward_body_end(request)

    def forward_body(self, request: Request, chunk: bytes) -> None:
        upstream = request.upstream
        if upstream is None or upstream.transport is None or upstream.closed:
            return
        request.bytes_up += len(chunk)
        self.worker.counters.add(metrics.BYTES_UP, len(chunk))
        if request.chunked:
            upstream.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            upstream.send(chunk)

    def forward_body_end(self, request: Request) -> None:
        upstream = request.upstream
        if request.chunked and upstream is not None and upstream.transport is not None and not upstream.closed:
            upstream.send(b"0\r\n\r\n")

    # upstream -> client
    def response_head(self, request: Request, upstream: Upstream, status: int, reason: bytes,
                      headers: list[tuple[bytes, bytes]], upstream_keep_alive: bool) -> None:
        request.status = status
        transport = self.transport
        if transport is None or self.closing:
            return
        if 100 <= status < 200:  # informational: pass it on, the final response follows
            self.send(interim_head(status, reason))
            return
        head, upstream.rechunk, upstream.until_close, request.keep_alive = final_head(
            status, reason, headers, request.version, request.head_only,
            request.keep_alive and not self.worker.draining)
        self.send(head)
        request.sent = True

    def response_body(self, request: Request, upstream: Upstream, chunk: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        request.bytes_down += len(chunk)
        self.worker.counters.add(metrics.BYTES_DOWN, len(chunk))
        if upstream.rechunk:
            self.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.send(chunk)

    def response_done(self, request: Request, upstream: Upstream, reusable: bool) -> None:
        if upstream.rechunk:
            self.send(b"0\r\n\r\n")
        request.upstream = None
        if reusable and request.complete:
            self.worker.release(upstream)
        else:
            upstream.close()
        self.finish(request)

    def retry(self, request: Request) -> None:
        request.upstream = None
        if request.host is None or self.closing:
            return
        self.worker.loop.create_task(self.dispatch(request, request.host, request.port, None, fresh=True))

    def upstream_failed(self, request: Request, message: str) -> None:
        """The upstream closed or failed before the response was complete."""
        request.upstream = None
        if request.sent or self.transport is None:
            self.abort(message)  # the client has part of a response: it must see the connection end
            return
        self.worker.counters.add(metrics.UPSTREAM_ERRORS)
        self.fail(ProxyError(502, message))

    def finish(self, request: Request) -> None:
        if self.worker.settings.access_log:
            verdict = "local" if request.local else ("allowed" if request.status < 400 else "error")
            self.access_log(request, verdict)
        self.current = None
        if not request.keep_alive or self.closing:
            self.close()
            return
        if self.queue:
            self.current = self.queue.pop(0)
            if not self.queue and self.paused and self.transport is not None:
                self.transport.resume_reading()
                self.paused = False
            self.start(self.current)

    def origin_form(self, request: Request) -> None:
        request.local = True
        if local_page(request.method, request.url) == HEALTHZ:
            self.reply(request, 200, "ok\n")
        else:
            self.reply(request, 200, metrics.prometheus_http(self.worker.shared),
                       content_type=b"text/plain; version=0.0.4")

    def reply(self, request: Request, status: int, body: str, *, content_type: bytes = b"text/plain") -> None:
        request.status = status
        if self.transport is not None and not self.closing:
            self.send(simple_response(status, body, close=not request.keep_alive, content_type=content_type,
                                      head_only=request.method == b"HEAD"))
        if request.complete:
            self.finish(request)
        else:
            request.keep_alive = False  # the body we did not read makes the connection unusable
            self.finish(request)

    def fail(self, exc: ProxyError) -> None:
        if exc.counter is not None:
            self.worker.counters.add(exc.counter)
        request = self.current
        if ends_connection(exc.status) or request is None:
            self.bad_request(exc.message, exc.status)
            return
        request.status = exc.status
        if self.worker.settings.access_log or exc.status >= 500:
            self.access_log(request, "denied" if exc.status == 403 else "error", exc.message,
                            level=logging.INFO if exc.status < 500 else logging.WARNING)
        request.keep_alive = request.keep_alive and request.complete
        if self.transport is not None and not self.closing:
            self.send(error_response(exc.status, exc.message, close=not request.keep_alive))
        self.current = None
        if not request.keep_alive:
            self.close()
        elif self.queue:
            self.current = self.queue.pop(0)
            self.start(self.current)

    def bad_request(self, message: str, status: int = 400) -> None:
        if self.closing:
            return
        if self.worker.settings.access_log:
            request = self.current or self.parsing
            method = request.method.decode("latin-1") if request is not None and request.method else "-"
            log.info("%s %s - bad_request %d up=0 down=0 - %s", self.peer, method, status, message)
        self.send(error_response(status, message, close=True))
        self.close()

    # ------------------------------------------------------------ tunnels
    def start_tunnel(self, request: Request) -> None:
        host, request.port = parse_connect_target(request.url)
        request.host_text = host_text(host)
        request.tunnel = True
        addresses = self.worker.addresses_for(host)
        self.worker.loop.create_task(self.open_tunnel(request, host, addresses))

    def upgraded(self, early: bytes) -> None:
        """The parser stopped after the CONNECT head; bytes after it belong to the tunnel."""
        if early and self.current is not None and self.current.tunnel:
            assert self.current.body is not None
            self.current.body.append(early)

    async def open_tunnel(self, request: Request, host: Host, addresses: list[Address] | None) -> None:
        try:
            transport, relay, address = await self.worker.open_upstream(
                host, request.port, addresses, lambda: TunnelUpstream(self))
        except ProxyError as exc:
            if not self.closing:
                self.fail(exc)
                self.worker.flush()
            return
        if self.closing or self.transport is None:
            transport.close()
            return
        worker = self.worker
        worker.counters.add(metrics.ALLOWED)
        worker.counters.add(metrics.TUNNELS)
        self.tunnel = transport
        self.flush()
        self.transport.write(TUNNEL_ESTABLISHED)
        request.status = 200
        for chunk in request.body or ():
            transport.write(chunk)
            worker.counters.add(metrics.BYTES_UP, len(chunk))
        request.body = None
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

    # ------------------------------------------------------------ closing
    @property
    def peer(self) -> str:
        """The client's address, for log lines (looked up only when a line is written)."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    def idle(self) -> bool:
        return self.current is None and self.tunnel is None and not self.queue

    def close(self) -> None:
        self.closing = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        if self.worker.settings.access_log:
            log.info("%s connection closed: %s", self.peer, reason)
        self.closing = True
        if self.tunnel is not None:
            self.tunnel.abort()
        if self.transport is not None:
            self.transport.abort()

    def access_log(self, request: Request, verdict: str, note: str = "", level: int = logging.INFO) -> None:
        """client method target verdict status up= down= duration [note]: one line per request or tunnel."""
        duration = (self.worker.loop.time() - request.started) * 1000
        target = request.host_text if request.tunnel else request.host_text + request.url[:200].decode("latin-1")
        log.log(level, "%s %s %s %s %d up=%d down=%d %.1fms%s", self.peer, request.method.decode("latin-1"),
                target or "-", verdict, request.status, request.bytes_up, request.bytes_down, duration,
                f" {note}" if note else "")


class Upstream(Endpoint, asyncio.Protocol):
    """A keep-alive connection to an origin server; attached to one client request at a time."""

    __slots__ = ("worker", "transport", "parser", "client", "request", "key", "closed", "idle_since", "rechunk",
                 "headers", "reason", "done_early", "until_close", "reused",
                 "answered")

    def __init__(self, worker: Worker):
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.request: Request | None = None
        self.key: tuple[Address, int] = (IPv4Address(0), 0)
        self.closed = False
        self.idle_since = 0.0
        self.rechunk = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.done_early = False
        self.until_close = False
        self.reused = False  # taken from the pool: the server may have closed it just now
        self.answered = False  # some of the current response has arrived
        self.out = None

    def attach(self, client: ClientConnection, request: Request) -> None:
        self.client = client
        self.request = request
        self.until_close = False
        self.answered = False
        self.headers = []
        self.reason = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and exc is None and self.client is not None:
            self._complete(False)  # a body delimited by the end of the connection has just ended
            self.worker.flush()
            return
        client, request = self.client, self.request
        self.client = self.request = None
        if client is not None and request is not None and request.upstream is self:
            if self.reused and not self.answered and request.complete and request.bytes_up == 0:
                # The server closed an idle keep-alive connection as we reused it (the usual race):
                # nothing was answered and there is no body to resend, so try a fresh connection.
                client.retry(request)
            else:
                client.upstream_failed(request, "the upstream server closed the connection"
                                       + (f" ({exc})" if exc else ""))
            self.worker.flush()

    def data_received(self, data: bytes) -> None:
        if self.client is None:  # data on an idle pooled connection: the server broke protocol
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            client, request = self.client, self.request
            self.client = self.request = None
            self.close()
            if client is not None and request is not None:
                client.upstream_failed(request, f"invalid response from the upstream server: {exc}")
            return
        if self.done_early:  # a response without a body ended at its head: start a fresh parser
            self.done_early = False
            self.parser = httptools.HttpResponseParser(self)
        self.worker.flush()

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None and not self.client.paused:
            self.client.transport.resume_reading()

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self.answered = True
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        client, request = self.client, self.request
        if client is None or request is None:
            return
        status = self.parser.get_status_code()
        client.response_head(request, self, status, self.reason, self.headers, self.parser.should_keep_alive())
        if 100 <= status < 200:
            self.headers = []
            self.reason = b""
            return
        if response_ends_at_head(status, request.head_only):
            # httptools would wait for a body the server will not send: the response ends here.
            self.done_early = True
            self._complete(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.client is not None and self.request is not None:
            self.client.response_body(self.request, self, body)

    def on_message_complete(self) -> None:
        if self.done_early or self.client is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return
        self._complete(self.parser.should_keep_alive())

    def _complete(self, keep_alive: bool) -> None:
        client, request = self.client, self.request
        self.client = self.request = None
        if client is not None and request is not None:
            client.response_done(request, self, keep_alive)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


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
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()


def run(settings: HttpProxySettings) -> int:
    """Run the HTTP proxy until SIGTERM/SIGINT (blocking); returns the exit code."""
    from .server import available_cpus, listen_spec, loop_worker, serve

    workers = settings.workers or available_cpus()
    shared = SharedCounters(workers)
    log.info("HTTP proxy allow list: %s", settings.acl.describe())
    started = time.monotonic()
    worker_main = loop_worker(shared, lambda index: Worker(settings, shared, index))
    code = serve("HTTP proxy", listen_spec(settings.port), workers, worker_main,
                 settings.grace_seconds)
    log.debug("HTTP proxy ran for %.1f s (pid %d)", time.monotonic() - started, os.getpid())
    return code
