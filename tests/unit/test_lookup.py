"""Name lookups (egress_router.proxy.lookup) without a network: the hosts file grammar, and the HTTP proxy's answers
with a stand-in for dnspython's resolver (coalescing, negative answers, stale answers, timeouts, the counters).
tests/lab/test_http_proxy.py checks the same through the real proxy and a real DNS server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.asyncresolver
import dns.resolver
import pytest

from egress_router.proxy import lookup, metrics
from egress_router.proxy.lookup import (
    Names,
    NotResolved,
    connected_udp,
    describe_dns_error,
    keep,
    parse_hosts,
    resolve,
)
from egress_router.proxy.metrics import SharedCounters

HOSTS_TEXT = """\
# a comment line
127.0.0.1   localhost
::1         localhost ip6-localhost
203.0.113.10 www.example.com  Example.COM.  # comment after the names
203.0.113.11 www.example.com
::ffff:192.0.2.7 mapped.example
fe80::1%eth0 scoped.example
300.1.1.1 bad.example
203.0.113.12
2001:db8::5 v6.example
"""


def test_parse_hosts_reads_as_glibc_does() -> None:
    names = parse_hosts(HOSTS_TEXT)
    assert names["www.example.com"] == [IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11")]
    assert names["example.com"] == [IPv4Address("203.0.113.10")]  # no case, no trailing dot
    assert names["localhost"] == [IPv4Address("127.0.0.1"), IPv6Address("::1")]
    assert names["mapped.example"] == [IPv4Address("192.0.2.7")]
    assert names["v6.example"] == [IPv6Address("2001:db8::5")]
    for skipped in ("scoped.example", "bad.example", "comment", "a"):
        assert skipped not in names


class FakeResolver:
    """dnspython's resolve() as lookups use it: `table` name -> addresses, an exception, or None (never answers)."""

    def __init__(self, table: dict[str, list[str] | Exception | None], ttl: int = 30):
        self.table = table
        self.ttl = ttl
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str, search: bool = False, backend: Any = None) -> Any:
        self.asked.append((name, rdtype))
        entry = self.table.get(name, dns.resolver.NXDOMAIN())
        if entry is None:
            await asyncio.sleep(3600)
        if isinstance(entry, Exception):
            raise entry
        assert entry is not None
        wanted = 4 if rdtype == "A" else 6
        records = [SimpleNamespace(address=a) for a in entry if ip_address(a).version == wanted]
        if not records:
            raise dns.resolver.NoAnswer()
        return Answer(records, self.ttl)


class Answer(list[Any]):
    """The records, iterable, and the rrset's TTL."""

    def __init__(self, records: list[Any], ttl: int):
        super().__init__(records)
        self.rrset = SimpleNamespace(ttl=ttl)


def run(test: Callable[[Names, FakeResolver, SharedCounters], Coroutine[Any, Any, None]],
        table: dict[str, list[str] | Exception | None], tmp_path: Path, hosts: str = "") -> SharedCounters:
    shared = SharedCounters(1)
    (tmp_path / "hosts").write_text(hosts)

    async def main() -> None:
        names = Names(asyncio.get_running_loop(), shared.row(0), hosts=str(tmp_path / "hosts"),
                      resolv_conf=str(tmp_path / "resolv.conf"))
        resolver = FakeResolver(table)
        names.source.resolver = lambda: resolver  # type: ignore[method-assign]
        await test(names, resolver, shared)

    asyncio.run(main())
    return shared


def test_waiters_for_one_name_share_one_lookup_and_the_answer_is_kept(tmp_path: Path) -> None:
    async def test(names: Names, resolver: FakeResolver, shared: SharedCounters) -> None:
        results = await asyncio.gather(*(names.lookup("www.example.com") for _ in range(20)))
        assert all(r == [IPv4Address("192.0.2.1"), IPv6Address("2001:db8::1")] for r in results)
        assert sorted(resolver.asked) == [("www.example.com", "A"), ("www.example.com", "AAAA")]
        assert await names.lookup("www.example.com") == results[0]  # from memory
        assert len(resolver.asked) == 2
        assert shared.total(metrics.LOOKUPS_ANSWERED) == 1
        expires, _, usable = names.answers["www.example.com"]
        assert expires - asyncio.get_running_loop().time() == pytest.approx(30, abs=1)
        assert usable == expires + lookup.STALE_FOR

    run(test, {"www.example.com": ["192.0.2.1", "2001:db8::1"]}, tmp_path)


def test_the_hosts_file_comes_first_and_is_read_again_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "HOSTS_RECHECK", 0.0)  # stat()ed on every lookup (tests/unit/test_hosts_lookup.py: 1 s)

    async def test(names: Names, resolver: FakeResolver, shared: SharedCounters) -> None:
        assert await names.lookup("www.example.com") == [IPv4Address("203.0.113.10")]
        (tmp_path / "hosts").write_text("203.0.113.99 www.example.com other.example\n")
        assert await names.lookup("other.example") == [IPv4Address("203.0.113.99")]
        assert resolver.asked == []
        assert await names.lookup("dns.example") == [IPv4Address("192.0.2.2")]
        assert resolver.asked == [("dns.example", "A"), ("dns.example", "AAAA")]

    run(test, {"www.example.com": ["192.0.2.1"], "dns.example": ["192.0.2.2"]}, tmp_path,
        hosts="203.0.113.10 www.example.com\n")


def test_a_missing_name_is_remembered_briefly_a_failure_is_not(tmp_path: Path) -> None:
    async def test(names: Names, resolver: FakeResolver, shared: SharedCounters) -> None:
        for name, message in (("nowhere.example", "cannot resolve nowhere.example: no such name"),
                              ("empty.example", "cannot resolve empty.example: it has no address")):
            for _ in range(3):
                with pytest.raises(NotResolved) as raised:
                    await names.lookup(name)
                assert (raised.value.message, raised.value.timed_out) == (message, False)
            assert len([a for a in resolver.asked if a[0] == name]) == 2  # once, A and AAAA
        assert shared.total(metrics.LOOKUPS_NOT_FOUND) == 2
        names.missing["nowhere.example"] = (0.0, "expired")
        with pytest.raises(NotResolved):
            await names.lookup("nowhere.example")
        assert len([a for a in resolver.asked if a[0] == "nowhere.example"]) == 4  # asked again once expired
        for _ in range(2):
            with pytest.raises(NotResolved) as raised:
                await names.lookup("servfail.example")
            assert raised.value.message.startswith("cannot resolve servfail.example: ")
        assert shared.total(metrics.LOOKUPS_FAILED) == 2  # not remembered: asked each time

    run(test, {"empty.example": [], "servfail.example": dns.resolver.NoNameservers()}, tmp_path)


def test_a_lookup_times_out_on_its_own_and_the_timeout_is_not_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "LOOKUP_TIMEOUT", 0.05)

    async def test(names: Names, resolver: FakeResolver, shared: SharedCounters) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcomes = await asyncio.gather(*(names.lookup(f"n{i}.hang.example") for i in range(50)),
                                        names.lookup("quick.example"), return_exceptions=True)
        assert loop.time() - started < 1.0
        assert outcomes[-1] == [IPv4Address("192.0.2.3")]
        for i, outcome in enumerate(outcomes[:-1]):
            assert isinstance(outcome, NotResolved) and outcome.timed_out
            assert outcome.message == f"DNS lookup of n{i}.hang.example timed out after 0.05 s"
        assert shared.total(metrics.LOOKUPS_TIMED_OUT) == 50
        assert names.pending == {} and "n0.hang.example" not in names.missing
        resolver.table["n0.hang.example"] = ["192.0.2.4"]
        assert await names.lookup("n0.hang.example") == [IPv4Address("192.0.2.4")]

    run(test, {**{f"n{i}.hang.example": None for i in range(50)}, "quick.example": ["192.0.2.3"]}, tmp_path)


def test_an_expired_answer_is_used_while_it_is_refreshed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(lookup, "LOOKUP_TIMEOUT", 0.05)

    async def test(names: Names, resolver: FakeResolver, shared: SharedCounters) -> None:
        now = asyncio.get_running_loop().time
        old = [IPv4Address("192.0.2.1")]
        names.answers["slow.example"] = (now() - 1, old, now() + 30)
        names.answers["gone.example"] = (now() - 1, old, now() + 30)
        names.answers["moved.example"] = (now() - 1, old, now() + 30)
        names.answers["too-old.example"] = (now() - 100, old, now() - 1)
        for name in ("slow.example", "gone.example", "moved.example"):
            assert await names.lookup(name) == old  # at once, a refresh started
            assert name in names.pending
        with pytest.raises(NotResolved):
            await names.lookup("too-old.example")  # past its stale use: waited for (and not found)
        await asyncio.sleep(0.2)
        assert names.pending == {}
        assert names.answers["moved.example"][1] == [IPv4Address("192.0.2.9")]
        assert "gone.example" not in names.answers  # NXDOMAIN: the last answer goes
        expires, addresses, usable = names.answers["slow.example"]  # kept; no new refresh for a moment
        assert addresses == old and expires > now() and usable < now() + 31
        assert await names.lookup("slow.example") == old and "slow.example" not in names.pending
        assert shared.total(metrics.LOOKUPS_TIMED_OUT) == 1 and shared.total(metrics.LOOKUPS_NOT_FOUND) == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "DNS lookup of slow.example timed out after 0.05 s; its last answer is used for up to 30 s more" \
            in warnings
        assert "cannot resolve gone.example: no such name; its last answer is dropped" in warnings
        assert len(warnings) == 2  # a failure nobody waited for is logged; those with waiters are theirs to log

    run(test, {"slow.example": None, "moved.example": ["192.0.2.9"]}, tmp_path)


def test_tables_are_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "MAX_NAMES", 3)
    table: dict[str, int] = {}
    for number, name in enumerate("abcad"):
        keep(table, name, number)
    assert table == {"c": 2, "a": 3, "d": 4}  # "a" stored again is the newest; "b" went first


def test_a_closed_nameserver_port_fails_the_lookup_at_once() -> None:
    """As with glibc: ICMP port unreachable reaches a connected UDP socket (dnspython's default is not connected)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = port
        resolver.lifetime = 3.0
        started = time.monotonic()
        with pytest.raises(dns.resolver.NoNameservers) as raised:
            await resolve(resolver, "nowhere.example", backend=connected_udp())
        assert time.monotonic() - started < 1.0
        assert describe_dns_error(raised.value) == \
            f"no nameserver answered (Do53:127.0.0.1@{port}: [Errno 111] Connection refused)"

    asyncio.run(main())
