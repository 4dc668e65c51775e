"""Every mode on every pod network: replies, kubelet probes and DNS keep their way back through the pod interface.

Calico-, Cilium- and OpenShift-SDN-style router pods (egress_router.podlab), clients on the same and on the other
node, probes from the node's own IP (also inside EGRESS_SOURCE's subnet), the cluster DNS on a Service IP, and
rp_filter 0, 1 and 2 in the router pod. Destinations must see only EGRESS_SOURCE.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from egress_router.lab import DEMO_SERVERS, DEST_IPS
from egress_router.podlab import LAYOUTS, PodLab
from tests.lab.conftest import origins
from tests.lab.inprocess import failed_apply, without_qdisc
from tests.lab.origin import Origin, host_of, read_response
from tests.lab.proxyproc import ProxyProcess, proxy_env, spawn_proxy

CLIENTS = ("client", "remote")  # a pod on the router's node, a pod on the other node
NAME = "www.example.test"  # 203.0.113.10, answered by the cluster DNS only
GRACE = {"EGRESS_PROXY_GRACE_SECONDS": "1"}
MakePodLab = Callable[..., PodLab]


def init(lab: PodLab) -> str:
    result = lab.run_router(lab.router_env())
    assert result.returncode == 0, result.stderr
    return result.stderr


@contextlib.contextmanager
def proxy(lab: PodLab, **variables: str) -> Iterator[ProxyProcess]:
    """A proxy mode in the one-container layout (it configures the network, then serves); stopped cleanly."""
    env = proxy_env(GRACE, network=True, variables=variables)
    running = ProxyProcess(lab, spawn_proxy(lab, env), grace=1.0)
    try:
        yield running
    finally:
        problems = running.stop_and_check()
        assert not problems, "\n".join(problems) + "\n" + running.stderr


def eventually_connects(lab: PodLab, port: int, role: str = "client", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            lab.connect(lab.router_ip, port, role=role, timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def http_get(lab: PodLab, role: str, url: str, port: int = 8080) -> tuple[int, bytes]:
    """GET through the HTTP proxy from a client pod (absolute form, as curl -x sends it)."""
    host = url.split("/")[2]
    with lab.connect(lab.router_ip, port, role=role, timeout=10.0) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = read_response(sock.makefile("rb"))
    return response.status, response.body


def tcp_echo(lab: PodLab, role: str, port: int) -> bytes:
    """A short TCP exchange through the DNS proxy with the origin's echo service."""
    with lab.connect(lab.router_ip, port, role=role, timeout=10.0) as sock:
        sock.sendall(b"hello through the pod network\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


# ---------------------------------------------------------------- redirect mode

@pytest.mark.parametrize("rp_filter", [0, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_redirect_mode(make_podlab: MakePodLab, layout: str, rp_filter: int) -> None:
    lab = make_podlab(layout, rp_filter=rp_filter)
    lab.serve(DEMO_SERVERS)
    init(lab)
    for role in CLIENTS:
        for proto, port, landed in (("tcp", 80, "203.0.113.10:80"), ("udp", 53, "203.0.113.10:5353"),
                                    ("tcp", 7000, "203.0.113.12:7000")):
            reply = lab.request(proto, lab.router_ip, port, role=role)
            assert (reply.landed, reply.peer_ip) == (landed, lab.source_ip), (role, proto, port)
    lab.probe_tcp(80)  # kubelet's tcpSocket probe from the node's own IP: DNAT-ed, answered, and back
    assert lab.lookup(NAME) == [DEST_IPS[0]]  # the pod still resolves through the cluster DNS
    if rp_filter == 1:
        assert lab.rp_filter("eth0") == 2  # loosened on the pod interface, and only there
        assert lab.read_sysctl("router", "net.ipv4.conf.macvlan0.rp_filter") == "1"
    else:
        assert lab.rp_filter("eth0") == rp_filter  # nothing to loosen: left alone


@pytest.mark.parametrize("layout", LAYOUTS)
def test_redirect_mode_rerun_changes_nothing_and_node_in_the_egress_subnet(make_podlab: MakePodLab,
                                                                           layout: str) -> None:
    lab = make_podlab(layout, node_in_egress_subnet=True, rp_filter=1)
    lab.serve(DEMO_SERVERS)
    init(lab)
    lab.settle()
    before = lab.snapshot("router")
    again = init(lab)
    lab.settle()
    assert lab.snapshot("router") == before
    assert "network already configured" in again and "NAT rules already in place" in again
    # the node's IP is inside EGRESS_SOURCE's subnet, where the macvlan cannot reach it: the reply must not
    # go there (it would be an ARP request on the LAN that the node never answers)
    lab.probe_tcp(80)
    reply = lab.request("tcp", lab.router_ip, 8080, role="remote")
    assert (reply.landed, reply.peer_ip) == ("203.0.113.11:80", lab.source_ip)


# ---------------------------------------------------------------- the proxies

@pytest.mark.parametrize("rp_filter", [0, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_http_proxy_mode(make_podlab: MakePodLab, layout: str, rp_filter: int) -> None:
    lab = make_podlab(layout, rp_filter=rp_filter, node_in_egress_subnet=rp_filter == 2)
    with contextlib.ExitStack() as stack:
        origin = stack.enter_context(origins_in(lab))
        stack.enter_context(proxy(lab, EGRESS_HTTP_PROXY_DESTINATION="*.example.test"))
        eventually_connects(lab, 8080)
        for role in CLIENTS:
            status, body = http_get(lab, role, f"http://{NAME}/hello")
            assert status == 200, (role, body)
            seen = origin.requests("/hello")[-1]
            assert (seen.landed_ip, seen.peer_ip) == (DEST_IPS[0], lab.source_ip), role
        assert lab.probe_http(8080, "/healthz") == 200  # kubelet's httpGet probe from the node's IP
        lab.probe_tcp(8080)
        assert all(host_of(peer) == lab.source_ip for _, peer in origin.connections_to(DEST_IPS[0]))


@pytest.mark.parametrize("rp_filter", [0, 1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dns_proxy_mode(make_podlab: MakePodLab, layout: str, rp_filter: int) -> None:
    lab = make_podlab(layout, rp_filter=rp_filter, node_in_egress_subnet=rp_filter == 2)
    with contextlib.ExitStack() as stack:
        origin = stack.enter_context(origins_in(lab))
        stack.enter_context(proxy(lab, EGRESS_DNS_PROXY_DESTINATION=f"7000 {NAME}"))
        eventually_connects(lab, 7000)
        for role in CLIENTS:
            assert tcp_echo(lab, role, 7000).startswith(b"hello through the pod network\n"), role
        lab.probe_tcp(7000)  # kubelet's tcpSocket probe from the node's IP
        connections = origin.connections_to(DEST_IPS[0])
        assert connections and all(host_of(peer) == lab.source_ip for _, peer in connections), connections


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_container_layout(make_podlab: MakePodLab, layout: str) -> None:
    """A privileged init container configures the network (no NAT), the proxy runs alone and unprivileged."""
    lab = make_podlab(layout, rp_filter=1)
    env = lab.router_env(mode="http-proxy")
    del env["EGRESS_DESTINATION"]
    setup = init_with(lab, env)
    assert "no NAT (proxy mode)" in setup and "connection-mark rules" in setup, setup
    with contextlib.ExitStack() as stack:
        origin = stack.enter_context(origins_in(lab))
        env = proxy_env(GRACE, network=False, variables={"EGRESS_HTTP_PROXY_DESTINATION": "*.example.test"})
        running = ProxyProcess(lab, spawn_proxy(lab, env, prefix=["setpriv", "--reuid=65534", "--regid=65534",
                                                                  "--clear-groups", "--"]), grace=1.0)
        stack.callback(lambda: check(running))
        eventually_connects(lab, 8080, role="remote")
        assert http_get(lab, "remote", f"http://{NAME}/hello")[0] == 200
        assert origin.requests("/hello")[-1].peer_ip == lab.source_ip
        assert lab.probe_http(8080) == 200


def init_with(lab: PodLab, env: dict[str, str]) -> str:
    result = lab.run_router(env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def check(running: ProxyProcess) -> None:
    problems = running.stop_and_check()
    assert not problems, "\n".join(problems) + "\n" + running.stderr


def origins_in(lab: PodLab) -> contextlib.AbstractContextManager[Origin]:
    return origins(lab)


OTHERS_MANGLE = ["*mangle", ":MESH-MARK - [0:0]",
                 "-A MESH-MARK -p tcp -m tcp --dport 15001 -j MARK --set-xmark 0x539/0xfff",
                 "-A PREROUTING -j MESH-MARK", "-A OUTPUT -p udp -j RETURN", "COMMIT"]


def test_other_owners_rules_survive_and_a_failure_undoes_the_new_steps(make_podlab: MakePodLab,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another owner's mangle rules and policy rule are untouched by a run and by its undo; when the last
    network step fails, the return path's steps (table 7910, the policy rule, the nameserver route, the
    loosened rp_filter, the mark rules) are undone with the rest."""
    from egress_router.net import apply as net_apply

    lab = make_podlab("calico", rp_filter=1)
    lab.exec("router", ["iptables-restore", "--noflush"], stdin="\n".join(OTHERS_MANGLE) + "\n", check=True)
    lab.exec("router", ["ip", "rule", "add", "fwmark", "0x539/0xfff", "lookup", "100", "priority", "5000"], check=True)
    lab.settle()
    before = lab.snapshot("router")

    def write(path: str, value: str) -> None:
        if path.endswith("ip_forward"):
            raise PermissionError(13, "Permission denied")
        with open(path, "w", encoding="ascii") as handle:
            handle.write(value)

    monkeypatch.setattr(net_apply, "write_sysctl", write)
    assert failed_apply(lab).endswith("; the changes made before it were undone")
    assert without_qdisc(lab.snapshot("router")) == without_qdisc(before)
    monkeypatch.undo()
    init(lab)  # and for real: theirs still there, ours added
    mangle = lab.exec("router", ["iptables-save", "-t", "mangle"], check=True).stdout
    assert "-A MESH-MARK -p tcp -m tcp --dport 15001 -j MARK --set-xmark 0x539/0xfff" in mangle
    assert "-A PREROUTING -j MESH-MARK" in mangle and "-A PREROUTING -j EGRESS-ROUTER-MARK" in mangle
    rules = lab.exec("router", ["ip", "rule", "show"], check=True).stdout
    assert "5000:\tfrom all fwmark 0x539/0xfff lookup 100" in rules
    assert "7910:\tfrom all fwmark 0x2000000/0x2000000 lookup 7910" in rules


def test_a_changed_configuration_converges_and_leaves_other_routes_alone(make_podlab: MakePodLab) -> None:
    """Networks dropped from EGRESS_CLUSTER_CIDRS lose their routes on the next run (ours carry proto 245);
    a route through the pod interface that someone else added stays."""
    lab = make_podlab("cilium")
    lab.exec("router", ["ip", "route", "add", "198.51.100.232/30", "via", lab.pod_gateway, "dev", "eth0"], check=True)

    def ours() -> list[str]:
        shown = lab.exec("router", ["ip", "route", "show", "proto", "245"], check=True).stdout
        return sorted(line.split()[0] for line in shown.splitlines())

    init_with(lab, lab.router_env(EGRESS_CLUSTER_CIDRS="198.51.100.240/29, 198.51.100.248/30"))
    assert ours() == ["198.51.100.138", "198.51.100.240/29", "198.51.100.248/30"]
    changed = init_with(lab, lab.router_env(EGRESS_CLUSTER_CIDRS="198.51.100.240/29"))
    assert "Removed route 198.51.100.248/30" in changed
    assert ours() == ["198.51.100.138", "198.51.100.240/29"]
    init_with(lab, lab.router_env())
    assert ours() == ["198.51.100.138"]
    assert "198.51.100.232/30 via" in lab.exec("router", ["ip", "route"], check=True).stdout
    assert "network already configured" in init_with(lab, lab.router_env())
