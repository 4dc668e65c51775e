"""The HTTP proxy's admin port in the lab: its metrics against the traffic sent, kept from proxy clients, served
again by a replaced worker, and a port in use refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from egress_router.lab import SOURCE_IP, Lab, router_command
from tests.lab.origin import ECHO_TAIL, Origin, blob
from tests.lab.proxyproc import proxy_env
from tests.lab.test_http_proxy import (
    PORT,
    Client,
    StartProxy,
    assert_denied,
    connect,
    eventually,
    fetch,
    http_proxy_env,
    scrape,
)
from tests.lab.test_http_proxy import start_proxy as start_proxy  # the fixture

ADMIN = 9253
SIZES = (0, 1, 1000, 65536, 300_000)  # response bodies: empty, tiny, and bigger than one read
TUNNEL_PAYLOADS = (b"x" * 10, b"y" * 70_000)


def admin_scrape(lab: Lab) -> dict[str, float]:
    return scrape(lab, port=ADMIN)


def admin_up(lab: Lab) -> bool:
    try:
        return fetch(lab, "/healthz", port=ADMIN, timeout=1).status == 200
    except OSError:
        return False


def test_metrics_count_the_traffic_sent_over_two_workers(lab: Lab, origin: Origin, start_proxy: StartProxy) -> None:
    proxy = start_proxy("www.example.com\napi.example.com", EGRESS_METRICS_PORT=str(ADMIN),
                        EGRESS_HTTP_PROXY_WORKERS="2")
    assert eventually(lambda: admin_up(lab), timeout=5), proxy.stderr
    before = admin_scrape(lab)
    assert before['egress_router_http_requests_total{verdict="allowed"}'] == 0
    for size in SIZES:
        response = fetch(lab, f"http://www.example.com/blob?size={size}")
        assert response.status == 200 and response.body == blob(size), size
    for _ in range(3):
        assert_denied(fetch(lab, "http://internal.example.com/hello"), "internal.example.com")
    for payload in TUNNEL_PAYLOADS:
        with Client(lab) as client:
            assert connect(client, "api.example.com:7000").status == 200
            client.send(payload)
            assert client.reader.read(len(payload)) == payload
            client.sock.shutdown(socket.SHUT_WR)
            assert client.reader.read() == ECHO_TAIL
    # the tunnels' last bytes are counted as they pass, and the second worker's row is read as well
    assert eventually(lambda: admin_scrape(lab)['egress_router_http_open_connections'] == 0)
    after = admin_scrape(lab)
    assert after['egress_router_http_requests_total{verdict="allowed"}'] == len(SIZES) + len(TUNNEL_PAYLOADS)
    assert after['egress_router_http_requests_total{verdict="denied"}'] == 3
    assert after["egress_router_http_tunnels_total"] == len(TUNNEL_PAYLOADS)
    payload_bytes = sum(map(len, TUNNEL_PAYLOADS))
    assert after['egress_router_http_bytes_total{direction="upstream"}'] == payload_bytes
    assert after['egress_router_http_bytes_total{direction="downstream"}'] == \
        sum(SIZES) + payload_bytes + len(TUNNEL_PAYLOADS) * len(ECHO_TAIL)
    # every answered request in the histogram (the denied ones too), the tunnels as connects; probes not
    assert after['egress_router_http_request_duration_seconds_count{kind="request"}'] == len(SIZES) + 3
    assert after['egress_router_http_request_duration_seconds_count{kind="connect"}'] == len(TUNNEL_PAYLOADS)
    assert after['egress_router_http_request_duration_seconds_bucket{kind="request",le="+Inf"}'] == len(SIZES) + 3
    assert 0 < after['egress_router_http_request_duration_seconds_sum{kind="request"}'] < 10
    assert after['egress_router_build_info{version="0.1.0",python="' +
                 next(k.split('python="')[1].split('"')[0] for k in after if k.startswith("egress_router_build_info"))
                 + '",mode="http-proxy"}'] == 1
    # the master and both workers: three processes' memory, at least 3 x 10 MiB
    assert after["process_resident_memory_bytes"] > 30 * 2 ** 20
    assert after["process_open_fds"] > 10


def test_the_proxy_port_keeps_the_metrics_from_its_clients(lab: Lab, origin: Origin,
                                                          start_proxy: StartProxy) -> None:
    start_proxy("www.example.com", EGRESS_METRICS_PORT=str(ADMIN))
    assert eventually(lambda: admin_up(lab), timeout=5)
    kept = fetch(lab, "/metrics", port=PORT)
    assert kept.status == 404 and kept.text == f"the metrics are served on the admin port ({ADMIN})\n"
    assert fetch(lab, "/healthz", port=PORT).status == 200  # probes of the proxy port keep working
    assert fetch(lab, "/ready", port=ADMIN).text == "ok\n"
    assert fetch(lab, "/nothing", port=ADMIN).status == 404


def test_without_admin_port_the_proxy_port_serves_them(lab: Lab, origin: Origin, start_proxy: StartProxy) -> None:
    start_proxy("www.example.com", EGRESS_METRICS_PORT="off")
    assert fetch(lab, "/metrics", port=PORT).status == 200
    assert 'egress_router_http_request_duration_seconds_count{kind="request"}' in scrape(lab, port=PORT)
    assert not admin_up(lab)


def test_a_replaced_first_worker_serves_the_admin_port_again(lab: Lab, origin: Origin,
                                                             start_proxy: StartProxy) -> None:
    proxy = start_proxy("www.example.com", EGRESS_METRICS_PORT=str(ADMIN), EGRESS_HTTP_PROXY_WORKERS="2")
    assert eventually(lambda: admin_up(lab), timeout=5)
    for _ in range(4):
        assert fetch(lab, "http://www.example.com/hello").status == 200
    listening = lab.exec("router", ["ss", "-Htlnp", "sport", f"= :{ADMIN}"], check=True).stdout
    first = int(listening.split("pid=")[1].split(",")[0])
    assert first in proxy.children()
    os.kill(first, signal.SIGKILL)
    assert eventually(lambda: len(proxy.children()) == 2 and first not in proxy.children(), timeout=5)
    assert eventually(lambda: admin_up(lab), timeout=5), proxy.stderr
    # the replaced worker's counts stay (its row in shared memory): the four requests are all still there
    assert admin_scrape(lab)['egress_router_http_requests_total{verdict="allowed"}'] == 4
    proxy.remember_workers()


@pytest.mark.parametrize("mode", ["http-proxy", "dns-proxy"])
def test_an_admin_port_in_use_stops_the_proxy_before_it_changes_anything(lab: Lab, origin: Origin, mode: str) -> None:
    with lab.entered("router"):
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with taken:
        taken.bind(("0.0.0.0", ADMIN))
        taken.listen()
        admin = {"EGRESS_METRICS_PORT": str(ADMIN)}
        env = http_proxy_env("www.example.com", network=True, port=PORT, variables=admin) if mode == "http-proxy" \
            else proxy_env({"EGRESS_DNS_PROXY_DESTINATION": f"{PORT} 203.0.113.10 80"}, network=True, variables=admin)
        done = lab.exec("router", router_command(), env=env, etc=True, timeout=30)
    assert done.returncode == 1, done
    assert done.stderr == f"error: the admin port {ADMIN} (EGRESS_METRICS_PORT) cannot be opened: it is in use; " \
        "choose another port, or off\n"
    assert SOURCE_IP not in lab.exec("router", ["ip", "-4", "addr"], check=True).stdout  # the network untouched
    assert lab.exec("router", ["ss", "-Htln", "sport", f"= :{PORT}"], check=True).stdout == ""
