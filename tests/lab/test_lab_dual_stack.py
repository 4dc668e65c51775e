"""The dual-stack lab itself, before egress-router knows IPv6: the router namespace configured by hand as the
router will configure it (nodad source, default route per family, forwarding), and packets through it."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator

import pytest

from egress_router.lab import (
    CLIENT_IP,
    CLIENT_IP6,
    DEMO_DESTINATION,
    DEMO_DESTINATION6,
    DEMO_LANDING,
    DEMO_LANDING6,
    DEMO_SERVERS,
    DEMO_SERVERS6,
    DEMO_TRAFFIC,
    DEMO_TRAFFIC6,
    DEST_IPS6,
    GATEWAY_LAN_IP,
    GATEWAY_LAN_IP6,
    GATEWAY_LINK_LOCAL,
    GATEWAY_WAN_IP6,
    LAN_PREFIX6,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    SOURCE_IP6,
    Lab,
    Reply,
)
from tests.lab.conftest import require_lab

IPV6_TRAFFIC = (("tcp", DEST_IPS6[0], 80), ("udp", DEST_IPS6[0], 5353), ("tcp", DEST_IPS6[2], 7000),
                ("udp", DEST_IPS6[2], 7001))


def sh(lab: Lab, role: str, command: str) -> str:
    return lab.exec(role, command.split(), check=True).stdout


def configure_router6(lab: Lab, gateway: str = GATEWAY_LAN_IP6) -> None:
    """What egress-router will do for an IPv6 source, by hand: address without DAD, default route, forwarding."""
    sh(lab, "router", "ip link set macvlan0 up")
    sh(lab, "router", f"ip -6 addr add {SOURCE_IP6}/{LAN_PREFIX6} dev macvlan0 nodad")
    sh(lab, "router", f"ip -6 route replace default via {gateway} dev macvlan0")
    lab.sysctl("router", "net.ipv6.conf.all.forwarding", "1")
    lab.settle()


def global_ipv6(lab: Lab, role: str) -> list[str]:
    return [line.split()[3] for line in sh(lab, role, "ip -6 -o addr show scope global").splitlines()]


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@pytest.fixture
def fresh() -> Iterator[None]:
    require_lab()
    yield


def test_the_dual_stack_lab_has_the_issue_addresses_and_routes(lab6: Lab) -> None:
    assert global_ipv6(lab6, "client") == [f"{CLIENT_IP6}/64"]
    assert global_ipv6(lab6, "router") == [f"{ROUTER_POD_IP6}/64"]  # macvlan0 is the router's to configure
    assert sorted(global_ipv6(lab6, "gateway")) == sorted([f"{GATEWAY_LAN_IP6}/64", f"{GATEWAY_WAN_IP6}/64"])
    assert sorted(global_ipv6(lab6, "dest")) == sorted(f"{ip}/64" for ip in DEST_IPS6)
    assert f"inet6 {GATEWAY_LINK_LOCAL}/64 scope link nodad" in sh(lab6, "gateway", "ip -6 -o addr show dev lan0")
    for role, via, dev in (("client", ROUTER_POD_IP6, "eth0"), ("router", CLIENT_IP6, "eth0"),
                           ("dest", GATEWAY_WAN_IP6, "wan0")):
        assert sh(lab6, role, "ip -6 route show default").startswith(f"default via {via} dev {dev} "), role
    for role in lab6.roles:  # nothing waits for duplicate address detection
        assert "tentative" not in sh(lab6, role, "ip -6 addr show"), role
    assert lab6.read_sysctl("gateway", "net.ipv6.conf.all.forwarding") == "1"
    assert lab6.read_sysctl("router", "net.ipv6.conf.all.forwarding") == "0"
    # the IPv4 topology is all there too
    assert f"inet {ROUTER_POD_IP}/24" in sh(lab6, "router", "ip -4 -o addr show dev eth0")
    assert sh(lab6, "router", "ip -4 route show default").startswith(f"default via {CLIENT_IP} dev eth0")


def test_without_dual_stack_no_namespace_has_a_global_ipv6_address(lab: Lab) -> None:
    for role in lab.roles:
        assert global_ipv6(lab, role) == [], role
        assert sh(lab, role, "ip -6 route show default") == "", role


def test_tcp_and_udp_over_ipv6_from_the_router_land_on_the_destinations_from_the_source(served6: Lab) -> None:
    configure_router6(served6)
    for proto, ip, port in IPV6_TRAFFIC:
        reply = served6.request(proto, ip, port, role="router")
        assert reply.landed == f"[{ip}]:{port}", (proto, ip, port)
        assert reply.peer_ip == SOURCE_IP6, (proto, ip, port)
        assert reply.peer.startswith(f"[{SOURCE_IP6}]:")
    # and IPv4 beside it, through the same macvlan0 once it has its IPv4 source too
    sh(served6, "router", f"ip -4 addr add {SOURCE_IP}/24 dev macvlan0")
    sh(served6, "router", f"ip -4 route replace default via {GATEWAY_LAN_IP} dev macvlan0")
    reply = served6.request("tcp", "203.0.113.10", 80, role="router")
    assert (reply.landed, reply.peer_ip) == ("203.0.113.10:80", SOURCE_IP)


def test_a_link_local_gateway_works_as_the_next_hop(served6: Lab) -> None:
    configure_router6(served6, gateway=GATEWAY_LINK_LOCAL)
    default = sh(served6, "router", "ip -6 route show default")
    assert default.startswith(f"default via {GATEWAY_LINK_LOCAL} dev macvlan0")
    assert f"via {GATEWAY_LINK_LOCAL} dev macvlan0" in sh(served6, "router", f"ip -6 route get {DEST_IPS6[1]}")
    for proto, ip, port in IPV6_TRAFFIC:
        reply = served6.request(proto, ip, port, role="router")
        assert (reply.landed, reply.peer_ip) == (f"[{ip}]:{port}", SOURCE_IP6), (proto, ip, port)
    with served6.iproute("gateway") as ipr:
        gateway_mac = ipr.get_links(ipr.link_lookup(ifname="lan0")[0])[0].get("IFLA_ADDRESS")
    neigh = sh(served6, "router", f"ip -6 neigh show {GATEWAY_LINK_LOCAL} dev macvlan0")
    assert f"lladdr {gateway_mac}" in neigh  # resolved on macvlan0 to the gateway's lan0


# the IPv6 half of the demo's NAT, by hand, in chains that are not the router's
DEMO_NAT6 = f"""*nat
:LAB-DNAT6 - [0:0]
:LAB-SNAT6 - [0:0]
-A PREROUTING -i eth0 -j LAB-DNAT6
-A POSTROUTING -o macvlan0 -j LAB-SNAT6
-A LAB-DNAT6 -p tcp --dport 80 -j DNAT --to-destination {DEST_IPS6[0]}
-A LAB-DNAT6 -p tcp --dport 8080 -j DNAT --to-destination [{DEST_IPS6[1]}]:80
-A LAB-DNAT6 -p udp --dport 53 -j DNAT --to-destination [{DEST_IPS6[0]}]:5353
-A LAB-DNAT6 -j DNAT --to-destination {DEST_IPS6[2]}
-A LAB-SNAT6 -j SNAT --to-source {SOURCE_IP6}
COMMIT
"""


def test_client_traffic_nated_by_hand_lands_where_the_demo_says_from_the_source(served6: Lab) -> None:
    """The lab carries what the router will set up: client -> router pod IPv6 -> DNAT/SNAT -> destination."""
    configure_router6(served6)
    served6.exec("router", ["ip6tables-restore", "--noflush"], stdin=DEMO_NAT6, check=True)
    for proto, port in DEMO_TRAFFIC6:
        reply = served6.request(proto, ROUTER_POD_IP6, port)
        assert (reply.landed, reply.peer_ip) == (DEMO_LANDING6[(proto, port)], SOURCE_IP6), (proto, port)


def test_the_client_reaches_the_router_pod_over_ipv6_and_ipv4(lab6: Lab) -> None:
    lab6.serve([("tcp", ROUTER_POD_IP6, 7000), ("udp", ROUTER_POD_IP6, 7001), ("tcp", ROUTER_POD_IP, 7000)],
               role="router")
    for proto, port in (("tcp", 7000), ("udp", 7001)):
        reply = lab6.request(proto, ROUTER_POD_IP6, port)
        assert reply.landed == f"[{ROUTER_POD_IP6}]:{port}"
        assert reply.peer_ip == CLIENT_IP6
    reply = lab6.request("tcp", ROUTER_POD_IP, 7000)
    assert (reply.landed, reply.peer_ip) == (f"{ROUTER_POD_IP}:7000", CLIENT_IP)


def test_pod_ipv6_is_idempotent_in_a_dual_stack_lab(lab6: Lab) -> None:
    lab6.pod_ipv6()
    lab6.pod_ipv6()
    assert global_ipv6(lab6, "client") == [f"{CLIENT_IP6}/64"]
    assert global_ipv6(lab6, "router") == [f"{ROUTER_POD_IP6}/64"]


def test_pod_ipv6_in_an_ipv4_lab_adds_only_the_pod_pair(lab: Lab) -> None:
    lab.pod_ipv6()
    lab.pod_ipv6()
    assert global_ipv6(lab, "client") == [f"{CLIENT_IP6}/64"]
    assert global_ipv6(lab, "router") == [f"{ROUTER_POD_IP6}/64"]
    assert global_ipv6(lab, "dest") == []


@pytest.mark.parametrize("dual_stack", [False, True])
def test_two_snapshots_of_an_unchanged_namespace_are_equal(fresh: None, dual_stack: bool) -> None:
    with Lab(dual_stack=dual_stack) as lab:
        if dual_stack:
            configure_router6(lab)
        for role in lab.roles:
            assert lab.snapshot(role) == lab.snapshot(role), role
        router = lab.snapshot("router")
        for part in ("$ ip6tables-save", "$ ip -6 -o addr show", "$ ip -6 route show table all",
                     "$ ip -6 rule show", "ipv6.all.forwarding=", "ipv6.macvlan0.accept_ra=",
                     "ipv6.macvlan0.disable_ipv6="):
            assert part in router
        assert "fe80:" not in router and "ff00::/8" not in router  # the kernel's own link-local state
        assert (f"{SOURCE_IP6}/64" in router) is dual_stack
        assert (f"default via {GATEWAY_LAN_IP6} dev macvlan0" in router) is dual_stack
        assert "ipv6.all.forwarding=" + ("1" if dual_stack else "0") in router


def test_a_snapshot_sees_every_ipv6_change_the_router_will_make(lab6: Lab) -> None:
    def changed(command: str) -> None:
        before = lab6.snapshot("router")
        if command.startswith("sysctl "):
            lab6.sysctl("router", *command.split()[1].split("="))
        else:
            sh(lab6, "router", command)
        lab6.settle()
        assert lab6.snapshot("router") != before, command

    changed("ip link set macvlan0 up")
    changed(f"ip -6 addr add {SOURCE_IP6}/{LAN_PREFIX6} dev macvlan0 nodad")
    changed(f"ip -6 route replace default via {GATEWAY_LINK_LOCAL} dev macvlan0")  # a link-local next hop stays in
    changed(f"ip -6 route replace default via {GATEWAY_LAN_IP6} dev macvlan0")
    changed("ip6tables -t nat -A POSTROUTING -o macvlan0 -j SNAT --to-source 2001:db8:2::99")
    changed("ip -6 rule add fwmark 0x2000000/0x2000000 lookup 7910 priority 7910")
    changed("sysctl net.ipv6.conf.macvlan0.accept_ra=0")
    changed("sysctl net.ipv6.conf.macvlan0.disable_ipv6=1")
    changed("sysctl net.ipv6.conf.all.forwarding=1")


def test_teardown_leaves_no_namespace_also_when_the_body_raises(fresh: None) -> None:
    with Lab(dual_stack=True) as lab:
        names = set(lab.ns.values())
        assert names <= netns_names()
    assert not names & netns_names()
    with pytest.raises(RuntimeError, match="the body failed"), Lab(dual_stack=True) as failing:
        names = set(failing.ns.values())
        assert names <= netns_names()
        raise RuntimeError("the body failed")
    assert not names & netns_names()


def test_a_build_that_fails_half_way_tears_down_what_it_made(fresh: None) -> None:
    class Broken(Lab):
        def settle(self, timeout: float = 5.0) -> None:
            raise TimeoutError("did not settle")

    lab = Broken(dual_stack=True)
    names = set(lab.ns.values())
    with pytest.raises(TimeoutError), lab:
        pass
    assert not names & netns_names()


def test_reply_formats_and_parses_both_families() -> None:
    assert Reply("203.0.113.10:80", "192.0.2.99:40000").peer_ip == "192.0.2.99"
    assert Reply("[2001:db8:203::10]:80", "[2001:db8:2::99]:40000").peer_ip == "2001:db8:2::99"
    assert Reply("[2001:db8:203::10]:80", "[::ffff:192.0.2.99]:1").peer_ip == "::ffff:192.0.2.99"


def test_the_router_env_of_both_families_and_the_demo_constants_agree() -> None:
    lab = Lab(dual_stack=True)  # not built: router_env6 only reads the configuration
    env = lab.router_env6()
    assert env["EGRESS_SOURCE"] == "192.0.2.99/24,2001:db8:2::99/64"
    assert env["EGRESS_GATEWAY"] == "192.0.2.1,2001:db8:2::1"
    assert env["EGRESS_DESTINATION"] == DEMO_DESTINATION6 and env["EGRESS_ROUTER_MODE"] == "init"
    assert lab.router_env6("80 tcp 2001:db8:203::10\n", gateway="fe80::1", source=SOURCE_IP6,
                           mode="legacy")["EGRESS_GATEWAY"] == "fe80::1"
    assert lab.router_env()["EGRESS_SOURCE"] == "192.0.2.99/24"  # unchanged
    assert DEMO_TRAFFIC6 == DEMO_TRAFFIC
    # the rules say where each port lands; the servers listen there; the IPv4 rules are the IPv4 demo's
    for destination, traffic, landing, servers, version in (
            (DEMO_DESTINATION, DEMO_TRAFFIC, DEMO_LANDING, DEMO_SERVERS, 4),
            (DEMO_DESTINATION6, DEMO_TRAFFIC6, DEMO_LANDING6, DEMO_SERVERS6, 6)):
        rules, fallbacks = parse(destination)
        assert [rule for rule in rules if ipaddress.ip_address(rule[2]).version == 4] == parse(DEMO_DESTINATION)[0]
        served = {f"{proto} {ipaddress.ip_address(ip).version} {ip}:{port}" for proto, ip, port in servers}
        for proto, port in traffic:
            ip, to_port = next(((r[2], r[3]) for r in rules if r[:2] == (proto, port)
                                and ipaddress.ip_address(r[2]).version == version), (fallbacks[version], port))
            expected = f"[{ip}]:{to_port}" if version == 6 else f"{ip}:{to_port}"
            assert landing[(proto, port)] == expected, (version, proto, port)
            assert f"{proto} {version} {ip}:{to_port}" in served


def parse(text: str) -> tuple[list[tuple[str, int, str, int]], dict[int, str]]:
    """The EGRESS_DESTINATION grammar of the issue: port rules first, then at most one fallback per family."""
    rules: list[tuple[str, int, str, int]] = []
    fallbacks: dict[int, str] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) == 1:
            version = ipaddress.ip_address(words[0]).version
            assert version not in fallbacks, line
            fallbacks[version] = words[0]
            continue
        assert not fallbacks, f"a port rule after a fallback: {line}"
        port, proto, ip = int(words[0]), words[1], words[2]
        rules.append((proto, port, ip, int(words[3]) if len(words) > 3 else port))
    return rules, fallbacks
