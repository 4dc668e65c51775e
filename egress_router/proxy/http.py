"""The HTTP proxy's client connections: requests decided (http_rules) and answered, in order; run_http_proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import cast

from ..admin import bind
from ..core.allowlist import AccessList
from ..core.config import HttpProxySettings
from ..ha_view import ACTIVE, STANDBY_REFUSAL, SharedRole
from ..logs import BARE, FIELDS
from . import metrics
from .families import egress_versions
from .http_flow import BUFFERED, QUEUED, UPSTREAM_FULL
from .http_reader import Request as Request  # where the other modules find it
from .http_reader import RequestReader
from .http_rules import (
    HEALTHZ,
    ProxyError,
    ends_connection,
    error_response,
    final_head,
    interim_head,
    keeps_connection,
    local_page,
    parse_target,
    simple_response,
)
from .http_upstream import Upstream, pool_key
from .http_worker import Worker
from .metrics import SharedCounters
from .reload import Reloader, acl_changes, rule_source
from .server import reset
from .squid_log import DENIED, INVALID, INVALID_URL, MISS, TUNNEL, logged_url, squid_line

log = logging.getLogger(__name__)
ERROR_TYPE = "text/plain; charset=utf-8"  # of the proxy's own answers (http_rules.simple_response)


class ClientConnection(RequestReader, asyncio.Protocol):
    """A client of the proxy: requests one after another (pipelining kept in order), or one tunnel."""

    __slots__ = ("worker", "transport", "closing", "advancing")

    def __init__(self, worker: Worker):
        self.worker = worker
        self.transport = None
        self.current: Request | None = None
        self.closing = False
        self.advancing = False  # next_request is starting queued requests
        self.last = worker.now
        self.parser = self.parsing = self.queue = self.resuming = self.upgrading = None  # see RequestReader
        self.head_size = self.head_raw = 0
        self.read_done = False
        self.connecting = None
        self.tunnel = self.relay = None  # see TunnelSide
        self.client_eof = self.upstream_eof = False
        self.holds = 0  # see FlowControl
        self.write_full = False
        self.paused_source = None
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
        self.stop_relay("the client connection closed")
        if self.tunnel is not None:
            if exc is not None:
                reset(self.tunnel)  # the client reset its side: so does the tunnel
            else:
                self.tunnel.close()
            self.log_tunnel()
        if self.current is not None:
            self.let_go(self.current)  # mid-response: the upstream connection cannot be reused

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.client_eof = True
            if self.tunnel.can_write_eof():
                self.tunnel.write_eof()
            return not self.upstream_eof  # keep the other direction open (half-close)
        current, parsing = self.current, self.parsing
        if parsing is not None and (current is None or parsing is current):
            self.abandon("the client closed the connection before its request was complete")
            return False
        if current is None:
            return False
        # The client is done sending: what it sent whole is answered, then the connection ends.
        if parsing is not None and self.queue and parsing in self.queue:
            self.queue.remove(parsing)  # ... not a request it left half-sent
        current.keep_alive = False
        for queued in self.queue or ():
            queued.keep_alive = False
        if current.tunnel:
            self.client_eof = True  # passed on when the tunnel opens
        return True

    def pause_writing(self) -> None:
        source = self.tunnel
        if source is None and self.current is not None and self.current.upstream is not None:
            source = self.current.upstream.transport
        self.write_paused(source)

    def resume_writing(self) -> None:
        self.last = self.worker.now  # the client took what waited for it: not stalled
        self.write_resumed()

    # ------------------------------------------------------------ requests
    def start(self, request: Request) -> None:
        """Decide and dispatch the current request."""
        try:
            role = self.worker.role
            if role is not None and not role.cells[ACTIVE] and request.url[:1] != b"/":
                raise ProxyError(503, STANDBY_REFUSAL, metrics.STANDBY)
            if request.method == b"CONNECT":
                self.start_tunnel(request)
                return
            if request.url[:1] == b"/":
                self.origin_form(request)
                return
            host, request.host_text, port, request.url = parse_target(request.url)
            request.host = host
            request.port = port
            request.head_only = request.method == b"HEAD"
            addresses = self.worker.addresses_of(host, request.host_text)
            if addresses is not None:
                upstream = self.worker.pool.take(pool_key(addresses[0], port))
                if upstream is not None:
                    upstream.send_request(self, request)
                    return
            request.task = self.worker.loop.create_task(
                self.worker.dispatch(self, request, host, port, addresses))
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
        request.head_down = len(head)
        if self.worker.settings.access_log == "squid":
            request.peer_ip = str(upstream.key[0])
            request.content_type = next((value.decode("latin-1") for name, value in headers
                                         if name.lower() == b"content-type"), None)

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
        if self.paused_source is not None:
            self.stops_feeding(upstream.transport)
        if reusable and request.complete:
            self.worker.release(upstream)
        else:
            upstream.close()
        self.finish(request)

    def retry(self, request: Request) -> None:
        request.upstream = None
        if request.host is None or self.closing:
            return
        request.task = self.worker.loop.create_task(
            self.worker.dispatch(self, request, request.host, request.port, None, fresh=True))

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

    def timed(self, request: Request) -> None:
        """The request into the duration histogram: answered (or refused) now; an opened tunnel was counted when it
        opened, the proxy's own pages not at all."""
        if request.local or (request.method == b"CONNECT" and request.status == 200):
            return
        kind = metrics.CONNECT if request.method == b"CONNECT" else metrics.REQUEST
        self.worker.counters.observe(kind, self.worker.loop.time() - request.started)

    def finish(self, request: Request) -> None:
        self.timed(request)
        if self.worker.settings.access_log:
            verdict = "local" if request.local else ("allowed" if request.status < 400 else "error")
            self.access_log(request, verdict)
        self.done(request)

    def done(self, request: Request) -> None:
        """The current request is answered: the connection ends, or the next one starts."""
        self.current = None
        if self.holds:
            self.release(UPSTREAM_FULL | BUFFERED)  # those were for this request's upstream
        if not request.keep_alive or self.closing:
            # corked only after a request read whole (see close: a close with input unread is a reset)
            self.close(corked=(request.complete or request.bodyless) and not self.closing)
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
                if not queue:
                    self.release(QUEUED)
                self.start(request)
        finally:
            self.advancing = False

    def origin_form(self, request: Request) -> None:
        request.local = True
        if local_page(request.method, request.url) == HEALTHZ:
            self.reply(request, 200, "ok\n")
        elif self.worker.settings.metrics_port:  # kept from proxy clients: the admin port serves them
            self.reply(request, 404, f"the metrics are served on the admin port ({self.worker.settings.metrics_port})"
                       "\n")
        else:
            self.reply(request, 200, metrics.prometheus_http(self.worker.shared),
                       content_type=b"text/plain; version=0.0.4")

    def reply(self, request: Request, status: int, body: str, *, content_type: bytes = b"text/plain") -> None:
        request.status = status
        # a body that is not read makes the connection unusable: it says so
        request.keep_alive = request.keep_alive and (request.complete or request.bodyless)
        response = simple_response(status, body, close=not request.keep_alive, content_type=content_type,
                                   head_only=request.method == b"HEAD")
        request.head_down, request.content_type = len(response), content_type.decode() + "; charset=utf-8"
        if self.transport is not None and not self.closing:
            self.send(response)
        self.finish(request)

    def fail(self, exc: ProxyError) -> None:
        request = self.current
        if ends_connection(exc.status) or request is None:
            self.bad_request(exc.message, exc.status, exc.counter)
            return
        if exc.counter is not None:
            self.worker.counters.add(exc.counter)
        request.status = exc.status
        request.keep_alive = keeps_connection(exc.status, request.keep_alive,
                                              request.complete or request.bodyless, request.tunnel)
        response = error_response(exc.status, exc.message, close=not request.keep_alive)
        request.head_down, request.content_type = len(response), ERROR_TYPE
        if self.worker.settings.access_log or exc.status >= 500:
            self.access_log(request, "denied" if exc.status == 403 else "error", exc.message,
                            level=logging.INFO if exc.status < 500 else logging.WARNING)
        if self.transport is not None and not self.closing:
            self.send(response)
        self.timed(request)
        self.done(request)

    def bad_request(self, message: str, status: int = 400, counter: int | None = metrics.BAD) -> None:
        """A request that cannot be read (malformed, too large, too slow): answered, counted, the end."""
        if self.closing:
            return
        if counter is not None:
            self.worker.counters.add(counter)
        response = error_response(status, message, close=True)
        if self.worker.settings.access_log:
            request = self.current or self.parsing
            method = request.method.decode("latin-1") if request is not None and request.method else "-"
            fields = {"client": self.peer, "method": method, "verdict": "bad_request", "status": status,
                      "note": message}
            if self.worker.settings.access_log == "squid":
                elapsed = 0.0 if request is None else (self.worker.loop.time() - request.started) * 1000
                line = squid_line(time.time(), elapsed, self.peer_ip, INVALID, status, len(response), "NONE",
                                  INVALID_URL, None, ERROR_TYPE)
                log.info("%s", line, extra={BARE: True, FIELDS: fields})
            else:
                log.info("%s %s - bad_request %d up=0 down=0 - %s", self.peer, method, status, message,
                         extra={FIELDS: fields})
        self.send(response)
        self.close()

    # ------------------------------------------------------------ closing
    @property
    def peer(self) -> str:
        """The client's address, for log lines (looked up only when a line is written)."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    @property
    def peer_ip(self) -> str:
        """The client's address alone, as squid logs it."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if peer else "-"

    def idle(self) -> bool:
        return self.current is None and self.tunnel is None and not self.queue

    def stalled(self, seconds: float) -> None:
        """No data for `seconds` (EGRESS_HTTP_PROXY_TUNNEL_IDLE_TIMEOUT) with a request or a tunnel open. A request
        whose upstream sent nothing yet is answered 504 (the connection may go on); a response cut off midway ends
        with a reset (a close-delimited body must not look whole); an idle tunnel is closed."""
        request = self.current
        if self.tunnel is None and request is not None and not request.sent and self.transport is not None \
                and not self.closing:
            self.let_go(request)
            self.fail(ProxyError(504, f"the upstream server sent no response for {seconds:g} s",
                                 metrics.UPSTREAM_TIMEOUTS))
            self.worker.flush()
            return
        self.abort(f"no data for {seconds:g} s", hard=self.tunnel is None and request is not None)

    def let_go(self, request: Request) -> None:
        """Nothing more goes to or comes from the request's upstream: its connection (which cannot be
        reused mid-request) is closed, or the connecting given up."""
        upstream = request.upstream
        if upstream is not None:
            request.upstream = None
            upstream.detach()
            upstream.close()
        task = request.task
        if task is not None and not task.done():
            task.cancel()

    def abandon(self, reason: str) -> None:
        """The client left with a request half-sent: both sides are freed at once (not an upstream error)."""
        if self.worker.settings.access_log:
            log.info("%s connection closed: %s", self.peer, reason)
        if self.current is not None:
            self.let_go(self.current)
        self.close()

    def close(self, corked: bool = False) -> None:
        """End the connection once what is queued for the client is written. `corked`: the last bytes and the
        FIN in one segment, not two (TCP_CORK before the last write; the close pushes both): a short answer with
        `Connection: close` costs the client and the proxy one segment and a wake-up fewer. Only where the
        request was read whole: a close with unread input resets the connection, and a reset drops what the
        cork still holds (not yet sent), where without it the answer would at least have gone out first."""
        self.closing = True
        transport = self.transport
        if corked and self.out is not None and transport is not None and not transport.is_closing() and \
                not transport.get_write_buffer_size():
            try:  # noqa: SIM105 (once per connection: no context manager made for it)
                transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            except (AttributeError, OSError):
                pass
        self.flush()
        if transport is not None:
            transport.close()

    def abort(self, reason: str, *, hard: bool = False) -> None:
        """End the connection now, unsent output dropped; `hard`: with a TCP reset."""
        if self.worker.settings.access_log:
            log.info("%s connection closed: %s", self.peer, reason)
        self.closing = True
        self.stop_relay(reason)
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
        method = request.method.decode("latin-1")
        target = request.host_text if request.tunnel else request.host_text + request.url[:200].decode("latin-1")
        fields: dict[str, str | int | float] = {
            "client": self.peer, "method": method, "target": target or "-", "verdict": verdict,
            "status": request.status, "bytes_up": request.bytes_up, "bytes_down": request.bytes_down,
            "duration_ms": round(duration, 1)}
        if note:
            fields["note"] = note
        if self.worker.settings.access_log == "squid":
            log.log(level, "%s", self.squid_line(request, verdict, duration), extra={BARE: True, FIELDS: fields})
            return
        log.log(level, "%s %s %s %s %d up=%d down=%d %.1fms%s", self.peer, method, target or "-", verdict,
                request.status, request.bytes_up, request.bytes_down, duration, f" {note}" if note else "",
                extra={FIELDS: fields})

    def squid_line(self, request: Request, verdict: str, duration: float) -> str:
        """The request as squid's access.log has it (squid_log.py)."""
        connect = request.method == b"CONNECT"
        if verdict == "denied":
            action = DENIED
        elif connect and request.status == 200:
            action = TUNNEL
        else:
            action = MISS
        path = request.url.decode("latin-1")
        url = path if connect or request.local or not request.host_text else \
            logged_url(request.host_text, request.port, path)
        return squid_line(time.time(), duration, self.peer_ip, action, request.status,
                          request.head_down + request.bytes_down, request.method.decode("latin-1"), url,
                          request.peer_ip, request.content_type)


def run_http_proxy(settings: HttpProxySettings, env: Mapping[str, str] | None = None,
                   admin_socket: socket.socket | None = None, role: SharedRole | None = None) -> int:
    """Run the HTTP proxy until SIGTERM/SIGINT (blocking); returns the exit code.

    With `env` (the environment `settings` came from), the allow list is reloaded when its file changes
    and on SIGHUP (proxy/reload.py). `admin_socket`: the admin port, when the caller opened it already (before
    configuring the network). `role`: a high-availability replica's role (ha_keeper.py); a standby refuses requests."""
    from .server import auto_workers, listen_spec, loop_worker, serve

    workers = settings.workers or auto_workers("HTTP proxy")
    shared = SharedCounters(workers)
    if admin_socket is None and settings.metrics_port:
        admin_socket = bind(settings.metrics_port)
    log.info("HTTP proxy allow list: %s", settings.acl.describe())
    started = time.monotonic()
    reloader = None if env is None else allow_list_reloader(settings, env, shared)
    versions = egress_versions(env)

    def make_worker(index: int) -> Worker:
        # a worker forked after a reload starts from the list in force then, not from the start-up one
        in_force = settings if reloader is None else dataclasses.replace(settings, acl=reloader.rules)
        return Worker(in_force, shared, index, ClientConnection, reloader, versions, admin_socket, role)

    code = serve("HTTP proxy", listen_spec(settings.port), workers, loop_worker(shared, make_worker),
                 settings.grace_seconds, reloader)
    log.debug("HTTP proxy ran for %.1f s (pid %d)", time.monotonic() - started, os.getpid())
    return code


def allow_list_reloader(settings: HttpProxySettings, env: Mapping[str, str],
                        shared: SharedCounters) -> Reloader[AccessList]:
    from ..core import variables as v
    from ..core.config import load_http_proxy

    source = rule_source(env, v.HTTP_DESTINATION)

    def parse(text: str) -> AccessList:
        """The core's loader on `text` as the file's content (inline rules: the environment's, `text` unused)."""
        return load_http_proxy(env, {source.path: text} if source.path is not None else {}).acl

    return Reloader(source, settings.acl, parse, acl_changes, shared.row(0))
