"""Name lookups, the same for both proxies: the hosts file, then DNS (dnspython, asynchronous); the HTTP proxy's cache.

NameResolver is the one way a name becomes addresses, in glibc's `hosts: files dns` order: the
hosts file first (hostAliases rely on it), then DNS with resolv.conf's nameservers, search list,
ndots and per-try timeout. Both files are read again when they change. Lookups are coroutines,
not threads, so a slow name never queues another behind it: up to MAX_LOOKUPS names at a time per
process, each ending within LOOKUP_TIMEOUT. Names (the HTTP proxy) looks each name up once however
many requests wait for it; the DNS proxy's forwards (dns_targets.py) keep theirs resolved.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any

from ..core.hosts import Address, parse_hosts
from . import metrics
from .metrics import WorkerCounters

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 5.0  # a lookup (A and AAAA, the search list included) gets this long; then the request gets 504
MAX_LOOKUPS = 1000  # names looked up at once per process (two UDP sockets each); more wait within their timeout
TTL_MIN, TTL_MAX = 5.0, 60.0  # the HTTP proxy keeps an answer for its TTL within these (a hosts file answer: TTL_MIN)
HOSTS_TTL = 0.0  # a hosts file answer's TTL: the shortest a proxy keeps any answer (the file is watched, not trusted)
HOSTS_RECHECK = 1.0  # the hosts file is stat()ed at most this often: no system call on every connection
NEGATIVE_TTL = 2.0  # a name that does not exist (NXDOMAIN) or has no address is answered from memory this long
STALE_FOR = 60.0  # an expired answer is still used this long while it is refreshed (or the refresh fails)
MAX_NAMES = 10_000  # answers (and as many negative ones) kept per process; beyond, the oldest goes
HOSTS, RESOLV_CONF = "/etc/hosts", "/etc/resolv.conf"


class NotResolved(Exception):
    """A name has no usable address: `message` says why in one line; `timed_out`: DNS did not answer in time."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.message = message
        self.timed_out = timed_out


class NoAddresses(OSError):
    """The name exists but has neither A nor AAAA records."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A lookup's failure as its waiters see it (each raises a NotResolved of its own)."""

    message: str
    timed_out: bool = False


async def resolve(resolver: Any, name: str, *, search: bool = False,
                  backend: Any = None) -> tuple[list[Address], float]:
    """A and AAAA for `name` (both at once); the addresses, IPv4 first, and the smallest TTL. Raises if neither
    answers: the first error, or NoAddresses."""
    import dns.exception
    import dns.resolver

    answers = await asyncio.gather(*(resolver.resolve(name, rdtype, search=search, backend=backend)
                                     for rdtype in ("A", "AAAA")), return_exceptions=True)
    addresses: list[Address] = []
    ttls: list[float] = []
    errors: list[BaseException] = []
    for answer in answers:
        if isinstance(answer, dns.resolver.NoAnswer):
            continue
        if isinstance(answer, (dns.exception.DNSException, OSError)):
            errors.append(answer)
            continue
        if isinstance(answer, BaseException):
            raise answer
        ttls.append(float(answer.rrset.ttl))
        for record in answer:
            address = unmapped(ip_address(record.address))
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        if errors:
            raise errors[0]
        raise NoAddresses(f"{name} has no A or AAAA records")
    return addresses, min(ttls)


def describe_dns_error(exc: BaseException) -> str:
    """One short line: for "all nameservers failed", what each said (dnspython's text repeats the query)."""
    if isinstance(exc, TimeoutError):  # NameResolver's own timeout: its text is empty
        return f"timed out after {LOOKUP_TIMEOUT:g} s"
    errors = getattr(exc, "kwargs", {}).get("errors") if type(exc).__name__ == "NoNameservers" else None
    if errors:
        text = "no nameserver answered (" + "; ".join(f"{e[0]}: {e[3]}" for e in errors) + ")"
    else:
        text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def connected_udp() -> Any:
    """dnspython's asyncio backend on connected UDP sockets, as glibc's resolver uses: a nameserver whose port
    is closed (a Service without endpoints) fails the lookup at once (ICMP port unreachable) instead of
    letting it time out."""
    import dns.asyncbackend

    class ConnectedUdp(type(dns.asyncbackend.get_backend("asyncio"))):  # type: ignore[misc]
        def datagram_connection_required(self) -> bool:
            return True

    return ConnectedUdp()


def unmapped(address: Address) -> Address:
    """::ffff:a.b.c.d is a.b.c.d (the allow list checks it as IPv4)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file: inode, modification time and size (None: no such file)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


class HostsFile:
    """The hosts file, parsed once and read again when it changes (stat()ed at most every HOSTS_RECHECK seconds)."""

    def __init__(self, path: str = HOSTS, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.clock = clock
        self.recheck = HOSTS_RECHECK
        self.checked = -math.inf  # when it was last stat()ed, on `clock`
        self.stamp: tuple[int, int, int] | None = None
        self.names: dict[str, list[Address]] = {}

    def get(self, name: str) -> list[Address] | None:
        """The name's addresses (a list of its own), None when the file does not have it."""
        now = self.clock()
        if now - self.checked >= self.recheck:
            self.checked = now
            current = stamp(self.path)
            if current != self.stamp:
                self.stamp = current
                try:
                    with open(self.path, encoding="utf-8", errors="replace") as handle:
                        self.names = parse_hosts(handle.read())
                except OSError:  # gone or unreadable: no names from it, as glibc
                    self.names = {}
        addresses = self.names.get(name.lower().rstrip("."))
        return None if addresses is None else list(addresses)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A name's addresses (IPv4 first), their TTL in seconds (callers clamp it) and where they came from."""

    addresses: list[Address]
    ttl: float
    source: str  # "hosts" (the hosts file) or "dns"


class NameResolver:
    """The one way both proxies resolve a name: the hosts file, then DNS as resolv.conf says."""

    def __init__(self, hosts: str = HOSTS, resolv_conf: str = RESOLV_CONF):
        self.hosts = HostsFile(hosts)
        self.resolv_conf = resolv_conf
        self.slots = asyncio.Semaphore(MAX_LOOKUPS)
        self._resolver: Any = None
        self._resolver_stamp: tuple[int, int, int] | None = None
        self._backend: Any = None

    async def resolve(self, name: str) -> Resolved:
        """Raises TimeoutError after LOOKUP_TIMEOUT (a wait for a slot included), NoAddresses, or what dnspython
        raises (NXDOMAIN, NoNameservers, ...); a name in the hosts file never waits for DNS."""
        addresses = self.hosts.get(name)
        if addresses is not None:
            return Resolved(addresses, HOSTS_TTL, "hosts")
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            async with self.slots:
                addresses, ttl = await resolve(self.resolver(), name, search=True, backend=self._backend)
        return Resolved(addresses, ttl, "dns")

    def resolver(self) -> Any:
        """dnspython's resolver as resolv.conf says (read again when it changes); no nameserver: 127.0.0.1, as glibc."""
        current = stamp(self.resolv_conf)
        if self._resolver is None or current != self._resolver_stamp:
            import dns.asyncresolver
            import dns.resolver

            resolver = dns.asyncresolver.Resolver(configure=False)
            try:
                resolver.read_resolv_conf(self.resolv_conf)
            except dns.resolver.NoResolverConfiguration:
                resolver.nameservers = ["127.0.0.1"]
            resolver.lifetime = LOOKUP_TIMEOUT + 1.0  # our own timeout ends a lookup first: one way to time out
            self._resolver, self._resolver_stamp = resolver, current
            if self._backend is None:
                self._backend = connected_udp()
        return self._resolver


def keep(table: dict[str, Any], name: str, value: Any) -> None:
    """Store as the newest entry; a full table loses its oldest first."""
    table.pop(name, None)
    if len(table) >= MAX_NAMES:
        del table[next(iter(table))]
    table[name] = value


Answer = tuple[float, list[Address], float]  # (expiry on the loop's clock, addresses, usable until: expiry + STALE_FOR)


class Names:
    """One process's answers; `answers` is what the hot path reads (a dict probe and a comparison)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: WorkerCounters,
                 hosts: str = HOSTS, resolv_conf: str = RESOLV_CONF):
        self.loop = loop
        self.counters = counters
        self.answers: dict[str, Answer] = {}
        self.missing: dict[str, tuple[float, str]] = {}  # name -> (expiry, why): negative answers
        self.pending: dict[str, asyncio.Task[list[Address] | Failure]] = {}
        self.source = NameResolver(hosts, resolv_conf)

    def usable_stale(self, name: str, answer: Answer, now: float) -> bool:
        """An expired answer: True, and a refresh started in the background, while it may still be used."""
        if now > answer[2]:
            return False
        if name not in self.pending:
            self.start(name, refresh=True)
        return True

    async def lookup(self, name: str) -> list[Address]:
        """The name's addresses: from memory, else as NameResolver finds them; raises NotResolved."""
        now = self.loop.time()
        answer = self.answers.get(name)
        if answer is not None and (answer[0] >= now or self.usable_stale(name, answer, now)):
            return answer[1]
        task = self.pending.get(name)
        if task is None:
            missing = self.missing.get(name)
            if missing is not None and missing[0] > now:
                raise NotResolved(missing[1])
            task = self.start(name)
        outcome = await asyncio.shield(task)  # one waiter leaving does not end the others' lookup
        if isinstance(outcome, Failure):
            raise NotResolved(outcome.message, outcome.timed_out)
        return outcome

    def store(self, name: str, addresses: list[Address], ttl: float) -> None:
        expires = self.loop.time() + min(max(ttl, TTL_MIN), TTL_MAX)
        keep(self.answers, name, (expires, addresses, expires + STALE_FOR))
        self.missing.pop(name, None)

    def start(self, name: str, refresh: bool = False) -> asyncio.Task[list[Address] | Failure]:
        task = self.loop.create_task(self._resolve(name, refresh))
        self.pending[name] = task
        return task

    async def _resolve(self, name: str, refresh: bool) -> list[Address] | Failure:
        """Never raises: its waiters, or nobody for a refresh, get the outcome; the metrics count it."""
        import dns.exception
        import dns.resolver

        counters = self.counters
        try:
            resolved = await self.source.resolve(name)
        except (TimeoutError, dns.exception.Timeout):
            counters.add(metrics.LOOKUPS_TIMED_OUT)
            failure = Failure(f"DNS lookup of {name} timed out after {LOOKUP_TIMEOUT:g} s", timed_out=True)
        except (dns.resolver.NXDOMAIN, NoAddresses) as exc:
            counters.add(metrics.LOOKUPS_NOT_FOUND)
            why = "no such name" if isinstance(exc, dns.resolver.NXDOMAIN) else "it has no address"
            failure = Failure(f"cannot resolve {name}: {why}")
            keep(self.missing, name, (self.loop.time() + NEGATIVE_TTL, failure.message))
            self.answers.pop(name, None)  # the name is gone: its last answer with it
        except (dns.exception.DNSException, OSError) as exc:
            counters.add(metrics.LOOKUPS_FAILED)
            failure = Failure(f"cannot resolve {name}: {describe_dns_error(exc)}")
        else:
            if resolved.source == "dns":  # the counters count DNS lookups; the hosts file is not one
                counters.add(metrics.LOOKUPS_ANSWERED)
            self.store(name, resolved.addresses, resolved.ttl)
            return resolved.addresses
        finally:
            del self.pending[name]
        if refresh:  # no request waits for this one: the log says what its counter says
            stale = self.answers.get(name)
            if stale is None:
                log.warning("%s; its last answer is dropped", failure.message)
            else:  # used on, without another refresh for a moment: a failing DNS is not asked on every request
                self.answers[name] = (self.loop.time() + NEGATIVE_TTL, stale[1], stale[2])
                log.warning("%s; its last answer is used for up to %.0f s more", failure.message,
                            max(0.0, stale[2] - self.loop.time()))
        return failure

    def expire(self, now: float) -> None:
        """Forget answers past their use, stale use included, and negative answers past theirs."""
        for name in [n for n, (_, _, usable) in self.answers.items() if usable < now]:
            del self.answers[name]
        for name in [n for n, (expires, _) in self.missing.items() if expires < now]:
            del self.missing[name]
