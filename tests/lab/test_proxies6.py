"""Both proxies, dual-stack lab: IPv6 destinations reached from the reserved IPv6 source, clients of both families."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from egress_router.lab import (
    DEST_IPS,
    DEST_IPS6,
    GATEWAY_LAN_IP,
    GATEWAY_LINK_LOCAL,
    LAN_PREFIX,
    LAN_PREFIX6,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    SOURCE_IP6,
    Lab,
)
from tests.lab import test_dns_proxy as dnsproxy
from tests.lab import test_http_proxy as httpproxy
from tests.lab.dnsserver import DNS_IP, DnsServer, serving
from tests.lab.origin import ECHO_TAIL, Origin, host_of
from tests.lab.proxyproc import ProxyProcess, check_stopped, spawn_proxy
from tests.lab.test_dns_proxy import services as services  # the fixture: its servers, stopped at the end

PORT = 8080
V4, V6 = DEST_IPS[0], DEST_IPS6[0]  # 203.0.113.10, 2001:db8:203::10
V6_OTHER, V6_DUAL = DEST_IPS6[1], DEST_IPS6[2]  # ::11 (the AAAA-only name), ::12 (the dual name's AAAA)
V4_DUAL = DEST_IPS[2]  # 203.0.113.12, the dual name's A
AAAA_ONLY, DUAL, A_ONLY = "v6only.test", "dual.test", "v4only.test"
ONLY_V6_LISTENS = 8090  # the dual name's port where only its IPv6 address listens: its IPv4 one refuses
QUICK = 2.0  # seconds: what needs no connect timeout waited out takes less, on a loaded machine too
SECOND_IP6 = "2001:db8:2::77"  # another global address on macvlan0, as IPAM or SLAAC may leave one
DUAL_STACK = {"EGRESS_SOURCE": f"{SOURCE_IP}/{LAN_PREFIX},{SOURCE_IP6}/{LAN_PREFIX6}",
              "EGRESS_GATEWAY": f"{GATEWAY_LAN_IP},{GATEWAY_LINK_LOCAL}"}
IPV6_ONLY = {"EGRESS_SOURCE": f"{SOURCE_IP6}/{LAN_PREFIX6}", "EGRESS_GATEWAY": GATEWAY_LINK_LOCAL}
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"  # every other name comes from the test DNS server
RESOLV = f"nameserver {DNS_IP}\noptions timeout:1 attempts:1\n"


# ------------------------------------------------------------------ fixtures

@pytest.fixture
def lab(lab6: Lab) -> Lab:
    """Every test here runs in the dual-stack lab (the imported helpers take it as `lab`)."""
    return lab6


@pytest.fixture
def dns(lab: Lab) -> Iterator[DnsServer]:
    """The test DNS server on the pod network, the router's only nameserver; the names the tests use."""
    lab.etc_file("router", "hosts", HOSTS)
    lab.etc_file("router", "resolv.conf", RESOLV)
    with serving(lab) as server:
        server.set(AAAA_ONLY, V6_OTHER, ttl=300)
        server.set(DUAL, V4_DUAL, V6_DUAL, ttl=300)
        server.set(A_ONLY, V4, ttl=300)
        yield server


@pytest.fixture
def origin(lab: Lab) -> Iterator[Origin]:
    """HTTP on port 80 of every destination of both families, TCP echo on [v6]:443 and 203.0.113.10:7000;
    on the dual name's pair, port ONLY_V6_LISTENS on the IPv6 address alone."""
    server = Origin()
    with lab.entered("dest"):
        for ip in (*DEST_IPS, *DEST_IPS6):
            server.listen(ip, 80)
        server.listen(V6, 443, kind="echo")
        server.listen(V4, 7000, kind="echo")
        server.listen(V6_DUAL, ONLY_V6_LISTENS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


StartHttp = Callable[..., httpproxy.Proxy]


@pytest.fixture
def start_http(lab: Lab, dns: DnsServer, origin: Origin) -> Iterator[StartHttp]:
    """HTTP proxies that configure the network first (dual-stack unless told otherwise), then serve; each must
    stop cleanly at teardown."""
    started: list[ProxyProcess] = []

    def start(rules: str, *, network: dict[str, str] = DUAL_STACK, **variables: str) -> httpproxy.Proxy:
        env = httpproxy.http_proxy_env(rules, network=True, port=PORT, variables={**network, **variables})
        proxy = httpproxy.Proxy(lab, spawn_proxy(lab, env), PORT, float(env["EGRESS_PROXY_GRACE_SECONDS"]))
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    yield start
    check_stopped(started)


class DnsProxy(dnsproxy.Proxy):
    """The DNS proxy, ready once a connection through its readiness port lands on `ready_ip` (either family)."""

    def __init__(self, lab: Lab, process: subprocess.Popen[str], ready_ip: str):
        super().__init__(lab, process, 3.0, dnsproxy.READY_PORT, True)
        self.ready_ip = ready_ip

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        probes = 0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the proxy exited with {self.process.returncode}:\n{self.stderr}")
            try:
                with dnsproxy.Conn(self.lab, self.ready_port, timeout=1) as conn:
                    probes += 1
                    line = conn.line()
            except OSError:
                line = ""
            if line and host_of(line.split()[0]) == self.ready_ip:
                self.remember_workers()
                self.wait_probe_ends(probes)  # a probe counts as open until the proxy has seen it end
                return
            time.sleep(0.03)
        pytest.fail(f"the proxy did not relay a connection within {timeout} s:\n{self.stderr}")


StartDns = Callable[..., DnsProxy]


@pytest.fixture
def start_dns(lab: Lab, dns: DnsServer, services: dnsproxy.Services) -> Iterator[StartDns]:
    """DNS proxies (the network first, dual-stack unless told otherwise); readiness polled through a forward to
    203.0.113.10, or to 2001:db8:203::10 on an IPv6-only router."""
    started: list[ProxyProcess] = []
    ready = dnsproxy.READY_PORT

    def start(destination: str, *, network: dict[str, str] = DUAL_STACK, **variables: str) -> DnsProxy:
        ready_ip = V6 if network is IPV6_ONLY else V4
        services.listen("dest", ready_ip, ready, "whoami")
        env = httpproxy.proxy_env({"EGRESS_DNS_PROXY_DESTINATION": f"{destination}\n{ready} {ready_ip}",
                                   "EGRESS_DNS_PROXY_WORKERS": "1", "EGRESS_DNS_PROXY_DEBUG": "1",
                                   "EGRESS_PROXY_GRACE_SECONDS": "3"}, network=True,
                                  variables={**network, **variables})
        proxy = DnsProxy(lab, spawn_proxy(lab, env), ready_ip)
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    yield start
    check_stopped(started)


# ------------------------------------------------------------------ clients

def curl(lab: Lab, proxy_host: str, *args: str) -> str:
    """curl in the client namespace through the proxy at proxy_host:PORT; its body (fails on an error)."""
    proxy = f"http://[{proxy_host}]:{PORT}" if ":" in proxy_host else f"http://{proxy_host}:{PORT}"
    result = lab.exec("client", ["curl", "-sS", "-g", "--fail-with-body", "--max-time", "10", "-x", proxy, *args],
                      timeout=20)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def requests_get(lab: Lab, proxy_host: str, url: str) -> requests.Response:
    """Python requests from the client namespace (this thread inside it), through the proxy, no environment."""
    proxy = f"http://[{proxy_host}]:{PORT}" if ":" in proxy_host else f"http://{proxy_host}:{PORT}"
    with lab.entered("client"), requests.Session() as session:
        session.trust_env = False
        return session.get(url, proxies={"http": proxy}, timeout=10)


def tunnel_echo(lab: Lab, proxy_host: str, target: str, data: bytes) -> bytes:
    """CONNECT through the proxy to an echo service; `data` sent, half-closed, everything read back."""
    with httpproxy.Client(lab, host=proxy_host) as client:
        assert httpproxy.connect(client, target).status == 200
        client.send(data)
        assert client.reader.read(len(data)) == data  # echoed while the tunnel is still open both ways
        client.sock.shutdown(socket.SHUT_WR)
        return client.reader.read()


def hello(ip: str, port: int = 80) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"hello from {host}:{port}\n"


def peers(origin: Origin, ip: str) -> set[str]:
    """The source addresses of every connection the origin accepted on `ip`."""
    return {host_of(peer) for _, peer in origin.connections_to(ip)}


# ------------------------------------------------------------------ 1. the HTTP proxy, dual stack

def test_http_proxy_reaches_ipv6_destinations_from_the_reserved_source(
        lab: Lab, origin: Origin, start_http: StartHttp) -> None:
    start_http("*")
    for proxy_host in (ROUTER_POD_IP, ROUTER_POD_IP6):  # the proxy listens on both families
        assert curl(lab, proxy_host, f"http://[{V6}]:80/hello") == hello(V6)
        assert curl(lab, proxy_host, "-p", f"http://[{V6}]/hello") == hello(V6)  # curl's own CONNECT tunnel
        response = requests_get(lab, proxy_host, f"http://[{V6}]/hello")
        assert response.status_code == 200 and response.text == hello(V6), response.text
        data = os.urandom(200_000)
        assert tunnel_echo(lab, proxy_host, f"[{V6}]:443", data) == ECHO_TAIL
        # a name whose only record is AAAA, and IPv4 beside it on the same proxy
        assert curl(lab, proxy_host, f"http://{AAAA_ONLY}/hello") == hello(V6_OTHER)
        assert curl(lab, proxy_host, f"http://{A_ONLY}/hello") == hello(V4)
    assert peers(origin, V6) == peers(origin, V6_OTHER) == {SOURCE_IP6}
    assert peers(origin, V4) == {SOURCE_IP}
    assert len(origin.connections_to(V6)) >= 4  # the tunnels to :443 at least, each a connection of its own
    seen = [s for s in origin.requests("/hello") if s.landed_ip == V6]
    assert len(seen) == 6 and {s.header("Host") for s in seen} == {f"[{V6}]"}, seen


def test_a_name_with_both_families_uses_ipv4_first_and_falls_back_to_ipv6_when_refused(
        lab: Lab, origin: Origin, start_http: StartHttp) -> None:
    """The proxy takes the lookup's IPv4 addresses first; a refused connection moves on to the next address."""
    start_http("*")
    assert curl(lab, ROUTER_POD_IP, f"http://{DUAL}/hello") == hello(V4_DUAL)
    assert peers(origin, V4_DUAL) == {SOURCE_IP} and origin.connections_to(V6_DUAL) == []
    # nothing listens on ONLY_V6_LISTENS at the IPv4 address: refused, then the IPv6 address answers
    started = time.monotonic()
    assert curl(lab, ROUTER_POD_IP6, f"http://{DUAL}:{ONLY_V6_LISTENS}/hello") == hello(V6_DUAL, ONLY_V6_LISTENS)
    assert time.monotonic() - started < 3.0  # a refusal is no timeout: no connect timeout was waited out
    assert peers(origin, V6_DUAL) == {SOURCE_IP6}


# ------------------------------------------------------------------ 2. the allow list with IPv6 networks

def test_allow_list_with_ipv6_networks(lab: Lab, origin: Origin, start_http: StartHttp) -> None:
    start_http(f"!{V6_OTHER}\n2001:db8:203::/64")
    for proxy_host in (ROUTER_POD_IP, ROUTER_POD_IP6):
        assert curl(lab, proxy_host, f"http://[{V6}]/hello") == hello(V6)
        assert tunnel_echo(lab, proxy_host, f"[{V6}]:443", b"allowed\n") == ECHO_TAIL
        # the dual name's A record is outside the list, its AAAA inside: the IPv6 address is used
        assert curl(lab, proxy_host, f"http://{DUAL}/hello") == hello(V6_DUAL)
    with httpproxy.Client(lab, host=ROUTER_POD_IP6) as client:
        for target, host in ((f"http://[{V6_OTHER}]/hello", V6_OTHER), (f"http://{AAAA_ONLY}/hello", AAAA_ONLY),
                             (f"http://{V4}/hello", V4), (f"http://{A_ONLY}/hello", A_ONLY),
                             ("http://[2001:db8:2::1]/hello", "2001:db8:2::1")):
            httpproxy.assert_denied(client.request("GET", target), host)
    for target in (f"[{V6_OTHER}]:80", f"{AAAA_ONLY}:80", f"[{V6_OTHER}]:443", f"{V4}:7000"):
        assert httpproxy.fetch(lab, target, method="CONNECT").status == 403, target
    assert origin.connections_to(V6_OTHER) == [] and origin.connections_to(V4) == []  # nothing reached them
    assert peers(origin, V6) == peers(origin, V6_DUAL) == {SOURCE_IP6}
    assert origin.connections_to(V4_DUAL) == []


# ------------------------------------------------------------------ 3. the DNS proxy

def test_dns_proxy_forwards_to_ipv6_from_the_reserved_source(
        lab: Lab, services: dnsproxy.Services, start_dns: StartDns) -> None:
    for ip in DEST_IPS6:
        services.listen("dest", ip, 7000, "whoami")
    proxy = start_dns(f"7000 {AAAA_ONLY}\n7001 {V6} 7000\n7002 [{V6_DUAL}] 7000")
    proxy.wait_resolved(7000, AAAA_ONLY)
    for client_side in (ROUTER_POD_IP, ROUTER_POD_IP6):
        assert dnsproxy.whoami(lab, 7000, host=client_side) == (V6_OTHER, SOURCE_IP6)
        assert dnsproxy.whoami(lab, 7001, host=client_side) == (V6, SOURCE_IP6)
        assert dnsproxy.whoami(lab, 7002, host=client_side) == (V6_DUAL, SOURCE_IP6)
        assert dnsproxy.whoami(lab, dnsproxy.READY_PORT, host=client_side) == (V4, SOURCE_IP)
    assert {a.peer_ip for a in services.accepted if ":" in a.landed_ip} == {SOURCE_IP6}
    assert len([a for a in services.accepted if ":" in a.landed_ip]) == 6


# ------------------------------------------------------------------ 4. an IPv6-only router

def test_ipv6_only_router_http_proxy(lab: Lab, origin: Origin, start_http: StartHttp) -> None:
    """Only the configured family's default route is replaced: the pod's own IPv4 one stays, and leads nowhere in
    this lab (the client namespace does not forward). IPv4 destinations get a 504 within the connect timeout;
    a name with both families goes to its IPv6 address first instead of waiting that timeout out on IPv4."""
    timeout = 4.0
    proxy = start_http("*", network=IPV6_ONLY, EGRESS_HTTP_PROXY_CONNECT_TIMEOUT=f"{timeout:g}")
    routes = lab.exec("router", ["ip", "-6", "route"], check=True).stdout
    assert f"default via {GATEWAY_LINK_LOCAL} dev macvlan0 " in routes and f"src {SOURCE_IP6}" in routes, routes
    assert SOURCE_IP not in lab.exec("router", ["ip", "-4", "addr"], check=True).stdout
    for proxy_host in (ROUTER_POD_IP, ROUTER_POD_IP6):
        assert curl(lab, proxy_host, f"http://[{V6}]/hello") == hello(V6)
        assert curl(lab, proxy_host, f"http://{AAAA_ONLY}/hello") == hello(V6_OTHER)
        started = time.monotonic()
        assert curl(lab, proxy_host, f"http://{DUAL}/hello") == hello(V6_DUAL)
        assert time.monotonic() - started < QUICK, "the IPv4 address was tried first"
    assert tunnel_echo(lab, ROUTER_POD_IP6, f"[{V6}]:443", b"v6 only\n") == ECHO_TAIL
    # IPv4-only destinations: a clear error answer within the connect timeout (not a hang, not a 200)
    for target, shown in ((f"http://{V4}/hello", f"{V4} ({V4})"), (f"http://{A_ONLY}/hello", f"{A_ONLY} ({V4})")):
        started = time.monotonic()
        response = httpproxy.fetch(lab, target, timeout=timeout + 10)
        assert time.monotonic() - started < timeout + QUICK, target
        assert response.status == 504, (target, response)
        assert response.text == f"timed out connecting to {shown} port 80\n", response.text
    started = time.monotonic()
    assert httpproxy.fetch(lab, f"{V4}:7000", method="CONNECT", timeout=timeout + 10).status == 504
    assert time.monotonic() - started < timeout + QUICK
    assert origin.connections_to(V4) == [] and origin.connections_to(V4_DUAL) == []
    assert peers(origin, V6) == peers(origin, V6_OTHER) == peers(origin, V6_DUAL) == {SOURCE_IP6}
    # the access log line follows the answer: the last one may still be on its way through the pipe
    assert httpproxy.eventually(lambda: proxy.stderr.count(" error 504 ") == 3), proxy.stderr


def test_ipv6_only_router_dns_proxy_reaches_a_names_ipv6_addresses(
        lab: Lab, services: dnsproxy.Services, start_dns: StartDns) -> None:
    """Every address of a name is a backend, the IPv4 ones too on an IPv6-only router: a connection sent to one
    waits the connect timeout out (the pod's IPv4 route leads nowhere here), is retried on an IPv6 backend, and the
    IPv4 one stays out of rotation after that. An IPv6 literal forward works."""
    for ip in (V4_DUAL, V6_DUAL, V6):
        services.listen("dest", ip, 7000, "whoami")
    timeout = 2.0
    proxy = start_dns(f"7000 {DUAL}\n7001 {V6} 7000", network=IPV6_ONLY,
                      EGRESS_DNS_PROXY_CONNECT_TIMEOUT=f"{timeout:g}")
    line = proxy.wait_resolved(7000, DUAL)
    assert f"{V4_DUAL}:7000" in line and f"[{V6_DUAL}]:7000" in line, line
    took = []
    for client_side in (ROUTER_POD_IP, ROUTER_POD_IP6) * 3:
        started = time.monotonic()
        assert dnsproxy.whoami(lab, 7000, host=client_side) == (V6_DUAL, SOURCE_IP6)
        took.append(time.monotonic() - started)
        assert dnsproxy.whoami(lab, 7001, host=client_side) == (V6, SOURCE_IP6)
    assert max(took) < timeout + QUICK, took
    assert sum(t >= timeout for t in took) <= 1, took  # only one connection paid for the IPv4 backend
    assert services.landed(V4_DUAL) == []
    assert proxy.stderr.count(f"backend {V4_DUAL}:7000 failed (connect timed out)") <= 1, proxy.stderr


# ------------------------------------------------------------------ 5. a second global address on the egress link

def test_a_second_global_address_does_not_become_the_source(
        lab: Lab, origin: Origin, services: dnsproxy.Services, start_http: StartHttp, start_dns: StartDns) -> None:
    """The default route's src pins the source; the test shows that without it the other address would be used."""
    add_second = ["ip", "-6", "addr", "add", f"{SECOND_IP6}/{LAN_PREFIX6}", "dev", "macvlan0", "nodad"]
    lab.exec("router", add_second, check=True)  # before the router runs
    services.listen("dest", V6, 7000, "whoami")
    start_http("*")
    start_dns(f"7000 {V6}")

    def sources() -> tuple[str, str]:
        """(HTTP proxy's, DNS proxy's) source of a fresh upstream connection to [V6]."""
        before = len(origin.requests("/close"))
        curl(lab, ROUTER_POD_IP6, f"http://[{V6}]/close")  # the origin closes it: nothing pooled
        seen = origin.requests("/close")
        assert len(seen) == before + 1
        return seen[-1].peer_ip, dnsproxy.whoami(lab, 7000, host=ROUTER_POD_IP6)[1]

    addresses = lab.exec("router", ["ip", "-6", "-o", "addr", "show", "dev", "macvlan0", "scope", "global"],
                         check=True).stdout
    assert SECOND_IP6 in addresses and SOURCE_IP6 in addresses, addresses
    assert sources() == (SOURCE_IP6, SOURCE_IP6)
    # the other address made the newest (as a renewal would): the kernel's own choice would now be it
    lab.exec("router", ["ip", "-6", "addr", "del", f"{SECOND_IP6}/{LAN_PREFIX6}", "dev", "macvlan0"], check=True)
    lab.exec("router", add_second, check=True)
    assert sources() == (SOURCE_IP6, SOURCE_IP6)
    # the route's src removed by hand: the check above would fail, the other address is used
    route = lab.exec("router", ["ip", "-6", "route", "show", "default"], check=True).stdout
    assert f"src {SOURCE_IP6}" in route, route
    lab.exec("router", ["ip", "-6", "route", "replace", "default", "via", GATEWAY_LINK_LOCAL, "dev", "macvlan0"],
             check=True)
    route = lab.exec("router", ["ip", "-6", "route", "show", "default"], check=True).stdout
    assert "src" not in route and route.count("default") == 1, route
    assert sources() == (SECOND_IP6, SECOND_IP6)
