"""The DNS proxy worker: TCP forwarding to names and addresses, re-resolved, balanced, health-checked.

Each configured port forwards to one host. A name is resolved with the pod's nameservers
(dnspython, A and AAAA), honouring the answer's TTL within limits; every address is a backend.
New connections go to the healthy backend with the fewest open connections (round-robin among
equals); a backend that refuses or times out is skipped and the connection is retried elsewhere;
only an active TCP check that succeeds brings the backend back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from ipaddress import IPv6Address
from typing import cast

from ..core.config import DnsProxySettings
from ..core.forwards import Forward
from ..core.hosts import Address
from . import metrics
from .lookup import describe_dns_error, resolve
from .metrics import SharedCounters, WorkerCounters
from .server import handle_stop_signals, reset

log = logging.getLogger(__name__)


RESOLVE_RETRY_MAX = 30.0
RESOLVE_MIN_INTERVAL = 0.2  # even a TTL of 0 must not make the proxy query in a tight loop
PENDING_LIMIT = 256 * 1024  # client bytes held while the backend connection is being made
class Backend:
    """One address of a forward's host."""

    __slots__ = ("address", "port", "open", "down_until", "checking", "text")

    def __init__(self, address: Address, port: int):
        self.address = address
        self.port = port
        self.open = 0
        self.down_until = 0.0
        self.checking = False
        self.text = f"[{address}]:{port}" if isinstance(address, IPv6Address) else f"{address}:{port}"


class Target:
    """A forward and its current backends (static for an address, resolved for a name)."""

    def __init__(self, worker: DnsWorker, forward: Forward):
        self.worker = worker
        self.forward = forward
        self.backends: list[Backend] = []
        self.resolved_once = False
        self.failing = False
        self.turn = 0
        self.first_attempt = asyncio.Event()  # set once the first lookup has answered or failed
        if not isinstance(forward.host, str):
            self.backends = [Backend(forward.host, forward.remote_port)]
            self.resolved_once = True

    @property
    def ready(self) -> bool:
        return bool(self.backends)

    def choose(self, exclude: set[Backend]) -> Backend | None:
        """Least open connections among healthy backends, round-robin among equals; all down: any."""
        now = self.worker.loop.time()
        candidates = [b for b in self.backends if b not in exclude and b.down_until <= now]
        if not candidates:
            candidates = sorted((b for b in self.backends if b not in exclude), key=lambda b: b.down_until)[:1]
        if not candidates:
            return None
        fewest = min(b.open for b in candidates)
        equal = [b for b in candidates if b.open == fewest]
        self.turn += 1
        return equal[self.turn % len(equal)]

    async def keep_resolved(self) -> None:
        """Re-resolve the name as its TTL says; keep the last good answer when DNS fails."""
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        assert isinstance(self.forward.host, str)
        name = self.forward.host
        settings = self.worker.settings
        resolver = dns.asyncresolver.Resolver()
        retry = 1.0
        while True:
            try:
                addresses, ttl = await resolve(resolver, name)
            except (dns.exception.DNSException, OSError) as exc:
                self.first_attempt.set()
                if self.resolved_once:
                    if not self.failing:
                        log.warning("Port %d: cannot resolve %s (%s); keeping the last answer (%s)",
                                    self.forward.port, name, describe_dns_error(exc),
                                    ", ".join(b.text for b in self.backends))
                else:
                    log.warning("Port %d: cannot resolve %s (%s); connections are refused until it resolves; "
                                "retrying in %g s", self.forward.port, name, describe_dns_error(exc), retry)
                self.failing = True
                await asyncio.sleep(retry)
                retry = min(retry * 2, RESOLVE_RETRY_MAX)
                continue
            retry = 1.0
            if self.failing:
                log.info("Port %d: %s resolves again", self.forward.port, name)
                self.failing = False
            self.update(addresses)
            self.first_attempt.set()
            await asyncio.sleep(max(RESOLVE_MIN_INTERVAL, min(max(ttl, settings.ttl_min), settings.ttl_max)))

    def update(self, addresses: list[Address]) -> None:
        current = {b.address: b for b in self.backends}
        fresh = [current.get(a) or Backend(a, self.forward.remote_port) for a in addresses]
        # A server that rotates its records (CoreDNS loadbalance) changes the order, not the set: not news.
        if {b.address for b in fresh} != set(current):
            log.info("Port %d: %s is now %s", self.forward.port, self.forward.host,
                     ", ".join(b.text for b in fresh) or "(no addresses)")
        self.backends = fresh
        self.resolved_once = self.resolved_once or bool(fresh)

    def mark_down(self, backend: Backend, reason: str) -> None:
        """Take the backend out of rotation until an active check succeeds (not merely until a timer runs
        out: a backend whose connects time out would otherwise make one client in a few wait that long)."""
        worker = self.worker
        if backend.down_until <= worker.loop.time():
            log.warning("Port %d: backend %s failed (%s); skipped until a check succeeds (every %g s)",
                        self.forward.port, backend.text, reason, worker.settings.check_interval)
        backend.down_until = math.inf
        if not backend.checking:
            backend.checking = True
            worker.loop.create_task(self.check(backend))

    async def check(self, backend: Backend) -> None:
        """Active TCP check every check interval until the backend accepts a connection again, or leaves
        the answer; only then does it get client connections again."""
        worker = self.worker
        try:
            while backend in self.backends:
                await asyncio.sleep(worker.settings.check_interval)
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(str(backend.address), backend.port), worker.settings.connect_timeout)
                except (TimeoutError, OSError):
                    continue
                writer.close()
                backend.down_until = 0.0
                log.info("Port %d: backend %s is back", self.forward.port, backend.text)
                return
        finally:
            backend.checking = False


class DnsWorker:
    """One process's forwards and connections."""

    def __init__(self, settings: DnsProxySettings, shared: SharedCounters, index: int):
        self.settings = settings
        self.shared = shared
        self.counters: WorkerCounters = shared.row(index)
        self.loop = asyncio.get_event_loop()
        self.targets = {f.port: Target(self, f) for f in settings.forwards}
        self.connections: set[Relay] = set()
        self.stopped = asyncio.Event()
        self.draining = False

    async def run(self, sockets: list[socket.socket], alone: bool = False) -> int:
        names = [t for t in self.targets.values() if isinstance(t.forward.host, str)]
        for target in names:
            self.loop.create_task(target.keep_resolved())
        if names:  # connections wait in the listen backlog meanwhile, so the first ones are not refused
            await asyncio.wait([self.loop.create_task(t.first_attempt.wait()) for t in names], timeout=5.0)
        servers = []
        for sock in sockets:
            target = self.targets[sock.getsockname()[1]]
            servers.append(await self.loop.create_server(
                lambda t=target: Relay(self, t), sock=sock, backlog=4096))  # type: ignore[misc]
        handle_stop_signals(self.loop, self.stopped, self.settings.grace_seconds, alone)
        sweeper = self.loop.create_task(self.sweep())
        await self.stopped.wait()
        for server in servers:
            server.close()
        self.draining = True
        deadline = self.loop.time() + self.settings.grace_seconds
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.connections):
            relay.abort("the grace period ended")
        sweeper.cancel()
        return 0

    async def sweep(self) -> None:
        idle = self.settings.idle_timeout
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for relay in list(self.connections):
                if now - relay.last > idle:
                    relay.abort(f"idle for {idle:g} s")


class Relay(asyncio.Protocol):
    """A client connection and, once connected, its backend connection; bytes both ways, half-close kept."""

    __slots__ = ("worker", "target", "transport", "upstream", "backend", "pending", "pending_size", "eof", "last",
                 "started", "up", "down", "ended", "closing", "upstream_full")

    def __init__(self, worker: DnsWorker, target: Target):
        self.worker = worker
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] | None = []  # client bytes before the backend connection is up
        self.pending_size = 0
        self.upstream_full = False  # the backend's write buffer is above its high-water mark
        self.eof = [False, False]  # client finished sending, backend finished sending
        self.last = worker.loop.time()
        self.started = self.last
        self.up = 0
        self.down = 0
        self.ended = ""
        self.closing = False

    # client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        worker = self.worker
        if worker.shared.total(metrics.OPEN) >= worker.settings.max_connections:
            worker.counters.add(metrics.REJECTED)
            self.end("refused: connection limit reached", abort=True)
            return
        if not self.target.ready:
            worker.counters.add(metrics.UPSTREAM_ERRORS)
            self.end(f"refused: {self.target.forward.host} has not resolved yet", abort=True)
            return
        worker.counters.add(metrics.OPEN)
        worker.connections.add(self)
        self.transport.pause_reading()  # until the backend is connected
        worker.loop.create_task(self.connect())

    async def connect(self) -> None:
        worker, target = self.worker, self.target
        tried: set[Backend] = set()
        reason = "no backend"
        for _ in range(worker.settings.tries):
            backend = target.choose(tried)
            if backend is None:
                break
            tried.add(backend)
            backend.open += 1
            try:
                transport, _ = await asyncio.wait_for(worker.loop.create_connection(
                    lambda: BackendSide(self), str(backend.address), backend.port), worker.settings.connect_timeout)
            except TimeoutError:
                backend.open -= 1
                reason = f"timed out connecting to {backend.text}"
                worker.counters.add(metrics.UPSTREAM_TIMEOUTS)
                target.mark_down(backend, "connect timed out")
                continue
            except OSError as exc:
                backend.open -= 1
                reason = f"cannot connect to {backend.text}: {exc.strerror or exc}"
                worker.counters.add(metrics.UPSTREAM_ERRORS)
                target.mark_down(backend, exc.strerror or str(exc))
                continue
            if self.closing:  # the client went away while we were connecting
                backend.open -= 1
                transport.close()
                return
            self.backend = backend
            self.upstream = transport
            worker.counters.add(metrics.ALLOWED)
            pending, self.pending = self.pending, None
            for chunk in pending or ():
                self.upstream.write(chunk)
            if self.eof[0] and self.upstream.can_write_eof():
                self.upstream.write_eof()
            if self.transport is not None and not self.upstream_full:  # else resume_writing resumes it
                self.transport.resume_reading()
            return
        self.end(f"failed: {reason}", abort=True)

    def data_received(self, data: bytes) -> None:
        self.last = self.worker.loop.time()
        self.up += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
        elif self.pending is not None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size >= PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # hold the rest in the kernel until the backend is up

    def eof_received(self) -> bool:
        self.eof[0] = True
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()
        if self.eof[1]:
            self.end("closed by both sides")
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reset(self.upstream)  # the client reset: the backend must not see a clean end
        if not self.ended:
            self.end(f"client connection lost{f' ({exc})' if exc else ''}", abort=exc is not None)
        self.finish()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # backend side (called by BackendSide)
    def backend_data(self, data: bytes) -> None:
        self.last = self.worker.loop.time()
        self.down += len(data)
        if self.transport is not None:
            self.transport.write(data)

    def backend_eof(self) -> bool:
        self.eof[1] = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.eof[0]:
            self.end("closed by both sides")
            return False
        return True

    def backend_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reset(self.transport)  # the backend reset: a cut-off transfer must not look complete
        if not self.ended:
            self.end(f"backend connection lost{f' ({exc})' if exc else ''}", abort=exc is not None)
        if self.transport is not None:
            self.transport.close()

    # ending
    def end(self, how: str, *, abort: bool = False) -> None:
        if self.ended:
            return
        self.ended = how
        self.closing = True
        if abort:
            if self.transport is not None:
                self.transport.abort()
            if self.upstream is not None:
                self.upstream.abort()
        else:
            if self.transport is not None:
                self.transport.close()
            if self.upstream is not None:
                self.upstream.close()
        if self.worker.settings.debug or how.startswith(("refused", "failed")):
            self.log_line()

    def abort(self, reason: str) -> None:
        self.end(reason, abort=True)

    def finish(self) -> None:
        worker = self.worker
        if self in worker.connections:
            worker.connections.discard(self)
            worker.counters.sub(metrics.OPEN)
            worker.counters.add(metrics.BYTES_UP, self.up)
            worker.counters.add(metrics.BYTES_DOWN, self.down)
        if self.backend is not None:
            self.backend.open -= 1
            self.backend = None
        if self.upstream is not None:
            self.upstream.close()

    @property
    def client(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    def log_line(self) -> None:
        duration = (self.worker.loop.time() - self.started) * 1000
        backend = self.backend.text if self.backend is not None else "-"
        level = logging.INFO if self.worker.settings.debug else logging.WARNING
        log.log(level, "%s -> :%d %s -> %s up=%d down=%d %.1fms %s", self.client, self.target.forward.port,
                self.target.forward.target(), backend, self.up, self.down, duration, self.ended)


class BackendSide(asyncio.Protocol):
    __slots__ = ("relay",)

    def __init__(self, relay: Relay):
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.backend_data(data)

    def eof_received(self) -> bool:
        return self.relay.backend_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.backend_lost(exc)

    def pause_writing(self) -> None:
        self.relay.upstream_full = True
        if self.relay.transport is not None:
            self.relay.transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.upstream_full = False
        if self.relay.transport is not None:
            self.relay.transport.resume_reading()


def run_dns_proxy(settings: DnsProxySettings) -> int:
    """Run the DNS proxy until SIGTERM/SIGINT (blocking); returns the exit code."""
    from .server import Listen, available_cpus, loop_worker, serve

    workers = settings.workers or available_cpus()
    shared = SharedCounters(workers)
    for forward in settings.forwards:
        log.info("Forwarding port %d to %s", forward.port, forward.target())
    specs = [Listen(family, host, f.port) for f in settings.forwards
             for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))]
    started = time.monotonic()
    worker_main = loop_worker(shared, lambda index: DnsWorker(settings, shared, index))
    code = serve("DNS proxy", specs, workers, worker_main, settings.grace_seconds)
    log.debug("DNS proxy ran for %.1f s", time.monotonic() - started)
    return code
