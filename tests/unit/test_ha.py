"""High availability, the pure parts: peers, priorities, keepalived's configuration, its state lines, what a
standby holds; the configuration errors; `egress-router ready`."""

from __future__ import annotations

import os
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from egress_router.core import ha
from egress_router.core.config import load
from egress_router.core.errors import ConfigError
from egress_router.core.plan import dual_plan
from egress_router.core.steps import Address, Announce, LinkUp, Route, Sysctl
from egress_router.readiness import check, write_state

BASE = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "80 tcp 203.0.113.10",
        "EGRESS_ROUTER_MODE": "legacy"}


@pytest.mark.parametrize(("value", "addresses", "service"), [
    ("198.51.100.11 198.51.100.12", ("198.51.100.11", "198.51.100.12"), None),
    ("198.51.100.11,198.51.100.12, 198.51.100.13", ("198.51.100.11", "198.51.100.12", "198.51.100.13"), None),
    ("2001:db8:100::11 2001:db8:100::12", ("2001:db8:100::11", "2001:db8:100::12"), None),
    ("egress-router-peers.egress.svc.cluster.local.", (), "egress-router-peers.egress.svc.cluster.local"),
    ("Peers", (), "peers"),
])
def test_peers(value: str, addresses: tuple[str, ...], service: str | None) -> None:
    assert ha.parse_peers(value, "EGRESS_HA_PEERS") == (tuple(map(ip_address, addresses)), service)


@pytest.mark.parametrize(("value", "message"), [
    ("198.51.100.11 peers", "'198.51.100.11 peers': give one headless Service name or the replicas' addresses, not "
     "both or several names"),
    ("a b", "'a b': give one headless Service name or the replicas' addresses, not both or several names"),
    ("198.51.100.11 2001:db8::1", "'198.51.100.11 2001:db8::1': the replicas' addresses must be of one family (the "
     "heartbeats use one)"),
    ("198.51.100.11 198.51.100.11", "198.51.100.11 is given twice"),
    ("198.51.100.300", "'198.51.100.300' is neither an IP address nor a DNS name"),
    ("under_score", "'under_score' is neither an IP address nor a DNS name"),
    ("224.0.0.18", "224.0.0.18 is not a pod address"),
    ("127.0.0.1 198.51.100.1", "127.0.0.1 is not a pod address"),
])
def test_bad_peers(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ha.parse_peers(value, "EGRESS_HA_PEERS")
    assert str(caught.value) == f"EGRESS_HA_PEERS: {message}"


def test_priorities_are_distinct_by_address_order() -> None:
    replicas = [ip_address(a) for a in ("198.51.100.13", "198.51.100.11", "198.51.100.12")]
    assert [ha.priority(r, replicas) for r in replicas] == [170, 250, 210]
    many = [ip_address(f"198.51.100.{i}") for i in range(10, 20)]
    assert ha.priority(many[-1], many) == ha.LOWEST_PRIORITY
    assert ha.priority(ip_address("198.51.100.99"), replicas) == 130  # its own address need not be listed


def test_keepalived_config() -> None:
    text = ha.keepalived_config(own=ip_address("198.51.100.12"),
                                peers=[ip_address("198.51.100.12"), ip_address("198.51.100.13"),
                                       ip_address("198.51.100.11")],
                                interface="eth0", vrid=51, advert=0.2, fifo="/run/e/keepalived.fifo",
                                guard="/run/e/guard", startup_delay=8, egress="macvlan0")
    assert text == """\
# written by egress-router from EGRESS_HA_*: do not edit, it is rewritten on every start and peer change
track_file egress_guard {
    file /run/e/guard
}
global_defs {
    router_id egress-router-198.51.100.12
    notify_fifo /run/e/keepalived.fifo
    max_auto_priority -1
    vrrp_startup_delay 8
}
vrrp_instance egress {
    state BACKUP
    interface eth0
    virtual_router_id 51
    version 3
    priority 210
    advert_int 0.2
    nopreempt
    unicast_src_ip 198.51.100.12
    unicast_peer {
        198.51.100.11
        198.51.100.13
    }
    track_file {
        egress_guard weight 0
    }
    track_interface {
        macvlan0
    }
    virtual_ipaddress {
        127.0.0.99/32 dev lo
    }
}
"""


@pytest.mark.parametrize(("line", "state"), [
    ('INSTANCE "egress" MASTER 250', "MASTER"), ('INSTANCE "egress" BACKUP 250', "BACKUP"),
    ('INSTANCE "egress" FAULT 0', "FAULT"), ('INSTANCE "egress" STOP 250', "STOP"),
    ('INSTANCE "egress" MASTER_RX_LOWER_PRI 250', None),  # an event, not a state
    ('INSTANCE "other" MASTER 100', None), ("", None), ("GROUP x MASTER", None),
])
def test_fifo_lines(line: str, state: str | None) -> None:
    assert ha.fifo_state(line) == state


def test_what_a_standby_holds_and_what_only_the_active_one_holds() -> None:
    plan = dual_plan("macvlan0", "eth0", [(ip_interface("192.0.2.99/24"), ip_address("192.0.2.1")),
                                          (ip_interface("2001:db8:2::99/64"), ip_address("fe80::1"))], None)
    held = [step for step in plan.steps if ha.held_step(step, plan.interface)]
    assert {type(step) for step in held} == {Address, Route, Announce}
    assert all(step.interface == "macvlan0" for step in held)  # type: ignore[union-attr]
    prepared = [step for step in plan.steps if not ha.held_step(step, plan.interface)]
    assert LinkUp("macvlan0") in prepared and any(isinstance(step, Sysctl) for step in prepared)
    routes = ha.standby_routes([4, 6])
    assert [route.render() for route in routes] == ["ip route replace unreachable default",
                                                   "ip -6 route replace unreachable default"]
    assert routes[0] == Route("", ip_network("0.0.0.0/0"), sole=True, kind="unreachable")


def test_an_address_with_a_lifetime_renders_it() -> None:
    assert Address("macvlan0", ip_interface("192.0.2.99/24"), lifetime=2).render() == \
        "ip address add 192.0.2.99/24 dev macvlan0 valid_lft 2 preferred_lft 2"
    assert ha.RENEW_SECONDS * 3 < ha.ADDRESS_LIFETIME < ha.YIELD_AFTER < 3.0  # renewed in time; a leftover lapses
    # before a live replica gives way to it, and two holders are resolved within the 3 s the LAN may see them


def test_settings_loaded() -> None:
    config = load({**BASE, "EGRESS_HA_PEERS": "198.51.100.11 198.51.100.12", "EGRESS_HA_VRID": "7",
                   "EGRESS_HA_ADVERT_SECONDS": "0.5", "EGRESS_HA_STATE_DIR": "/run/x"})
    assert config.ha == ha.HaSettings((ip_address("198.51.100.11"), ip_address("198.51.100.12")), None, 7, 0.5,
                                      "/run/x")
    assert load(BASE).ha is None


@pytest.mark.parametrize(("env", "message"), [
    ({"EGRESS_ROUTER_MODE": "init"}, "EGRESS_HA_PEERS: high availability needs a mode that stays up (legacy, "
     "http-proxy, dns-proxy), not init: an init container exits and cannot hand the address over"),
    ({"EGRESS_ROUTER_MODE": "http-proxy", "EGRESS_HTTP_PROXY_DESTINATION": "*", "EGRESS_SOURCE": "",
      "EGRESS_GATEWAY": ""},
     "EGRESS_HA_PEERS: high availability moves EGRESS_SOURCE between the replicas: set EGRESS_SOURCE and "
     "EGRESS_GATEWAY in this container (the single-container layout)"),
    ({"EGRESS_HA_ADVERT_SECONDS": "41"}, "EGRESS_HA_ADVERT_SECONDS: 41 is over VRRPv3's longest advert interval "
     "(40.95 s)"),
    ({"EGRESS_HA_VRID": "256"}, "EGRESS_HA_VRID: '256' is not a whole number from 1 to 255"),
])
def test_settings_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE, "EGRESS_HA_PEERS": "198.51.100.11 198.51.100.12", **env})
    assert str(caught.value) == message


def test_ready_probe(tmp_path: Path) -> None:
    env = {"EGRESS_HA_PEERS": "198.51.100.11 198.51.100.12", "EGRESS_HA_STATE_DIR": str(tmp_path)}
    assert check({})[0] == 2
    assert check(env) == (1, f"not ready: no state in {tmp_path} yet (the router is starting)")
    write_state(tmp_path, "standby")
    assert check(env) == (1, "not ready: this replica is standby (another one holds EGRESS_SOURCE)")
    write_state(tmp_path, "active")
    assert check(env) == (0, "ready: this replica is active and holds EGRESS_SOURCE")
    (tmp_path / "ha-state").write_text("active 999999999\n", encoding="ascii")  # no such process
    assert check(env)[0] == 1 and "is gone" in check(env)[1]
    assert sorted(os.listdir(tmp_path)) == ["ha-state"]  # the state file is replaced whole, nothing left beside


def test_ready_command_exit_codes(tmp_path: Path) -> None:
    import subprocess
    import sys

    program = [sys.executable, "-c", "from egress_router.entry import main; import sys; sys.argv = ['egress-router', "
               "'ready']; main()"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")},
           "EGRESS_HA_PEERS": "198.51.100.11 198.51.100.12", "EGRESS_HA_STATE_DIR": str(tmp_path)}
    standby = subprocess.run(program, env=env, capture_output=True, text=True, timeout=30)
    assert (standby.returncode, standby.stdout) == (1, "") and standby.stderr.startswith("not ready: no state")
    write_state(tmp_path, "active")
    active = subprocess.run(program, env=env, capture_output=True, text=True, timeout=30)
    assert (active.returncode, active.stdout) == (0, "ready: this replica is active and holds EGRESS_SOURCE\n")


def test_a_protocol_named_by_iptables_save_compares_as_its_number() -> None:
    """iptables-save prints `-p vrrp` where /etc/protocols names 112: the rule written `-p 112` still holds."""
    from egress_router.core.nat import parse_save

    text = "*mangle\n:EGRESS-ROUTER-MARK - [0:0]\n-A EGRESS-ROUTER-MARK -p vrrp -j RETURN\nCOMMIT\n"
    assert parse_save(text).mangle == {"EGRESS-ROUTER-MARK": ["-p 112 -j RETURN"]}


@pytest.mark.parametrize("proxy", [
    {"EGRESS_ROUTER_MODE": "http-proxy", "EGRESS_HTTP_PROXY_DESTINATION": "*"},
    {"EGRESS_ROUTER_MODE": "dns-proxy", "EGRESS_DNS_PROXY_DESTINATION": "53 203.0.113.10"}])
def test_settings_in_the_proxy_modes(proxy: dict[str, str]) -> None:
    config = load({**BASE, "EGRESS_HA_PEERS": "egress-router-ha", **proxy})
    assert config.ha == ha.HaSettings((), "egress-router-ha", 51, 0.2, "/run/egress-router")
    assert config.configures_network and not config.configures_nat


# ---------------------------------------------------------------- a replica's part of the plan (core.ha.replica_plan)

def dual_stack_plan():  # type: ignore[no-untyped-def]
    return dual_plan("macvlan0", "eth0", [(ip_interface("192.0.2.99/24"), ip_address("192.0.2.1")),
                                          (ip_interface("2001:db8:2::99/64"), ip_address("fe80::1"))], None)


def test_the_active_replica_holds_every_step_its_reserved_addresses_with_their_lifetime() -> None:
    plan = dual_stack_plan()
    active = ha.replica_plan(plan, ha.ACTIVE)
    assert (active.interface, active.addresses, active.gateways) == (plan.interface, plan.addresses, plan.gateways)
    assert len(active.steps) == len(plan.steps)
    for wanted, held in zip(plan.steps, active.steps, strict=True):
        if isinstance(wanted, Address):
            assert held == Address(wanted.interface, wanted.address, lifetime=ha.ADDRESS_LIFETIME)
        else:
            assert held == wanted
    assert [step.render() for step in active.steps if isinstance(step, Address)] == [
        "ip address add 192.0.2.99/24 dev macvlan0 valid_lft 1 preferred_lft 1",
        "ip address add 2001:db8:2::99/64 dev macvlan0 nodad valid_lft 1 preferred_lft 1"]
    assert ha.active_steps(plan) == active.steps


def test_a_standby_holds_the_prepared_steps_and_unreachable_defaults_instead_of_the_held_ones() -> None:
    plan = dual_stack_plan()
    standby = ha.replica_plan(plan, ha.STANDBY)
    prepared = tuple(step for step in plan.steps if not ha.held_step(step, "macvlan0"))
    assert standby.steps == prepared + ha.standby_routes([4, 6])
    assert not any(isinstance(step, (Address, Announce)) for step in standby.steps)
    assert not any(isinstance(step, Route) and step.interface == "macvlan0" for step in standby.steps)
    assert standby.addresses == plan.addresses  # what it stands by for, still named in logs and verify's summary
    assert ha.standby_defaults(plan) == ha.standby_routes([4, 6])
    ipv4 = dual_plan("macvlan0", "eth0", [(ip_interface("192.0.2.99/24"), ip_address("192.0.2.1"))], None)
    assert [step.render() for step in ha.replica_plan(ipv4, ha.STANDBY).steps][-1:] == [
        "ip route replace unreachable default"]


def test_a_role_is_active_or_standby() -> None:
    with pytest.raises(ValueError, match="a replica's role is active or standby, not 'starting'"):
        ha.replica_plan(dual_stack_plan(), "starting")


@pytest.mark.parametrize(("state", "why"), [
    ("starting", "its keepalived has not reported a state yet: it could not take over now"),
    ("standby", "another one holds EGRESS_SOURCE"),
    ("fault", "keepalived is in FAULT: its egress link is down, or it gave way to a second holder of EGRESS_SOURCE"),
    ("stopped", "the router is stopping"),
    ("later", "a state this version does not know"),
])
def test_ready_probe_says_why_a_replica_is_not_ready(tmp_path: Path, state: str, why: str) -> None:
    env = {"EGRESS_HA_PEERS": "198.51.100.11 198.51.100.12", "EGRESS_HA_STATE_DIR": str(tmp_path)}
    write_state(tmp_path, state)
    assert check(env) == (1, f"not ready: this replica is {state} ({why})")
