"""The DNS proxy's backend connect path for real (issue 16 made it cheaper): every outcome of a connect counted in
exactly one cell (relayed, failed, abandoned; timeouts), a client that leaves while its connect is pending, the
per-backend open counts that balancing reads left even after timeouts, and the FINs passed on with the fewest
shutdowns (strace on the worker) while a real half-close stays one."""

# ruff: noqa: F811 (the tests take the imported fixtures by their names)

from __future__ import annotations

import socket
import struct
import subprocess
import time

from egress_router.lab import Lab
from tests.lab.dnsserver import DnsServer
from tests.lab.reloadlib import wait_until
from tests.lab.test_dns_metrics import ADMIN, counted, scrape, settled, value
from tests.lab.test_dns_proxy import (  # noqa: F401 (dns, services, start_proxy: the fixtures)
    POOL,
    TAIL,
    A,
    B,
    Conn,
    Services,
    StartProxy,
    dns,
    drop_syns,
    refused_at_once,
    services,
    start_proxy,
    whoami,
)

TIMEOUT = 3  # EGRESS_DNS_PROXY_CONNECT_TIMEOUT: a SYN retransmitted after 1 s still gets through within it


def leave(conn: Conn) -> None:
    """The client goes away: its close() sends a reset."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_connect_outcomes_are_counted_once_each_and_balancing_stays_even(lab: Lab, dns: DnsServer, services: Services,
                                                                         start_proxy: StartProxy) -> None:
    for ip in (A, B):
        services.listen("dest", ip, 7000, "whoami")
    drop_syns(lab, B, 7000)
    dns.set(POOL, A, B, ttl=300)
    proxy = start_proxy(f"7000 {POOL}\n7001 {B} 7000", EGRESS_DNS_PROXY_CONNECT_TIMEOUT=str(TIMEOUT),
                        EGRESS_METRICS_PORT=str(ADMIN))
    proxy.wait_resolved(7000, POOL)
    pool, only_b = f"{POOL}:7000", f"{B}:7000"

    def open_now(port: int) -> float | None:
        return value(scrape(lab), "open_connections", port=port, target=pool if port == 7000 else only_b)

    # a name with a backend whose connects time out: retried on the other one, the client sees no failure
    relayed = 0
    while "Port 7000: backend" not in proxy.stderr:
        assert whoami(lab, 7000)[0] == A
        relayed += 1
    proxy.wait_log(rf"Port 7000: backend {B}:7000 failed \(connect timed out\)")
    # one backend only: the client is closed after the timeout (failed)
    started = time.monotonic()
    refused_at_once(lab, 7001)
    assert time.monotonic() - started > TIMEOUT - 0.5
    # the client leaves (a reset: a FIN is only its half-close) while its connect is pending, which then times
    # out: abandoned, not failed
    with Conn(lab, 7001) as conn:
        wait_until(lambda: open_now(7001) == 1, "the proxy took the connection", lambda: proxy.stderr)
        leave(conn)
    wait_until(lambda: counted(scrape(lab), 7001, only_b, "connections_total", "result")["abandoned"] == 1,
               "the abandoned connect counted", lambda: proxy.stderr, timeout=TIMEOUT + 3)
    # the client leaves while its connect is pending, which then succeeds (the SYN retried after 1 s gets
    # through): relayed, and the backend connection is closed at once
    with Conn(lab, 7001) as conn:
        wait_until(lambda: open_now(7001) == 1, "the proxy took the connection", lambda: proxy.stderr)
        leave(conn)
    wait_until(lambda: open_now(7001) == 0, "the proxy saw the client leave", lambda: proxy.stderr)
    drop_syns(lab, B, 7000, "-D")
    wait_until(lambda: counted(scrape(lab), 7001, only_b, "connections_total", "result")["relayed"] == 1,
               "the late connect counted", lambda: proxy.stderr, timeout=TIMEOUT + 1)
    wait_until(lambda: services.open_count(B) == 0, "the backend connection closed", lambda: proxy.stderr)

    # B is back (the active check): with no connection open, least-connections and round-robin alternate
    # exactly, which they do only if no timed-out or abandoned connect left a count behind on a backend
    proxy.wait_log(rf"Port 7000: backend {B}:7000 is back", timeout=5)
    landed = []
    for _ in range(8):
        landed.append(whoami(lab, 7000)[0])
        settled(lab, proxy, [7000])
    assert sorted(landed) == [A] * 4 + [B] * 4, landed

    samples = settled(lab, proxy, [7000, 7001])
    assert counted(samples, 7000, pool, "connections_total", "result") == \
        {"relayed": relayed + 8, "failed": 0, "rejected": 0, "unresolved": 0, "abandoned": 0}
    assert counted(samples, 7000, pool, "backend_connect_failures_total", "kind") == \
        {"refused": 0, "unreachable": 0, "timeout": 1}
    assert counted(samples, 7001, only_b, "connections_total", "result") == \
        {"relayed": 1, "failed": 1, "rejected": 0, "unresolved": 0, "abandoned": 1}
    assert counted(samples, 7001, only_b, "backend_connect_failures_total", "kind") == \
        {"refused": 0, "unreachable": 0, "timeout": 2}


def test_a_fin_each_way_costs_one_shutdown_and_half_close_still_works(lab: Lab, dns: DnsServer, services: Services,
                                                                      start_proxy: StartProxy) -> None:
    """The second side to end is closed, not shut down and then closed: one shutdown per connection (haproxy's
    count), whichever side ended first, and the side still sending after the first FIN is still relayed."""
    services.listen("dest", A, 7000, "whoami")  # ends first: its line, then its FIN; then reads to EOF
    services.listen("dest", A, 7001, "echo")  # the client ends first: echoes, then TAIL and its FIN
    proxy = start_proxy(f"7000 {A}\n7001 {A}")
    [worker] = proxy.serving_pids()
    trace = subprocess.Popen(["strace", "-f", "-e", "trace=shutdown", "-p", str(worker)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert trace.stderr is not None
        while "attached" not in (line := trace.stderr.readline()):  # strace says so once it traces every thread
            assert line, "strace ended before attaching"
        with Conn(lab, 7000) as conn:
            assert conn.landed_ip() == A
            assert conn.rest() == b""  # the backend's FIN came through as a FIN
            conn.sock.sendall(b"after the backend's end\n")  # and this side still goes through
        with Conn(lab, 7001) as conn:
            assert conn.landed_ip() == A
            conn.sock.sendall(b"ping\n")
            assert conn.reader.readline() == b"ping\n"
            assert conn.finish() == TAIL  # the client's FIN reached the backend, which answered after it
        lines = proxy.wait_connection_lines(2)
        assert [m["how"] for m in lines] == ["closed by both sides"] * 2, proxy.stderr
    finally:
        trace.terminate()
        _, log = trace.communicate(timeout=10)
    calls = [line for line in log.splitlines() if "shutdown(" in line]
    assert len(calls) == 2, f"shutdowns for 2 connections (1 each expected):\n{log}"


def test_sigterm_while_a_connect_is_pending_ends_cleanly(lab: Lab, dns: DnsServer, services: Services,
                                                        start_proxy: StartProxy) -> None:
    """A connect still pending when the grace period ends: the client is cut, the proxy exits 0 with nothing in
    its log about a coroutine or a transport left behind (the fixture checks that log)."""
    drop_syns(lab, B, 7000)
    proxy = start_proxy(f"7000 {B}", EGRESS_DNS_PROXY_CONNECT_TIMEOUT="20", EGRESS_PROXY_GRACE_SECONDS="1",
                        EGRESS_METRICS_PORT=str(ADMIN))
    with Conn(lab, 7000) as conn:
        wait_until(lambda: value(scrape(lab), "open_connections", port=7000, target=f"{B}:7000") == 1,
                   "the proxy took the connection", lambda: proxy.stderr)
        started = time.monotonic()
        assert proxy.stop() == 0
        assert time.monotonic() - started < 3
        try:  # closed by the proxy (the grace period ended), not left open; with a reset: the client was cut
            ending = conn.sock.recv(10)
        except ConnectionResetError:
            ending = b"(reset)"
        assert ending == b"(reset)"
    assert [m["how"] for m in proxy.wait_connection_lines(1, 7000)] == ["the grace period ended"]
