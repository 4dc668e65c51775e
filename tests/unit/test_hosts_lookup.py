"""The hosts file and the one lookup order both proxies share (core.hosts.parse_hosts, proxy.lookup.NameResolver):
the grammar, the file watched at most once a second, hosts before DNS, and the DNS proxy's forwards resolving as the
HTTP proxy does. tests/lab/test_hosts_names.py checks the same through both real proxies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.resolver
import pytest

from egress_router.core.forwards import Forward
from egress_router.core.hosts import parse_hosts
from egress_router.proxy import lookup
from egress_router.proxy.dns_targets import Target
from egress_router.proxy.lookup import HOSTS_TTL, HostsFile, NameResolver, Names
from egress_router.proxy.metrics import SharedCounters

V4 = IPv4Address
V6 = IPv6Address


# ------------------------------------------------------------------ the grammar

def test_comments_blank_lines_and_fields_that_are_not_entries() -> None:
    names = parse_hosts(
        "# kubelet-managed hosts file\n"
        "\n"
        "   # an indented comment 203.0.113.1 commented.test\n"
        "203.0.113.2\tone.test\t# the comment ends the names: not.a.name\n"
        "203.0.113.3 two.test#glued\n"
        "#203.0.113.4 commented.test\n"
        "203.0.113.5\n"  # an address without names
        "not-an-address name.test\n"
        "300.1.1.1 bad.test\n"
        "fe80::1%eth0 scoped.test\n"  # zone ids: glibc skips the line
        "203.0.113.6 . dotted.test.\r\n")
    assert names == {"one.test": [V4("203.0.113.2")], "two.test": [V4("203.0.113.3")],
                     "dotted.test": [V4("203.0.113.6")]}


def test_aliases_ipv4_and_ipv6_entries() -> None:
    """hostAliases write one line per IP: the address, then every hostname given for it."""
    names = parse_hosts("# Entries added by HostAliases.\n"
                        "203.0.113.10\tfoo.local\tbar.local\n"
                        "2001:DB8:0::0:10\tv6.local   both.local\n"
                        "203.0.113.11 both.local\n"
                        "::ffff:192.0.2.7 mapped.local\n")
    assert names["foo.local"] == names["bar.local"] == [V4("203.0.113.10")]
    assert names["v6.local"] == [V6("2001:db8::10")]  # canonical, whatever the spelling
    assert names["both.local"] == [V4("203.0.113.11"), V6("2001:db8::10")]
    assert names["mapped.local"] == [V4("192.0.2.7")]  # an IPv4-mapped address is IPv4


def test_a_name_on_several_lines_gets_every_address_ipv4_first_each_family_in_file_order() -> None:
    names = parse_hosts("2001:db8::2 multi.test\n"
                        "203.0.113.20 multi.test\n"
                        "2001:db8::1 multi.test other.test\n"
                        "203.0.113.5 Multi.TEST\n"
                        "203.0.113.20 multi.test\n")  # a repeated pair counts once
    assert names["multi.test"] == [V4("203.0.113.20"), V4("203.0.113.5"), V6("2001:db8::2"), V6("2001:db8::1")]
    assert names["other.test"] == [V6("2001:db8::1")]


def test_names_are_compared_without_case_or_trailing_dot(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("203.0.113.7 Db.Example.TEST\n")
    hosts = HostsFile(str(path))
    for spelling in ("db.example.test", "DB.EXAMPLE.TEST", "db.example.test."):
        assert hosts.get(spelling) == [V4("203.0.113.7")]
    assert hosts.get("example.test") is None  # names, not domains


# ------------------------------------------------------------------ the file, watched

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_file_is_statted_at_most_once_a_second_and_parsed_only_when_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text("203.0.113.1 a.test\n")
    stats: list[str] = []
    parses: list[str] = []

    def counted_stamp(where: str) -> tuple[int, int, int] | None:
        stats.append(where)
        return real_stamp(where)

    def counted_parse(text: str) -> dict[str, list[V4 | V6]]:
        parses.append(text)
        return parse_hosts(text)

    real_stamp = lookup.stamp
    monkeypatch.setattr(lookup, "stamp", counted_stamp)
    monkeypatch.setattr(lookup, "parse_hosts", counted_parse)
    clock = Clock()
    hosts = HostsFile(str(path), clock)
    for _ in range(1000):  # connections in one second: one stat, one parse
        assert hosts.get("a.test") == [V4("203.0.113.1")]
        clock.now += 0.0009
    assert (len(stats), len(parses)) == (1, 1)
    path.write_text("203.0.113.2 a.test b.test\n")
    assert hosts.get("a.test") == [V4("203.0.113.1")]  # within the second: not looked at yet
    clock.now += 0.2
    assert hosts.get("b.test") == [V4("203.0.113.2")]  # a second after the last stat: seen
    assert (len(stats), len(parses)) == (2, 2)
    clock.now += 5
    assert hosts.get("b.test") == [V4("203.0.113.2")]  # stat()ed again, unchanged: not parsed again
    assert (len(stats), len(parses)) == (3, 2)


def test_a_replaced_file_is_read_again_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    """kubelet replaces files it manages; a new inode is a new file, whatever its size and time say."""
    path = tmp_path / "hosts"
    path.write_text("203.0.113.1 a.test\n")
    clock = Clock()
    hosts = HostsFile(str(path), clock)
    assert hosts.get("a.test") == [V4("203.0.113.1")]
    before = os.stat(path)
    fresh = tmp_path / "hosts.new"
    fresh.write_text("203.0.113.9 a.test\n")  # same length
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
    keep_old_inode = tmp_path / "hosts.old"
    os.link(path, keep_old_inode)  # so that the new file cannot get the old inode number back
    os.replace(fresh, path)
    clock.now += 1
    assert hosts.get("a.test") == [V4("203.0.113.9")]
    path.unlink()  # gone: no names from it
    clock.now += 1
    assert hosts.get("a.test") is None
    path.write_text("203.0.113.3 a.test\n")  # back
    clock.now += 1
    assert hosts.get("a.test") == [V4("203.0.113.3")]


def test_the_answer_is_a_copy() -> None:
    hosts = HostsFile("/nonexistent/hosts")
    hosts.checked = hosts.clock()  # as if stat()ed just now
    hosts.names = {"a.test": [V4("203.0.113.1")]}
    hosts.get("a.test").append(V4("192.0.2.1"))  # type: ignore[union-attr]
    assert hosts.names == {"a.test": [V4("203.0.113.1")]}


# ------------------------------------------------------------------ the order: hosts, then DNS

class FakeDns:
    """dnspython's asynchronous resolve() as NameResolver calls it: `table` name -> addresses (None: never answers)."""

    def __init__(self, table: dict[str, list[str] | None], ttl: int = 42):
        self.table = table
        self.ttl = ttl
        self.asked: list[tuple[str, str, bool]] = []

    async def resolve(self, name: str, rdtype: str, search: bool = False, backend: Any = None) -> Any:
        self.asked.append((name, rdtype, search))
        if name not in self.table:
            raise dns.resolver.NXDOMAIN()  # type: ignore[no-untyped-call]
        entry = self.table[name]
        if entry is None:
            await asyncio.sleep(3600)
            raise AssertionError("never answers")
        records = [SimpleNamespace(address=a) for a in entry if ip_address(a).version == (4 if rdtype == "A" else 6)]
        if not records:
            raise dns.resolver.NoAnswer()  # type: ignore[no-untyped-call]
        return Records(records, self.ttl)


class Records(list[Any]):
    """An answer as resolve() reads it: its records, and the rrset's TTL."""

    def __init__(self, records: list[Any], ttl: int):
        super().__init__(records)
        self.rrset = SimpleNamespace(ttl=ttl)


HOSTS = "203.0.113.10 alias.test both.test\n2001:db8::10 alias.test\n"
TABLE: dict[str, list[str] | None] = {"both.test": ["192.0.2.20"], "dns.test": ["192.0.2.30", "2001:db8::30"],
                                      "hang.test": None}


def with_resolver(tmp_path: Path, test: Callable[[NameResolver, FakeDns], Coroutine[Any, Any, None]],
                  hosts: str = HOSTS) -> None:
    (tmp_path / "hosts").write_text(hosts)

    async def main() -> None:
        resolver = NameResolver(str(tmp_path / "hosts"), str(tmp_path / "resolv.conf"))
        fake = FakeDns(dict(TABLE))
        resolver.resolver = lambda: fake  # type: ignore[method-assign]
        await test(resolver, fake)

    asyncio.run(main())


def test_a_name_in_the_hosts_file_never_asks_dns_even_when_dns_has_it(tmp_path: Path) -> None:
    async def test(resolver: NameResolver, fake: FakeDns) -> None:
        resolved = await resolver.resolve("both.test")
        assert (resolved.addresses, resolved.ttl, resolved.source) == ([V4("203.0.113.10")], HOSTS_TTL, "hosts")
        resolved = await resolver.resolve("alias.test")
        assert resolved.addresses == [V4("203.0.113.10"), V6("2001:db8::10")] and resolved.source == "hosts"
        assert fake.asked == []

    with_resolver(tmp_path, test)


def test_a_name_not_in_the_hosts_file_goes_to_dns_with_the_search_list(tmp_path: Path) -> None:
    async def test(resolver: NameResolver, fake: FakeDns) -> None:
        resolved = await resolver.resolve("dns.test")
        assert (resolved.addresses, resolved.ttl, resolved.source) == \
            ([V4("192.0.2.30"), V6("2001:db8::30")], 42.0, "dns")
        assert sorted(fake.asked) == [("dns.test", "A", True), ("dns.test", "AAAA", True)]
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("nowhere.test")

    with_resolver(tmp_path, test)


def test_a_hosts_file_name_does_not_wait_for_a_busy_dns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "LOOKUP_TIMEOUT", 0.5)

    async def test(resolver: NameResolver, fake: FakeDns) -> None:
        resolver.slots = asyncio.Semaphore(1)
        hanging = asyncio.create_task(resolver.resolve("hang.test"))  # holds the only DNS slot
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await resolver.resolve("alias.test")).source == "hosts"
        assert loop.time() - started < 0.1
        with pytest.raises(TimeoutError):  # and the lookup itself has its timeout
            await hanging

    with_resolver(tmp_path, test)


# ------------------------------------------------------------------ both proxies, the same answers

def test_the_dns_proxy_s_forwards_and_the_http_proxy_resolve_alike(tmp_path: Path) -> None:
    """A forward to a hostAliases name gets the hosts file's addresses as backends, as the HTTP proxy's lookup
    does; a name in both the file and DNS gets the file's; a name only in DNS gets DNS's, in both."""
    (tmp_path / "hosts").write_text(HOSTS)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fakes = [FakeDns(dict(TABLE)), FakeDns(dict(TABLE))]
        names = Names(loop, SharedCounters(1).row(0), hosts=str(tmp_path / "hosts"),
                      resolv_conf=str(tmp_path / "resolv.conf"))
        names.source.resolver = lambda: fakes[0]  # type: ignore[method-assign]
        worker = SimpleNamespace(loop=loop, settings=SimpleNamespace(ttl_min=1.0, ttl_max=30.0),
                                 names=NameResolver(str(tmp_path / "hosts"), str(tmp_path / "resolv.conf")))
        worker.names.resolver = lambda: fakes[1]
        for port, name in enumerate(("alias.test", "both.test", "dns.test"), 7000):
            target = Target(worker, Forward(port, name, 80))  # type: ignore[arg-type]
            target.start()
            try:
                await asyncio.wait_for(target.first_attempt.wait(), 2.0)
                assert [b.address for b in target.backends] == await names.lookup(name), name
            finally:
                target.retire()
        assert [b.address for b in target.backends] == [V4("192.0.2.30"), V6("2001:db8::30")]
        assert {a[0] for a in fakes[0].asked} == {a[0] for a in fakes[1].asked} == {"dns.test"}

    asyncio.run(main())


def test_a_dns_proxy_forward_follows_a_changed_hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "HOSTS_RECHECK", 0.0)
    (tmp_path / "hosts").write_text(HOSTS)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        resolver = NameResolver(str(tmp_path / "hosts"), str(tmp_path / "resolv.conf"))
        fake = FakeDns(dict(TABLE))
        resolver.resolver = lambda: fake  # type: ignore[method-assign]
        worker = SimpleNamespace(loop=loop, settings=SimpleNamespace(ttl_min=0.0, ttl_max=30.0), names=resolver)
        target = Target(worker, Forward(7000, "alias.test", 80))  # type: ignore[arg-type]
        target.start()
        try:
            await asyncio.wait_for(target.first_attempt.wait(), 2.0)
            assert [b.address for b in target.backends] == [V4("203.0.113.10"), V6("2001:db8::10")]
            (tmp_path / "hosts").write_text("203.0.113.99 alias.test\n")
            async with asyncio.timeout(2.0):  # re-read within RESOLVE_MIN_INTERVAL (a hosts file answer: TTL 0)
                while [b.address for b in target.backends] != [V4("203.0.113.99")]:
                    await asyncio.sleep(0.02)
            assert fake.asked == []
        finally:
            target.retire()

    asyncio.run(main())
