"""hostAliases-style names in both proxies for real: the router namespace's hosts file (written as kubelet writes
it), the test DNS server on the pod network, the DNS proxy and the HTTP proxy side by side in the router namespace.
Both must give a name the same addresses: the hosts file's when it has the name (DNS never asked), DNS's otherwise,
and a changed hosts file's new ones soon after it changed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from egress_router.lab import DEST_IPS, SOURCE_IP, Lab
from tests.lab import test_dns_proxy as dnsproxy
from tests.lab import test_http_proxy as httpproxy
from tests.lab.dnsserver import DNS_IP, DnsServer, serving
from tests.lab.origin import Origin
from tests.lab.proxyproc import ProxyProcess, check_stopped, proxy_env, spawn_proxy
from tests.lab.test_dns_proxy import services as services  # the fixture: its servers, stopped at the end

A, B, C = DEST_IPS  # 203.0.113.10, .11, .12: origins on port 80 (conftest), whoami services on SERVICE_PORT
ALIAS = "backend.internal.test"  # only in the hosts file, as a hostAliases entry
OTHER_ALIAS = "db.internal.test"  # the same entry's second hostname
BOTH = "www.example.test"  # in the hosts file (A) and in DNS (C): the hosts file wins
DNS_ONLY = "api.example.test"  # only in DNS (C)
SERVICE_PORT = 7100  # the DNS proxy forwards its ports to whoami services here (the origins hold 7000)
HTTP_PORT = 8080
RESOLV = f"nameserver {DNS_IP}\noptions timeout:1 attempts:1\n"


def kubelet_hosts(aliases: dict[str, list[str]]) -> str:
    """A pod's /etc/hosts as kubelet writes it: its own entries, then one line per hostAliases IP."""
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "fe00::0\tip6-localnet", "198.51.100.1\tegress-router-0", "", "# Entries added by HostAliases."]
    lines += [f"{ip}\t" + "\t".join(names) for ip, names in aliases.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Proxies:
    """Both proxies in the router namespace, on the network an init container configured."""

    dns_proxy: dnsproxy.Proxy
    http_proxy: httpproxy.Proxy


@pytest.fixture
def dns(lab: Lab) -> Iterator[DnsServer]:
    """The test DNS server, the router's only nameserver; DNS_ONLY and BOTH in it."""
    lab.etc_file("router", "resolv.conf", RESOLV)
    with serving(lab) as server:
        server.set(BOTH, C, ttl=300)
        server.set(DNS_ONLY, C, ttl=300)
        yield server


StartBoth = Callable[[], Proxies]


@pytest.fixture
def start_both(lab: Lab, dns: DnsServer, origin: Origin, services: dnsproxy.Services) -> Iterator[StartBoth]:
    """Configures the network (the init container's part), then starts the DNS proxy (one forward per name, and
    the readiness forward) and the HTTP proxy (`*.test`) with the lab's /etc files; both must stop cleanly."""
    started: list[ProxyProcess] = []

    def start() -> Proxies:
        dnsproxy.configure_network(lab)
        for ip in DEST_IPS:
            services.listen("dest", ip, SERVICE_PORT, "whoami")
        services.listen("dest", A, dnsproxy.READY_PORT, "whoami")
        forwards = f"7100 {ALIAS}\n7101 {BOTH} {SERVICE_PORT}\n7102 {DNS_ONLY} {SERVICE_PORT}\n" \
                   f"7103 {OTHER_ALIAS.upper()} {SERVICE_PORT}\n{dnsproxy.READY_PORT} {A}"
        env = proxy_env({"EGRESS_DNS_PROXY_DESTINATION": forwards, "EGRESS_DNS_PROXY_WORKERS": "1",
                         "EGRESS_DNS_PROXY_DEBUG": "1", "EGRESS_PROXY_GRACE_SECONDS": "3"},
                        network=False, variables={})
        dns_proxy = dnsproxy.Proxy(lab, spawn_proxy(lab, env), 3.0, dnsproxy.READY_PORT, True)
        started.append(dns_proxy)
        env = httpproxy.http_proxy_env("*.test", network=False, port=HTTP_PORT, variables={})
        http_proxy = httpproxy.Proxy(lab, spawn_proxy(lab, env), HTTP_PORT, float(env["EGRESS_PROXY_GRACE_SECONDS"]))
        started.append(http_proxy)
        dns_proxy.wait_ready()
        http_proxy.wait_ready()
        return Proxies(dns_proxy, http_proxy)

    yield start
    check_stopped(started)


def through_dns_proxy(lab: Lab, port: int) -> str:
    """Where a connection to the DNS proxy's `port` landed (it must land: a refusal fails the test)."""
    landed, peer = dnsproxy.whoami(lab, port)
    assert peer == SOURCE_IP
    return landed


def through_http_proxy(lab: Lab, name: str) -> str:
    """The address the HTTP proxy reached for http://name/hello (from the origin's answer)."""
    response = httpproxy.fetch(lab, f"http://{name}/hello")
    assert response.status == 200, (name, response)
    return response.text.removeprefix("hello from ").removesuffix(":80\n")


def test_a_hostaliases_name_resolves_to_the_same_address_in_both_proxies(
        lab: Lab, dns: DnsServer, start_both: StartBoth) -> None:
    lab.etc_file("router", "hosts", kubelet_hosts({B: [ALIAS, OTHER_ALIAS], A: [BOTH]}))
    proxies = start_both()
    for port, name in ((7100, ALIAS), (7101, BOTH), (7102, DNS_ONLY), (7103, OTHER_ALIAS)):
        proxies.dns_proxy.wait_resolved(port, name)
    line = proxies.dns_proxy.wait_resolved(7100, ALIAS)
    assert line.endswith(f"is now {B}:{SERVICE_PORT} (hosts file)"), line
    line = proxies.dns_proxy.wait_resolved(7102, DNS_ONLY)
    assert line.endswith(f"is now {C}:{SERVICE_PORT}"), line  # from DNS: no note
    for name, port, expected in ((ALIAS, 7100, B), (OTHER_ALIAS, 7103, B), (BOTH, 7101, A), (DNS_ONLY, 7102, C)):
        assert (through_dns_proxy(lab, port), through_http_proxy(lab, name)) == (expected, expected), name
    assert not dns.asked(ALIAS) and not dns.asked(OTHER_ALIAS) and not dns.asked(BOTH)  # neither proxy asked DNS
    assert {q.rdtype for q in dns.asked(DNS_ONLY)} == {"A", "AAAA"}


def test_both_proxies_follow_a_changed_hosts_file(lab: Lab, dns: DnsServer, start_both: StartBoth) -> None:
    """kubelet writes the file at pod start only, but an edit is seen: the DNS proxy within TTL_MIN (1 s) and one
    second of not looking, the HTTP proxy within its 5 s (an expired answer is used once while it is refreshed)."""
    lab.etc_file("router", "hosts", kubelet_hosts({B: [ALIAS, OTHER_ALIAS], A: [BOTH]}))
    proxies = start_both()
    proxies.dns_proxy.wait_resolved(7100, ALIAS)
    proxies.dns_proxy.wait_resolved(7101, BOTH)
    assert (through_dns_proxy(lab, 7100), through_http_proxy(lab, ALIAS)) == (B, B)
    assert (through_dns_proxy(lab, 7101), through_http_proxy(lab, BOTH)) == (A, A)
    changed = time.monotonic()
    lab.etc_file("router", "hosts", kubelet_hosts({C: [ALIAS, OTHER_ALIAS]}))  # BOTH left the file: DNS's now
    moved: dict[str, float] = {}
    checks: dict[str, Callable[[], bool]] = {
        "dns proxy, alias": lambda: through_dns_proxy(lab, 7100) == C,
        "dns proxy, both": lambda: through_dns_proxy(lab, 7101) == C,
        "http proxy, alias": lambda: through_http_proxy(lab, ALIAS) == C,
        "http proxy, both": lambda: through_http_proxy(lab, BOTH) == C,
    }
    deadline = changed + 12.0
    while len(moved) < len(checks) and time.monotonic() < deadline:
        for what, check in checks.items():
            if what not in moved and check():
                moved[what] = time.monotonic() - changed
        time.sleep(0.05)
    assert set(moved) == set(checks), (moved, proxies.dns_proxy.stderr)
    assert max(moved["dns proxy, alias"], moved["dns proxy, both"]) < 1 + 1 + 1.5, moved
    assert max(moved["http proxy, alias"], moved["http proxy, both"]) < 5 + 1 + 1.5, moved
    for port, name in ((7100, ALIAS), (7101, BOTH)):  # and from then on only the new address, in both
        assert (through_dns_proxy(lab, port), through_http_proxy(lab, name)) == (C, C)
    proxies.dns_proxy.wait_log(rf"Port 7100: {re.escape(ALIAS)} is now {C}:{SERVICE_PORT} \(hosts file\)$")
    proxies.dns_proxy.wait_log(rf"Port 7101: {re.escape(BOTH)} is now {C}:{SERVICE_PORT}$")
    assert dns.asked(BOTH)  # once out of the file, it is DNS's
