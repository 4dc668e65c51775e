"""EGRESS_LOG_FORMAT=json in every mode (each stderr line one JSON object, the workers' too) and the HTTP
proxy's squid access log for real requests, in the lab."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from egress_router.lab import DEST_IPS, Lab, router_command
from tests.lab import test_dns_proxy as dnsproxy
from tests.lab import test_http_proxy as httpproxy
from tests.lab.dnsserver import DnsServer, serving
from tests.lab.origin import ECHO_TAIL, Origin
from tests.lab.proxyproc import ProxyProcess, check_stopped, proxy_env, spawn_proxy
from tests.lab.test_live_legacy import Router

WWW, API, INTERNAL = httpproxy.WWW, httpproxy.API, httpproxy.INTERNAL
CLIENT_IP = "198.51.100.2"
RULES = f"!{INTERNAL}/32\n*.example.com"
JSON_KEYS = {"time", "level", "logger", "message"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# logformat squid %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt
SQUID = re.compile(r"^(?P<time>\d{9,}\.\d{3}) (?P<elapsed>[ \d]{5}\d) (?P<client>\S+) (?P<action>[A-Z_]+)/"
                   r"(?P<code>\d{3}) (?P<size>\d+) (?P<method>[A-Z]+) (?P<url>\S+) (?P<user>\S+) "
                   r"(?P<hierarchy>HIER_[A-Z_]+)/(?P<peer>\S+) (?P<type>\S+)$")


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Every line parsed, and each an object with the keys and an RFC 3339 UTC time with milliseconds."""
    assert lines, "no output at all"
    parsed = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not one JSON object: {line!r}\nall output:\n" + "\n".join(lines))
        assert isinstance(record, dict) and record.keys() >= JSON_KEYS, line
        assert TIME.fullmatch(record["time"]), line
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), line
        parsed.append(record)
    return parsed


def messages(proxy: ProxyProcess) -> list[str]:
    return [record["message"] for record in json_lines(proxy.lines())]


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


# ------------------------------------------------------------------ init, its errors, legacy

def test_init_mode_logs_json_lines_and_its_errors_too(served: Lab) -> None:
    result = served.run_router(served.router_env(EGRESS_LOG_FORMAT="json"))
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stderr.splitlines())
    assert any(r["message"].startswith("Ready:") and r["level"] == "info" for r in records), result.stderr
    assert {r["logger"].split(".")[0] for r in records} == {"egress_router"}

    # a configuration error: one JSON line naming the variable, nothing else on stderr, exit 1
    bad = served.run_router(served.router_env(EGRESS_LOG_FORMAT="json", EGRESS_SOURCE="192.0.2.999"))
    assert bad.returncode == 1 and bad.stdout == ""
    [error] = json_lines(bad.stderr.splitlines())
    assert error["level"] == "error" and error["fields"] == {"variable": "EGRESS_SOURCE"}, error
    assert error["message"].startswith("EGRESS_SOURCE: ") and "192.0.2.999" in error["message"], error
    # a set-up error (the environment, not a variable): the same
    missing = served.run_router(served.router_env(EGRESS_LOG_FORMAT="json", EGRESS_INTERFACE="nosuch0"))
    assert missing.returncode == 1
    assert [r["level"] for r in json_lines(missing.stderr.splitlines())][-1] == "error", missing.stderr
    assert "nosuch0" in missing.stderr
    # the default stays text
    text = served.run_router(served.router_env(EGRESS_SOURCE="192.0.2.999"))
    assert text.stderr.startswith("error: EGRESS_SOURCE: ") and text.stderr.count("\n") == 1, text.stderr


def test_legacy_mode_logs_json_lines_until_it_stops(served: Lab) -> None:
    env = served.router_env(mode="legacy", EGRESS_LOG_FORMAT="json")
    router = Router(served, served.spawn("router", router_command(), env=env), 3.0)
    try:
        router.wait_log(r'"message": "Ready:')
    finally:
        problems = router.stop_and_check()
    assert not problems, problems
    assert any(m.startswith("Ready:") for m in messages(router))


# ------------------------------------------------------------------ the HTTP proxy

StartHttp = Callable[..., httpproxy.Proxy]


@pytest.fixture
def start_http(lab: Lab, origin: Origin) -> Iterator[StartHttp]:
    """HTTP proxies (proxy only: the network configured first, as by an init container); each must stop
    cleanly (no traceback in its output) at teardown."""
    lab.etc_file("router", "hosts", httpproxy.HOSTS)
    lab.etc_file("router", "resolv.conf", httpproxy.RESOLV)
    httpproxy.configure_network(lab)
    started: list[ProxyProcess] = []

    def start(**variables: str) -> httpproxy.Proxy:
        env = httpproxy.http_proxy_env(RULES, network=False, port=httpproxy.PORT, variables=variables)
        proxy = httpproxy.Proxy(lab, spawn_proxy(lab, env), httpproxy.PORT, 5.0)
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    yield start
    check_stopped(started)


def traffic(lab: Lab) -> tuple[str, bytes]:
    """A curl GET (its reply's size: head and body as curl counts them), a refused GET, a CONNECT tunnel
    (what came back through it)."""
    result = httpproxy.curl(lab, "-o", "/dev/null", "-w", "%{http_code} %{size_header} %{size_download}",
                            "http://www.example.com/hello?token=secret")
    code, header, body = result.stdout.split()
    assert code == "200", result.stderr
    assert httpproxy.fetch(lab, "http://internal.example.com/hello").status == 403
    with httpproxy.Client(lab) as client:
        head = httpproxy.connect(client, "api.example.com:7000")
        assert head.status == 200
        client.send(b"through the tunnel\n")
        client.sock.shutdown(socket.SHUT_WR)
        back = client.reader.read()
    assert back == b"through the tunnel\n" + ECHO_TAIL
    return str(int(header) + int(body)), head.head + back


def test_http_proxy_json_lines_from_two_workers(lab: Lab, start_http: StartHttp) -> None:
    proxy = start_http(EGRESS_LOG_FORMAT="json", EGRESS_HTTP_PROXY_WORKERS="2")
    assert len(proxy.children()) == 2, "two forked workers"
    traffic(lab)

    def access() -> list[dict[str, Any]]:
        return [r for r in json_lines(proxy.lines()) if r.get("fields", {}).get("client", "").startswith(CLIENT_IP)
                and not r["fields"]["target"].startswith("/")]

    assert eventually(lambda: len(access()) >= 3), proxy.stderr
    assert proxy.stop() == 0
    lines = access()
    by_method = {(r["fields"]["method"], r["fields"]["verdict"], r["fields"]["status"]) for r in lines}
    assert by_method == {("GET", "allowed", 200), ("GET", "denied", 403), ("CONNECT", "allowed", 200)}, lines
    tunnel = next(r for r in lines if r["fields"]["method"] == "CONNECT")
    assert tunnel["fields"]["bytes_down"] == len(b"through the tunnel\n" + ECHO_TAIL)
    assert tunnel["logger"] == "egress_router.proxy.http"
    json_lines(proxy.lines())  # every line, the master's start and stop included


def test_http_proxy_squid_access_log(lab: Lab, start_http: StartHttp) -> None:
    proxy = start_http(EGRESS_HTTP_PROXY_ACCESS_LOG="squid")
    before = time.time()
    size, tunnel_bytes = traffic(lab)

    def squid() -> list[re.Match[str]]:
        return [m for line in proxy.lines() if (m := SQUID.match(line)) and m["client"] == CLIENT_IP
                and not m["url"].startswith("/")]

    assert eventually(lambda: len(squid()) >= 3), proxy.stderr
    assert proxy.stop() == 0
    got, denied, tunnel = squid()
    for match in (got, denied, tunnel):
        assert before - 1 <= float(match["time"]) <= time.time() + 1, match[0]
        assert match["user"] == "-" and int(match["elapsed"]) >= 0
    assert (got["action"], got["code"], got["method"], got["url"]) == \
        ("TCP_MISS", "200", "GET", "http://www.example.com/hello"), got[0]  # the query left out, as squid does
    assert (got["hierarchy"], got["peer"], got["type"]) == ("HIER_DIRECT", WWW, "application/octet-stream")
    assert got["size"] == size, (got[0], size)  # head and body, as curl received them
    assert (denied["action"], denied["code"], denied["url"], denied["hierarchy"], denied["peer"]) == \
        ("TCP_DENIED", "403", "http://internal.example.com/hello", "HIER_NONE", "-"), denied[0]
    assert denied["type"] == "text/plain;charset=utf-8"
    assert (tunnel["action"], tunnel["code"], tunnel["method"], tunnel["url"], tunnel["hierarchy"],
            tunnel["peer"], tunnel["type"]) == \
        ("TCP_TUNNEL", "200", "CONNECT", "api.example.com:7000", "HIER_DIRECT", API, "-"), tunnel[0]
    assert int(tunnel["size"]) == len(tunnel_bytes)
    assert not [line for line in proxy.lines() if "internal.example.com" in line and not SQUID.match(line)]


# ------------------------------------------------------------------ the DNS proxy

def test_dns_proxy_json_lines_from_two_workers(lab: Lab) -> None:
    a = DEST_IPS[0]
    started: list[ProxyProcess] = []
    lab.etc_file("router", "resolv.conf", dnsproxy.RESOLV)
    with serving(lab) as dns:
        services = dnsproxy.Services(lab)
        try:
            dns_forward(lab, dns, services, started, a)
        finally:
            services.stop()
            check_stopped(started)


def dns_forward(lab: Lab, dns: DnsServer, services: dnsproxy.Services, started: list[ProxyProcess], a: str) -> None:
    dns.set(dnsproxy.NAME, a, ttl=300)
    services.listen("dest", a, dnsproxy.READY_PORT, "whoami")
    services.listen("dest", a, 53, "whoami")
    dnsproxy.configure_network(lab)
    env = proxy_env({"EGRESS_DNS_PROXY_DESTINATION": f"53 {dnsproxy.NAME}\n{dnsproxy.READY_PORT} {a}",
                     "EGRESS_DNS_PROXY_WORKERS": "2", "EGRESS_DNS_PROXY_DEBUG": "1", "EGRESS_LOG_FORMAT": "json",
                     "EGRESS_PROXY_GRACE_SECONDS": "3"}, network=False, variables={})
    # debug=False: its readiness wait looks for the text lines; the JSON ones are checked here
    proxy = dnsproxy.Proxy(lab, spawn_proxy(lab, env), 3.0, dnsproxy.READY_PORT, False)
    started.append(proxy)
    proxy.wait_ready()
    assert len(proxy.children()) == 2, "two forked workers"
    for _ in range(4):
        assert dnsproxy.whoami(lab, 53)[0] == a

    def relayed() -> list[str]:
        return [m for m in messages(proxy) if f" -> :53 {dnsproxy.NAME}:53 -> {a}:53 " in m]

    assert eventually(lambda: len(relayed()) >= 4), proxy.stderr
    assert proxy.stop() == 0
    json_lines(proxy.lines())  # every line
