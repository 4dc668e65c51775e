"""The DNS proxy's forwards as it serves them: a Target per forward, with its backends (resolved, balanced, checked)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

from ..core.forwards import Forward
from ..core.hosts import Address
from . import dns_metrics as cells
from .dns_metrics import Slot, stable_hash
from .lookup import NoAddresses, describe_dns_error

if TYPE_CHECKING:
    from .dns import DnsWorker
    from .dns_conn import Connection

log = logging.getLogger(__name__)

RESOLVE_RETRY_MAX = 30.0
RESOLVE_MIN_INTERVAL = 0.2  # even a TTL of 0 must not make the proxy query in a tight loop


class Backend:
    """One address of a forward's host."""

    __slots__ = ("address", "host", "port", "open", "down_until", "checking", "text", "key")

    def __init__(self, address: Address, port: int):
        self.address = address
        self.host = str(address)  # what connect() is given: made once, not per connection
        self.port = port
        self.open = 0
        self.down_until = 0.0
        self.checking = False
        self.text = f"[{address}]:{port}" if isinstance(address, IPv6Address) else f"{address}:{port}"
        self.key = stable_hash(self.text)  # how the workers tell each other about it (dns_metrics.Slot)


class Target:
    """A forward and its current backends (static for an address, resolved for a name)."""

    def __init__(self, worker: DnsWorker, forward: Forward, slot: Slot | None = None):
        self.worker = worker
        self.forward = forward
        self.slot = Slot.detached() if slot is None else slot  # its cells in the worker's table (metrics)
        self.relays = 0  # client connections that hold the slot (see DnsWorker.release_if_done)
        self.connecting: set[Connection] = set()  # backend connects in progress (a client that left may have one)
        self.backends: list[Backend] = []
        self.resolved_once = False
        self.failing = False
        self.turn = 0
        self.first_attempt = asyncio.Event()  # set once the first lookup has answered or failed
        self.task: asyncio.Task[None] | None = None  # keep_resolved, for a name
        self.retired = False  # a reload removed or changed the forward: its connections drain, nothing new
        if not isinstance(forward.host, str):
            self.backends = [Backend(forward.host, forward.remote_port)]
            self.resolved_once = True
        self.publish()

    def start(self) -> None:
        """Resolve a name, and keep it resolved (an address needs nothing)."""
        if isinstance(self.forward.host, str) and self.task is None:
            self.task = self.worker.loop.create_task(self.keep_resolved())

    def retire(self) -> None:
        """A reload took the forward away: no more lookups or checks; open connections keep their backend."""
        self.retired = True
        if self.task is not None:
            self.task.cancel()
            self.task = None

    @property
    def ready(self) -> bool:
        return bool(self.backends)

    def choose(self, exclude: Collection[Backend]) -> Backend | None:
        """Least open connections among healthy backends, round-robin among equals; all down: any."""
        if len(self.backends) == 1:  # one address, the common case: the same answer without the lists below
            only = self.backends[0]
            if only in exclude:
                return None
            self.turn += 1
            return only
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
        """Re-resolve the name as its TTL says (the HTTP proxy's way: the hosts file, then DNS; lookup.py);
        keep the last good answer when that fails."""
        import dns.exception

        assert isinstance(self.forward.host, str)
        name = self.forward.host
        settings = self.worker.settings
        retry = 1.0
        while True:
            try:
                resolved = await self.worker.names.resolve(name)
            except (dns.exception.DNSException, OSError) as exc:
                self.slot.add(lookup_result(exc))
                self.slot.set(cells.DNS_FAILING, 1)
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
            if resolved.source == "dns":  # as the HTTP proxy counts: a hosts file answer is not a DNS lookup
                self.slot.add(cells.ANSWERED)
            self.slot.set(cells.DNS_FAILING, 0)
            if self.failing:
                log.info("Port %d: %s resolves again", self.forward.port, name)
                self.failing = False
            self.update(resolved.addresses, " (hosts file)" if resolved.source == "hosts" else "")
            self.first_attempt.set()
            # a hosts file answer (TTL 0) is looked at again every TTL_MIN: cheap, the file is stat()ed once a second
            await asyncio.sleep(max(RESOLVE_MIN_INTERVAL, min(max(resolved.ttl, settings.ttl_min), settings.ttl_max)))

    def update(self, addresses: list[Address], origin: str = "") -> None:
        current = {b.address: b for b in self.backends}
        fresh = [current.get(a) or Backend(a, self.forward.remote_port) for a in addresses]
        # A server that rotates its records (CoreDNS loadbalance) changes the order, not the set: not news.
        if {b.address for b in fresh} != set(current):
            log.info("Port %d: %s is now %s%s", self.forward.port, self.forward.host,
                     ", ".join(b.text for b in fresh) or "(no addresses)", origin)
        self.backends = fresh
        self.resolved_once = self.resolved_once or bool(fresh)
        self.publish()

    def publish(self) -> None:
        """The backends' health where the other workers' /metrics (worker 0's) can read it."""
        now = self.worker.loop.time()
        self.slot.publish_health((b.key, b.down_until > now) for b in self.backends)

    def mark_down(self, backend: Backend, reason: str) -> None:
        """Take the backend out of rotation until an active check succeeds (not merely until a timer runs
        out: a backend whose connects time out would otherwise make one client in a few wait that long)."""
        worker = self.worker
        if backend.down_until <= worker.loop.time():
            log.warning("Port %d: backend %s failed (%s); skipped until a check succeeds (every %g s)",
                        self.forward.port, backend.text, reason, worker.settings.check_interval)
        backend.down_until = math.inf
        self.publish()
        if not backend.checking and not self.retired:
            backend.checking = True
            worker.loop.create_task(self.check(backend))

    async def check(self, backend: Backend) -> None:
        """Active TCP check every check interval until the backend accepts a connection again, or leaves
        the answer; only then does it get client connections again."""
        worker = self.worker
        try:
            while backend in self.backends and not self.retired:
                await asyncio.sleep(worker.settings.check_interval)
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection(backend.host, backend.port), worker.settings.connect_timeout)
                except (TimeoutError, OSError):
                    continue
                writer.close()
                backend.down_until = 0.0
                self.publish()
                log.info("Port %d: backend %s is back", self.forward.port, backend.text)
                return
        finally:
            backend.checking = False


def lookup_result(exc: BaseException) -> int:
    """The cell a failed lookup counts in, as the HTTP proxy tells them apart (lookup.Names)."""
    import dns.exception
    import dns.resolver

    if isinstance(exc, (TimeoutError, dns.exception.Timeout)):
        return cells.LOOKUP_TIMEOUT
    if isinstance(exc, (dns.resolver.NXDOMAIN, NoAddresses)):
        return cells.NOT_FOUND
    return cells.LOOKUP_FAILED
