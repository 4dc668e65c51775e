"""The pod-network return path as data: nameservers from resolv.conf, the steps, EGRESS_CLUSTER_CIDRS, render."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from click.testing import CliRunner

from egress_router.cli import main
from egress_router.core.config import load
from egress_router.core.errors import ConfigError
from egress_router.core.nat import MARK_CHAIN, POD_MARK, NatRules, render
from egress_router.core.plan import network_plan
from egress_router.core.podnet import RETURN_PRIORITY, RETURN_TABLE, PodFacts, parse_nameservers
from egress_router.core.steps import PolicyRule, Route, Sysctl

SOURCE = IPv4Interface("192.0.2.99/24")
LAN_GATEWAY = IPv4Address("192.0.2.1")
POD_GATEWAY = IPv4Address("198.51.100.254")
DNS = IPv4Address("198.51.100.200")
BASE = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "203.0.113.12",
        "EGRESS_ROUTER_MODE": "init"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nameserver 198.51.100.200\nsearch default.svc.cluster.local\noptions ndots:5\n", ["198.51.100.200"]),
        ("nameserver 198.51.100.200\nnameserver 203.0.113.53\nnameserver 198.51.100.200\n",
         ["198.51.100.200", "203.0.113.53"]),
        ("# nameserver 203.0.113.1\n; nameserver 203.0.113.2\nnameserver   203.0.113.3  # cluster\n", ["203.0.113.3"]),
        ("nameserver 127.0.0.53\nnameserver 2001:db8::53\nnameserver bogus\nnameserver\n", []),
        ("", []),
    ],
)
def test_nameservers_from_resolv_conf(text: str, expected: list[str]) -> None:
    assert parse_nameservers(text) == tuple(IPv4Address(a) for a in expected)


def return_steps(facts: PodFacts, cidrs: tuple[IPv4Network, ...] = (), pod: str = "eth0") -> list[object]:
    plan = network_plan("macvlan0", pod, SOURCE, LAN_GATEWAY, None, facts, cidrs)
    return [step for step in plan.steps if isinstance(step, (PolicyRule, Sysctl, Route))
            and getattr(step, "interface", pod) == pod and getattr(step, "key", "") != "net.ipv4.ip_forward"]


def test_return_path_steps_in_order_and_before_the_default_route() -> None:
    facts = PodFacts(True, POD_GATEWAY, (DNS,))
    plan = network_plan("macvlan0", "eth0", SOURCE, LAN_GATEWAY, None, facts, (IPv4Network("198.51.100.192/26"),))
    rendered = [step.render() for step in plan.steps[1:]]
    assert rendered[3:8] == [
        f"ip route replace default via {POD_GATEWAY} dev eth0 onlink table {RETURN_TABLE} proto 245",
        f"ip rule add fwmark {POD_MARK:#x}/{POD_MARK:#x} lookup {RETURN_TABLE} priority {RETURN_PRIORITY}",
        f"ip route replace {DNS}/32 via {POD_GATEWAY} dev eth0 onlink proto 245",
        f"ip route replace 198.51.100.192/26 via {POD_GATEWAY} dev eth0 onlink proto 245",
        f"ip route del <each route dev eth0 proto 245 but {DNS}/32, 198.51.100.192/26>  # only what an earlier "
        "configuration added",
    ]
    assert rendered[8] == "ip route replace default via 192.0.2.1 dev macvlan0"  # taken over only after


def test_the_iptables_step_marks_pod_connections_even_without_nat() -> None:
    plan = network_plan("macvlan0", "eth0", SOURCE, LAN_GATEWAY, None, PodFacts(True, POD_GATEWAY))
    nat = plan.nat
    assert isinstance(nat, NatRules) and nat.chains == ()
    assert nat.mangle == ((MARK_CHAIN, (
        "-i eth0 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark 0x2000000/0x2000000",
        "! -i eth0 -j CONNMARK --restore-mark --nfmask 0x2000000 --ctmask 0x2000000")),)
    assert render(nat) == (
        "*mangle\n:EGRESS-ROUTER-MARK - [0:0]\n"
        "-A EGRESS-ROUTER-MARK -i eth0 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark 0x2000000/0x2000000\n"
        "-A EGRESS-ROUTER-MARK ! -i eth0 -j CONNMARK --restore-mark --nfmask 0x2000000 --ctmask 0x2000000\n"
        "-A PREROUTING -j EGRESS-ROUTER-MARK\n-A OUTPUT -j EGRESS-ROUTER-MARK\nCOMMIT\n")


def test_nat_and_mangle_in_one_payload() -> None:
    from egress_router.core.redirect import parse_destinations

    plan = network_plan("macvlan0", "eth0", SOURCE, LAN_GATEWAY, parse_destinations("203.0.113.12"),
                        PodFacts(True, POD_GATEWAY))
    assert plan.nat is not None
    payload = render(plan.nat)
    assert payload.index("*nat") < payload.index("COMMIT\n*mangle") < payload.rindex("COMMIT")


def test_strict_rp_filter_is_loosened_on_the_pod_interface_only_when_strict() -> None:
    assert Sysctl("net.ipv4.conf.eth0.rp_filter", "2") in return_steps(PodFacts(True, POD_GATEWAY,
                                                                               strict_rp_filter=True))
    assert not any(isinstance(s, Sysctl) for s in return_steps(PodFacts(True, POD_GATEWAY)))


def test_a_device_route_next_hop_and_unknown_or_pattern_interfaces() -> None:
    direct = return_steps(PodFacts(True, None))
    assert direct[0] == Route("eth0", IPv4Network("0.0.0.0/0"), None, sole=True, table=RETURN_TABLE, owned=True)
    assert direct[0].render() == f"ip route replace default dev eth0 scope link table {RETURN_TABLE} proto 245"
    assert return_steps(PodFacts()) == []  # next hop unknown: no return path
    assert return_steps(PodFacts(True, POD_GATEWAY), pod="veth+") == []  # a pattern is not one interface


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("198.51.100.0/24", ["198.51.100.0/24"]),
        (" 198.51.100.0/25, 198.51.100.192/26\t203.0.113.0/24 ,", ["198.51.100.0/25", "198.51.100.192/26",
                                                                  "203.0.113.0/24"]),
        ("198.51.100.7", ["198.51.100.7/32"]),
        ("198.51.100.0/24 198.51.100.0/24", ["198.51.100.0/24"]),
    ],
)
def test_cluster_cidrs(value: str, expected: list[str]) -> None:
    assert load({**BASE, "EGRESS_CLUSTER_CIDRS": value}).cluster_cidrs == tuple(IPv4Network(n) for n in expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("198.51.100.1/24", "EGRESS_CLUSTER_CIDRS: '198.51.100.1/24' has host bits set; did you mean 198.51.100.0/24?"),
        ("198.51.100.0/33", "EGRESS_CLUSTER_CIDRS: '198.51.100.0/33' is not an IPv4 network (address/prefix)"),
        ("cluster.local", "EGRESS_CLUSTER_CIDRS: 'cluster.local' is not an IPv4 network"),
        ("0.0.0.0/0", "EGRESS_CLUSTER_CIDRS: '0.0.0.0/0' is every address"),
    ],
)
def test_bad_cluster_cidrs_name_the_variable_and_the_text(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load({**BASE, "EGRESS_CLUSTER_CIDRS": value})
    assert str(raised.value).startswith(message)


def test_render_summarizes_the_return_path_without_a_next_hop() -> None:
    result = CliRunner().invoke(main, ["render"], env=BASE)
    assert result.exit_code == 0, result.stderr
    assert "# + the pod-network return path" in result.stdout
    assert "table 7910" not in "\n".join(line for line in result.stdout.splitlines() if not line.startswith("#"))


def test_render_with_a_next_hop_shows_every_step(tmp_path: object) -> None:
    from pathlib import Path

    resolv = Path(str(tmp_path)) / "resolv.conf"
    resolv.write_text(f"nameserver {DNS}\n", encoding="utf-8")
    env = {**BASE, "EGRESS_CLUSTER_CIDRS": "198.51.100.192/26"}
    result = CliRunner().invoke(main, ["render", "--pod-next-hop", str(POD_GATEWAY), "--resolv-conf", str(resolv)],
                                env=env)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "*mangle" in lines and f"ip route replace {DNS}/32 via {POD_GATEWAY} dev eth0 onlink proto 245" in lines
    assert f"ip route replace default via {POD_GATEWAY} dev eth0 onlink table 7910 proto 245" in lines
    assert "ip route replace 198.51.100.192/26 via 198.51.100.254 dev eth0 onlink proto 245" in lines
    bad = CliRunner().invoke(main, ["render", "--pod-next-hop", "10.0.0"], env=BASE)
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --pod-next-hop: '10.0.0' is not an IPv4 address")
