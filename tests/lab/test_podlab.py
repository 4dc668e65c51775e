"""The pod-network layouts themselves, before any router runs: routes as the CNI leaves them, reachability, DNS."""

from __future__ import annotations

import ipaddress

import pytest

from egress_router.lab import DEMO_SERVERS, DEST_IPS, GATEWAY_LAN_IP, SOURCE_IP
from egress_router.podlab import (
    CALICO_GATEWAY,
    DNS_NAMES,
    DNS_SERVICE_IP,
    NODE_NETWORK,
    NODE_POD_GATEWAYS,
    PodLab,
)
from tests.lab.origin import Origin

# the router pod's routes as each CNI plugin leaves them (ip -4 route show)
POD_ROUTES = {
    "calico": [f"default via {CALICO_GATEWAY} dev eth0 onlink"],
    "cilium": [f"default via {NODE_POD_GATEWAYS[0]} dev eth0", f"{NODE_POD_GATEWAYS[0]} dev eth0 scope link"],
    "openshift-sdn": [f"default via {NODE_POD_GATEWAYS[0]} dev eth0",
                      "198.51.100.0/26 dev eth0 proto kernel scope link src 198.51.100.2",
                      "198.51.100.0/25 dev eth0 scope link",
                      "198.51.100.128/26 via 198.51.100.1 dev eth0",
                      "224.0.0.0/4 dev eth0 scope link"],
}
POD_PREFIX = {"calico": 32, "cilium": 32, "openshift-sdn": 26}


def routes(podlab: PodLab, role: str = "router") -> list[str]:
    return [line.strip() for line in podlab.exec(role, ["ip", "-4", "route", "show"], check=True).stdout.splitlines()]


def test_the_router_pod_has_the_cni_layout_and_a_bare_macvlan_on_the_nodes_lan(podlab: PodLab) -> None:
    assert routes(podlab) == POD_ROUTES[podlab.layout]
    addresses = podlab.exec("router", ["ip", "-4", "-o", "addr", "show"], check=True).stdout
    assert f"inet {podlab.router_ip}/{POD_PREFIX[podlab.layout]} " in addresses
    assert "macvlan0" not in addresses  # the router gives it EGRESS_SOURCE
    link = podlab.exec("router", ["ip", "-d", "link", "show", "macvlan0"], check=True).stdout
    assert "macvlan mode " + ("private" if podlab.layout == "openshift-sdn" else "bridge") in link
    assert podlab.pod_gateway == (CALICO_GATEWAY if podlab.layout == "calico" else NODE_POD_GATEWAYS[0])
    if podlab.layout == "calico":  # the gateway exists nowhere: the node answers for it by proxy ARP
        for role in podlab.roles:
            assert CALICO_GATEWAY not in podlab.exec(role, ["ip", "-4", "-o", "addr", "show"], check=True).stdout
    assert ipaddress.ip_address(podlab.node_ip) in ipaddress.ip_network(NODE_NETWORK)


@pytest.mark.parametrize("rp_filter", [0, 1, 2])
def test_every_client_and_the_node_reach_the_router_pod(podlab: PodLab, rp_filter: int) -> None:
    podlab.set_rp_filter(rp_filter)
    assert podlab.rp_filter("eth0") == rp_filter and podlab.rp_filter("macvlan0") == rp_filter
    podlab.serve([("tcp", podlab.router_ip, 7000), ("udp", podlab.router_ip, 7001)], role="router")
    for role, ip in (("client", podlab.client_ip), ("remote", podlab.remote_ip)):
        for proto, port in (("tcp", 7000), ("udp", 7001)):
            reply = podlab.request(proto, podlab.router_ip, port, role=role)
            assert reply.peer_ip == ip, (role, proto)  # straight through the pod network: nobody NATs
    server = Origin()
    with podlab.entered("router"):
        server.listen(podlab.router_ip, 8080)
    server.start()
    try:
        podlab.probe_tcp(7000)
        assert podlab.probe_http(8080, "/hello") == 200
        assert podlab.probe_http(8080, "/hello", source="0.0.0.0") == 200  # the kernel's choice, as kubelet's
    finally:
        server.stop()
    peers = {seen.peer_ip for seen in server.requests("/hello")}
    assert podlab.node_ip in peers, peers


def test_the_router_pod_resolves_names_through_the_cluster_dns(podlab: PodLab) -> None:
    resolv = podlab.exec("router", ["cat", "/etc/resolv.conf"], etc=True, check=True).stdout
    assert f"nameserver {DNS_SERVICE_IP}" in resolv.splitlines()
    for name, ip in DNS_NAMES.items():
        assert podlab.lookup(name) == [ip], name
    assert podlab.lookup("nowhere.example.test") == []
    assert podlab.query_dns("www.example.test", role="router") == [DEST_IPS[0]]
    # only the service address answers: dnsmasq listens nowhere else
    sockets = podlab.exec("node", ["ss", "-Hlnu", "sport", "= :53"], check=True).stdout.split()
    assert [field for field in sockets if field.endswith(":53")] == [f"{DNS_SERVICE_IP}:53"]


def test_destinations_are_reached_through_the_macvlan_only_once_the_default_route_uses_it(podlab: PodLab) -> None:
    podlab.serve(DEMO_SERVERS)
    podlab.serve([("tcp", podlab.router_ip, 7000)], role="router")
    with pytest.raises(OSError):  # through the pod network: no node masquerades pod traffic
        podlab.request("tcp", DEST_IPS[0], 80, role="router", timeout=1)
    podlab.replace_default_route_by_hand()
    assert podlab.request("tcp", DEST_IPS[0], 80, role="router").peer_ip == SOURCE_IP
    # Issue 11, reproduced without the router: replies to the pods follow the new default route to the
    # LAN gateway, which has no route back, except where the platform routes the cluster network itself.
    for role, ip in (("client", podlab.client_ip), ("remote", podlab.remote_ip)):
        if podlab.layout == "openshift-sdn":
            assert podlab.request("tcp", podlab.router_ip, 7000, role=role, timeout=1).peer_ip == ip
        else:
            with pytest.raises(TimeoutError):
                podlab.request("tcp", podlab.router_ip, 7000, role=role, timeout=1)
    with pytest.raises(TimeoutError):  # from the node's own IP: the same way out, in every layout
        podlab.probe_tcp(7000, timeout=1)


def test_a_node_ip_in_egress_sources_subnet_is_out_of_its_macvlans_reach(
        podlab_node_in_egress_subnet: PodLab) -> None:
    podlab = podlab_node_in_egress_subnet
    assert ipaddress.ip_address(podlab.node_ip) in ipaddress.ip_network(f"{SOURCE_IP}/24", strict=False)
    podlab.serve([("tcp", podlab.router_ip, 7000)], role="router")
    podlab.serve([("tcp", podlab.node_ip, 7002)], role="node")
    podlab.serve([("tcp", podlab.node2_ip, 7002)], role="node2")
    podlab.probe_tcp(7000)  # through the pod network
    podlab.replace_default_route_by_hand()
    # a macvlan cannot reach its parent: its own node never answers its ARP, the other node does
    assert podlab.request("tcp", podlab.node2_ip, 7002, role="router").peer_ip == SOURCE_IP
    with pytest.raises(OSError):
        podlab.request("tcp", podlab.node_ip, 7002, role="router", timeout=1)
    neighbour = podlab.exec("router", ["ip", "neigh", "show", podlab.node_ip, "dev", "macvlan0"], check=True).stdout
    assert "lladdr" not in neighbour, neighbour
    assert podlab.request("tcp", podlab.node_ip, 7002, role="gateway").peer_ip == GATEWAY_LAN_IP
