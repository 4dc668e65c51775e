"""IPv6 and dual-stack in the pure core: sources and gateways per family, IPv6 rules, the plan, unit-test output."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, IPv6Network

import pytest
from click.testing import CliRunner

from egress_router.cli import main
from egress_router.core.config import load
from egress_router.core.errors import ConfigError
from egress_router.core.nat import NatState, legacy_lines, parse_save, render, restore_payload
from egress_router.core.plan import build_plan
from egress_router.core.podnet import PodFacts, parse_nameservers, parse_nameservers6, return_path_steps
from egress_router.core.redirect import Destinations, PortRule, format_destinations, parse_destinations
from egress_router.core.steps import Address, Announce, PolicyRule, PruneRoutes, Route, Sysctl
from egress_router.core.values import ip_networks, parse_ipv6

DUAL = {
    "EGRESS_ROUTER_MODE": "init",
    "EGRESS_SOURCE": "192.0.2.99/24,2001:db8:2::99/64",
    "EGRESS_GATEWAY": "192.0.2.1,fe80::1",
    "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n"
                          "443 tcp 2001:db8::25\n"
                          "8443 tcp 2001:db8::25 443\n"
                          "53 udp 2001:db8::53 5353\n"
                          "203.0.113.12\n"
                          "2001:db8::26\n",
}
V6_ONLY = {**DUAL, "EGRESS_SOURCE": "2001:db8:2::99", "EGRESS_GATEWAY": "2001:db8:2::1",
           "EGRESS_DESTINATION": "443 tcp 2001:db8::25\n2001:db8::26"}


def load_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(env)
    return str(caught.value)


# ---------------------------------------------------------------- EGRESS_SOURCE and EGRESS_GATEWAY

@pytest.mark.parametrize("source", ["192.0.2.99/24,2001:db8:2::99/64", "2001:db8:2::99/64 192.0.2.99/24",
                                    " 192.0.2.99/24 , 2001:db8:2::99/64 "])
def test_one_source_per_family_in_any_order_and_separator(source: str) -> None:
    config = load({**DUAL, "EGRESS_SOURCE": source})
    assert config.versions == (4, 6)
    assert config.source == IPv4Interface("192.0.2.99/24") and config.gateway == IPv4Address("192.0.2.1")
    assert config.source6 == IPv6Interface("2001:db8:2::99/64") and config.gateway6 == IPv6Address("fe80::1")


def test_ipv6_only_without_prefix_is_a_host_address() -> None:
    config = load(V6_ONLY)
    assert config.versions == (6,) and config.source is None
    assert config.source6 == IPv6Interface("2001:db8:2::99/128")
    assert config.egress[0].has_prefix is False


def test_gateways_are_matched_by_family_not_by_position() -> None:
    config = load({**DUAL, "EGRESS_GATEWAY": "2001:db8:2::1 192.0.2.1"})
    assert (config.gateway, config.gateway6) == (IPv4Address("192.0.2.1"), IPv6Address("2001:db8:2::1"))


@pytest.mark.parametrize(("env", "message"), [
    ({"EGRESS_SOURCE": "192.0.2.99/24"},
     "EGRESS_GATEWAY: fe80::1 is an IPv6 gateway, but EGRESS_SOURCE (192.0.2.99) has no IPv6 address"),
    ({"EGRESS_GATEWAY": "192.0.2.1"},
     "EGRESS_GATEWAY: no IPv6 gateway for the IPv6 source 2001:db8:2::99 (give one per family, e.g. "
     "'192.0.2.1,2001:db8:2::1')"),
    ({"EGRESS_GATEWAY": "192.0.2.1,192.0.2.2"},
     "EGRESS_GATEWAY: '192.0.2.1,192.0.2.2' gives two IPv4 gateways: give one per family of EGRESS_SOURCE"),
    ({"EGRESS_GATEWAY": "fe80::1,2001:db8:2::1,192.0.2.1"},
     "EGRESS_GATEWAY: 'fe80::1,2001:db8:2::1,192.0.2.1' gives two IPv6 gateways: give one per family of "
     "EGRESS_SOURCE"),
    ({"EGRESS_SOURCE": "2001:db8:2::99/64", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "2001:db8::26"},
     "EGRESS_GATEWAY: 192.0.2.1 is an IPv4 gateway, but EGRESS_SOURCE (2001:db8:2::99) has no IPv4 address"),
    ({"EGRESS_SOURCE": "2001:db8:2::99/64,2001:db8:2::98/64"},
     "EGRESS_SOURCE: '2001:db8:2::99/64,2001:db8:2::98/64' gives two IPv6 addresses: give one per family (an "
     "IPv4 and an IPv6 address)"),
    ({"EGRESS_SOURCE": "192.0.2.99,2001:db8:2::99,198.51.100.9"},
     "EGRESS_SOURCE: '192.0.2.99,2001:db8:2::99,198.51.100.9' gives 3 addresses: give one, or one IPv4 and one "
     "IPv6 address"),
    ({"EGRESS_SOURCE": "192.0.2.99/24,fe80::99/64"},
     "EGRESS_SOURCE: fe80::99 is a link-local address, which is never routed: give a global or unique local address"),
    ({"EGRESS_SOURCE": "192.0.2.99/24,2001:db8:2::/64"},
     "EGRESS_SOURCE: 2001:db8:2::/64 is the subnet-router anycast address of 2001:db8:2::/64"),
    ({"EGRESS_SOURCE": "192.0.2.99/24,2001:db8:2::99/129"},
     "EGRESS_SOURCE: '129' in '2001:db8:2::99/129' is not a prefix length (0-128)"),
    ({"EGRESS_GATEWAY": "192.0.2.1,2001:db8:2::99"}, "EGRESS_GATEWAY: 2001:db8:2::99 is the same address as "
     "EGRESS_SOURCE"),
    ({"EGRESS_GATEWAY": "192.0.2.1,fe80::1%macvlan0"},
     "EGRESS_GATEWAY: 'fe80::1%macvlan0' has a zone index: leave it out (the egress interface is the zone)"),
    ({"EGRESS_GATEWAY": "192.0.2.1,ff02::2"}, "EGRESS_GATEWAY: ff02::2 is a multicast address"),
])
def test_every_invalid_mix_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    assert load_error({**DUAL, **env}) == message


def test_a_rule_whose_family_has_no_source_names_the_line_and_text() -> None:
    env = {**DUAL, "EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1"}
    assert load_error(env) == ("EGRESS_DESTINATION line 2: '443 tcp 2001:db8::25': 2001:db8::25 is an IPv6 "
                               "destination, but EGRESS_SOURCE has no IPv6 address (it is 192.0.2.99)")
    assert load_error({**V6_ONLY, "EGRESS_DESTINATION": "443 tcp 2001:db8::25\n203.0.113.9"}) == (
        "EGRESS_DESTINATION line 2: '203.0.113.9': 203.0.113.9 is an IPv4 destination, but EGRESS_SOURCE has "
        "no IPv4 address (it is 2001:db8:2::99)")


# ---------------------------------------------------------------- EGRESS_DESTINATION with IPv6

def test_ipv6_rules_and_a_fallback_per_family() -> None:
    dests = parse_destinations(DUAL["EGRESS_DESTINATION"])
    assert dests.rules[1:3] == (PortRule(443, "tcp", IPv6Address("2001:db8::25")),
                                PortRule(8443, "tcp", IPv6Address("2001:db8::25"), 443))
    assert dests.fallback == IPv4Address("203.0.113.12") and dests.fallback6 == IPv6Address("2001:db8::26")
    assert dests.versions == (4, 6) and len(dests) == 6
    six = dests.family(6)
    assert [r.port for r in six.rules] == [443, 8443, 53] and six.fallback is None and six.fallbacks == (
        IPv6Address("2001:db8::26"),)
    assert six.target("tcp", 8443) == (IPv6Address("2001:db8::25"), 443)
    assert six.target("tcp", 9999) == (IPv6Address("2001:db8::26"), 9999)
    assert parse_destinations(format_destinations(dests)) == dests


def test_a_port_is_unique_per_protocol_and_family() -> None:
    dests = parse_destinations("80 tcp 203.0.113.10\n80 tcp 2001:db8::10\n80 udp 2001:db8::10")
    assert len(dests.family(4).rules) == 1 and len(dests.family(6).rules) == 2


def test_the_ipv6_fallback_may_come_first_then_the_ipv4_one() -> None:
    dests = parse_destinations("80 tcp 2001:db8::10\n2001:db8::26\n203.0.113.12")
    assert dests.fallbacks == (IPv4Address("203.0.113.12"), IPv6Address("2001:db8::26"))


def test_ipv6_dnat_targets_are_bracketed_only_with_a_port() -> None:
    assert PortRule(443, "tcp", IPv6Address("2001:db8::25")).target == "2001:db8::25"
    assert PortRule(8443, "tcp", IPv6Address("2001:db8::25"), 443).target == "[2001:db8::25]:443"


# ---------------------------------------------------------------- unit-test mode

def test_unit_test_prints_the_ipv4_lines_then_the_ipv6_lines() -> None:
    assert legacy_lines(load({**DUAL, "EGRESS_ROUTER_MODE": "unit-test"})) == [
        "-A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination 203.0.113.10",
        "-A PREROUTING -i eth0 -j DNAT --to-destination 203.0.113.12",
        "-A POSTROUTING -j SNAT --to-source 192.0.2.99",
        "-A PREROUTING -i eth0 -p tcp --dport 443 -j DNAT --to-destination 2001:db8::25",
        "-A PREROUTING -i eth0 -p tcp --dport 8443 -j DNAT --to-destination [2001:db8::25]:443",
        "-A PREROUTING -i eth0 -p udp --dport 53 -j DNAT --to-destination [2001:db8::53]:5353",
        "-A PREROUTING -i eth0 -j DNAT --to-destination 2001:db8::26",
        "-A POSTROUTING -j SNAT --to-source 2001:db8:2::99",
    ]


def test_unit_test_mode_of_the_console_script_ipv6_only() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "egress-router")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}, **V6_ONLY,
           "EGRESS_ROUTER_MODE": "unit-test"}
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == ("-A PREROUTING -i eth0 -p tcp --dport 443 -j DNAT --to-destination 2001:db8::25\n"
                           "-A PREROUTING -i eth0 -j DNAT --to-destination 2001:db8::26\n"
                           "-A POSTROUTING -j SNAT --to-source 2001:db8:2::99\n")


# ---------------------------------------------------------------- the plan

def test_dual_stack_plan_order_one_nat_transaction_per_family() -> None:
    plan = build_plan(load(DUAL), "macvlan0")
    kinds = [(type(step).__name__, getattr(step, "version", None)) for step in plan.steps]
    assert kinds[:2] == [("NatRules", 4), ("NatRules", 6)]
    assert plan.steps[2:] == (
        Sysctl("net.ipv6.conf.macvlan0.disable_ipv6", "0"),
        Sysctl("net.ipv6.conf.macvlan0.accept_ra", "0"),
        Address("macvlan0", IPv4Interface("192.0.2.99/24")),
        Address("macvlan0", IPv6Interface("2001:db8:2::99/64")),
        plan.steps[6],  # LinkUp
        Route("macvlan0", IPv4Interface("192.0.2.1/32").network),
        Route("macvlan0", IPv6Network("fe80::1/128")),
        Route("macvlan0", IPv4Interface("0.0.0.0/0").network, IPv4Address("192.0.2.1"), sole=True),
        Route("macvlan0", IPv6Network("::/0"), IPv6Address("fe80::1"), sole=True,
              source=IPv6Address("2001:db8:2::99")),
        Sysctl("net.ipv4.ip_forward", "1"),
        Sysctl("net.ipv6.conf.all.forwarding", "1"),
        Announce("macvlan0", IPv4Address("192.0.2.99")),
        Announce("macvlan0", IPv6Address("2001:db8:2::99")),
    )
    assert plan.addresses == (IPv4Interface("192.0.2.99/24"), IPv6Interface("2001:db8:2::99/64"))


def test_ipv6_steps_render_their_ip_6_equivalents() -> None:
    rendered = build_plan(load(DUAL), "macvlan0").render()
    assert "ip address add 2001:db8:2::99/64 dev macvlan0 nodad" in rendered
    assert "ip address add 192.0.2.99/24 dev macvlan0" in rendered  # no nodad for IPv4
    assert "ip -6 route replace fe80::1/128 dev macvlan0" in rendered
    assert "ip -6 route replace default via fe80::1 dev macvlan0 src 2001:db8:2::99" in rendered
    assert "sysctl -w net.ipv6.conf.macvlan0.accept_ra=0" in rendered
    assert rendered[-1].startswith("ndsend 2001:db8:2::99 macvlan0  # unsolicited neighbour advertisement")


def test_the_ipv6_nat_payload_holds_only_ipv6_rules() -> None:
    plan = build_plan(load(DUAL), "macvlan0")
    v4, v6 = plan.nats
    assert "2001:db8" not in render(v4) and "203.0.113" not in render(v6)
    assert render(v6) == (
        "*nat\n"
        ":EGRESS-ROUTER-DNAT - [0:0]\n"
        ":EGRESS-ROUTER-SNAT - [0:0]\n"
        "-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 443 -j DNAT --to-destination 2001:db8::25\n"
        "-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport 8443 -j DNAT --to-destination [2001:db8::25]:443\n"
        "-A EGRESS-ROUTER-DNAT -i eth0 -p udp -m udp --dport 53 -j DNAT --to-destination [2001:db8::53]:5353\n"
        "-A EGRESS-ROUTER-DNAT -i eth0 -j DNAT --to-destination 2001:db8::26\n"
        "-A EGRESS-ROUTER-SNAT -o macvlan0 -j SNAT --to-source 2001:db8:2::99\n"
        "-A PREROUTING -j EGRESS-ROUTER-DNAT\n"
        "-A POSTROUTING -j EGRESS-ROUTER-SNAT\n"
        "COMMIT\n")
    assert str(v6).startswith("ip6tables rules (5 in EGRESS-ROUTER-DNAT, EGRESS-ROUTER-SNAT)")
    # as ip6tables-save prints them back: converged, nothing to restore
    applied = parse_save(render(v6).replace("*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"))
    assert restore_payload(v6, applied) is None and restore_payload(v6, NatState()) is not None


def test_an_ipv4_only_configuration_plans_no_ipv6_step() -> None:
    plan = build_plan(load({**DUAL, "EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1",
                            "EGRESS_DESTINATION": "80 tcp 203.0.113.10"}), "macvlan0")
    assert all("ipv6" not in text and "-6" not in text for text in plan.render())
    assert [nat.version for nat in plan.nats] == [4]


def test_ipv6_only_plan_has_no_ipv4_step() -> None:
    plan = build_plan(load(V6_ONLY), "macvlan0")
    assert [nat.version for nat in plan.nats] == [6]
    assert Sysctl("net.ipv4.ip_forward", "1") not in plan.steps
    assert Route("macvlan0", IPv6Network("2001:db8:2::1/128")) in plan.steps  # a /128 source: the gateway on-link


# ---------------------------------------------------------------- the pod-network return path

def test_ipv6_return_path_with_a_link_local_next_hop_and_ipv6_nameservers() -> None:
    facts = PodFacts(True, IPv4Address("10.128.0.1"), (IPv4Address("172.30.0.10"),), known6=True,
                     gateway6=IPv6Address("fe80::ecee:eeff:feee:eeee"), nameservers6=(IPv6Address("fd02::a"),))
    steps = return_path_steps("eth0", facts, (IPv6Network("fd02::/112"),), 6)
    hop = IPv6Address("fe80::ecee:eeff:feee:eeee")
    assert steps == [
        Route("eth0", IPv6Network("::/0"), hop, sole=True, table=7910, owned=True),  # link-local: no onlink
        PolicyRule(7910, 0x2000000, 0x2000000, 7910, 6),
        Route("eth0", IPv6Network("fd02::a/128"), hop, owned=True),
        Route("eth0", IPv6Network("fd02::/112"), hop, owned=True),
        PruneRoutes("eth0", (IPv6Network("fd02::a/128"), IPv6Network("fd02::/112")), 6),
    ]
    assert steps[1].render() == "ip -6 rule add fwmark 0x2000000/0x2000000 lookup 7910 priority 7910"


def test_dual_stack_plan_has_both_return_paths_and_mark_rules_in_both_tables() -> None:
    facts = PodFacts(True, IPv4Address("198.51.100.2"), known6=True, gateway6=IPv6Address("2001:db8:100::2"))
    plan = build_plan(load(DUAL), "macvlan0", facts)
    v4, v6 = plan.nats
    assert v4.mangle and v6.mangle and v6.version == 6
    global_hop = [s for s in plan.steps if isinstance(s, Route) and s.table == 7910 and s.destination.version == 6]
    assert global_hop == [Route("eth0", IPv6Network("::/0"), IPv6Address("2001:db8:100::2"), sole=True, table=7910,
                                onlink=True, owned=True)]


def test_nameservers_per_family() -> None:
    text = ("nameserver 172.30.0.10\nnameserver fd02::a\nnameserver ::1\nnameserver fe80::1%eth0\n"
            "nameserver fe80::2\nnameserver fd02::a\n")
    assert parse_nameservers(text) == (IPv4Address("172.30.0.10"),)
    assert parse_nameservers6(text) == (IPv6Address("fd02::a"),)


def test_cluster_cidrs_of_both_families() -> None:
    assert [str(n) for n in ip_networks("10.128.0.0/14, fd02::/112", "EGRESS_CLUSTER_CIDRS")] == [
        "10.128.0.0/14", "fd02::/112"]
    with pytest.raises(ConfigError, match="'fd02::1/112' has host bits set; did you mean fd02::/112"):
        ip_networks("fd02::1/112", "EGRESS_CLUSTER_CIDRS")


@pytest.mark.parametrize(("text", "fragment"), [
    ("::", "unspecified"), ("::1", "loopback"), ("ff02::1", "multicast"), ("::ffff:192.0.2.1", "IPv4-mapped"),
    ("fe80::1", "link-local"), ("2001:db8::g", "not an IPv6 address"), ("2001:db8:::1", "not an IPv6 address"),
])
def test_unusable_ipv6_addresses(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_ipv6(text, "EGRESS_DESTINATION")


# ---------------------------------------------------------------- the CLI faces

def test_validate_and_render_describe_both_families() -> None:
    runner = CliRunner()
    env = {name: DUAL[name] for name in DUAL}
    valid = runner.invoke(main, ["validate"], env=env)
    assert valid.exit_code == 0, valid.output
    assert "source 192.0.2.99/24 and 2001:db8:2::99/64; gateway 192.0.2.1 and fe80::1" in valid.output
    assert "fallback 203.0.113.12 and 2001:db8::26" in valid.output
    rendered = runner.invoke(main, ["render", "--pod-next-hop", "198.51.100.2,fe80::1"], env=env)
    assert rendered.exit_code == 0, rendered.output
    assert "one transaction per family: iptables-restore --noflush and ip6tables-restore --noflush" in rendered.output
    assert "ip -6 route replace default via fe80::1 dev eth0 table 7910 proto 245" in rendered.output


def test_destinations_value_objects_keep_their_families_apart() -> None:
    both = Destinations((PortRule(80, "tcp", IPv4Address("203.0.113.1")),
                         PortRule(80, "tcp", IPv6Address("2001:db8::1"))), None, IPv6Address("2001:db8::2"))
    assert both.family(4).target("tcp", 81) is None
    assert both.family(6).target("tcp", 81) == (IPv6Address("2001:db8::2"), 81)


def test_a_repair_puts_the_addresses_before_a_route_and_announces_only_a_readdressed_family() -> None:
    from egress_router.live import repair_steps

    plan = build_plan(load(DUAL), "macvlan0")
    default6 = next(s for s in plan.steps if isinstance(s, Route) and s.destination.prefixlen == 0
                    and s.destination.version == 6)
    address6 = Address("macvlan0", IPv6Interface("2001:db8:2::99/64"))
    address4 = Address("macvlan0", IPv4Interface("192.0.2.99/24"))
    # a route drifted (its address may have gone since drift read it): both addresses first, in plan order
    assert repair_steps(plan, [default6]) == (address4, address6, default6)
    # the IPv6 address drifted: it is re-added and announced again, the IPv4 one is not announced
    assert repair_steps(plan, [address6]) == (address6, Announce("macvlan0", IPv6Address("2001:db8:2::99")))
    forwarding = Sysctl("net.ipv6.conf.all.forwarding", "1")
    assert repair_steps(plan, [forwarding]) == (forwarding,)
