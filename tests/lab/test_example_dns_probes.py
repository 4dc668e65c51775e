"""The DNS proxy example's probes and scrape as the kubelet and Prometheus make them: the proxy container of
examples/dns-proxy.yaml, its names answered by the lab's DNS server, asked over the pod interface."""
# ruff: noqa: F811 (the test takes the imported fixtures by their names)

from __future__ import annotations

from egress_router.lab import DEST_IPS, Lab
from tests.lab.dnsserver import DnsServer
from tests.lab.test_dns_proxy import (  # noqa: F401 (dns, services, start_proxy: the fixtures)
    StartProxy,
    configure_network,
    dns,
    services,
    start_proxy,
)
from tests.lab.test_example_probes import example_container, get


def test_the_dns_proxy_examples_probes_answer_on_the_admin_port(start_proxy: StartProxy, dns: DnsServer,
                                                               lab: Lab) -> None:
    container = example_container("dns-proxy.yaml")
    env = {item["name"]: item["value"] for item in container["env"]}
    dns.set("db.example.com", DEST_IPS[1])
    configure_network(lab)  # what the example's init container does
    start_proxy(env.pop("EGRESS_DNS_PROXY_DESTINATION").rstrip("\n"), network=False, **env)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert get(lab, ports[action["port"]], action["path"])[0] == 200, probe
    status, metrics = get(lab, ports["metrics"], "/metrics")
    assert status == 200 and "egress_router_build_info{" in metrics
