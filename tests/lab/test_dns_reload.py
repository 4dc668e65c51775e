"""The DNS proxy reloads its forwards without a restart: a ConfigMap volume swap or SIGHUP, validated first (a bad edit
or a port that cannot be bound: one line, the forwards in force stay), new ports opened in every worker, removed ones
closed at once and drained, established connections through unchanged forwards untouched."""

# ruff: noqa: F811 (the tests take the imported fixtures by their names)

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from egress_router.lab import ROUTER_POD_IP, Lab
from tests.lab.proxyproc import connection_refused
from tests.lab.reloadlib import (
    HELD,
    IN_FORCE_LIMIT,
    MARGIN,
    EchoHub,
    RuleVolume,
    exchange_all,
    file_limit,
    in_force_after,
    sighup,
    wait_until,
)
from tests.lab.test_dns_proxy import (  # noqa: F401 (dns, services, start_proxy: the fixtures)
    READY_PORT,
    A,
    B,
    C,
    Conn,
    Proxy,
    Services,
    StartProxy,
    dns,
    services,
    start_proxy,
    whoami,
)

FILE_VARIABLE = "EGRESS_DNS_PROXY_DESTINATION_FILE"
READY_LINE = f"{READY_PORT} {A}\n"  # the fixture's readiness probes go through this forward: every file keeps it


def start_from(start_proxy: StartProxy, volume: RuleVolume, **variables: str) -> Proxy:
    """The proxy with its forwards in the volume's file (the inline variable left empty)."""
    return start_proxy("", EGRESS_DNS_PROXY_DESTINATION="", **{FILE_VARIABLE: volume.path}, **variables)


def lands(lab: Lab, port: int) -> str | None:
    """Where a fresh connection to `port` lands (the whoami line), None if it is refused or cut."""
    try:
        return whoami(lab, port)[0]
    except (OSError, AssertionError):
        return None


def refused(lab: Lab, port: int) -> bool:
    return connection_refused(lambda: Conn(lab, port, timeout=1))


def reload_lines(proxy: Proxy) -> list[str]:
    return [line for line in proxy.lines() if "Reloaded " in line or "Reload failed" in line]


def listening_pids(lab: Lab, port: int) -> set[int]:
    """The processes with a listening socket on `port` in the router namespace."""
    out = lab.exec("router", ["ss", "-Hltnp", "sport", f"= :{port}"], check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def echo_line(conn: Conn, text: bytes) -> bytes:
    conn.sock.sendall(text)
    return conn.reader.readline()


def test_a_configmap_swap_adds_removes_and_changes_forwards(lab: Lab, services: Services, start_proxy: StartProxy,
                                                            tmp_path: Path) -> None:
    services.listen("dest", A, 7000, "echo")
    services.listen("dest", C, 7000, "whoami")
    services.listen("dest", B, 7001, "echo")
    services.listen("dest", A, 7002, "whoami")
    volume = RuleVolume(tmp_path, "forwards", f"7000 {A}\n7001 {B}\n{READY_LINE}")
    proxy = start_from(start_proxy, volume, EGRESS_PROXY_GRACE_SECONDS="2", EGRESS_ROUTER_DEBUG="1")
    # the watch is in place and its first look done: a swap now is a change, not the start-up check's find
    wait_until(lambda: "start-up check: " in proxy.stderr, "the start-up check", lambda: proxy.stderr)
    assert refused(lab, 7002)
    with Conn(lab, 7001) as removed, Conn(lab, 7000) as changed:
        assert removed.landed_ip() == B and changed.landed_ip() == A
        swapped = volume.swap(f"7000 {C}\n7002 {A}\n{READY_LINE}")
        in_force_after(swapped, lambda: lands(lab, 7002) == A, "+7002", lambda: proxy.stderr)
        assert refused(lab, 7001)  # removed: no longer accepting (applied before the new port opened)
        assert lands(lab, 7000) == C  # changed: new connections go to the new host
        assert echo_line(removed, b"draining\n") == b"draining\n"  # established ones go on meanwhile
        assert echo_line(changed, b"draining\n") == b"draining\n"
        with contextlib.suppress(ConnectionResetError):  # after the grace period, they are closed
            assert removed.rest() == b""
            assert changed.rest() == b""
        # timed from the swap, which comes before the reload: the grace period (2 s) runs from the reload, so no
        # close comes sooner than 2 s after the swap (less a timer's rounding), nor later than the reload's limit
        # (IN_FORCE_LIMIT + MARGIN) plus the grace period and 1 s. (Timed from the end of the checks above, as
        # before, it failed when those checks took more than 1 s on a loaded machine.)
        closed = time.monotonic() - swapped
        assert 1.9 < closed < IN_FORCE_LIMIT + MARGIN + 2.0 + 1.0, f"closed {closed:.2f} s after the swap"
    [line] = reload_lines(proxy)
    assert line.endswith(f"[info] Reloaded {FILE_VARIABLE}={volume.path} (file changed, rules generation 2): "
                         f"+1 forward (7002 to {A}:7002), -1 (7001), 1 changed (7000 to {C}:7000)"), line
    hows = {int(m["port"]): m["how"] for m in proxy.wait_connection_lines(2) if m["how"].startswith("forward")}
    assert hows == {7001: "forward removed by a reload: the grace period ended",
                    7000: "forward changed by a reload: the grace period ended"}, proxy.stderr
    assert lands(lab, 7002) == A and lands(lab, 7000) == C


def test_sighup_bad_edits_and_a_port_that_cannot_be_bound(lab: Lab, services: Services, start_proxy: StartProxy,
                                                          tmp_path: Path) -> None:
    for ip, port in ((A, 7000), (B, 7001), (A, 7003), (A, 7004)):
        services.listen("dest", ip, port, "whoami")
    volume = RuleVolume(tmp_path, "forwards", f"7000 {A}\n{READY_LINE}")
    proxy = start_from(start_proxy, volume, EGRESS_ROUTER_DEBUG="1")
    wait_until(lambda: "start-up check: " in proxy.stderr, "the start-up check", lambda: proxy.stderr)
    volume.rewrite_unseen(f"7001 {B}\n{READY_LINE}")  # the watch cannot see this: only SIGHUP reads it
    time.sleep(1.2)  # two polls: that they change nothing is what is checked
    assert lands(lab, 7000) == A and refused(lab, 7001)
    sent = time.monotonic()
    sighup(proxy.process.pid)
    in_force_after(sent, lambda: lands(lab, 7001) == B, "SIGHUP: +7001", lambda: proxy.stderr)
    assert refused(lab, 7000)

    volume.swap(f"7001 {B}\n7002 203.0.113\n{READY_LINE}")
    wait_until(lambda: len(reload_lines(proxy)) == 2, "the bad edit's line", lambda: proxy.stderr)
    assert f"[error] Reload failed (1 failed so far); the rules in force stay: {FILE_VARIABLE}={volume.path} " \
           "line 2: '7002 203.0.113': " in reload_lines(proxy)[1], proxy.stderr
    assert lands(lab, 7001) == B and refused(lab, 7002)

    with lab.entered("router"):
        squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("0.0.0.0", 7003))  # someone else holds 7003 (no SO_REUSEPORT to share it)
        squatter.listen(1)
        volume.swap(f"7001 {B}\n7003 {A}\n7004 {A}\n{READY_LINE}")
        wait_until(lambda: len(reload_lines(proxy)) == 3, "the bind error's line", lambda: proxy.stderr)
        assert reload_lines(proxy)[2].endswith(
            f"[error] Reload failed (2 failed so far); the rules in force stay: {FILE_VARIABLE}={volume.path}: "
            "cannot listen on port 7003: Address already in use (is another proxy running?)"), proxy.stderr
        assert refused(lab, 7004) and lands(lab, 7001) == B  # nothing of that edit: all or nothing
    finally:
        squatter.close()
    sent = time.monotonic()
    sighup(proxy.process.pid)  # the port is free now: the same file applies
    in_force_after(sent, lambda: lands(lab, 7003) == A, "SIGHUP after the bind error: +7003", lambda: proxy.stderr)
    assert lands(lab, 7004) == A and lands(lab, 7001) == B
    assert "(SIGHUP, rules generation 3): +2 forwards" in reload_lines(proxy)[3]


def test_sighup_with_inline_forwards_says_so_and_keeps_serving(lab: Lab, services: Services,
                                                               start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "whoami")
    proxy = start_proxy(f"7000 {A}")
    sighup(proxy.process.pid)
    wait_until(lambda: "cannot change without a restart" in proxy.stderr, "the inline SIGHUP line",
               lambda: proxy.stderr)
    assert proxy.process.poll() is None and lands(lab, 7000) == A
    assert "[info] SIGHUP: the rules are inline in EGRESS_DNS_PROXY_DESTINATION and cannot change without a " \
           f"restart; give them in {FILE_VARIABLE} to reload them" in proxy.stderr


def worker_lines(proxy: Proxy, what: str, generation: int) -> set[int]:
    pattern = re.compile(rf"Worker \d+ \(pid (\d+)\) {what} rules generation {generation}$")
    return {int(m[1]) for line in proxy.lines() if (m := pattern.search(line))}


def test_two_workers_listen_on_new_ports_and_a_replaced_worker_too(lab: Lab, services: Services,
                                                                   start_proxy: StartProxy, tmp_path: Path) -> None:
    services.listen("dest", A, 7000, "whoami")
    services.listen("dest", B, 7002, "whoami")
    volume = RuleVolume(tmp_path, "forwards", f"7000 {A}\n{READY_LINE}")
    proxy = start_from(start_proxy, volume, EGRESS_DNS_PROXY_WORKERS="2", EGRESS_ROUTER_DEBUG="1")
    workers = set(proxy.children())
    assert len(workers) == 2
    swapped = volume.swap(f"7000 {A}\n7002 {B}\n{READY_LINE}")
    in_force_after(swapped, lambda: all(lands(lab, 7002) == B for _ in range(20)), "2 workers: +7002 (20 connections)",
                   lambda: proxy.stderr)
    wait_until(lambda: listening_pids(lab, 7002) == workers, "both workers listen on 7002", lambda: proxy.stderr)
    wait_until(lambda: worker_lines(proxy, "applied", 2) == workers, "both workers applied generation 2",
               lambda: proxy.stderr)

    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(proxy.children()) == 2 and victim not in proxy.children(), "a replacement",
               lambda: proxy.stderr)
    proxy.remember_workers()
    now = set(proxy.children())
    wait_until(lambda: listening_pids(lab, 7002) == now, "the replacement listens on 7002 too", lambda: proxy.stderr)
    wait_until(lambda: (now - workers) <= worker_lines(proxy, "serves", 2), "the replacement serves generation 2",
               lambda: proxy.stderr)

    volume.swap(f"7000 {A}\n7002 {B} 99999\n{READY_LINE}")  # one error line, from the master alone
    wait_until(lambda: "Reload failed" in proxy.stderr, "the bad edit's line", lambda: proxy.stderr)
    swapped = volume.swap(f"7000 {A}\n{READY_LINE}")
    in_force_after(swapped, lambda: refused(lab, 7002), "2 workers: -7002 refused", lambda: proxy.stderr)
    assert listening_pids(lab, 7002) == set()
    assert all(lands(lab, 7000) == A for _ in range(10))
    assert len([line for line in proxy.lines() if "Reload failed" in line]) == 1, proxy.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_1000_connections_through_an_unchanged_forward_survive_a_reload(
        lab: Lab, services: Services, start_proxy: StartProxy, tmp_path: Path, workers: str) -> None:
    hub = EchoHub(lab, "dest", A, 7100)
    services.listen("dest", C, 7002, "whoami")
    volume = RuleVolume(tmp_path, "forwards", f"7000 {A} 7100\n7001 {B}\n{READY_LINE}")
    proxy = start_from(start_proxy, volume, EGRESS_DNS_PROXY_WORKERS=workers, EGRESS_DNS_PROXY_DEBUG="0")
    socks: list[socket.socket] = []
    with file_limit(4 * HELD + 256):
        try:
            with lab.entered("client"):
                for _ in range(HELD):
                    socks.append(socket.create_connection((ROUTER_POD_IP, 7000), timeout=10))
            assert exchange_all(socks, "before") == []
            swapped = volume.swap(f"7000 {A} 7100\n7002 {C}\n{READY_LINE}")  # 7001 out, 7002 in
            in_force_after(swapped, lambda: lands(lab, 7002) == C, f"{workers} worker(s), 1,000 connections: +7002",
                           lambda: proxy.stderr)
            lost = exchange_all(socks, "after")
            assert lost == [], f"{len(lost)} of {HELD} connections lost: {lost[:10]}"
            assert hub.accepted == HELD
            assert refused(lab, 7001)
            for sock in socks[:10]:  # and they still end in order: a half-close reaches the hub, which closes
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(100) == b""
        finally:
            for sock in socks:
                sock.close()
            hub.stop()
    assert len(reload_lines(proxy)) == 1
