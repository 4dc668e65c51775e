"""The HTTP proxy's per-request shortcuts (issue 16) keep its answers: caches follow the rules, keys stay apart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from egress_router.core.config import load_http_proxy
from egress_router.proxy import metrics
from egress_router.proxy.http import ClientConnection
from egress_router.proxy.http_rules import (
    CONNECTION,
    CONTENT_LENGTH,
    HOP,
    HOST,
    PLAIN,
    TRANSFER_ENCODING,
    UPGRADE_FIELD,
    VIA_FIELD,
    ProxyError,
    header_kind,
    parse_absolute_form,
    parse_target,
    request_head,
)
from egress_router.proxy.http_upstream import Upstream, UpstreamPool, pool_key
from egress_router.proxy.http_worker import Worker
from egress_router.proxy.metrics import SharedCounters


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def worker(rules: str) -> Worker:
    settings = load_http_proxy({"EGRESS_HTTP_PROXY_DESTINATION": rules})
    return Worker(settings, SharedCounters(1), 0, ClientConnection)


@pytest.mark.usefixtures("loop")
def test_a_kept_literal_verdict_goes_with_the_rules_it_came_from() -> None:
    proxy = worker("203.0.113.10")
    host, text, _, _ = parse_target(b"http://203.0.113.10/")
    assert proxy.addresses_of(host, text) == [IPv4Address("203.0.113.10")]
    assert proxy.addresses_of(host, text) == [IPv4Address("203.0.113.10")]  # the kept answer, the same
    denying = load_http_proxy({"EGRESS_HTTP_PROXY_DESTINATION": "203.0.113.11"}).acl
    asyncio.get_event_loop().run_until_complete(proxy.apply_rules(1, denying, []))
    with pytest.raises(ProxyError) as refused:
        proxy.addresses_of(host, text)
    assert (refused.value.status, refused.value.counter) == (403, metrics.DENIED)


@pytest.mark.usefixtures("loop")
def test_a_denied_literal_is_judged_every_time() -> None:
    proxy = worker("203.0.113.11")
    host, text, _, _ = parse_target(b"http://203.0.113.10/")
    for _ in range(2):
        with pytest.raises(ProxyError):
            proxy.addresses_of(host, text)
    assert not proxy.literals


@pytest.mark.usefixtures("loop")
def test_names_are_not_kept_as_literals() -> None:
    proxy = worker("www.example.com")
    assert proxy.addresses_of("www.example.com", "www.example.com") is None  # not resolved yet: a lookup
    assert not proxy.literals


def test_pool_keys_of_the_two_families_never_meet() -> None:
    v4, v6 = IPv4Address("0.0.0.1"), IPv6Address("::1")
    assert int(v4) == int(v6)
    assert pool_key(v4, 80) != pool_key(v6, 80)
    assert pool_key(v4, 80) == pool_key(IPv4Address("0.0.0.1"), 80) != pool_key(v4, 81)
    mapped = IPv6Address("::ffff:203.0.113.10")  # as before: another address than 203.0.113.10, another key
    assert pool_key(mapped, 80) != pool_key(IPv4Address("203.0.113.10"), 80)


@pytest.mark.usefixtures("loop")
def test_the_pool_gives_back_by_address_and_port() -> None:
    proxy = worker("203.0.113.0/24")
    pool = UpstreamPool()
    upstreams = []
    for address, port in ((IPv4Address("203.0.113.10"), 80), (IPv6Address("::cb00:710a"), 80),
                          (IPv4Address("203.0.113.10"), 8080)):
        upstream = Upstream(proxy)
        upstream.key = (address, port)
        pool.put(upstream, 0.0)
        upstreams.append(upstream)
    assert pool.take(pool_key(IPv4Address("203.0.113.10"), 80)) is upstreams[0]
    assert pool.take(pool_key(IPv4Address("203.0.113.10"), 80)) is None
    assert pool.take(pool_key(IPv6Address("::cb00:710a"), 80)) is upstreams[1]
    assert pool.take(pool_key(IPv4Address("203.0.113.10"), 8080)) is upstreams[2]


@pytest.mark.parametrize("name, kind", [
    (b"Content-Length", CONTENT_LENGTH), (b"content-length", CONTENT_LENGTH), (b"CONTENT-LENGTH", CONTENT_LENGTH),
    (b"Connection", CONNECTION), (b"Transfer-Encoding", TRANSFER_ENCODING), (b"Upgrade", UPGRADE_FIELD),
    (b"Host", HOST), (b"VIA", VIA_FIELD), (b"Keep-Alive", HOP), (b"Proxy-Authorization", HOP), (b"TE", HOP),
    (b"X-Content-Length", PLAIN), (b"Server", PLAIN),
])
def test_header_kinds_whatever_the_case(name: bytes, kind: int) -> None:
    assert header_kind(name) == kind
    assert header_kind(name) == kind  # kept: the same answer


def test_a_host_kept_from_one_target_does_not_let_brackets_through_in_another() -> None:
    assert parse_absolute_form(b"http://203.0.113.10/")[0] == IPv4Address("203.0.113.10")
    with pytest.raises(ProxyError) as refused:
        parse_absolute_form(b"http://[203.0.113.10]/")
    assert refused.value.message == "only IPv6 addresses may be written in brackets"


def test_kept_hosts_answer_as_the_first_time() -> None:
    first = parse_target(b"http://WWW.Example.COM:8080/a?b")
    assert first == ("www.example.com", "www.example.com", 8080, b"/a?b")
    assert parse_target(b"http://WWW.Example.COM/c") == ("www.example.com", "www.example.com", 80, b"/c")
    assert parse_target(b"http://[2001:db8::1]/") == (IPv6Address("2001:db8::1"), "[2001:db8::1]", 80, b"/")
    assert parse_target(b"http://[2001:db8::1]/") == (IPv6Address("2001:db8::1"), "[2001:db8::1]", 80, b"/")


def test_the_second_pass_of_a_request_head_starts_from_its_first_line() -> None:
    headers = [(b"Connection", b"X-Drop"), (b"X-Drop", b"1"), (b"Accept", b"*/*")]
    assert request_head(b"GET", b"/", "www.example.com", 8080, headers, False) == (
        b"GET / HTTP/1.1\r\nHost: www.example.com:8080\r\nAccept: */*\r\nVia: 1.1 egress-router\r\n\r\n")


def test_worker_rows_are_views_of_their_own_cells() -> None:
    shared = SharedCounters(3)
    rows = [shared.row(index) for index in range(3)]
    for index, row in enumerate(rows):
        row.add(metrics.OPEN, index + 1)
        row.observe(metrics.REQUEST, 0.002)
    rows[1].sub(metrics.OPEN, 5)  # never below 0
    assert shared.total(metrics.OPEN) == 1 + 0 + 3
    assert shared.cells[2 * metrics.WIDTH + metrics.OPEN] == 3
    histogram = metrics.DURATIONS + metrics.REQUEST * metrics.SERIES
    assert shared.total(histogram + metrics.DURATION_BUCKETS.index(0.0025)) == 3
    assert shared.total(histogram + metrics.BUCKETS) == 3 * 2000
