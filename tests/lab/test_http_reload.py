"""The HTTP proxy reloads its allow list without a restart: a ConfigMap volume swap or SIGHUP, validated first (a bad
edit: one line, the list in force stays, a counter), applied by every worker, established tunnels untouched."""

# ruff: noqa: F811 (the tests take the imported start_proxy fixture by its name)

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from egress_router.lab import ROUTER_POD_IP, Lab
from tests.lab.origin import Origin
from tests.lab.reloadlib import (
    HELD,
    EchoHub,
    RuleVolume,
    exchange_all,
    file_limit,
    in_force_after,
    sighup,
    wait_until,
)
from tests.lab.test_http_proxy import (  # noqa: F401 (start_proxy: the fixture)
    API,
    INTERNAL,
    PORT,
    WWW,
    Client,
    Proxy,
    StartProxy,
    assert_denied,
    assert_hello,
    connect,
    fetch,
    scrape,
    start_proxy,
)

FILE_VARIABLE = "EGRESS_HTTP_PROXY_DESTINATION_FILE"
WWW_URL, API_URL, INTERNAL_URL = ("http://www.example.com/hello", "http://api.example.com/hello",
                                  "http://internal.example.com/hello")


def start_from(start_proxy: StartProxy, volume: RuleVolume, **variables: str) -> Proxy:
    """The proxy with its allow list in the volume's file (the inline variable left empty)."""
    return start_proxy("", EGRESS_HTTP_PROXY_DESTINATION="", **{FILE_VARIABLE: volume.path}, **variables)


def allowed(lab: Lab, url: str) -> bool:
    status = fetch(lab, url).status
    assert status in (200, 403), status
    return status == 200


def reload_lines(proxy: Proxy) -> list[str]:
    return [line for line in proxy.lines() if "Reloaded " in line or "Reload failed" in line]


def reloads(lab: Lab) -> tuple[float, float]:
    samples = scrape(lab)
    return (samples['egress_router_http_reloads_total{result="applied"}'],
            samples['egress_router_http_reloads_total{result="failed"}'])


def test_a_configmap_swap_changes_the_list_for_new_requests_and_keep_alive_ones(
        lab: Lab, origin: Origin, start_proxy: StartProxy, tmp_path: Path) -> None:
    volume = RuleVolume(tmp_path, "allow", "www.example.com\n")
    proxy = start_from(start_proxy, volume, EGRESS_ROUTER_DEBUG="1")
    # the watch is in place and its first look done: a swap now is a change, not the start-up check's find
    wait_until(lambda: "start-up check: " in proxy.stderr, "the start-up check", lambda: proxy.stderr)
    assert allowed(lab, WWW_URL) and not allowed(lab, API_URL)
    with Client(lab) as kept, Client(lab) as tunnel:
        assert_hello(kept.request("GET", WWW_URL), WWW)  # a keep-alive connection from before the reload
        assert connect(tunnel, "www.example.com:7000").status == 200
        swapped = volume.swap("api.example.com\n# www.example.com is no longer allowed\n")
        in_force_after(swapped, lambda: allowed(lab, API_URL), "api.example.com allowed", lambda: proxy.stderr)
        assert not allowed(lab, WWW_URL)
        assert_denied(kept.request("GET", WWW_URL), "www.example.com")  # its next request: the new list
        assert_hello(kept.request("GET", API_URL), API)
        tunnel.send(b"still open\n")  # established before: it goes on
        assert tunnel.reader.readline() == b"still open\n"
    [line] = reload_lines(proxy)
    assert re.search(rf"\[info\] Reloaded {FILE_VARIABLE}={re.escape(volume.path)} \(file changed, rules generation "
                     r"2\): \+1 rule \(api\.example\.com\); -1 rule \(www\.example\.com\); now 1 allow rule, "
                     r"0 deny rules, default deny$", line), line
    assert reloads(lab) == (1, 0)
    volume.swap("api.example.com\n")  # another text, the same rules; then the very same text again
    volume.swap("api.example.com\n")
    time.sleep(1.2)  # two polls: the absence of a line is what is checked
    assert len(reload_lines(proxy)) == 1 and reloads(lab) == (1, 0)


def test_sighup_reloads_and_a_bad_edit_keeps_the_list_in_force(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                               tmp_path: Path) -> None:
    volume = RuleVolume(tmp_path, "allow", "www.example.com\n")
    proxy = start_from(start_proxy, volume, EGRESS_ROUTER_DEBUG="1")
    wait_until(lambda: "start-up check: " in proxy.stderr, "the start-up check", lambda: proxy.stderr)
    volume.rewrite_unseen("api.example.com\n")  # the watch cannot see this one: only SIGHUP reads it
    time.sleep(1.2)  # two polls: that they change nothing is what is checked
    assert allowed(lab, WWW_URL) and not allowed(lab, API_URL)
    sent = time.monotonic()
    sighup(proxy.process.pid)
    in_force_after(sent, lambda: allowed(lab, API_URL), "SIGHUP: api.example.com allowed", lambda: proxy.stderr)
    assert not allowed(lab, WWW_URL)
    assert "(SIGHUP, rules generation 2)" in reload_lines(proxy)[0]

    volume.swap("api.example.com\n*.example.com\n203.0.113\n")
    wait_until(lambda: len(reload_lines(proxy)) == 2, "the bad edit's line", lambda: proxy.stderr)
    line = reload_lines(proxy)[1]
    assert f"[error] Reload failed (1 failed so far); the rules in force stay: {FILE_VARIABLE}={volume.path} line 3: " \
           "'203.0.113': '203.0.113' is not a dotted-quad IPv4 address" in line, line
    assert allowed(lab, API_URL) and not allowed(lab, WWW_URL)  # the list in force stays
    assert reloads(lab) == (1, 1)
    swapped = volume.swap("api.example.com\n*.example.com\n")  # the next good edit is applied
    in_force_after(swapped, lambda: allowed(lab, WWW_URL), "after a bad edit: *.example.com", lambda: proxy.stderr)
    assert reloads(lab) == (2, 1)
    assert proxy.process.poll() is None


def test_sighup_with_inline_rules_says_so_and_keeps_serving(lab: Lab, origin: Origin,
                                                            start_proxy: StartProxy) -> None:
    proxy = start_proxy("www.example.com")
    sighup(proxy.process.pid)
    wait_until(lambda: "cannot change without a restart" in proxy.stderr, "the inline SIGHUP line",
               lambda: proxy.stderr)
    assert proxy.process.poll() is None
    assert allowed(lab, WWW_URL) and not allowed(lab, API_URL)
    assert [line for line in proxy.lines() if "SIGHUP" in line][0].endswith(
        "[info] SIGHUP: the rules are inline in EGRESS_HTTP_PROXY_DESTINATION and cannot change without a restart; "
        f"give them in {FILE_VARIABLE} to reload them")


def worker_lines(proxy: Proxy, what: str, generation: int) -> set[int]:
    """The worker pids that logged `what` ('applied' or 'serves') for `generation` (debug lines)."""
    pattern = re.compile(rf"Worker \d+ \(pid (\d+)\) {what} rules generation {generation}$")
    return {int(m[1]) for line in proxy.lines() if (m := pattern.search(line))}


def test_two_workers_switch_together_and_a_replaced_worker_gets_the_list_in_force(
        lab: Lab, origin: Origin, start_proxy: StartProxy, tmp_path: Path) -> None:
    volume = RuleVolume(tmp_path, "allow", "www.example.com\n")
    proxy = start_from(start_proxy, volume, EGRESS_HTTP_PROXY_WORKERS="2", EGRESS_ROUTER_DEBUG="1")
    workers = proxy.children()
    assert len(workers) == 2
    swapped = volume.swap("internal.example.com\n")
    in_force_after(swapped, lambda: all(allowed(lab, INTERNAL_URL) for _ in range(20)),
                   "2 workers: internal.example.com allowed on 20 new connections", lambda: proxy.stderr)
    wait_until(lambda: worker_lines(proxy, "applied", 2) == set(workers), "both workers applied generation 2",
               lambda: proxy.stderr)
    assert not any(allowed(lab, WWW_URL) for _ in range(20))

    volume.swap("internal.example.com\nwww.example.com bad\n")  # one error line, from the master alone
    wait_until(lambda: "Reload failed" in proxy.stderr, "the bad edit's line", lambda: proxy.stderr)
    time.sleep(0.6)
    assert len([line for line in proxy.lines() if "Reload failed" in line]) == 1, proxy.stderr
    assert f"{volume.path} line 2: 'www.example.com bad'" in proxy.stderr

    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: len(proxy.children()) == 2 and workers[0] not in proxy.children(), "a replacement",
               lambda: proxy.stderr)
    [replacement] = set(proxy.children()) - set(workers)
    proxy.remember_workers()
    wait_until(lambda: replacement in worker_lines(proxy, "serves", 2), "the replacement serves generation 2",
               lambda: proxy.stderr)
    assert all(allowed(lab, INTERNAL_URL) for _ in range(20)) and not any(allowed(lab, WWW_URL) for _ in range(20))
    assert reloads(lab) == (1, 1)

    volume.rewrite_unseen(padded("api.example.com\n", "internal.example.com\nwww.example.com bad\n"))
    sent = time.monotonic()
    sighup(proxy.process.pid)  # the master's SIGHUP: it reads, validates and hands out
    in_force_after(sent, lambda: all(allowed(lab, API_URL) for _ in range(20)), "2 workers, SIGHUP: api allowed",
                   lambda: proxy.stderr)
    wait_until(lambda: worker_lines(proxy, "applied", 3) == set(proxy.children()), "both workers applied generation 3",
               lambda: proxy.stderr)
    assert reloads(lab) == (2, 1)


def padded(text: str, like: str) -> str:
    """`text` with a comment line that makes it as long as `like` (for RuleVolume.rewrite_unseen)."""
    fill = len(like) - len(text) - 2
    assert fill >= 0
    return text + "#" + "x" * fill + "\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_1000_tunnels_through_an_unchanged_rule_survive_a_reload(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                                  tmp_path: Path, workers: str) -> None:
    hub = EchoHub(lab, "dest", WWW, 7100)
    volume = RuleVolume(tmp_path, "allow", "www.example.com\nother.test\n")
    proxy = start_from(start_proxy, volume, EGRESS_HTTP_PROXY_ACCESS_LOG="0", EGRESS_HTTP_PROXY_WORKERS=workers)
    socks: list[socket.socket] = []
    with file_limit(4 * HELD + 256):
        try:
            with lab.entered("client"):
                for _ in range(HELD):
                    socks.append(socket.create_connection((ROUTER_POD_IP, PORT), timeout=10))
            for sock in socks:
                sock.sendall(b"CONNECT www.example.com:7100 HTTP/1.1\r\nHost: www.example.com:7100\r\n\r\n")
            for sock in socks:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    chunk = sock.recv(1)
                    assert chunk, head
                    head += chunk
                assert head.startswith(b"HTTP/1.1 200 "), head
            assert exchange_all(socks, "before") == []
            swapped = volume.swap("www.example.com\napi.example.com\n")  # other.test out, api in
            in_force_after(swapped, lambda: allowed(lab, API_URL), f"{workers} worker(s), 1,000 tunnels: api allowed",
                           lambda: proxy.stderr)
            lost = exchange_all(socks, "after")
            assert lost == [], f"{len(lost)} of {HELD} tunnels lost: {lost[:10]}"
            assert hub.accepted == HELD
        finally:
            for sock in socks:
                sock.close()
            hub.stop()
    assert len(reload_lines(proxy)) == 1
