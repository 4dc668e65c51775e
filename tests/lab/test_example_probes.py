"""The examples' probes and scrape as the kubelet and Prometheus make them: a legacy-mode router started with the
environment of examples/legacy-redirect-deployment.yaml (the lab's addresses) and the HTTP proxy with that of
examples/http-proxy.yaml's proxy container, asked over the pod interface (the DNS proxy's: test_example_dns_probes)."""
# ruff: noqa: F811 (a test takes the imported start_proxy fixture by its name)

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, Lab
from tests.lab.test_http_proxy import StartProxy, start_proxy  # noqa: F401 (start_proxy: the fixture)
from tests.lab.test_live_legacy import StartRouter, eventually, legacy_routers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NETWORK = ("EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_DESTINATION")  # the lab's, not the example's addresses


def example_container(name: str) -> dict[str, Any]:
    """The long-running egress-router container of an example."""
    docs = [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text(encoding="utf-8")) if doc]
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def get(lab: Lab, port: int, path: str) -> tuple[int, str]:
    """GET from the client namespace: like the kubelet's probe, it arrives on the router's pod interface."""
    with lab.entered("client"), socket.create_connection((ROUTER_POD_IP, port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {ROUTER_POD_IP}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.decode("utf-8").partition("\r\n\r\n")
    return int(head.split(" ", 2)[1]), body


@pytest.fixture
def start_router(lab: Lab) -> Iterator[StartRouter]:
    yield from legacy_routers(lab, lambda *args, **extra: lab.router_env(*args, **extra))


RULE = f"80 tcp {DEST_IPS[0]}\n"


@pytest.mark.parametrize("destination", [RULE, f"{RULE}{DEST_IPS[2]}\n"], ids=["rules", "and-a-fallback"])
def test_the_legacy_examples_probes_and_scrape_answer(start_router: StartRouter, lab: Lab, destination: str) -> None:
    """Also with a fallback (as in egressrouter-configmap.yaml), which redirects every other port but the
    admin port's."""
    container = example_container("legacy-redirect-deployment.yaml")
    env = {item["name"]: item["value"] for item in container["env"] if item["name"] not in NETWORK}
    assert env.pop("EGRESS_ROUTER_MODE") == "legacy"
    start_router(destination, **env)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert get(lab, ports[action["port"]], action["path"]) == (200, "ok\n"), probe
    monitor = yaml.safe_load((EXAMPLES / "monitoring" / "podmonitor.yaml").read_text(encoding="utf-8"))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    status, metrics = get(lab, ports[endpoint["port"]], endpoint["path"])
    assert status == 200 and "egress_router_build_info{" in metrics
    assert "egress_router_drift_repair_failures_total 0" in metrics


def test_the_legacy_examples_readiness_fails_while_a_repair_fails(start_router: StartRouter, lab: Lab) -> None:
    """Why the legacy examples probe /healthz for readiness too: with the egress interface gone the drift repair
    fails, /healthz turns 503 (the router leaves the Service, then is restarted), while /ready stays 200."""
    container = example_container("legacy-redirect-deployment.yaml")
    env = {item["name"]: item["value"] for item in container["env"] if item["name"] not in NETWORK}
    env.pop("EGRESS_ROUTER_MODE")
    start_router(RULE, **env, EGRESS_ROUTER_DRIFT_SECONDS="0.2")
    port = {port["name"]: port["containerPort"] for port in container["ports"]}["metrics"]
    with lab.iproute("router") as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="macvlan0")[0])
    assert eventually(lambda: get(lab, port, container["readinessProbe"]["httpGet"]["path"])[0] == 503, 10.0) \
        is not None
    status, body = get(lab, port, container["livenessProbe"]["httpGet"]["path"])
    assert status == 503 and body.startswith("drift repair failed: ")
    assert get(lab, port, "/ready") == (200, "ok\n")


def test_the_http_proxy_examples_probes_answer_on_the_admin_port_only(start_proxy: StartProxy, lab: Lab) -> None:
    """The proxy container of examples/http-proxy.yaml (its init container's network part is the lab's): the
    probes' pages on the port named metrics, and the proxy port no longer shows the metrics to clients."""
    container = example_container("http-proxy.yaml")
    env = {item["name"]: item["value"] for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    start_proxy(env.pop("EGRESS_HTTP_PROXY_DESTINATION"), network=False, port=ports["proxy"], **env)
    for probe in ("readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert get(lab, ports[action["port"]], action["path"])[0] == 200, probe
    status, metrics = get(lab, ports["metrics"], "/metrics")
    assert status == 200 and "egress_router_build_info{" in metrics
    status, body = get(lab, ports["proxy"], "/metrics")
    assert status != 200 and "egress_router_" not in body

