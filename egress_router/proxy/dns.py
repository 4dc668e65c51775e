"""The DNS proxy worker: TCP forwarding to names and addresses, re-resolved, balanced, health-checked.

Each configured port forwards to one host. A name is resolved as the HTTP proxy resolves it (the
hosts file, then the pod's nameservers: lookup.NameResolver), honouring the answer's TTL within
limits; every address is a backend.
New connections go to the healthy backend with the fewest open connections (round-robin among
equals); a backend that refuses or times out is skipped and the connection is retried elsewhere;
only an active TCP check that succeeds brings the backend back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
import weakref
from collections.abc import Mapping
from typing import cast

from ..admin import bind, serve_in_worker
from ..core.config import DnsProxySettings
from ..core.forwards import Forward
from ..ha_view import ACTIVE, STANDBY_REFUSAL, SharedRole
from . import dns_metrics as cells
from . import metrics
from .dns_connect import Connecting
from .dns_metrics import ForwardTable, dns_families, stable_hash
from .dns_targets import Backend, Target
from .lookup import NameResolver
from .metrics import SharedCounters, WorkerCounters
from .reload import Reloader, WorkerReloads, forward_changes, forward_listeners, rule_source
from .server import handle_stop_signals, reset

log = logging.getLogger(__name__)

PENDING_LIMIT = 256 * 1024  # client bytes held while the backend connection is being made
class DnsWorker:
    """One process's forwards and connections."""

    def __init__(self, settings: DnsProxySettings, shared: SharedCounters, table: ForwardTable, index: int,
                 reloader: Reloader[tuple[Forward, ...]] | None = None, admin_socket: socket.socket | None = None,
                 role: SharedRole | None = None):
        self.settings = settings
        self.role = role  # high availability: the replica's role (a standby refuses connections); None: one replica
        self.admin_socket = admin_socket  # the admin port (EGRESS_METRICS_PORT), served by worker 0
        self.shared = shared
        self.table = table
        self.index = index
        self.counters: WorkerCounters = shared.row(index)  # OPEN: the connection limit counts every worker's
        self.slots = table.worker(index)  # the per-forward metrics
        # a replaced worker goes on counting in its predecessor's slots of the forwards in force
        self.slots.started({(f.port, stable_hash(f.target())) for f in settings.forwards})
        self.loop = asyncio.get_event_loop()
        self.names = NameResolver()  # one per process, shared by its forwards: one parsed hosts file
        self.targets = {f.port: self.new_target(f) for f in settings.forwards}
        self.servers: dict[int, list[asyncio.AbstractServer]] = {}  # port -> its listeners (IPv4, IPv6)
        self.connections: set[Relay] = set()
        self.retired: weakref.WeakSet[Target] = weakref.WeakSet()  # targets a reload took away, while in use
        self.stopped = asyncio.Event()
        self.draining = False
        self.reloader = reloader
        self.drains: set[asyncio.Task[None]] = set()

    async def run(self, sockets: list[socket.socket], alone: bool = False, channel: socket.socket | None = None) -> int:
        await self.resolved(list(self.targets.values()))
        await self.listen(sockets)
        admin = await serve_in_worker(self.loop, self.admin_socket, self.index, alone, "dns-proxy",
                                      lambda: dns_families(self.shared, self.table, self.targets.values()),
                                      self.role)
        handle_stop_signals(self.loop, self.stopped, self.settings.grace_seconds, alone)
        reloads = None if self.reloader is None else \
            WorkerReloads(self.loop, self.reloader, self.apply_rules, self.index, alone, channel)
        sweeper = self.loop.create_task(self.sweep())
        await self.stopped.wait()
        if reloads is not None:
            reloads.stop()
        for servers in self.servers.values():
            for server in servers:
                server.close()
        if admin is not None:
            admin.close()
        self.draining = True
        deadline = self.loop.time() + self.settings.grace_seconds
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.connections):
            relay.abort("the grace period ended")
        for target in {*self.targets.values(), *self.retired}:
            for connecting in list(target.connecting):
                connecting.stop_connecting()
        await asyncio.sleep(0)  # a turn of the loop: the sockets closed just now are released while it runs
        sweeper.cancel()
        return 0

    async def resolved(self, targets: list[Target]) -> None:
        """Start the lookups of the names among `targets` and wait (bounded) for their first answers: connections
        wait in the listen backlog meanwhile, so the first ones are not refused."""
        names = [t for t in targets if t.forward.is_name]
        for target in names:
            target.start()
        if names:
            await asyncio.wait([self.loop.create_task(t.first_attempt.wait()) for t in names], timeout=5.0)

    async def listen(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            port = sock.getsockname()[1]
            # the target is looked up per connection: a reload that changes the forward moves new connections
            server = await self.loop.create_server(lambda p=port: self.accept(p), sock=sock,  # type: ignore[misc]
                                                   backlog=4096)
            self.servers.setdefault(port, []).append(server)

    def accept(self, port: int) -> Relay:
        return Relay(self, self.targets[port])

    def new_target(self, forward: Forward) -> Target:
        return Target(self, forward, self.slots.claim(forward.port, forward.target()))

    def release_if_done(self, target: Target) -> None:
        """A retired target's last connection has ended: its metrics slot is freed (its series leave /metrics
        with the forward; a forward that comes back later starts from zero)."""
        if target.retired and target.relays == 0:
            self.slots.release(target.slot)

    async def apply_rules(self, generation: int, forwards: tuple[Forward, ...], sockets: list[socket.socket]) -> None:
        """A reload: removed forwards stop accepting now and drain; added and changed ones are resolved first, then
        take new connections; unchanged ones (their connections, lookups, health) are not touched."""
        wanted = {f.port: f for f in forwards}
        for port in [p for p in self.targets if p not in wanted]:
            for server in self.servers.pop(port, []):
                server.close()
            self.retire(self.targets.pop(port), "removed")
        fresh = {p: self.new_target(f) for p, f in wanted.items()
                 if p not in self.targets or self.targets[p].forward != f}
        await self.resolved(list(fresh.values()))
        if self.draining:  # stopping meanwhile: the new ones are not started
            for target in fresh.values():
                target.retire()
                self.release_if_done(target)
            for sock in sockets:
                sock.close()
            return
        for port, target in fresh.items():
            old = self.targets.get(port)
            self.targets[port] = target
            if old is not None:
                self.retire(old, "changed")
        await self.listen(sockets)

    def retire(self, target: Target, how: str) -> None:
        """The forward is gone (or changed): its connections get the grace period to end, then are closed."""
        target.retire()
        self.retired.add(target)
        self.release_if_done(target)
        if any(relay.target is target for relay in self.connections):
            task = self.loop.create_task(self.drain(target, how))
            self.drains.add(task)
            task.add_done_callback(self.drains.discard)

    async def drain(self, target: Target, how: str) -> None:
        deadline = self.loop.time() + self.settings.grace_seconds
        while self.loop.time() < deadline:
            if not any(relay.target is target for relay in self.connections):
                return
            await asyncio.sleep(0.1)
        for relay in [r for r in self.connections if r.target is target]:
            relay.abort(f"forward {how} by a reload: the grace period ended")

    async def sweep(self) -> None:
        idle = self.settings.idle_timeout
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for relay in list(self.connections):
                if now - relay.last > idle:
                    relay.abort(f"idle for {idle:g} s")


class Relay(Connecting):
    """A client connection and, once connected (dns_connect.Connecting), its backend connection; bytes both ways,
    half-close kept."""

    __slots__ = ("worker", "target", "transport", "upstream", "backend", "pending", "pending_size", "eof", "last",
                 "started", "up", "down", "ended", "closing", "upstream_full", "client_full")

    def __init__(self, worker: DnsWorker, target: Target):
        self.worker = worker
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] | None = []  # client bytes before the backend connection is up
        self.pending_size = 0
        self.upstream_full = False  # the backend's write buffer is above its high-water mark
        self.client_full = False  # the client's write buffer is above its high-water mark
        self.eof = [False, False]  # client finished sending, backend finished sending
        self.last = worker.loop.time()
        self.started = self.last
        self.up = 0
        self.down = 0
        self.ended = ""
        self.closing = False
        super().__init__()

    # client side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        worker, target = self.worker, self.target
        if worker.role is not None and not worker.role.cells[ACTIVE]:
            target.slot.add(cells.REJECTED)
            self.end(f"refused: {STANDBY_REFUSAL}", abort=True)
            return
        if worker.shared.total(metrics.OPEN) >= worker.settings.max_connections:
            target.slot.add(cells.REJECTED)
            self.end("refused: connection limit reached", abort=True)
            return
        if not target.ready:
            target.slot.add(cells.UNRESOLVED)
            self.end(f"refused: {target.forward.host} has not resolved yet", abort=True)
            return
        worker.counters.add(metrics.OPEN)
        target.slot.add(cells.OPEN)
        target.relays += 1
        worker.connections.add(self)
        self.transport.pause_reading()  # until the backend is connected
        self.tries_left = worker.settings.tries
        self.connect()

    def backend_side(self) -> BackendSide:
        return BackendSide(self)

    def gave_up(self) -> None:
        self.target.slot.add(cells.ABANDONED if self.closing else cells.FAILED)  # closing: the client left meanwhile
        self.end(f"failed: {self.reason}", abort=True)

    def connected(self, transport: asyncio.Transport) -> bool:
        """The backend accepted (BackendSide.connection_made: nothing has been read from it yet); False: the
        transport is not taken (its end is not the relay's)."""
        if self.expired:  # the timeout fired first, in the same turn of the loop: it wins (the socket is closed)
            return False
        self.connect_started()
        backend, self.trying = self.trying, None
        assert backend is not None
        # relayed once the backend connected, whatever happens next
        self.target.slot.add(cells.RELAYED)
        if self.closing:  # the client went away while we were connecting
            backend.open -= 1
            transport.close()
            return False
        self.backend = backend
        self.upstream = transport
        pending, self.pending = self.pending, None
        for chunk in pending or ():
            transport.write(chunk)
        if self.eof[0] and transport.can_write_eof():
            transport.write_eof()
        if self.transport is not None and not self.upstream_full:  # else resume_writing resumes it
            self.transport.resume_reading()
        return True

    def data_received(self, data: bytes) -> None:
        self.last = self.worker.loop.time()
        self.up += len(data)
        slot = self.target.slot  # counted as they flow: a connection that lasts for days shows its bytes
        slot.cells[slot.base + cells.BYTES_UP] += len(data)
        if self.upstream is not None:
            self.upstream.write(data)
        elif self.pending is not None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size >= PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # hold the rest in the kernel until the backend is up

    def eof_received(self) -> bool:
        self.eof[0] = True
        if self.eof[1] and self.upstream is not None:
            # both sides have ended: closing sends the backend its FIN (after what is still buffered), as a
            # shutdown would, one syscall fewer
            self.end("closed by both sides")
            return False
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()  # half-close: the backend may still answer
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reset(self.upstream)  # the client reset: the backend must not see a clean end
        if not self.ended:
            self.end(f"client connection lost{f' ({exc})' if exc else ''}", abort=exc is not None)
        self.finish()

    def pause_writing(self) -> None:
        self.client_full = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.client_full = False
        if self.upstream is not None:
            self.upstream.resume_reading()

    # backend side (called by BackendSide)
    def backend_data(self, data: bytes) -> None:
        self.last = self.worker.loop.time()
        self.down += len(data)
        slot = self.target.slot
        slot.cells[slot.base + cells.BYTES_DOWN] += len(data)
        if self.transport is not None:
            self.transport.write(data)

    def backend_eof(self) -> bool:
        self.eof[1] = True
        if self.eof[0] and self.upstream is not None:  # both ended: close, no shutdown first (see eof_received)
            self.end("closed by both sides")
            return False
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()  # half-close: the client may still send
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
            self.target.slot.sub(cells.OPEN)
            self.target.relays -= 1
            worker.release_if_done(self.target)
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
    __slots__ = ("relay", "taken")

    def __init__(self, relay: Relay):
        self.relay = relay
        self.taken = False  # the relay took the transport (connected)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.taken = self.relay.connected(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.relay.backend_data(data)

    def eof_received(self) -> bool:
        return self.relay.backend_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.taken:
            self.relay.backend_lost(exc)

    def pause_writing(self) -> None:
        self.relay.upstream_full = True
        if self.relay.transport is not None:
            self.relay.transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.upstream_full = False
        if self.relay.transport is not None:
            self.relay.transport.resume_reading()


def run_dns_proxy(settings: DnsProxySettings, env: Mapping[str, str] | None = None,
                  admin_socket: socket.socket | None = None, role: SharedRole | None = None) -> int:
    """Run the DNS proxy until SIGTERM/SIGINT (blocking); returns the exit code.

    With `env` (the environment `settings` came from), the forwards are reloaded when their file changes
    and on SIGHUP (proxy/reload.py). `role`: a high-availability replica's role (ha_keeper.py); a standby refuses
    connections."""
    from .server import auto_workers, loop_worker, serve

    workers = settings.workers or auto_workers("DNS proxy")
    shared = SharedCounters(workers)
    table = ForwardTable(workers)
    if admin_socket is None and settings.metrics_port:  # else opened by the caller, before the network was set up
        admin_socket = bind(settings.metrics_port)
    for forward in settings.forwards:
        log.info("Forwarding port %d to %s", forward.port, forward.target())
    started = time.monotonic()
    reloader = None if env is None else forwards_reloader(settings, env, shared)

    def make_worker(index: int) -> DnsWorker:
        # a worker forked after a reload starts from the forwards in force then (and listens on their ports)
        in_force = settings if reloader is None else dataclasses.replace(settings, forwards=reloader.rules)
        return DnsWorker(in_force, shared, table, index, reloader, admin_socket, role)

    code = serve("DNS proxy", forward_listeners(settings.forwards), workers, loop_worker(shared, make_worker),
                 settings.grace_seconds, reloader)
    log.debug("DNS proxy ran for %.1f s", time.monotonic() - started)
    return code


def forwards_reloader(settings: DnsProxySettings, env: Mapping[str, str],
                      shared: SharedCounters) -> Reloader[tuple[Forward, ...]]:
    from ..core import variables as v
    from ..core.config import load_dns_proxy

    source = rule_source(env, v.DNS_DESTINATION)

    def parse(text: str) -> tuple[Forward, ...]:
        """The core's loader on `text` as the file's content (inline rules: the environment's, `text` unused)."""
        return load_dns_proxy(env, {source.path: text} if source.path is not None else {}).forwards

    return Reloader(source, settings.forwards, parse, forward_changes, shared.row(0), forward_listeners)
