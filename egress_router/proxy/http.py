"""The HTTP proxy's client side: httptools' request parser wired to http_rules and the transports; run_http_proxy."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import cast

import httptools

from ..core.config import HttpProxySettings
from ..core.hosts import Address
from . import metrics
from .http_rules import (
    BODY,
    CHUNKED,
    HEALTHZ,
    TUNNEL_ESTABLISHED,
    Host,
    ProxyError,
    ends_connection,
    error_response,
    final_head,
    head_too_large,
    host_text,
    interim_head,
    keeps_connection,
    local_page,
    parse_absolute_form,
    parse_connect_target,
    request_framing,
    simple_response,
)
from .http_upstream import Endpoint, TunnelUpstream, Upstream
from .http_worker import Worker
from .metrics import SharedCounters
from .server import reset

log = logging.getLogger(__name__)


class Request:
    """One request from the client, parsed and being forwarded."""

    __slots__ = ("url", "headers", "method", "version", "keep_alive", "chunked", "complete", "body",
                 "started", "host_text", "port", "upstream", "head_only", "bytes_up", "bytes_down", "status",
                 "tunnel", "sent", "local", "host", "trailers", "bodyless")

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
        self.trailers: list[tuple[bytes, bytes]] | None = None  # of a chunked body
        self.bodyless = False  # its head says it has no body: it is read whole with its head


class ClientConnection(Endpoint, asyncio.Protocol):
    """A client of the proxy: requests one after another (pipelining kept in order), or one tunnel."""

    __slots__ = ("worker", "transport", "parser", "parsing", "current", "queue", "head_size", "head_raw", "last",
                 "closing", "tunnel", "client_eof", "upstream_eof", "paused", "advancing", "read_done")

    def __init__(self, worker: Worker):
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None  # made when the first bytes arrive
        self.parsing: Request | None = None
        self.current: Request | None = None
        self.queue: list[Request] | None = None  # pipelined requests waiting behind the current one
        self.head_size = 0  # of the head being parsed, as its parts arrive
        self.head_raw = 0  # bytes of reads that did not finish the head being parsed
        self.last = worker.now
        self.closing = False
        self.tunnel: asyncio.Transport | None = None
        self.client_eof = False  # tunnel half-closes
        self.upstream_eof = False
        self.paused = False
        self.advancing = False  # next_request is starting queued requests
        self.read_done = False  # the last request is read (Connection: close): what follows is ignored
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
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        parsing = self.parsing
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            self.parser_error(exc)
        else:
            if parsing is not None and self.parsing is parsing and not parsing.method:
                # all of it went into one head, which the parser keeps until its header ends: bound that too
                self.head_raw += len(data)
                if self.head_raw > self.worker.settings.header_limit:
                    self.fail(head_too_large(False))
        self.worker.flush()

    def parser_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__  # what a callback raised (httptools reports it as a callback error)
        if isinstance(cause, ProxyError):
            self.fail(cause)
        elif self.read_done:
            pass  # bytes after the last request (RFC 9112 9.6) are ignored: the answer to it is still due
        else:
            if cause is not None:
                log.error("%s: error handling a request", self.peer, exc_info=cause)
            self.bad_request(f"malformed request: {exc}")

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
        self.head_size = self.head_raw = 0

    def on_url(self, url: bytes) -> None:
        request = self.parsing
        assert request is not None
        request.url += url
        self.head_size += len(url)
        if self.head_size > self.worker.settings.header_limit:
            raise head_too_large(True)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None
        if request.method:  # the head is complete: a trailer of a chunked body
            if request.trailers is None:
                request.trailers = []
            request.trailers.append((name, value))
        else:
            request.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.worker.settings.header_limit:
            raise head_too_large(False)

    def on_headers_complete(self) -> None:
        request = self.parsing
        assert request is not None
        parser = self.parser
        assert parser is not None
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive() and not self.worker.draining
        framing = request_framing(request.headers)
        request.chunked = framing & CHUNKED != 0
        request.bodyless = not framing & BODY
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
        elif request.upstream is not None:
            request.upstream.send_body(request, body)

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        request.complete = True
        self.parsing = None
        if not request.keep_alive and request.method != b"CONNECT":
            self.read_done = True
        if request.body is None and request.upstream is not None:
            request.upstream.send_body_end(request)

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
                upstream = self.worker.pool.take((addresses[0], port))
                if upstream is not None:
                    upstream.send_request(self, request)
                    return
            self.worker.loop.create_task(self.worker.dispatch(self, request, host, port, addresses))
        except ProxyError as exc:
            self.fail(exc)

    # upstream -> client
    def response_head(self, request: Request, upstream: Upstream, status: int, reason: bytes,
                      headers: list[tuple[bytes, bytes]], upstream_keep_alive: bool) -> None:
        request.status = status
        transport = self.transport
        if transport is None or self.closing:
            return
        if 100 <= status < 200:  # informational: pass it on, the final response follows
            try:
                interim = interim_head(status, reason, headers, request.version)
            except ProxyError as exc:
                upstream.detach()
                upstream.close()
                self.upstream_failed(request, exc.message)
                return
            if interim is not None:
                self.send(interim)
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
        self.worker.loop.create_task(self.worker.dispatch(self, request, request.host, request.port, None,
                                                          fresh=True))

    def upstream_failed(self, request: Request, message: str) -> None:
        """The upstream closed or failed before the response was complete."""
        request.upstream = None
        self.worker.counters.add(metrics.UPSTREAM_ERRORS)
        if request.sent or self.transport is None:
            # The client has part of a response: a reset, so that it cannot take it for all of it (a clean
            # end would look complete to an HTTP/1.0 client or for a body that ends with the connection).
            self.abort(message, hard=True)
            return
        self.fail(ProxyError(502, message))

    def finish(self, request: Request) -> None:
        if self.worker.settings.access_log:
            verdict = "local" if request.local else ("allowed" if request.status < 400 else "error")
            self.access_log(request, verdict)
        self.done(request)

    def done(self, request: Request) -> None:
        """The current request is answered: the connection ends, or the next one starts."""
        self.current = None
        if not request.keep_alive or self.closing:
            self.close()
        elif self.queue:
            self.next_request()

    def next_request(self) -> None:
        """Start the queued requests in turn: answering one at once (a probe, a refusal) ends it, and the
        loop here, not a recursion through done(), starts the next."""
        if self.advancing:
            return
        self.advancing = True
        try:
            queue = self.queue
            while queue and self.current is None and not self.closing:
                self.current = request = queue.pop(0)
                if not queue and self.paused and self.transport is not None:
                    self.transport.resume_reading()
                    self.paused = False
                self.start(request)
        finally:
            self.advancing = False

    def origin_form(self, request: Request) -> None:
        request.local = True
        if local_page(request.method, request.url) == HEALTHZ:
            self.reply(request, 200, "ok\n")
        else:
            self.reply(request, 200, metrics.prometheus_http(self.worker.shared),
                       content_type=b"text/plain; version=0.0.4")

    def reply(self, request: Request, status: int, body: str, *, content_type: bytes = b"text/plain") -> None:
        request.status = status
        # a body that is not read makes the connection unusable: it says so
        request.keep_alive = request.keep_alive and (request.complete or request.bodyless)
        if self.transport is not None and not self.closing:
            self.send(simple_response(status, body, close=not request.keep_alive, content_type=content_type,
                                      head_only=request.method == b"HEAD"))
        self.finish(request)

    def fail(self, exc: ProxyError) -> None:
        request = self.current
        if ends_connection(exc.status) or request is None:
            self.bad_request(exc.message, exc.status, exc.counter)
            return
        if exc.counter is not None:
            self.worker.counters.add(exc.counter)
        request.status = exc.status
        if self.worker.settings.access_log or exc.status >= 500:
            self.access_log(request, "denied" if exc.status == 403 else "error", exc.message,
                            level=logging.INFO if exc.status < 500 else logging.WARNING)
        request.keep_alive = keeps_connection(exc.status, request.keep_alive, request.complete or request.bodyless)
        if self.transport is not None and not self.closing:
            self.send(error_response(exc.status, exc.message, close=not request.keep_alive))
        self.done(request)

    def bad_request(self, message: str, status: int = 400, counter: int | None = metrics.BAD) -> None:
        """A request that cannot be read (malformed, too large, too slow): answered, counted, the end."""
        if self.closing:
            return
        if counter is not None:
            self.worker.counters.add(counter)
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

    def abort(self, reason: str, *, hard: bool = False) -> None:
        """End the connection now, unsent output dropped; `hard`: with a TCP reset."""
        if self.worker.settings.access_log:
            log.info("%s connection closed: %s", self.peer, reason)
        self.closing = True
        if self.tunnel is not None:
            self.tunnel.abort()
        if hard:
            self.flush()
            reset(self.transport)
        elif self.transport is not None:
            self.transport.abort()

    def access_log(self, request: Request, verdict: str, note: str = "", level: int = logging.INFO) -> None:
        """client method target verdict status up= down= duration [note]: one line per request or tunnel."""
        duration = (self.worker.loop.time() - request.started) * 1000
        target = request.host_text if request.tunnel else request.host_text + request.url[:200].decode("latin-1")
        log.log(level, "%s %s %s %s %d up=%d down=%d %.1fms%s", self.peer, request.method.decode("latin-1"),
                target or "-", verdict, request.status, request.bytes_up, request.bytes_down, duration,
                f" {note}" if note else "")


def run_http_proxy(settings: HttpProxySettings) -> int:
    """Run the HTTP proxy until SIGTERM/SIGINT (blocking); returns the exit code."""
    from .server import available_cpus, listen_spec, loop_worker, serve

    workers = settings.workers or available_cpus()
    shared = SharedCounters(workers)
    log.info("HTTP proxy allow list: %s", settings.acl.describe())
    started = time.monotonic()
    worker_main = loop_worker(shared, lambda index: Worker(settings, shared, index, ClientConnection))
    code = serve("HTTP proxy", listen_spec(settings.port), workers, worker_main,
                 settings.grace_seconds)
    log.debug("HTTP proxy ran for %.1f s (pid %d)", time.monotonic() - started, os.getpid())
    return code
