"""The admin port's pages and the Prometheus text format (pure parts and the request handling)."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest

from egress_router.admin import Admin, bind, family_pids, process_families, read_head, serve_in_thread
from egress_router.core import exposition as ex
from egress_router.core.config import load
from egress_router.core.errors import ConfigError, SetupError
from egress_router.proxy import metrics

BASE = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1", "EGRESS_DESTINATION": "203.0.113.10"}


def test_render_counter_gauge_labels_and_escapes() -> None:
    text = ex.render([
        ex.single("a_total", "counter", "Things.\nTwo lines \\ here.", 3),
        ex.labelled("b", "gauge", "B.", [((("x", 'q"uo\\te\n'),), 1.5), ((("x", "y"), ("z", "w")), 2)]),
    ])
    assert text == ('# HELP a_total Things.\\nTwo lines \\\\ here.\n# TYPE a_total counter\na_total 3\n'
                    '# HELP b B.\n# TYPE b gauge\nb{x="q\\"uo\\\\te\\n"} 1.5\nb{x="y",z="w"} 2\n')


def test_numbers_as_the_format_writes_them() -> None:
    assert [ex.number(v) for v in (0, 7, 1.0, 0.25, 1e-4, math.inf, -math.inf)] == \
        ["0", "7", "1", "0.25", "0.0001", "+Inf", "-Inf"]
    assert ex.number(math.nan) == "NaN"


def test_histogram_is_cumulative_with_sum_and_count() -> None:
    family = ex.histogram("d_seconds", "D.", [((("kind", "k"),), [1, 0, 2, 4], 3.5)], bounds=(0.1, 1.0, 10.0))
    lines = ex.render([family]).splitlines()[2:]
    assert lines == ['d_seconds_bucket{kind="k",le="0.1"} 1', 'd_seconds_bucket{kind="k",le="1"} 1',
                     'd_seconds_bucket{kind="k",le="10"} 3', 'd_seconds_bucket{kind="k",le="+Inf"} 7',
                     'd_seconds_sum{kind="k"} 3.5', 'd_seconds_count{kind="k"} 7']
    with pytest.raises(ValueError):
        ex.histogram("d", "D.", [((), [1, 2], 0.0)], bounds=(0.1, 1.0))  # a count per bucket, +Inf included


@pytest.mark.parametrize(("seconds", "bucket"), [(0.0, 0), (0.0005, 0), (0.00051, 1), (0.003, 3), (10.0, 13),
                                                 (10.1, 14), (1e6, 14)])
def test_bucket_of_a_duration(seconds: float, bucket: int) -> None:
    assert ex.bucket_index(seconds) == bucket
    shared = metrics.SharedCounters(1)
    shared.row(0).observe(metrics.REQUEST, seconds)
    cells = [shared.total(metrics.DURATIONS + b) for b in range(metrics.BUCKETS)]
    assert cells == [1 if b == bucket else 0 for b in range(metrics.BUCKETS)]


def test_http_histogram_sums_over_workers() -> None:
    shared = metrics.SharedCounters(2)
    shared.row(0).observe(metrics.REQUEST, 0.002)
    shared.row(1).observe(metrics.REQUEST, 0.004)
    shared.row(1).observe(metrics.CONNECT, 0.3)
    text = metrics.prometheus_http(shared)
    assert 'egress_router_http_request_duration_seconds_bucket{kind="request",le="0.0025"} 1\n' in text
    assert 'egress_router_http_request_duration_seconds_bucket{kind="request",le="0.005"} 2\n' in text
    assert 'egress_router_http_request_duration_seconds_count{kind="request"} 2\n' in text
    assert 'egress_router_http_request_duration_seconds_sum{kind="request"} 0.006\n' in text
    assert 'egress_router_http_request_duration_seconds_count{kind="connect"} 1\n' in text
    assert 'egress_router_http_request_duration_seconds_bucket{kind="connect",le="0.25"} 0\n' in text


def admin(**kwargs: object) -> Admin:
    return Admin("legacy", lambda: [ex.single("x_total", "counter", "X.", 1)], **kwargs)  # type: ignore[arg-type]


def status_and_body(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    assert len(body) in (0, length)
    return int(head.split(b" ")[1]), body.decode()


def test_pages() -> None:
    page = admin()
    status, body = status_and_body(page.respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 200 and "x_total 1\n" in body
    assert 'egress_router_build_info{version="' in body and 'mode="legacy"} 1\n' in body
    assert "\nprocess_resident_memory_bytes " in body and "\nprocess_cpu_seconds_total " in body
    assert status_and_body(page.respond(b"GET /healthz HTTP/1.1\r\n\r\n")) == (200, "ok\n")
    assert status_and_body(page.respond(b"GET /ready?verbose=1 HTTP/1.0\r\n\r\n")) == (200, "ok\n")
    assert status_and_body(page.respond(b"HEAD /healthz HTTP/1.1\r\n\r\n")) == (200, "")
    assert status_and_body(page.respond(b"GET /other HTTP/1.1\r\n\r\n"))[0] == 404
    assert status_and_body(page.respond(b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
    assert status_and_body(page.respond(b"garbage\r\n\r\n"))[0] == 400
    assert page.scrapes == 1


def test_unhealthy_says_why_and_a_failing_collector_is_a_500() -> None:
    problem: list[str | None] = ["drift repair failed: boom"]
    page = admin(health=lambda: problem[0])
    assert status_and_body(page.respond(b"GET /healthz HTTP/1.1\r\n\r\n")) == (503, "drift repair failed: boom\n")
    assert status_and_body(page.respond(b"GET /ready HTTP/1.1\r\n\r\n")) == (200, "ok\n")
    problem[0] = None
    assert status_and_body(page.respond(b"GET /healthz HTTP/1.1\r\n\r\n")) == (200, "ok\n")

    def broken() -> list[ex.Family]:
        raise RuntimeError("bug")

    assert status_and_body(Admin("legacy", broken).respond(b"GET /metrics HTTP/1.1\r\n\r\n")) == \
        (500, "collecting the metrics failed: bug\n")


def test_process_metrics_of_this_process() -> None:
    families = {f.name: f.samples[0].value for f in process_families([os.getpid()])}
    assert families["process_resident_memory_bytes"] > 1_000_000
    assert families["process_open_fds"] >= 3
    assert abs(families["process_start_time_seconds"] - time.time()) < 24 * 3600
    assert families["process_max_fds"] >= families["process_open_fds"]
    gone = process_families([2 ** 22 + 12345])  # no such process: nothing summed, nothing raised
    assert {f.name: f.samples[0].value for f in gone}["process_open_fds"] == 0


def test_a_worker_sums_its_master_and_siblings() -> None:
    """family_pids() in a worker: the master first, then every worker (the master's children)."""
    reader, writer = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.read(go_r, 1)  # both workers exist
            os.write(writer, (" ".join(map(str, family_pids())) + "\n").encode())
            os._exit(0)
        pids.append(pid)
    os.write(go_w, b"xx")
    seen = b""
    while seen.count(b"\n") < 2:
        seen += os.read(reader, 4096)
    for pid in pids:
        os.waitpid(pid, 0)
    for fd in (reader, writer, go_r, go_w):
        os.close(fd)
    for line in seen.decode().splitlines():
        got = [int(p) for p in line.split()]
        assert got[0] == os.getpid() and set(pids) <= set(got[1:]), (got, pids)


def test_metrics_port_setting() -> None:
    assert load({**BASE, "EGRESS_ROUTER_MODE": "legacy"}).metrics_port == 0
    assert load({**BASE, "EGRESS_ROUTER_MODE": "legacy", "EGRESS_METRICS_PORT": "9300"}).metrics_port == 9300
    proxy = {**BASE, "EGRESS_HTTP_PROXY_DESTINATION": "*"}
    config = load(proxy)
    assert config.metrics_port == 9253 and config.http_proxy is not None and config.http_proxy.metrics_port == 9253
    assert load({**proxy, "EGRESS_METRICS_PORT": "off"}).metrics_port == 0
    assert load({**proxy, "EGRESS_METRICS_PORT": "0"}).http_proxy.metrics_port == 0  # type: ignore[union-attr]
    init = load({**BASE, "EGRESS_ROUTER_MODE": "init", "EGRESS_METRICS_PORT": "9253"})
    assert init.metrics_port == 0
    assert init.warnings == ("EGRESS_METRICS_PORT has no effect in init mode: the container exits once it is done",)


@pytest.mark.parametrize(("env", "message"), [
    ({"EGRESS_METRICS_PORT": "99999"}, "EGRESS_METRICS_PORT: '99999' is neither a port from 1 to 65535 nor 'off'"),
    ({"EGRESS_METRICS_PORT": "metrics"}, "EGRESS_METRICS_PORT: 'metrics' is neither a port from 1 to 65535 nor 'off'"),
    ({"EGRESS_HTTP_PROXY_DESTINATION": "*", "EGRESS_HTTP_PROXY_PORT": "9253"},
     "EGRESS_METRICS_PORT: 9253 is also the HTTP proxy's port (EGRESS_HTTP_PROXY_PORT): choose another, or off"),
    ({"EGRESS_DNS_PROXY_DESTINATION": "443 example.test\n9253 other.test 443"},
     "EGRESS_METRICS_PORT: 9253 is also a forward's port (EGRESS_DNS_PROXY_DESTINATION line 2: 9253 -> "
     "other.test:443): choose another, or off"),
])
def test_metrics_port_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**BASE, "EGRESS_ROUTER_MODE": "legacy", **env} if "PROXY" not in str(env) else {**BASE, **env})
    assert str(caught.value) == message


def test_threaded_server_answers_and_a_slow_client_holds_nobody_up() -> None:
    sock = bind(0)
    port = sock.getsockname()[1]
    serve_in_thread(sock, admin())
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"GET /metr")  # and never more
    with socket.create_connection(("::1", port), timeout=5) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert status_and_body(answer) == (200, "ok\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /" + b"a" * 9000)
        assert conn.recv(4096).startswith(b"HTTP/1.1 400 ")
    slow.close()
    with pytest.raises(SetupError, match=rf"admin port {port} \(EGRESS_METRICS_PORT\) cannot be opened: it is in use"):
        bind(port)
    sock.close()


def test_read_head_stops_at_the_end_of_the_head() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert read_head(ours) == b"GET / HTTP/1.1\r\n\r\n"
        theirs.close()
        assert read_head(ours) is None


SIGNAL_PROGRAM = """
import os, signal
from egress_router.admin import Admin, bind, serve_in_thread
serve_in_thread(bind(0), Admin("legacy", lambda: []))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO, signal.SIGHUP})  # as legacy mode's main thread has them
for _ in range(100):
    os.kill(os.getpid(), signal.SIGIO)
    os.kill(os.getpid(), signal.SIGHUP)
io, hup = signal.sigtimedwait({signal.SIGIO}, 1), signal.sigtimedwait({signal.SIGHUP}, 1)
print(io is not None and io.si_signo == signal.SIGIO, hup is not None)
"""


def test_the_server_threads_take_no_signal_meant_for_the_main_thread() -> None:
    """Legacy mode waits for SIGHUP and inotify's SIGIO with them blocked; a server thread that did not block them
    would take them (their default action ends the process)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SIGNAL_PROGRAM], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "True True\n"), done
