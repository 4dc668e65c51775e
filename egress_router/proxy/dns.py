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

from ..admin import bind, serve_in_worker
from ..core.config import DnsProxySettings
from ..core.forwards import Forward
from ..ha_view import SharedRole
from .dns_conn import Connection, Deadlines, Listener, Poller
from .dns_metrics import ForwardTable, dns_families, stable_hash
from .dns_targets import Target
from .lookup import NameResolver
from .metrics import SharedCounters, WorkerCounters
from .reload import Reloader, WorkerReloads, forward_changes, forward_listeners, rule_source
from .server import handle_stop_signals

log = logging.getLogger(__name__)


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
        self.poller = Poller(self.loop)  # the client and backend sockets, listeners too (proxy/dns_conn.py)
        self.deadlines = Deadlines(self.loop, settings.connect_timeout)
        self.servers: dict[int, list[Listener]] = {}  # port -> its listeners (IPv4, IPv6)
        self.connections: set[Connection] = set()
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
        self.deadlines.close()
        self.poller.close()
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
            # the target is looked up per connection: a reload that changes the forward moves new connections
            listener = Listener(self, sock)
            self.servers.setdefault(listener.port, []).append(listener)

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
                if now - relay.last > idle and not relay.still_sending(now):
                    relay.expire(f"idle for {idle:g} s")


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
