"""The DNS proxy's admin port for real: per-forward counts scraped from /metrics match the traffic sent (connections
by result exactly, bytes exactly), backend health, /healthz and /ready, with one and two workers, across a reload."""

# ruff: noqa: F811 (the tests take the imported fixtures by their names)

from __future__ import annotations

import platform
import re
import socket
from pathlib import Path

import pytest

from egress_router import __version__
from egress_router.lab import ROUTER_POD_IP, Lab
from tests.lab.dnsserver import DnsServer
from tests.lab.reloadlib import RuleVolume, wait_until
from tests.lab.test_dns_proxy import (  # noqa: F401 (dns, services, start_proxy: the fixtures)
    NAME,
    READY_PORT,
    A,
    B,
    C,
    Conn,
    Proxy,
    Services,
    StartProxy,
    dns,
    refused_at_once,
    services,
    start_proxy,
    whoami,
)

ADMIN = 9253
NOWHERE = "nx.example.test"  # the test DNS server answers NXDOMAIN
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------ the admin port, read as a scraper reads it

def get(lab: Lab, path: str, port: int = ADMIN) -> tuple[int, dict[str, str], str]:
    """GET `path` on the admin port from the client namespace: status, headers (lower-case names), body."""
    with lab.entered("client"):
        sock = socket.create_connection((ROUTER_POD_IP, port), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {ROUTER_POD_IP}:{port}\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(65536):  # the admin port closes every connection after its answer
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (f.split(":", 1) for f in fields)}
    assert int(headers["content-length"]) == len(body), head
    return int(status_line.split()[1]), headers, body.decode()


SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'\s*(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse(text: str) -> Samples:
    """The text exposition format (0.0.4), as far as the proxy writes it: every sample's family has its HELP and
    TYPE first, no sample twice, label values unescaped."""
    samples: Samples = {}
    declared: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            kind, name = line.split(" ", 3)[1:3]
            declared.setdefault(name, set()).add(kind)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample: {line!r}"
        labels: list[tuple[str, str]] = []
        rest = match["labels"] or ""
        while rest:
            pair = LABEL.match(rest)
            assert pair, f"bad labels in {line!r}"
            value = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], pair["value"])
            labels.append((pair["key"], value))
            rest = rest[pair.end():]
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in declared else name
        assert declared.get(family) == {"HELP", "TYPE"}, f"{name} without its HELP and TYPE"
        key = (name, frozenset(labels))
        assert key not in samples, f"twice: {line!r}"
        samples[key] = float(match["value"])
    return samples


def scrape(lab: Lab) -> Samples:
    status, headers, body = get(lab, "/metrics")
    assert status == 200, body
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body)


def value(samples: Samples, name: str, **labels: str | int) -> float | None:
    return samples.get((f"egress_router_dns_proxy_{name}", frozenset((k, str(v)) for k, v in labels.items())))


def of_forward(samples: Samples, port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {key: v for key, v in samples.items() if ("port", str(port)) in key[1]}


def settled(lab: Lab, proxy: Proxy, ports: list[int]) -> Samples:
    """A scrape once no connection through `ports` is open any more: the client has seen its end, the proxy's
    worker may count it a moment later (bounded wait)."""
    seen: list[Samples] = []

    def closed() -> bool:
        seen.append(scrape(lab))
        gauges = [v for (name, labels), v in seen[-1].items() if name == "egress_router_dns_proxy_open_connections"
                  and dict(labels)["port"] in {str(p) for p in ports}]
        return len(gauges) == len(ports) and not any(gauges)

    wait_until(closed, "no open connections", lambda: proxy.stderr)
    return seen[-1]


def echo(lab: Lab, port: int, payload: bytes) -> int:
    """One connection through an echo service: send `payload`, half-close, read to the end; bytes received."""
    with Conn(lab, port) as conn:
        conn.sock.sendall(payload)
        received = conn.finish()
    assert payload in received, received[:200]
    return len(received)


def counted(samples: Samples, port: int, target: str, family: str, key: str) -> dict[str, float | None]:
    values = {"connections_total": ("relayed", "failed", "rejected", "unresolved", "abandoned"),
              "bytes_total": ("upstream", "downstream"),
              "backend_connect_failures_total": ("refused", "unreachable", "timeout")}[family]
    return {v: value(samples, family, port=port, target=target, **{key: v}) for v in values}


# ------------------------------------------------------------------ traffic against the scrape

@pytest.mark.parametrize("workers", ["1", "2"])
def test_counts_bytes_and_health_per_forward_match_the_traffic(lab: Lab, dns: DnsServer, services: Services,
                                                               start_proxy: StartProxy, workers: str) -> None:
    for ip in (A, B):
        services.listen("dest", ip, 7000, "echo")
    dns.set(NAME, A, B)  # nothing listens on C:7001: connects there are refused
    proxy = start_proxy(f"7000 {NAME}\n7001 {C}\n7002 {NOWHERE}", EGRESS_METRICS_PORT=str(ADMIN),
                        EGRESS_DNS_PROXY_WORKERS=workers)
    sizes = [1000 * i + 7 for i in range(12)]
    down = sum(echo(lab, 7000, bytes([65 + i]) * size) for i, size in enumerate(sizes))
    for _ in range(5):
        refused_at_once(lab, 7001)
    for _ in range(3):
        refused_at_once(lab, 7002)
    samples = settled(lab, proxy, [7000, 7001, 7002])

    svc, c, nowhere = f"{NAME}:7000", f"{C}:7001", f"{NOWHERE}:7002"
    assert counted(samples, 7000, svc, "connections_total", "result") == \
        {"relayed": 12, "failed": 0, "rejected": 0, "unresolved": 0, "abandoned": 0}
    assert counted(samples, 7000, svc, "bytes_total", "direction") == {"upstream": sum(sizes), "downstream": down}
    assert counted(samples, 7000, svc, "backend_connect_failures_total", "kind") == \
        {"refused": 0, "unreachable": 0, "timeout": 0}
    assert counted(samples, 7001, c, "connections_total", "result") == \
        {"relayed": 0, "failed": 5, "rejected": 0, "unresolved": 0, "abandoned": 0}
    assert counted(samples, 7001, c, "backend_connect_failures_total", "kind") == \
        {"refused": 5, "unreachable": 0, "timeout": 0}
    assert counted(samples, 7001, c, "bytes_total", "direction") == {"upstream": 0, "downstream": 0}
    assert counted(samples, 7002, nowhere, "connections_total", "result") == \
        {"relayed": 0, "failed": 0, "rejected": 0, "unresolved": 3, "abandoned": 0}

    # health: both addresses of the name up, the refusing backend down (in whichever worker tried it)
    assert value(samples, "backend_up", port=7000, target=svc, backend=f"{A}:7000") == 1
    assert value(samples, "backend_up", port=7000, target=svc, backend=f"{B}:7000") == 1
    assert value(samples, "backend_up", port=7001, target=c, backend=f"{C}:7001") == 0
    forwards = ((7000, svc), (7001, c), (7002, nowhere))
    assert [value(samples, "healthy_backends", port=p, target=t) for p, t in forwards] == [2, 0, 0]
    assert value(samples, "backends", port=7002, target=nowhere) == 0
    # DNS: the name answered (once per worker at least), the other one not found and failing now
    assert (value(samples, "dns_lookups_total", port=7000, target=svc, result="answered") or 0) >= int(workers)
    assert value(samples, "dns_lookups_total", port=7000, target=svc, result="not_found") == 0
    assert (value(samples, "dns_lookups_total", port=7002, target=nowhere, result="not_found") or 0) >= int(workers)
    assert value(samples, "dns_lookups_total", port=7002, target=nowhere, result="answered") == 0
    assert [value(samples, "dns_failing", port=p, target=t) for p, t in forwards] == [0, 0, 1]
    assert value(samples, "forwards") == 4  # the three and the fixture's readiness forward
    assert samples[("egress_router_build_info", frozenset({("version", __version__), ("mode", "dns-proxy"),
                                                           ("python", platform.python_version())}))] == 1
    assert not [key for key in samples if ("port", "other") in key[1]]

    # probes: alive and ready although one forward has no healthy backend and another no address at all
    assert get(lab, "/healthz")[:1] == (200,) and get(lab, "/healthz")[2] == "ok\n"
    assert get(lab, "/ready")[0] == 200


# ------------------------------------------------------------------ a reload

@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_keeps_the_counts_of_unchanged_forwards(lab: Lab, services: Services, start_proxy: StartProxy,
                                                         tmp_path: Path, workers: str) -> None:
    services.listen("dest", A, 7000, "echo")
    services.listen("dest", B, 7001, "whoami")
    services.listen("dest", C, 7000, "whoami")
    services.listen("dest", C, 7002, "whoami")
    ready = f"{READY_PORT} {A}\n"
    volume = RuleVolume(tmp_path, "forwards", f"7000 {A}\n7001 {B}\n7003 {A} 7000\n{ready}")
    proxy = start_proxy("", EGRESS_DNS_PROXY_DESTINATION="", EGRESS_DNS_PROXY_DESTINATION_FILE=volume.path,
                        EGRESS_METRICS_PORT=str(ADMIN), EGRESS_ROUTER_DEBUG="1", EGRESS_DNS_PROXY_WORKERS=workers)
    wait_until(lambda: "start-up check: " in proxy.stderr, "the start-up check", lambda: proxy.stderr)
    down = sum(echo(lab, 7000, b"x" * size) for size in (10, 2000, 30000))
    for _ in range(2):
        assert whoami(lab, 7001)[0] == B
    echo(lab, 7003, b"y" * 5)
    before = settled(lab, proxy, [7000, 7001, 7003])
    unchanged = of_forward(before, 7000)
    assert counted(before, 7000, f"{A}:7000", "bytes_total", "direction") == {"upstream": 32010, "downstream": down}
    assert value(before, "connections_total", port=7001, target=f"{B}:7001", result="relayed") == 2

    volume.swap(f"7000 {A}\n7002 {C}\n7003 {C} 7000\n{ready}")  # 7001 out, 7002 in, 7003 to another host
    wait_until(lambda: value(scrape(lab), "forwards") == 4 and bool(of_forward(scrape(lab), 7002)),
               "the reload in the metrics", lambda: proxy.stderr)
    after = scrape(lab)
    assert of_forward(after, 7000) == unchanged  # every series of the unchanged forward, value for value
    assert of_forward(after, 7001) == {}  # a removed forward's series leave with it
    assert {dict(labels)["target"] for _, labels in of_forward(after, 7003)} == {f"{C}:7000"}
    assert value(after, "connections_total", port=7003, target=f"{C}:7000", result="relayed") == 0
    assert value(after, "connections_total", port=7002, target=f"{C}:7002", result="relayed") == 0

    assert whoami(lab, 7002)[0] == C and whoami(lab, 7003)[0] == C
    echo(lab, 7000, b"z" * 100)
    later = settled(lab, proxy, [7000, 7002, 7003])
    assert value(later, "connections_total", port=7000, target=f"{A}:7000", result="relayed") == 4
    assert value(later, "bytes_total", port=7000, target=f"{A}:7000", direction="upstream") == 32110
    assert value(later, "connections_total", port=7002, target=f"{C}:7002", result="relayed") == 1
    assert value(later, "connections_total", port=7003, target=f"{C}:7000", result="relayed") == 1
    assert value(later, "reloads_total", result="applied") == 1

    volume.swap(f"7000 {A}\n7001 {B}\n{ready}")  # 7001 back: its old slot was freed, it starts from zero
    wait_until(lambda: bool(of_forward(scrape(lab), 7001)), "the second reload in the metrics", lambda: proxy.stderr)
    again = scrape(lab)
    assert value(again, "connections_total", port=7001, target=f"{B}:7001", result="relayed") == 0
    assert of_forward(again, 7002) == {} and of_forward(again, 7003) == {}
    assert value(again, "connections_total", port=7000, target=f"{A}:7000", result="relayed") == 4
