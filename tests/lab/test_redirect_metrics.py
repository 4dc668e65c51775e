"""Redirect (legacy) mode's /metrics against the traffic sent through it: per-rule connections exactly, bytes
within the first packets' header sizes, the SNAT rule, conntrack, announcements, reloads and drift repairs, and
/healthz while a repair fails; scraped from the client namespace, through the pod interface a fallback rule
would otherwise redirect."""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egress_router.lab import DEST_IPS, DEST_IPS6, ROUTER_POD_IP, ROUTER_POD_IP6, Lab
from tests.lab.test_live_legacy import Router, Volume, eventually, legacy_routers

A, B, C = DEST_IPS
A6, B6, C6 = DEST_IPS6
PORT = 9253
RULES = f"80 tcp {A}\n53 udp {A} 5353\n{C}\n"  # the fallback's server C answers TCP 7000 and UDP 7001
PAYLOAD = b"hello\n"  # what lab.request sends in its one UDP datagram
IPV4, IPV6, UDP = 20, 40, 8  # header sizes; a TCP header is 20 bytes plus up to 40 of options
TCP_MIN, TCP_MAX = 20, 60
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
StartRouter = Callable[..., Router]


@pytest.fixture
def start_router(lab: Lab) -> Iterator[StartRouter]:
    yield from legacy_routers(lab, lambda **extra: lab.router_env("", **extra))


@pytest.fixture
def start_router6(lab6: Lab) -> Iterator[StartRouter]:
    yield from legacy_routers(lab6, lambda **extra: lab6.router_env6("", **extra))


# ---------------------------------------------------------------- scraping, and a small parser

def get(lab: Lab, path: str, host: str = ROUTER_POD_IP) -> tuple[int, str]:
    """One HTTP GET to the admin port from the client namespace: the status and the body."""
    with lab.entered("client"):
        sock = socket.create_connection((host, PORT), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> Samples:
    """Prometheus text to {(name, labels): value}; every sample's family has its HELP and TYPE, each series
    appears once, and the labels parse whole."""
    samples: Samples = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
        else:
            found = SAMPLE.match(line)
            assert found, f"not a sample line: {line!r}"
            name, labels_text, value = found.groups()
            labels = tuple(LABEL.findall(labels_text or ""))
            assert ",".join(f'{k}="{v}"' for k, v in labels) == (labels_text or ""), line
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
            assert family in typed and family in helped, f"{name} has no TYPE or HELP"
            assert (name, labels) not in samples, f"{line!r} appears twice"
            samples[(name, labels)] = float(value)
    return samples


def scrape(lab: Lab, host: str = ROUTER_POD_IP) -> Samples:
    status, body = get(lab, "/metrics", host)
    assert status == 200, body
    return parse(body)


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    found = [v for (n, ls), v in samples.items() if n == name and tuple(sorted(ls)) == wanted]
    assert len(found) == 1, f"{name}{labels} not in the scrape: {sorted(k for k in samples if k[0] == name)}"
    return found[0]


def redirect(samples: Samples, kind: str, family: str, protocol: str, port: str, destination: str) -> float:
    return value(samples, f"egress_router_redirect_{kind}_total", family=family, protocol=protocol, port=port,
                 destination=destination)


def snat(samples: Samples, kind: str, family: str, source: str) -> float:
    return value(samples, f"egress_router_snat_{kind}_total", family=family, interface="macvlan0", source=source)


def send(lab: Lab, host: str, tcp80: int, udp53: int, fallback: int) -> None:
    """TCP connections to port 80, UDP flows (a new source port each) to 53, TCP connections to the fallback."""
    for proto, port, count in (("tcp", 80, tcp80), ("udp", 53, udp53), ("tcp", 7000, fallback)):
        for _ in range(count):
            lab.request(proto, host, port)


def scraped_until(lab: Lab, check: Callable[[Samples], bool], timeout: float = 10.0,
                  host: str = ROUTER_POD_IP) -> Samples:
    found: list[Samples] = []

    def holds() -> bool:
        found[:] = [scrape(lab, host)]
        return check(found[0])

    assert eventually(holds, timeout) is not None, f"not within {timeout} s: {found}"
    return found[0]


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_each_rule_counts_the_connections_sent_through_it(served: Lab, start_router: StartRouter,
                                                          backend: str) -> None:
    start_router(EGRESS_DESTINATION=RULES, EGRESS_METRICS_PORT=str(PORT), EGRESS_IPTABLES=backend)
    assert "EGRESS-ROUTER-DNAT" in served.exec("router", [f"iptables-{backend}-save"], check=True).stdout
    before = scrape(served)  # the scrapes themselves go to the router: no rule counts them
    for protocol, port, destination in (("tcp", "80", A), ("udp", "53", f"{A}:5353"), ("all", "", C)):
        assert redirect(before, "packets", "4", protocol, port, destination) == 0
    assert snat(before, "packets", "4", "192.0.2.99") == 0
    tcp80, udp53, fallback = 7, 5, 3
    send(served, ROUTER_POD_IP, tcp80, udp53, fallback)
    after = scrape(served)
    assert redirect(after, "packets", "4", "tcp", "80", A) == tcp80
    assert redirect(after, "packets", "4", "udp", "53", f"{A}:5353") == udp53
    assert redirect(after, "packets", "4", "all", "", C) == fallback
    syn = redirect(after, "bytes", "4", "tcp", "80", A)
    assert tcp80 * (IPV4 + TCP_MIN) <= syn <= tcp80 * (IPV4 + TCP_MAX), syn
    assert redirect(after, "bytes", "4", "udp", "53", f"{A}:5353") == udp53 * (IPV4 + UDP + len(PAYLOAD))
    other = redirect(after, "bytes", "4", "all", "", C)
    assert fallback * (IPV4 + TCP_MIN) <= other <= fallback * (IPV4 + TCP_MAX), other
    # every redirected connection left through macvlan0 from the reserved address, with the same first packet
    assert snat(after, "packets", "4", "192.0.2.99") == tcp80 + udp53 + fallback
    assert snat(after, "bytes", "4", "192.0.2.99") == sum(redirect(after, "bytes", "4", *rule) for rule in (
        ("tcp", "80", A), ("udp", "53", f"{A}:5353"), ("all", "", C)))
    assert value(after, "egress_router_conntrack_entries") >= tcp80 + udp53 + fallback
    limit = served.read_sysctl("router", "net.netfilter.nf_conntrack_max")
    assert value(after, "egress_router_conntrack_limit") == int(limit)
    assert value(after, "egress_router_redirect_counter_read_failures_total") == 0
    # set-up's announcement and the one repeated once switches have settled
    scraped_until(served, lambda s: value(s, "egress_router_announcements_total", family="4") == 2)
    status, body = get(served, "/metrics")
    assert "only the first packet of a connection" in body


def test_a_reload_is_counted_and_its_new_rule_counts_at_once(served: Lab, start_router: StartRouter,
                                                            tmp_path: Path) -> None:
    volume = Volume(tmp_path, RULES)
    start_router(EGRESS_DESTINATION_FILE=volume.path, EGRESS_METRICS_PORT=str(PORT))
    send(served, ROUTER_POD_IP, 2, 0, 0)
    assert redirect(scrape(served), "packets", "4", "tcp", "80", A) == 2
    volume.update(f"8080 tcp {B} 80\n{RULES}")
    reloaded = scraped_until(served, lambda s: value(s, "egress_router_reloads_total", result="applied") == 1)
    assert redirect(reloaded, "packets", "4", "tcp", "8080", f"{B}:80") == 0
    for _ in range(4):
        assert served.request("tcp", ROUTER_POD_IP, 8080).landed == f"{B}:80"
    after = scrape(served)
    assert redirect(after, "packets", "4", "tcp", "8080", f"{B}:80") == 4
    # the chain was rewritten whole: the old rule's counter started again, as the HELP text says
    assert redirect(after, "packets", "4", "tcp", "80", A) == 0
    assert value(after, "egress_router_reloads_total", result="failed") == 0
    volume.update(f"8080 tcp {B} 80\n81 tcp 203.0.113\n")
    scraped_until(served, lambda s: value(s, "egress_router_reloads_total", result="failed") == 1)


FAILING = """#!/bin/sh
# {name}, made to fail while {flag} exists (when called with {when})
if [ -e {flag} ] && [ "$*" {test} "{when}" ]; then echo "{name} made to fail by the test" >&2; exit 1; fi
exec {real} "$@"
"""


def failing_tool(directory: Path, name: str, flag: Path, when: str = "") -> str:
    """A PATH entry holding a wrapper of the iptables tool `name` that fails while `flag` exists (only when
    called with the arguments `when`, if given); returns the PATH to start the router with."""
    real = shutil.which(name)
    assert real is not None
    directory.mkdir(exist_ok=True)
    wrapper = directory / name
    wrapper.write_text(FAILING.format(name=name, flag=flag, real=real, when=when, test="=" if when else "!="),
                       encoding="utf-8")
    wrapper.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}"


def test_drift_repairs_are_counted_and_healthz_fails_while_one_fails(served: Lab, start_router: StartRouter,
                                                                    tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    path = failing_tool(tmp_path / "bin", "iptables-nft-restore", flag)
    router = start_router(EGRESS_DESTINATION=RULES, EGRESS_METRICS_PORT=str(PORT), EGRESS_IPTABLES="nft",
                          EGRESS_ROUTER_DRIFT_SECONDS="0.3", PATH=path)
    assert get(served, "/healthz") == (200, "ok\n")
    flag.touch()
    served.exec("router", ["iptables", "-t", "nat", "-F", "EGRESS-ROUTER-DNAT"], check=True)
    assert eventually(lambda: get(served, "/healthz")[0] == 503, 10.0) is not None, router.stderr
    status, body = get(served, "/healthz")
    assert status == 503 and body.startswith("drift repair failed: "), body
    assert "iptables-nft-restore made to fail by the test" in body, body
    failing = scrape(served)
    assert value(failing, "egress_router_drift_repair_failures_total") >= 1
    assert value(failing, "egress_router_drift_repairs_total") == 0
    assert not [key for key in failing if key[0] == "egress_router_redirect_packets_total"]  # the chain is empty
    flag.unlink()
    assert eventually(lambda: get(served, "/healthz") == (200, "ok\n"), 10.0) is not None, router.stderr
    repaired = scrape(served)
    assert value(repaired, "egress_router_drift_repairs_total") == 1
    assert redirect(repaired, "packets", "4", "tcp", "80", A) == 0  # the rules are back, counting again
    send(served, ROUTER_POD_IP, 1, 0, 0)
    assert redirect(scrape(served), "packets", "4", "tcp", "80", A) == 1


def test_a_failed_counter_read_is_counted_and_the_rest_still_served(served: Lab, start_router: StartRouter,
                                                                     tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    path = failing_tool(tmp_path / "bin", "iptables-nft-save", flag, when="-c -t nat")  # the drift checks' reads work
    router = start_router(EGRESS_DESTINATION=RULES, EGRESS_METRICS_PORT=str(PORT), EGRESS_IPTABLES="nft", PATH=path)
    send(served, ROUTER_POD_IP, 1, 0, 0)
    flag.touch()
    for scrapes in (1, 2, 3):
        failing = scrape(served)
        assert value(failing, "egress_router_redirect_counter_read_failures_total") == scrapes
        assert not [key for key in failing if key[0].startswith(("egress_router_redirect_packets",
                                                                  "egress_router_snat_"))]
        assert value(failing, "egress_router_conntrack_entries") >= 1  # the rest of the scrape is there
    warnings = [line for line in router.lines() if "Reading the NAT rules' counters" in line]
    assert len(warnings) == 1 and "iptables-nft-save -c -t nat failed: iptables-nft-save made to fail by the test" \
        in warnings[0], warnings  # logged once, counted every time
    flag.unlink()
    working = scrape(served)
    assert redirect(working, "packets", "4", "tcp", "80", A) == 1
    assert value(working, "egress_router_redirect_counter_read_failures_total") == 3
    assert "works again" in router.wait_log("Reading the NAT rules' counters works again")
    assert get(served, "/healthz") == (200, "ok\n")  # a metrics problem is not a routing problem


RULES6 = f"80 tcp {A}\n80 tcp {A6}\n53 udp {A6} 5353\n{C}\n{C6}\n"


def test_ipv6_rules_count_their_connections(served6: Lab, start_router6: StartRouter) -> None:
    start_router6(EGRESS_DESTINATION=RULES6, EGRESS_METRICS_PORT=str(PORT))
    tcp80, udp53, fallback = 4, 6, 2
    send(served6, ROUTER_POD_IP6, tcp80, udp53, fallback)
    after = scrape(served6, ROUTER_POD_IP6)  # over IPv6: ip6tables' DNAT chain leaves the admin port alone too
    assert redirect(after, "packets", "6", "tcp", "80", A6) == tcp80
    assert redirect(after, "packets", "6", "udp", "53", f"[{A6}]:5353") == udp53
    assert redirect(after, "packets", "6", "all", "", C6) == fallback
    syn = redirect(after, "bytes", "6", "tcp", "80", A6)
    assert tcp80 * (IPV6 + TCP_MIN) <= syn <= tcp80 * (IPV6 + TCP_MAX), syn
    assert redirect(after, "bytes", "6", "udp", "53", f"[{A6}]:5353") == udp53 * (IPV6 + UDP + len(PAYLOAD))
    assert snat(after, "packets", "6", "2001:db8:2::99") == tcp80 + udp53 + fallback
    # nothing went through IPv4
    assert redirect(after, "packets", "4", "tcp", "80", A) == 0 and redirect(after, "packets", "4", "all", "", C) == 0
    assert snat(after, "packets", "4", "192.0.2.99") == 0
    send(served6, ROUTER_POD_IP, 1, 0, 0)
    assert redirect(scrape(served6), "packets", "4", "tcp", "80", A) == 1
    scraped_until(served6, lambda s: value(s, "egress_router_announcements_total", family="6") == 2)
