"""Target.choose: least open connections, round-robin among equals, a down backend only when all are down; the
one-address shortcut gives the general rule's answers."""

from __future__ import annotations

import math
from ipaddress import IPv4Address
from types import SimpleNamespace

from egress_router.core.forwards import Forward
from egress_router.proxy.dns_targets import Target


def target(*addresses: str) -> Target:
    worker = SimpleNamespace(loop=SimpleNamespace(time=lambda: 100.0))
    made = Target(worker, Forward(7000, IPv4Address(addresses[0]), 7000))  # type: ignore[arg-type]
    made.update([IPv4Address(a) for a in addresses])
    return made


def test_one_backend_is_chosen_while_healthy_or_down_never_when_tried() -> None:
    one = target("203.0.113.10")
    [backend] = one.backends
    assert [one.choose(set()) for _ in range(3)] == [backend] * 3
    assert one.turn == 3
    backend.open = 5  # busy does not matter when it is the only one
    backend.down_until = math.inf  # down: still the one to try (all are down)
    assert one.choose(set()) is backend
    assert one.choose({backend}) is None  # tried already
    assert one.turn == 4  # no choice made, no turn taken


def test_many_backends_least_open_then_round_robin_and_down_last() -> None:
    many = target("203.0.113.10", "203.0.113.11", "203.0.113.12")
    a, b, c = many.backends
    assert {many.choose(set()) for _ in range(3)} == {a, b, c}  # all equal: each in turn
    a.open, b.open = 1, 1
    assert many.choose(set()) is c
    c.down_until = math.inf
    assert many.choose(set()) in (a, b)
    assert many.choose({a, b}) is c  # only the down one left
    assert many.choose({a, b, c}) is None
