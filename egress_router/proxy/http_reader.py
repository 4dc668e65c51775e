"""Reading requests from an HTTP proxy client: httptools' callbacks, head limits, Upgrade requests, trailers."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import httptools

from . import metrics
from .http_flow import BUFFER_LIMIT, BUFFERED, QUEUED
from .http_rules import BODY, CHUNKED, UPGRADE, Host, ProxyError, head_too_large, request_framing, stand_in_head
from .http_tunnel import TunnelSide

if TYPE_CHECKING:
    from .http_upstream import Upstream

log = logging.getLogger(__name__)


class Request:
    """One request from the client, parsed and being forwarded."""

    __slots__ = ("url", "headers", "method", "version", "keep_alive", "chunked", "complete", "body",
                 "started", "host_text", "port", "upstream", "head_only", "bytes_up", "bytes_down", "status",
                 "tunnel", "sent", "local", "host", "buffered", "bodyless", "upgrade", "trailers", "task",
                 "peer_ip", "content_type", "head_down")

    def __init__(self, now: float):
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""  # set when the head is complete
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
        self.buffered = 0  # bytes in `body`
        self.bodyless = False  # its head says it has no body: it is read whole with its head
        self.upgrade = False  # its head asks for a protocol upgrade (see ClientConnection.feed)
        self.trailers: list[tuple[bytes, bytes]] | None = None  # of a chunked body
        self.task: asyncio.Task[Any] | None = None  # connecting upstream for it
        # for squid's access.log line: the upstream's address, the reply's Content-Type, its head's size
        self.peer_ip: str | None = None
        self.content_type: str | None = None
        self.head_down = 0


class RequestReader(TunnelSide):
    """The client connection's reading side: bytes in, Requests out (to `start`, or queued behind the
    current one), bodies to their upstream or held (up to BUFFER_LIMIT) until there is one."""

    __slots__ = ("parser", "parsing", "queue", "head_size", "head_raw", "resuming", "upgrading", "read_done",
                 "connecting")
    parser: httptools.HttpRequestParser | None  # made when the first bytes arrive
    parsing: Request | None
    queue: list[Request] | None  # pipelined requests waiting behind the current one
    head_size: int  # of the head being parsed, as its parts arrive
    head_raw: int  # bytes of reads that did not finish the head being parsed
    resuming: Request | None  # an Upgrade request whose stand-in head is being parsed
    upgrading: Request | None  # an Upgrade request whose head the parser has finished
    read_done: bool  # the last request is read (Connection: close): what follows is ignored
    connecting: Request | None  # a CONNECT read: what follows is for its tunnel (kept until it opens)

    if TYPE_CHECKING:
        @property
        def peer(self) -> str: ...
        def start(self, request: Request) -> None: ...
        def bad_request(self, message: str, status: int = 400, counter: int | None = metrics.BAD) -> None: ...

    def data_received(self, data: bytes) -> None:
        self.last = self.worker.now
        if self.tunnel is not None:
            self.tunnel.write(data)
            self.worker.counters.add(metrics.BYTES_UP, len(data))
            if self.current is not None:
                self.current.bytes_up += len(data)
            self.try_splice()  # see TunnelSide.try_splice
            return
        if self.closing:
            return
        if self.connecting is not None:  # the tunnel is not open yet: the bytes wait for it
            self.hold_for_tunnel(self.connecting, data)
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        parsing = self.parsing
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded(parser, data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            self.parser_error(exc)
        else:
            if parsing is not None and self.parsing is parsing and not parsing.method:
                # all of it went into one head, which the parser keeps until its header ends: bound that too
                self.head_raw += len(data)
                if self.head_raw > self.worker.settings.header_limit:
                    self.fail(head_too_large(False))
        self.worker.flush()

    def upgraded(self, parser: httptools.HttpRequestParser, rest: bytes) -> None:
        """The parser stopped after a head that asks for an upgrade. After a CONNECT, the bytes that follow
        are the tunnel's. After an Upgrade request (the proxy does no upgrades: it is forwarded as a plain
        one), a stand-in head with only its framing lets the parser read on: its body, the next requests."""
        while True:  # a loop, not a recursion: any number of Upgrade requests may be pipelined
            request = self.upgrading
            if request is None:  # a CONNECT: the last request read (the current one, or queued behind it)
                connect = self.queue[-1] if self.queue else self.current
                if connect is not None and connect.method == b"CONNECT":  # (else refused already: closing)
                    self.connecting = connect
                    if rest:
                        self.hold_for_tunnel(connect, rest)
                return
            self.upgrading = None
            self.resuming = request
            data = stand_in_head(request.headers, request.chunked) + rest
            try:
                parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                rest = data[upgrade.args[0]:]
            except httptools.HttpParserError as exc:
                self.parser_error(exc)
                return

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

    # httptools callbacks
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
        if self.resuming is not None:  # the stand-in head after an Upgrade request: its body is that request's
            self.parsing, self.resuming = self.resuming, None
            return
        parser = self.parser
        assert parser is not None
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive() and not self.worker.draining
        framing = request_framing(request.headers)
        request.chunked = framing & CHUNKED != 0
        request.bodyless = not framing & BODY
        if framing & UPGRADE and request.method != b"CONNECT" and parser.should_upgrade():
            request.upgrade = True
        if self.current is None:
            self.current = request
            self.start(request)
        else:
            if self.queue is None:
                self.queue = []
            self.queue.append(request)
            self.hold(QUEUED)

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        assert request is not None
        if request.body is not None:
            request.body.append(body)
            request.buffered += len(body)
            if request.buffered >= BUFFER_LIMIT:
                self.hold(BUFFERED)  # until an upstream connection takes it
        elif request.upstream is not None:
            request.upstream.send_body(request, body)

    def on_message_complete(self) -> None:
        request = self.parsing
        assert request is not None
        if request.upgrade:  # not the end: its body (if any) follows the stand-in head (see feed)
            request.upgrade = False
            self.upgrading = request
            return
        request.complete = True
        self.parsing = None
        if not request.keep_alive and request.method != b"CONNECT":
            self.read_done = True
        if request.body is None and request.upstream is not None:
            request.upstream.send_body_end(request)
