"""The plan as data: which steps, in which order, how each renders; every step type has an applier."""

from __future__ import annotations

import typing
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from egress_router.core.config import load
from egress_router.core.nat import NatRules
from egress_router.core.plan import Plan, Step, build_plan, network_plan
from egress_router.core.redirect import parse_destinations
from egress_router.core.steps import Address, Announce, LinkUp, Route, Sysctl

SOURCE = IPv4Interface("192.0.2.99/24")
GATEWAY = IPv4Address("192.0.2.1")
DESTS = parse_destinations("80 tcp 203.0.113.10\n203.0.113.12")


def test_steps_in_the_order_they_are_applied() -> None:
    plan = network_plan("macvlan0", "eth0", SOURCE, GATEWAY, DESTS)
    assert [type(step) for step in plan.steps] == [NatRules, Address, LinkUp, Route, Route, Sysctl, Announce]
    assert plan.steps[1:] == (
        Address("macvlan0", SOURCE),
        LinkUp("macvlan0"),
        Route("macvlan0", IPv4Network("192.0.2.1/32")),
        Route("macvlan0", IPv4Network("0.0.0.0/0"), GATEWAY, sole=True),
        Sysctl("net.ipv4.ip_forward", "1"),
        Announce("macvlan0", SOURCE.ip),
    )


def test_without_destinations_there_is_no_nat_step() -> None:
    plan = network_plan("net1", "eth0", SOURCE, GATEWAY, None)
    assert plan.nat is None
    assert type(plan.steps[0]) is Address


@pytest.mark.parametrize(
    ("step", "text"),
    [
        (Address("macvlan0", SOURCE), "ip address add 192.0.2.99/24 dev macvlan0"),
        (LinkUp("net1"), "ip link set net1 up"),
        (Route("macvlan0", IPv4Network("192.0.2.1/32")), "ip route replace 192.0.2.1/32 dev macvlan0 scope link"),
        (Route("macvlan0", IPv4Network("0.0.0.0/0"), GATEWAY, sole=True),
         "ip route replace default via 192.0.2.1 dev macvlan0"),
        (Route("net1", IPv4Network("198.51.100.0/24"), GATEWAY),
         "ip route replace 198.51.100.0/24 via 192.0.2.1 dev net1"),
        (Sysctl("net.ipv4.ip_forward", "1"), "sysctl -w net.ipv4.ip_forward=1"),
        (Announce("macvlan0", SOURCE.ip), "arping -A -c 1 -I macvlan0 192.0.2.99  # and -U (request form)"),
    ],
)
def test_each_step_renders_its_iproute2_equivalent(step: Step, text: str) -> None:
    assert step.render() == text


def test_sysctl_path() -> None:
    assert Sysctl("net.ipv4.conf.all.rp_filter", "2").path == "/proc/sys/net/ipv4/conf/all/rp_filter"


def test_render_is_every_step_in_order() -> None:
    plan = network_plan("macvlan0", "eth0", SOURCE, GATEWAY, DESTS)
    lines = plan.render()
    assert len(lines) == len(plan.steps)
    assert lines[0].startswith("*nat\n") and lines[0].endswith("\nCOMMIT")
    assert lines[1:] == [step.render() for step in plan.steps[1:]]


def test_build_plan_takes_nat_only_in_nat_modes() -> None:
    env = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "203.0.113.12"}
    assert build_plan(load({**env, "EGRESS_ROUTER_MODE": "init"}), "macvlan0").nat is not None
    assert build_plan(load({**env, "EGRESS_ROUTER_MODE": "http-proxy"}), "macvlan0").nat is None


def test_plans_are_frozen_data() -> None:
    plan = network_plan("macvlan0", "eth0", SOURCE, GATEWAY, DESTS)
    assert plan == network_plan("macvlan0", "eth0", SOURCE, GATEWAY, DESTS)
    with pytest.raises(AttributeError):
        plan.steps = ()  # type: ignore[misc]
    assert isinstance(hash(plan.steps[1:]), int)
    assert isinstance(plan, Plan)


def test_every_step_type_has_one_applier() -> None:
    """Adding a step type is one class in core/steps.py (or nat.py) and one entry in net.apply.APPLIERS."""
    from egress_router.net.apply import APPLIERS

    assert set(APPLIERS) == set(typing.get_args(Step))
