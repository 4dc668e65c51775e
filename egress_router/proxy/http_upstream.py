"""The HTTP proxy's upstream side: keep-alive origin connections and their pool."""

from __future__ import annotations

import asyncio
import os
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, TypeAlias, cast

import httptools

from ..core.hosts import Address
from . import metrics, splice
from .http_flow import UPSTREAM_FULL, Endpoint
from .http_rules import NO_BODY_STATUS, last_chunk, may_retry, request_head

if TYPE_CHECKING:
    from .http import ClientConnection
    from .http_reader import Request
    from .http_worker import Worker

_SPLICE = splice.available()
__all__ = ["POOL_IDLE_SECONDS", "POOL_MAX_PER_KEY", "SPLICE_BODY_MIN", "Endpoint", "PoolKey", "Upstream",
           "UpstreamPool", "pool_key"]  # Endpoint: from http_flow

POOL_IDLE_SECONDS = 30.0  # idle upstream connections are closed after this
POOL_MAX_PER_KEY = 256
# The pool's key for an (address, port): ipaddress hashes an address in Python (hash(hex(int))), on every take
# and put; an IPv4 address is keyed by its integer instead. IPv6 keeps the address (its int could be an IPv4
# one's), so keys of the two families never meet.
PoolKey: TypeAlias = tuple[int | Address, int]


def pool_key(address: Address, port: int) -> PoolKey:
    return (int(address), port) if type(address) is IPv4Address else (address, port)


# The rest of a Content-Length body at least this long goes upstream -> client with splice(2): setting the
# relay up costs ~10 syscalls (dups, pipes, epoll), what copying ~30 KB through Python costs; 1 MiB keeps
# that under 1% of the copying it saves, and leaves the small responses of the request path untouched.
SPLICE_BODY_MIN = 1024 * 1024


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The one Content-Length of a response head (llhttp refused a malformed or conflicting one); None if none."""
    found = None
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            if found is not None or not value.strip().isdigit():
                return None
            found = int(value)
    return found


class Upstream(Endpoint, asyncio.Protocol):
    """A keep-alive connection to an origin server; attached to one client request at a time."""

    __slots__ = ("worker", "transport", "parser", "client", "request", "key", "closed", "idle_since", "rechunk",
                 "headers", "reason", "done_early", "until_close", "reused",
                 "answered", "body_left", "keep", "relay", "pool_key")

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
        self.pool_key: PoolKey | None = None  # pool_key(*key), made when first pooled (key is set once connected)
        self.out = None
        self.body_left = -1  # of a body that may be spliced (Content-Length, passed on as it is); -1: none
        self.keep = False  # that response's keep-alive, as its head said
        self.relay: splice.Relay | None = None  # moving the rest of that body

    # client -> upstream
    def send_request(self, client: ClientConnection, request: Request) -> None:
        """Take on the client's request: its head, then as much of its body as has been read."""
        self.worker.counters.add(metrics.ALLOWED)
        request.upstream = self
        self.client = client
        self.request = request
        self.until_close = False
        self.answered = False
        self.headers = []
        self.reason = b""
        self.send(request_head(request.method, request.url, request.host_text, request.port, request.headers,
                               request.chunked))
        body, request.body = request.body, None
        for chunk in body or ():
            self.send_body(request, chunk)
        if request.complete:
            self.send_body_end(request)
        if client.holds or client.write_full:
            client.feeding(self.transport)

    def send_body(self, request: Request, chunk: bytes) -> None:
        if self.transport is None or self.closed:
            return
        request.bytes_up += len(chunk)
        self.worker.counters.add(metrics.BYTES_UP, len(chunk))
        if request.chunked:
            self.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.send(chunk)

    def send_body_end(self, request: Request) -> None:
        if request.chunked and self.transport is not None and not self.closed:
            self.send(last_chunk(request.trailers))

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
            if may_retry(request.method, self.reused, self.answered, request.complete, request.bytes_up):
                # The server closed an idle keep-alive connection as we reused it (the usual race).
                client.retry(request)
            else:
                client.upstream_failed(request, "the upstream server closed the connection"
                                       + (f" ({exc})" if exc else ""))
            self.worker.flush()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # data on an idle pooled connection: the server broke protocol
            self.close()
            return
        client.last = self.worker.now  # a response that flows is not stalled, however long it lasts
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # after a 101, which its client was answered 502 for
            self.detach()
            self.close()
        except httptools.HttpParserError as exc:
            client, request = self.client, self.request
            self.detach()
            self.close()
            if client is not None and request is not None:
                client.upstream_failed(request, f"invalid response from the upstream server: {exc}")
        else:
            if self.done_early:  # a response without a body ended at its head: start a fresh parser
                self.done_early = False
                self.parser = httptools.HttpResponseParser(self)
        self.worker.flush()  # the answers this made, an error answer included
        if self.body_left >= SPLICE_BODY_MIN:
            self.splice_body()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.hold(UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.last = self.worker.now  # the server took the request body that waited: not stalled
            self.client.release(UPSTREAM_FULL)

    def detach(self) -> None:
        """No client any more: what the server still sends is not for anyone."""
        self.client = self.request = None

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
        if request.head_only or status in NO_BODY_STATUS:  # response_ends_at_head, without a call per response
            # httptools would wait for a body the server will not send: the response ends here.
            self.done_early = True
            self._complete(self.parser.should_keep_alive())
        elif not self.rechunk and not self.until_close and _SPLICE:
            length = content_length(self.headers)
            if length is not None and length >= SPLICE_BODY_MIN:
                self.body_left = length
                self.keep = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.body_left > 0:
            self.body_left -= len(body)
        if self.client is not None and self.request is not None:
            self.client.response_body(self.request, self, body)

    def on_message_complete(self) -> None:
        self.body_left = -1
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
        self.body_left = -1
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.abort("the upstream connection closed")  # its dups: the sockets close with the transports
        if self.transport is not None:
            self.transport.close()

    # a large body with splice(2)
    def splice_body(self) -> None:
        """Move the rest of a large Content-Length body from this connection's socket to the client's with
        splice(2), once the client's transport has nothing buffered (until then, through Python).

        Both transports stay; this one is paused meanwhile (the relay reads a dup of its socket), the client's
        is not written to (its requests are still read and queued behind this one). At the body's end this
        connection reads again with a fresh parser and goes back to the pool, as after any response."""
        client, transport = self.client, self.transport
        if client is None or transport is None or self.closed or client.closing:
            self.body_left = -1
            return
        theirs = client.transport
        if theirs is None or theirs.is_closing():
            self.body_left = -1
            return
        if client.write_full or theirs.get_write_buffer_size():
            return  # the client has not taken all that was written to it yet: tried again with the next bytes
        mine, sock = transport.get_extra_info("socket"), theirs.get_extra_info("socket")
        if mine is None or sock is None:
            self.body_left = -1
            return
        try:
            a = splice.adopt(os.dup(sock.fileno()), sock.family)
        except OSError:  # out of descriptors (EMFILE): this body goes through Python
            self.body_left = -1
            return
        try:
            b = splice.adopt(os.dup(mine.fileno()), mine.family)
        except OSError:
            a.close()
            self.body_left = -1
            return
        transport.pause_reading()
        self.relay = relay = splice.Relay(self.worker.loop, a, b, self.body_bytes, self.body_ended,
                                          limit_down=self.body_left, up=False, pass_resets=False)
        try:
            relay.start()
        except OSError:  # no pipe to be had (EMFILE): nothing moved, the parser reads on
            self.relay = None
            self.body_left = -1
            a.close()
            b.close()
            transport.resume_reading()

    def body_bytes(self, direction: int, n: int) -> None:
        self.body_left -= n
        if self.client is not None:
            self.client.last = self.worker.now
        self.worker.counters.add(metrics.BYTES_DOWN, n)
        if self.request is not None:
            self.request.bytes_down += n

    def body_ended(self, how: str) -> None:
        relay, self.relay = self.relay, None
        assert relay is not None
        if how == splice.LIMIT:  # the whole body: the relay hands the dups back
            for sock in relay.socks:
                sock.close()
            self.body_left = -1
            self.parser = httptools.HttpResponseParser(self)
            if self.transport is not None:
                self.transport.resume_reading()
            self._complete(self.keep)
        elif how == splice.A_FAILED:  # the client reset, or cannot be written to: as its transport's failure
            if self.client is not None and self.client.transport is not None:
                self.client.transport.abort()
        else:  # the server closed (SHORT) or failed before the body's end: the client sees a cut-off
            self.body_left = -1
            client, request = self.client, self.request
            self.detach()
            self.close()
            if client is not None and request is not None and request.upstream is self:
                client.upstream_failed(request, "the upstream server closed the connection"
                                       + (f" ({relay.error})" if relay.error else ""))
        self.worker.flush()


class UpstreamPool:
    """Idle keep-alive upstream connections by (address, port), the most recently used last."""

    __slots__ = ("conns",)

    def __init__(self) -> None:
        self.conns: dict[PoolKey, list[Upstream]] = {}

    def take(self, key: PoolKey) -> Upstream | None:
        """An open idle connection to `key` (pool_key), marked as reused; None if there is none."""
        conns = self.conns.get(key)
        while conns:
            upstream = conns.pop()
            if not upstream.closed:
                upstream.reused = True
                return upstream
        return None

    def put(self, upstream: Upstream, now: float) -> None:
        """Keep an upstream connection whose response is complete for the next request (closed if full)."""
        key = upstream.pool_key
        if key is None:
            key = upstream.pool_key = pool_key(*upstream.key)
        conns = self.conns.get(key)
        if conns is None:
            conns = self.conns[key] = []
        elif len(conns) >= POOL_MAX_PER_KEY:
            upstream.close()
            return
        upstream.client = None
        upstream.idle_since = now
        conns.append(upstream)

    def expire(self, now: float) -> None:
        """Close what has been idle too long, forget what is closed."""
        for key, conns in list(self.conns.items()):
            keep = [u for u in conns if now - u.idle_since < POOL_IDLE_SECONDS and not u.closed]
            for upstream in conns:
                if upstream not in keep:
                    upstream.close()
            if keep:
                self.conns[key] = keep
            else:
                del self.conns[key]

    def close_all(self) -> None:
        for conns in self.conns.values():
            for upstream in conns:
                upstream.close()
