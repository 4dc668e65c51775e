"""One HTTP proxy process: its clients and life cycle, the allow list's verdicts, name lookups, connecting upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..admin import serve_in_worker
from ..core.allowlist import AccessList
from ..core.config import HttpProxySettings
from ..core.hosts import Address
from ..ha_view import SharedRole
from . import metrics
from .http_rules import Host, ProxyError
from .http_upstream import Endpoint, Upstream, UpstreamPool, pool_key
from .lookup import Names, NotResolved
from .metrics import SharedCounters, WorkerCounters, http_families
from .reload import Reloader, WorkerReloads
from .server import handle_stop_signals

if TYPE_CHECKING:
    from .http import ClientConnection, Request

HEADER_TIMEOUT = 30.0  # a client has this long to send a complete request head
LITERALS_MAX = 4096  # allowed IP-literal hosts whose verdict is kept (Worker.literals)


class Worker:
    """One process's proxy: its connections, upstream pool and name lookups."""

    def __init__(self, settings: HttpProxySettings, shared: SharedCounters, index: int,
                 client: Callable[[Worker], ClientConnection], reloader: Reloader[AccessList] | None = None,
                 versions: frozenset[int] | None = None, admin_socket: socket.socket | None = None,
                 role: SharedRole | None = None):
        self.settings = settings
        self.role = role  # high availability: the replica's role (a standby refuses requests); None: one replica
        self.admin_socket = admin_socket  # the admin port (EGRESS_METRICS_PORT), served by worker 0
        # The families with a reserved source (None: unknown). The pod's own default route of another family
        # stays in place: an address of that family, tried first, may only time out (or leave from the pod's
        # address), so it is tried last.
        self.versions = versions
        self.acl = settings.acl
        # IP-literal hosts the rules in force allow, by host_text -> [the address]: the verdict cannot change
        # until the rules do (apply_rules empties it), and a str probe is cheaper than judging the address again.
        self.literals: dict[str, list[Address]] = {}
        self.shared = shared
        self.counters: WorkerCounters = shared.row(index)
        self.index = index
        self.client = client  # makes the protocol of an accepted connection
        self.loop = asyncio.get_event_loop()
        self.now = self.loop.time()
        self.clients: set[ClientConnection] = set()
        self.pool = UpstreamPool()
        self.names = Names(self.loop, self.counters)
        self.dns = self.names.answers  # the hot path's dict probe
        self.draining = False
        self.stopped = asyncio.Event()
        self.dirty: list[Endpoint] = []  # endpoints with output waiting for the end of this callback
        self.reloader = reloader

    def flush(self) -> None:
        """Write what this callback queued: one write per connection instead of one per piece."""
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for endpoint in dirty:
                endpoint.flush()

    # ------------------------------------------------------------ life cycle
    async def run(self, sockets: list[socket.socket], alone: bool = False, channel: socket.socket | None = None) -> int:
        client = self.client
        servers = [await self.loop.create_server(lambda: client(self), sock=sock, backlog=4096)
                   for sock in sockets]
        admin = await serve_in_worker(self.loop, self.admin_socket, self.index, alone, "http-proxy",
                                      lambda: http_families(self.shared), self.role)
        handle_stop_signals(self.loop, self.stopped, self.settings.grace_seconds, alone)
        reloads = None if self.reloader is None else \
            WorkerReloads(self.loop, self.reloader, self.apply_rules, self.index, alone, channel)
        sweeper = self.loop.create_task(self.sweep())
        await self.stopped.wait()
        if reloads is not None:
            reloads.stop()
        for server in servers:
            server.close()
        if admin is not None:
            admin.close()
        await self.drain()
        sweeper.cancel()
        return 0

    async def apply_rules(self, generation: int, acl: AccessList, sockets: list[socket.socket]) -> None:
        """New requests (a keep-alive connection's next one too) are judged by `acl` from now on; tunnels and
        requests already past their check go on."""
        for sock in sockets:  # the HTTP proxy's port is not in its rules: nothing to listen on
            sock.close()
        self.acl = acl
        self.literals = {}
        self.settings = dataclasses.replace(self.settings, acl=acl)

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
        self.pool.close_all()

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
                    client.stalled(settings.tunnel_idle_timeout)
            self.pool.expire(now)
            self.names.expire(now)

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
        if cached is None or (cached[0] < self.now and not self.names.usable_stale(host, cached, self.now)):
            return None
        return self._allowed(host, cached[1], verdict)

    def addresses_of(self, host: Host, text: str) -> list[Address] | None:
        """addresses_for(host), `text` being host_text(host): an allowed IP literal's answer is kept."""
        if isinstance(host, str):
            return self.addresses_for(host)
        allowed = self.literals.get(text)
        if allowed is None:
            allowed = [host]
            if not self.acl.address_allowed(None, host):
                raise ProxyError(403, f"access to {host} is denied by the egress policy", metrics.DENIED)
            if len(self.literals) >= LITERALS_MAX:
                self.literals.clear()
            self.literals[text] = allowed
        return allowed

    def _allowed(self, host: str, addresses: list[Address], verdict: bool | None) -> list[Address]:
        allowed = addresses if verdict else self.acl.allowed_addresses(host, addresses)
        if not allowed:
            raise ProxyError(403, f"access to {host} is denied by the egress policy", metrics.DENIED)
        return self._preferred(allowed)

    def _preferred(self, addresses: list[Address]) -> list[Address]:
        """The addresses of the families with a reserved source first (the lookup's order otherwise kept)."""
        versions = self.versions
        if versions is None or len(addresses) < 2:
            return addresses
        return sorted(addresses, key=lambda a: a.version not in versions)

    async def resolve(self, host: str) -> list[Address]:
        """The allowed addresses of a name that had to be looked up: 504 if DNS did not answer in time, else 502."""
        try:
            addresses = await self.names.lookup(host)
        except NotResolved as exc:
            if exc.timed_out:
                raise ProxyError(504, exc.message, metrics.DNS_TIMEOUTS) from None
            raise ProxyError(502, exc.message, metrics.UPSTREAM_ERRORS) from None
        return self._allowed(host, addresses, self.acl.name_verdict(host))

    async def open_upstream(self, host: Host, port: int, addresses: list[Address] | None,
                            factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Transport, Any, Address]:
        """Connect to the first allowed address that answers; 502 or 504 if none does."""
        if addresses is None:
            assert isinstance(host, str)
            addresses = await self.resolve(host)
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

    async def dispatch(self, client: ClientConnection, request: Request, host: Host, port: int,
                       addresses: list[Address] | None, *, fresh: bool = False) -> None:
        """Send the request on an idle pooled connection to an allowed address (not if `fresh`), else on a new one."""
        try:
            if addresses is None:
                addresses = await self.resolve(host) if isinstance(host, str) else [host]
                upstream = None if fresh else self.pool.take(pool_key(addresses[0], port))
                if upstream is not None:
                    upstream.send_request(client, request)
                    self.flush()
                    return
            transport, upstream, address = await self.open_upstream(
                host, port, addresses, lambda: Upstream(self))
            upstream.key = (address, port)
            if client.closing:
                transport.close()
                return
            upstream.send_request(client, request)
        except ProxyError as exc:
            if not client.closing:
                client.fail(exc)
        self.flush()

    def release(self, upstream: Upstream) -> None:
        """An upstream connection whose response is complete: pooled, or closed when stopping."""
        if self.draining:
            upstream.close()
        else:
            self.pool.put(upstream, self.now)
