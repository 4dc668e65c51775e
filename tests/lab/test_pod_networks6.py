"""The pod-network return path for IPv6: dual-stack Calico- and OVN-style pods, a dual-stack router, IPv6 nameservers.

Calico's IPv6 next hop is link-local (fe80::ecee:eeff:feee:eeee, the node's cali* veth); the OVN-style layout has a
global one (the node's gateway in the pod's /64). Each test runs in init mode and in http-proxy mode (the one-container
layout, which configures the network itself). Clients on the other node reach the router over IPv6 only because its
replies take the pod interface: deleting our `ip -6 rule` shows the difference.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

import pytest

from egress_router.lab import (
    DEMO_DESTINATION6,
    DEMO_SERVERS,
    DEMO_SERVERS6,
    DEST_IPS,
    DEST_IPS6,
    GATEWAY_LINK_LOCAL,
    SOURCE_IP6,
)
from egress_router.podlab import DNS_SERVICE_IP, DNS_SERVICE_IP6, LAYOUTS6, PodLab
from tests.lab.origin import Origin, ProtocolError, read_response
from tests.lab.proxyproc import ProxyProcess, proxy_env, spawn_proxy

MODES = ("init", "http-proxy")
SOURCES = "192.0.2.99/24,2001:db8:2::99/64"
GATEWAYS = "192.0.2.1,2001:db8:2::1"
PROXY_RULES = "2001:db8:203::/64\n*.example.test"
NAME = "www.example.test"  # 203.0.113.10 and 2001:db8:203::10, from the cluster DNS only
OTHER_NAMESERVER6 = "2001:db8:5::b"  # a second IPv6 nameserver in resolv.conf (nothing needs to answer there)
FOREIGN_ROUTE6 = "2001:db8:c:ff::/64"  # someone else's route through the pod interface
PROTO_OURS = "245"
MakePodLab6 = Callable[..., PodLab]


@pytest.fixture
def make_podlab6(make_podlab: Callable[..., PodLab]) -> MakePodLab6:
    """Dual-stack PodLabs on demand (make_podlab with ipv6=True unless told), each torn down when the test ends."""

    def make(layout: str, *, ipv6: bool = True, node_in_egress_subnet: bool = False) -> PodLab:
        return make_podlab(layout, ipv6=ipv6, node_in_egress_subnet=node_in_egress_subnet)

    return make


@contextlib.contextmanager
def origins6(lab: PodLab) -> Iterator[Origin]:
    """HTTP origins on 2001:db8:203::10 and 203.0.113.10, port 80, in the destination namespace."""
    server = Origin()
    with lab.entered("dest"):
        server.listen(DEST_IPS6[0], 80)
        server.listen(DEST_IPS[0], 80)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def destinations(lab: PodLab, mode: str) -> Iterator[Origin | None]:
    """What the destinations serve: the demo's TCP/UDP servers for init mode, HTTP origins for the proxy."""
    if mode == "init":
        lab.serve(DEMO_SERVERS + DEMO_SERVERS6)
        yield None
        return
    with origins6(lab) as origin:
        yield origin


class Router:
    """One run of the dual-stack router in a mode: init runs to its end; a proxy runs until the block ends."""

    def __init__(self, lab: PodLab, mode: str):
        self.lab, self.mode = lab, mode
        self.proxy: ProxyProcess | None = None
        self.output = ""

    @property
    def log(self) -> str:
        return self.proxy.stderr if self.proxy is not None else self.output


@contextlib.contextmanager
def router(lab: PodLab, mode: str, gateways: str = GATEWAYS, **variables: str) -> Iterator[Router]:
    run = Router(lab, mode)
    if mode == "init":
        result = lab.run_router(lab.router_env6(DEMO_DESTINATION6, gateway=gateways, **variables))
        assert result.returncode == 0, result.stderr
        run.output = result.stderr
        yield run
        return
    env = proxy_env({"EGRESS_PROXY_GRACE_SECONDS": "1", "EGRESS_HTTP_PROXY_WORKERS": "1"}, network=True,
                    variables={"EGRESS_SOURCE": SOURCES, "EGRESS_GATEWAY": gateways,
                               "EGRESS_HTTP_PROXY_DESTINATION": PROXY_RULES, **variables})
    run.proxy = ProxyProcess(lab, spawn_proxy(lab, env), grace=1.0)
    try:
        ready(lab, run.proxy)
        yield run
    finally:
        problems = run.proxy.stop_and_check()
        assert not problems, "\n".join(problems) + "\n" + run.proxy.stderr


def ready(lab: PodLab, proxy: ProxyProcess, timeout: float = 20.0) -> None:
    """Until the proxy answers /healthz (same node, IPv4): its serving loop runs, with its stop handlers.

    An open port alone is not enough: the one-process proxy binds before it installs its SIGTERM handler."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with lab.connect(lab.router_ip, 8080, role="client", timeout=1.0) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n")
                if read_response(sock.makefile("rb")).status == 200:
                    return
        except (OSError, ProtocolError):
            pass
        if proxy.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the proxy did not answer /healthz within {timeout} s:\n{proxy.stderr}")
        time.sleep(0.05)


def http_get(lab: PodLab, role: str, url: str) -> int:
    """GET through the HTTP proxy at the router pod's IPv6 address (absolute form, as curl -x sends it)."""
    host = url.split("/")[2]
    with lab.connect(lab.router_ip6, 8080, role=role, timeout=10.0) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock.makefile("rb")).status


def sh(lab: PodLab, *argv: str) -> str:
    return lab.exec("router", list(argv), check=True).stdout


def return_state6(lab: PodLab) -> dict[str, str]:
    """Our IPv6 state: table 7910, the policy rules, the mangle table (without counters and comments)."""
    mangle = [re.sub(r" \[\d+:\d+\]$", "", line) for line in sh(lab, "ip6tables-save", "-t", "mangle").splitlines()
              if not line.startswith("#")]
    return {"table": sh(lab, "ip", "-6", "route", "show", "table", "7910"), "rules": sh(lab, "ip", "-6", "rule"),
            "mangle": "\n".join(mangle), "ours": sh(lab, "ip", "-6", "route", "show", "proto", PROTO_OURS)}


def ours6(lab: PodLab) -> list[str]:
    """The destinations of our IPv6 routes in the main table (proto 245)."""
    return sorted(line.split()[0] for line in sh(lab, "ip", "-6", "route", "show", "proto", PROTO_OURS).splitlines())


def delete_our_rule6(lab: PodLab) -> None:
    sh(lab, "ip", "-6", "rule", "del", "priority", "7910")
    assert "7910:" not in sh(lab, "ip", "-6", "rule")


def assert_times_out(action: Callable[[], object]) -> None:
    with pytest.raises(TimeoutError):
        action()


# ---------------------------------------------------------------- the layouts themselves

POD_ROUTES6 = {  # the router pod's IPv6 routes as the CNI leaves them (ip -6 route, without fe80::/64)
    "calico": ["2001:db8:c::2 dev eth0 proto kernel metric 256 pref medium",
               "default via fe80::ecee:eeff:feee:eeee dev eth0 metric 1024 pref medium"],
    "openshift-sdn": ["2001:db8:5::/112 via 2001:db8:c::1 dev eth0 metric 1024 pref medium",
                      "2001:db8:c::/64 dev eth0 proto kernel metric 256 pref medium",
                      "default via 2001:db8:c::1 dev eth0 metric 1024 pref medium"],
}


def ipv4_state(lab: PodLab, role: str) -> str:
    return "\n".join(lab.exec(role, argv, check=True).stdout for argv in (
        ["ip", "-4", "route", "show", "table", "all"], ["ip", "-4", "-o", "addr", "show"], ["ip", "rule", "show"]))


@pytest.mark.parametrize("layout", LAYOUTS6)
def test_the_dual_stack_layouts_add_the_cni_ipv6_shape_to_the_same_ipv4_one(make_podlab6: MakePodLab6,
                                                                            layout: str) -> None:
    lab, plain = make_podlab6(layout), make_podlab6(layout, ipv6=False)
    for role in lab.roles:
        assert ipv4_state(lab, role) == ipv4_state(plain, role), role
    routes = [line for line in sh(lab, "ip", "-6", "route").splitlines() if not line.startswith("fe80::/64")]
    assert routes == POD_ROUTES6[layout]
    assert "inet6 2001:db8:" not in plain.exec("router", ["ip", "-6", "-o", "addr"], check=True).stdout
    resolv = lab.exec("router", ["cat", "/etc/resolv.conf"], etc=True, check=True).stdout.splitlines()
    assert [line for line in resolv if line.startswith("nameserver")] == [f"nameserver {DNS_SERVICE_IP6}",
                                                                        f"nameserver {DNS_SERVICE_IP}"]
    lab.serve([("tcp", lab.router_ip6, 7000)], role="router")
    for role, ip in (("client", lab.client_ip6), ("remote", lab.remote_ip6)):
        assert lab.request("tcp", lab.router_ip6, 7000, role=role).peer_ip == ip, role
    lab.probe_tcp(7000, version=6)
    neighbour = sh(lab, "ip", "-6", "neigh", "show", lab.pod_gateway6, "dev", "eth0")
    if layout == "calico":  # the next hop is the node's cali* veth, by its link-local address: nowhere in the pod
        assert "lladdr ee:ee:ee:ee:ee:ee" in neighbour, neighbour
        assert f"inet6 {lab.pod_gateway6}/64" in lab.exec("node", ["ip", "-6", "-o", "addr", "show", "dev",
                                                                   lab.node_veth["router"]], check=True).stdout
        assert lab.pod_gateway6 not in sh(lab, "ip", "-6", "-o", "addr")
    else:
        assert f"inet6 {lab.pod_gateway6}/64" in lab.exec("node", ["ip", "-6", "-o", "addr", "show", "dev", "tun0"],
                                                          check=True).stdout
    assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6) == [DEST_IPS[0]]


# ---------------------------------------------------------------- 1. clients on another node

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS6)
def test_a_client_on_another_node_reaches_the_router_over_ipv6(make_podlab6: MakePodLab6, layout: str,
                                                                mode: str) -> None:
    lab = make_podlab6(layout)
    with destinations(lab, mode) as origin, router(lab, mode):
        assert sh(lab, "ip", "-6", "route", "show", "default").startswith("default via 2001:db8:2::1 dev macvlan0")
        table = sh(lab, "ip", "-6", "route", "show", "table", "7910")
        assert table.startswith(f"default via {lab.pod_gateway6} dev eth0 "), table
        # a reply to the other node's client, as the mark makes it: through eth0, to the CNI's next hop
        marked = sh(lab, "ip", "-6", "route", "get", lab.remote_ip6, "mark", "0x2000000")
        assert f"via {lab.pod_gateway6} dev eth0" in marked, marked
        for role in ("remote", "client"):
            if mode == "init":
                for proto, port, landed in (("tcp", 80, "[2001:db8:203::10]:80"),
                                            ("udp", 53, "[2001:db8:203::10]:5353"),
                                            ("tcp", 7000, "[2001:db8:203::12]:7000")):
                    reply = lab.request(proto, lab.router_ip6, port, role=role)
                    assert (reply.landed, reply.peer_ip) == (landed, SOURCE_IP6), (role, proto, port)
            else:
                assert origin is not None and http_get(lab, role, f"http://[{DEST_IPS6[0]}]/hello") == 200, role
                seen = origin.requests("/hello")[-1]
                assert (seen.landed_ip, seen.peer_ip) == (DEST_IPS6[0], SOURCE_IP6), role
        delete_our_rule6(lab)  # without the return path, the replies follow the default route to the LAN
        if mode == "init":
            assert_times_out(lambda: lab.request("tcp", lab.router_ip6, 80, role="remote", timeout=1))
        else:
            assert_times_out(lambda: lab.connect(lab.router_ip6, 8080, role="remote", timeout=1).close())
        # IPv4 has its own rule, untouched
        if mode == "init":
            assert lab.request("tcp", lab.router_ip, 80, role="remote").peer_ip == "192.0.2.99"
        else:
            lab.connect(lab.router_ip, 8080, role="remote", timeout=3.0).close()


# ---------------------------------------------------------------- 2. kubelet probes from the node

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS6)
def test_a_kubelet_probe_from_the_node_over_ipv6_gets_an_answer(make_podlab6: MakePodLab6, layout: str,
                                                                 mode: str) -> None:
    lab = make_podlab6(layout)
    with destinations(lab, mode), router(lab, mode):
        if mode == "init":  # the pod listens nowhere itself: the probe's port is DNAT-ed, answered, and back
            lab.probe_tcp(80, version=6)
            lab.probe_tcp(80, version=6, source="::")  # the node's kernel chooses the source, as kubelet's does
        else:
            assert lab.probe_http(8080, "/healthz", version=6) == 200
            assert lab.probe_http(8080, "/healthz", version=6, source="::") == 200
            lab.probe_tcp(8080, version=6)
        delete_our_rule6(lab)
        assert_times_out(lambda: lab.probe_tcp(80 if mode == "init" else 8080, version=6, timeout=1))


@pytest.mark.parametrize("layout", LAYOUTS6)
def test_a_probe_from_a_node_ip_inside_the_ipv6_egress_subnet_comes_back_through_the_pod(
        make_podlab6: MakePodLab6, layout: str) -> None:
    """The node's IPv6 address is in EGRESS_SOURCE's /64, which is on-link on the macvlan: the reply must still
    take the pod interface (a macvlan never reaches its own parent). The IPv6 gateway is given link-local here."""
    lab = make_podlab6(layout, node_in_egress_subnet=True)
    lab.serve(DEMO_SERVERS + DEMO_SERVERS6)
    with router(lab, "init", gateways=f"192.0.2.1,{GATEWAY_LINK_LOCAL}"):
        assert lab.node_ip6.startswith("2001:db8:2::")
        default = sh(lab, "ip", "-6", "route", "show", "default")
        assert default.startswith(f"default via {GATEWAY_LINK_LOCAL} dev macvlan0"), default
        lab.probe_tcp(80, version=6)
        reply = lab.request("tcp", lab.router_ip6, 8080, role="remote")
        assert (reply.landed, reply.peer_ip) == ("[2001:db8:203::11]:80", SOURCE_IP6)


# ---------------------------------------------------------------- 3. the router's own DNS

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS6)
def test_the_routers_own_lookups_reach_the_ipv6_cluster_dns_through_the_pod_interface(
        make_podlab6: MakePodLab6, layout: str, mode: str) -> None:
    lab = make_podlab6(layout)
    lab.write_resolv_conf(DNS_SERVICE_IP6)  # an IPv6 nameserver only: no IPv4 fallback hides a missing route
    with origins6(lab) as origin, router(lab, mode):
        assert sh(lab, "ip", "-6", "route", "show", "default").startswith("default via 2001:db8:2::1 dev macvlan0")
        route = sh(lab, "ip", "-6", "route", "show", f"{DNS_SERVICE_IP6}/128")
        assert route.startswith(f"{DNS_SERVICE_IP6} via {lab.pod_gateway6} dev eth0 proto {PROTO_OURS} "), route
        assert f"via {lab.pod_gateway6} dev eth0" in sh(lab, "ip", "-6", "route", "get", DNS_SERVICE_IP6)
        if mode == "init":
            assert lab.lookup(NAME) == [DEST_IPS[0]]  # getent, through resolv.conf
        else:  # the proxy resolves the name itself
            assert http_get(lab, "client", f"http://{NAME}/hello") == 200
            assert origin.requests("/hello")[-1].peer_ip in ("192.0.2.99", SOURCE_IP6)
        assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6) == [DEST_IPS[0]]
        assert f"query[A] {NAME} from {lab.router_ip6}" in lab.dns_log()
        sh(lab, "ip", "-6", "route", "del", f"{DNS_SERVICE_IP6}/128")
        if layout == "calico":  # nothing else leads there: the query leaves through the macvlan and is lost
            assert_times_out(lambda: lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6, timeout=1))
        else:  # the platform's own service-network route through the pod's gateway still does
            assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6) == [DEST_IPS[0]]


# ---------------------------------------------------------------- 4. a second run

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS6)
def test_a_second_run_changes_nothing_for_ipv6(make_podlab6: MakePodLab6, layout: str, mode: str) -> None:
    lab = make_podlab6(layout)
    with router(lab, mode):
        first = return_state6(lab)
    assert f"default via {lab.pod_gateway6} dev eth0" in first["table"]
    assert "7910:\tfrom all fwmark 0x2000000/0x2000000 lookup 7910" in first["rules"]
    assert "-A EGRESS-ROUTER-MARK -i eth0 -m conntrack --ctdir ORIGINAL -j CONNMARK --set-xmark " \
           "0x2000000/0x2000000" in first["mangle"]
    assert "-A PREROUTING -j EGRESS-ROUTER-MARK" in first["mangle"]
    with router(lab, mode) as again:
        assert return_state6(lab) == first
        if mode == "init":
            assert "network already configured" in again.log, again.log
        else:
            assert "Added route" not in again.log and "Added policy rule" not in again.log, again.log
    assert return_state6(lab) == first
    assert len(re.findall(r"^7910:", first["rules"], re.M)) == 1


# ---------------------------------------------------------------- 5. a nameserver dropped

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS6)
def test_a_dropped_ipv6_nameserver_loses_its_route_and_the_others_keep_theirs(make_podlab6: MakePodLab6,
                                                                             layout: str, mode: str) -> None:
    lab = make_podlab6(layout)
    sh(lab, "ip", "-6", "route", "add", FOREIGN_ROUTE6, "via", lab.pod_gateway6, "dev", "eth0")
    cluster = {"EGRESS_CLUSTER_CIDRS": "2001:db8:c:1::/64"}
    lab.write_resolv_conf(DNS_SERVICE_IP6, OTHER_NAMESERVER6, DNS_SERVICE_IP)
    with router(lab, mode, **cluster):
        assert ours6(lab) == sorted([DNS_SERVICE_IP6, OTHER_NAMESERVER6, "2001:db8:c:1::/64"])
    lab.write_resolv_conf(DNS_SERVICE_IP6, DNS_SERVICE_IP)
    with router(lab, mode, **cluster) as again:
        assert f"Removed route {OTHER_NAMESERVER6}" in again.log, again.log
        assert ours6(lab) == sorted([DNS_SERVICE_IP6, "2001:db8:c:1::/64"])
        v4 = sh(lab, "ip", "-4", "route", "show", "proto", PROTO_OURS)
        assert v4.startswith(f"{DNS_SERVICE_IP} via {lab.pod_gateway} dev eth0"), v4
        assert f"{FOREIGN_ROUTE6} via {lab.pod_gateway6} dev eth0" in sh(lab, "ip", "-6", "route")
        assert f"default via {lab.pod_gateway6} dev eth0" in sh(lab, "ip", "-6", "route", "show", "table", "7910")
        assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6) == [DEST_IPS[0]]


# ---------------------------------------------------------------- an IPv6-only router in a dual-stack pod

IPV6_ONLY_DESTINATION = """\
80 tcp 2001:db8:203::10
2001:db8:203::12
"""


@pytest.mark.parametrize("layout", LAYOUTS6)
def test_an_ipv6_only_router_keeps_the_ipv4_pod_network_as_it_was(make_podlab6: MakePodLab6, layout: str) -> None:
    """Only the IPv6 default route is taken over, so only IPv6 gets a return path; IPv4 keeps the CNI's routes."""
    lab = make_podlab6(layout)
    lab.serve(DEMO_SERVERS6)
    before = ipv4_state(lab, "router")
    result = lab.run_router(lab.router_env(IPV6_ONLY_DESTINATION, source="2001:db8:2::99/64",
                                           EGRESS_GATEWAY="2001:db8:2::1"))
    assert result.returncode == 0, result.stderr
    assert ipv4_state(lab, "router") == before  # no IPv4 rule, route or address of ours
    assert "7910:\tfrom all fwmark 0x2000000/0x2000000 lookup 7910" in sh(lab, "ip", "-6", "rule")
    reply = lab.request("tcp", lab.router_ip6, 80, role="remote")
    assert (reply.landed, reply.peer_ip) == ("[2001:db8:203::10]:80", SOURCE_IP6)
    lab.probe_tcp(80, version=6)
    assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP6) == [DEST_IPS[0]]
    assert lab.query_dns(NAME, role="router", server=DNS_SERVICE_IP) == [DEST_IPS[0]]  # IPv4 as before
