"""The DNS proxy's per-forward metrics: the slot table in shared memory, and the exact text /metrics renders."""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv6Address
from types import SimpleNamespace

from egress_router.core.exposition import render
from egress_router.core.forwards import Forward
from egress_router.proxy import dns_metrics as m
from egress_router.proxy.dns_metrics import ForwardRow, ForwardTable, forward_families, forward_rows, stable_hash
from egress_router.proxy.dns_targets import Target
from egress_router.proxy.metrics import RELOADS, SharedCounters


def counts(**values: int) -> list[int]:
    cells = [0] * m.SLOT_WIDTH
    for name, value in values.items():
        cells[getattr(m, name)] = value
    return cells


EXPECTED = '''\
# HELP egress_router_dns_proxy_forwards Forwards in force (worker 0's).
# TYPE egress_router_dns_proxy_forwards gauge
egress_router_dns_proxy_forwards 1
# HELP egress_router_dns_proxy_connections_total Client connections by forward and result: relayed (a backend \
connected), failed (no backend could be reached), rejected (the connection limit, or a standby replica), \
unresolved (the name has not resolved yet), abandoned (closed before any backend connected: the client left, or \
the proxy stopped). port="other": forwards beyond the slot table.
# TYPE egress_router_dns_proxy_connections_total counter
egress_router_dns_proxy_connections_total{port="5432",target="db.example.com:5432",result="relayed"} 7
egress_router_dns_proxy_connections_total{port="5432",target="db.example.com:5432",result="failed"} 2
egress_router_dns_proxy_connections_total{port="5432",target="db.example.com:5432",result="rejected"} 1
egress_router_dns_proxy_connections_total{port="5432",target="db.example.com:5432",result="unresolved"} 0
egress_router_dns_proxy_connections_total{port="5432",target="db.example.com:5432",result="abandoned"} 0
egress_router_dns_proxy_connections_total{port="other",target="other",result="relayed"} 3
egress_router_dns_proxy_connections_total{port="other",target="other",result="failed"} 0
egress_router_dns_proxy_connections_total{port="other",target="other",result="rejected"} 0
egress_router_dns_proxy_connections_total{port="other",target="other",result="unresolved"} 0
egress_router_dns_proxy_connections_total{port="other",target="other",result="abandoned"} 0
# HELP egress_router_dns_proxy_open_connections Client connections open now, by forward.
# TYPE egress_router_dns_proxy_open_connections gauge
egress_router_dns_proxy_open_connections{port="5432",target="db.example.com:5432"} 4
egress_router_dns_proxy_open_connections{port="other",target="other"} 0
# HELP egress_router_dns_proxy_bytes_total Payload bytes relayed, by forward and direction (upstream: client to \
backend), counted as they flow.
# TYPE egress_router_dns_proxy_bytes_total counter
egress_router_dns_proxy_bytes_total{port="5432",target="db.example.com:5432",direction="upstream"} 1000
egress_router_dns_proxy_bytes_total{port="5432",target="db.example.com:5432",direction="downstream"} 123456
egress_router_dns_proxy_bytes_total{port="other",target="other",direction="upstream"} 0
egress_router_dns_proxy_bytes_total{port="other",target="other",direction="downstream"} 0
# HELP egress_router_dns_proxy_backend_connect_failures_total Backend connects that failed, by forward and kind: \
refused, unreachable (any other error), timeout.
# TYPE egress_router_dns_proxy_backend_connect_failures_total counter
egress_router_dns_proxy_backend_connect_failures_total{port="5432",target="db.example.com:5432",kind="refused"} 2
egress_router_dns_proxy_backend_connect_failures_total{port="5432",target="db.example.com:5432",kind="unreachable"} 0
egress_router_dns_proxy_backend_connect_failures_total{port="5432",target="db.example.com:5432",kind="timeout"} 1
egress_router_dns_proxy_backend_connect_failures_total{port="other",target="other",kind="refused"} 0
egress_router_dns_proxy_backend_connect_failures_total{port="other",target="other",kind="unreachable"} 0
egress_router_dns_proxy_backend_connect_failures_total{port="other",target="other",kind="timeout"} 0
# HELP egress_router_dns_proxy_dns_lookups_total DNS lookups of the forward's name, by result (hosts file answers \
are not DNS lookups and are not counted); not_found, failed and timeout are the failures.
# TYPE egress_router_dns_proxy_dns_lookups_total counter
egress_router_dns_proxy_dns_lookups_total{port="5432",target="db.example.com:5432",result="answered"} 12
egress_router_dns_proxy_dns_lookups_total{port="5432",target="db.example.com:5432",result="not_found"} 0
egress_router_dns_proxy_dns_lookups_total{port="5432",target="db.example.com:5432",result="failed"} 0
egress_router_dns_proxy_dns_lookups_total{port="5432",target="db.example.com:5432",result="timeout"} 5
egress_router_dns_proxy_dns_lookups_total{port="other",target="other",result="answered"} 0
egress_router_dns_proxy_dns_lookups_total{port="other",target="other",result="not_found"} 0
egress_router_dns_proxy_dns_lookups_total{port="other",target="other",result="failed"} 0
egress_router_dns_proxy_dns_lookups_total{port="other",target="other",result="timeout"} 0
# HELP egress_router_dns_proxy_dns_failing 1 while the last lookup of the forward's name failed in some worker (the \
last good answer is used meanwhile, if there was one).
# TYPE egress_router_dns_proxy_dns_failing gauge
egress_router_dns_proxy_dns_failing{port="5432",target="db.example.com:5432"} 1
# HELP egress_router_dns_proxy_backends Backend addresses of the forward now (worker 0's answer).
# TYPE egress_router_dns_proxy_backends gauge
egress_router_dns_proxy_backends{port="5432",target="db.example.com:5432"} 2
# HELP egress_router_dns_proxy_healthy_backends Backends of the forward that get new connections (backend_up 1).
# TYPE egress_router_dns_proxy_healthy_backends gauge
egress_router_dns_proxy_healthy_backends{port="5432",target="db.example.com:5432"} 1
# HELP egress_router_dns_proxy_backend_up 1: the backend gets new connections; 0: a connect to it failed in some \
worker and that worker's active check has not succeeded since (combined over the workers; worker 0's view alone \
beyond 16 backends).
# TYPE egress_router_dns_proxy_backend_up gauge
egress_router_dns_proxy_backend_up{port="5432",target="db.example.com:5432",backend="203.0.113.25:5432"} 1
egress_router_dns_proxy_backend_up{port="5432",target="db.example.com:5432",backend="[2001:db8::25]:5432"} 0
# HELP egress_router_dns_proxy_reloads_total Reloads of the forwards, by result.
# TYPE egress_router_dns_proxy_reloads_total counter
egress_router_dns_proxy_reloads_total{result="applied"} 2
egress_router_dns_proxy_reloads_total{result="failed"} 0
'''


def test_the_families_of_a_forward_and_the_shared_slot_render_exactly() -> None:
    rows = [ForwardRow("5432", "db.example.com:5432",
                       counts(RELAYED=7, FAILED=2, REJECTED=1, OPEN=4, BYTES_UP=1000, BYTES_DOWN=123456, REFUSED=2,
                              TIMED_OUT=1, ANSWERED=12, LOOKUP_TIMEOUT=5),
                       failing=True, backends=(("203.0.113.25:5432", True), ("[2001:db8::25]:5432", False))),
            ForwardRow("other", "other", counts(RELAYED=3))]
    assert render(forward_families(rows, 2, 0)) == EXPECTED


def test_a_forward_without_a_slot_anywhere_has_health_series_but_no_counts() -> None:
    row = ForwardRow("7000", "203.0.113.10:7000", counts(), backends=(("203.0.113.10:7000", True),), counted=False)
    text = render(forward_families([row], 0, 0))
    assert 'egress_router_dns_proxy_backend_up{port="7000",target="203.0.113.10:7000",backend="203.0.113.10:7000"} 1' \
        in text
    assert 'connections_total{port="7000"' not in text and 'bytes_total{port="7000"' not in text


# ------------------------------------------------------------------ the slot table

def test_a_slot_is_kept_per_forward_and_summed_over_the_workers() -> None:
    table = ForwardTable(2, slots=4)
    first, second = table.worker(0), table.worker(1)
    a0, a1 = first.claim(7000, "svc.test:7000"), second.claim(7000, "svc.test:7000")
    b0 = first.claim(7001, "203.0.113.11:7001")
    a0.add(m.RELAYED, 3)
    a1.add(m.RELAYED, 2)
    a1.add(m.BYTES_UP, 10)
    b0.add(m.FAILED)
    assert first.claim(7000, "svc.test:7000").index == a0.index  # the same key: the same slot
    sums, other = table.sums()
    key = (7000, stable_hash("svc.test:7000"))
    assert sums[key].counts[m.RELAYED] == 5 and sums[key].counts[m.BYTES_UP] == 10
    assert sums[(7001, stable_hash("203.0.113.11:7001"))].counts[m.FAILED] == 1
    assert not any(other.counts)


def test_a_changed_target_gets_a_fresh_slot_and_a_released_one_is_zeroed_when_taken_again() -> None:
    slots = ForwardTable(1, slots=4).worker(0)
    old = slots.claim(7000, "203.0.113.10:7000")
    old.add(m.RELAYED, 9)
    new = slots.claim(7000, "203.0.113.12:7000")
    assert new.index != old.index and new.cells[new.base + m.RELAYED] == 0
    slots.release(old)
    old.add(m.RELAYED)  # a late write (a connect that was under way) goes nowhere that is read
    again = slots.claim(7002, "203.0.113.11:7002")
    assert again.index == 0 and again.cells[again.base + m.RELAYED] == 0
    sums, other = slots.table.sums()
    assert set(sums) == {(7000, stable_hash("203.0.113.12:7000")), (7002, stable_hash("203.0.113.11:7002"))}
    assert not any(other.counts)


def test_a_slot_held_twice_is_freed_by_its_last_holder() -> None:
    slots = ForwardTable(1, slots=4).worker(0)
    draining = slots.claim(7000, "svc.test:7000")
    back = slots.claim(7000, "svc.test:7000")  # changed away and back while the first drains
    slots.release(draining)
    back.add(m.RELAYED)
    assert slots.table.sums()[0][(7000, stable_hash("svc.test:7000"))].counts[m.RELAYED] == 1
    slots.release(back)
    assert slots.table.sums()[0] == {}


def test_forwards_beyond_the_table_count_in_the_shared_slot() -> None:
    table = ForwardTable(2, slots=2)
    for worker in (0, 1):
        slots = table.worker(worker)
        slots.claim(7000, "a:7000")
        slots.claim(7001, "b:7001")
        extra = slots.claim(7002, "c:7002")
        assert extra.index == -1
        extra.add(m.RELAYED, 2)
        extra.publish_health([(stable_hash("x"), True)])  # the shared slot has no health
    sums, other = table.sums()
    assert len(sums) == 2 and other.counts[m.RELAYED] == 4 and other.health == {}


def test_a_restarted_worker_keeps_the_counts_of_the_forwards_in_force_and_nothing_else() -> None:
    table = ForwardTable(1, slots=4)
    slots = table.worker(0)
    kept, gone = slots.claim(7000, "a:7000"), slots.claim(7001, "b:7001")
    kept.add(m.RELAYED, 5)
    kept.add(m.OPEN, 3)
    gone.add(m.OPEN, 1)
    kept.publish_health([(1, True)])
    table.worker(0).started({(7000, stable_hash("a:7000"))})
    sums, _ = table.sums()
    assert list(sums) == [(7000, stable_hash("a:7000"))]
    assert sums[(7000, stable_hash("a:7000"))].counts[m.RELAYED] == 5
    assert sums[(7000, stable_hash("a:7000"))].counts[m.OPEN] == 0 and sums[(7000, stable_hash("a:7000"))].health == {}


def test_a_backend_is_down_when_any_worker_has_it_down() -> None:
    table = ForwardTable(2, slots=2)
    zero, one = table.worker(0).claim(7000, "s:7000"), table.worker(1).claim(7000, "s:7000")
    zero.publish_health([(11, False), (22, False)])
    one.publish_health([(11, False), (22, True)])
    assert table.sums()[0][(7000, stable_hash("s:7000"))].health == {11: False, 22: True}
    one.publish_health([(11, False)])  # fewer backends now: the rest of its cells are cleared
    assert table.sums()[0][(7000, stable_hash("s:7000"))].health == {11: False, 22: False}


def test_health_beyond_the_published_backends_is_cut() -> None:
    slot = ForwardTable(1, slots=1).worker(0).claim(7000, "s:7000")
    slot.publish_health((key, True) for key in range(1, 40))
    cells = [slot.cells[slot.base + m.HEALTH_CELLS + i] for i in range(m.HEALTH)]
    assert [c >> 2 for c in cells] == list(range(1, m.HEALTH + 1))


# ------------------------------------------------------------------ worker 0's rows

def fake_worker(now: float = 100.0) -> SimpleNamespace:
    return SimpleNamespace(loop=SimpleNamespace(time=lambda: now), settings=SimpleNamespace(check_interval=2.0))


def test_the_rows_are_worker_0_s_forwards_with_every_worker_s_counts_and_health() -> None:
    table = ForwardTable(2, slots=4)
    worker = fake_worker()
    forward = Forward(7000, IPv4Address("203.0.113.10"), 7000)
    two = Forward(7001, IPv6Address("2001:db8::10"), 22)
    mine = Target(worker, forward, table.worker(0).claim(7000, forward.target()))  # type: ignore[arg-type]
    ipv6 = Target(worker, two, table.worker(0).claim(7001, two.target()))  # type: ignore[arg-type]
    theirs = Target(worker, forward, table.worker(1).claim(7000, forward.target()))  # type: ignore[arg-type]
    mine.slot.add(m.RELAYED)
    theirs.slot.add(m.RELAYED, 2)
    theirs.backends[0].down_until = math.inf  # worker 1's connect failed; worker 0 has not seen it
    theirs.publish()
    shared = SharedCounters(2)
    shared.row(0).add(RELOADS)
    rows = forward_rows(table, [ipv6, mine])
    assert [(r.port, r.target, r.counts[m.RELAYED], r.backends) for r in rows] == [
        ("7000", "203.0.113.10:7000", 3, (("203.0.113.10:7000", False),)),
        ("7001", "[2001:db8::10]:22", 0, (("[2001:db8::10]:22", True),))]
    text = render(m.dns_families(shared, table, [mine, ipv6]))
    assert 'egress_router_dns_proxy_healthy_backends{port="7000",target="203.0.113.10:7000"} 0' in text
    assert 'egress_router_dns_proxy_reloads_total{result="applied"} 1' in text
