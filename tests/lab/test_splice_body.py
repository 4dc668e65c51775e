"""Large Content-Length response bodies on the splice relay (proxy/http_upstream.py, Upstream.splice_body), for
real: curl-like raw clients in the client namespace, the lab's origin or a destination the test drives itself.

What holds as for a body copied through Python: pipelined requests answered in order with the upstream
connection reused after the spliced body, exact byte counts (access log, metrics), a client that stops reading
holds the server back (bounded), and a server that ends early shows the client a cut-off, never a clean end."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from egress_router.lab import Lab
from tests.lab.origin import Origin, blob, read_head
from tests.lab.proxyproc import PeakRss
from tests.lab.test_http_proxy import (
    ACCESS_LINE,
    Client,
    StartProxy,
    buffered_at_most,
    eventually,
    request_bytes,
    scrape,
)
from tests.lab.test_http_proxy import start_proxy as start_proxy  # the fixture
from tests.lab.test_splice_tunnel import DOWN, Destination, pipes
from tests.lab.test_splice_tunnel import dest as dest  # the fixture

WWW = "203.0.113.10"
TIMEOUT = 10.0
MIB = 1024 * 1024


def head_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(head)


def read_exactly(client: Client, n: int) -> bytes:
    data = client.reader.read(n)
    assert data is not None
    return data


def test_large_bodies_pipelined_are_spliced_in_order_and_counted_exactly(
        lab: Lab, origin: Origin, start_proxy: StartProxy) -> None:
    """Three requests pipelined: 8 MiB, 3 MiB (both above the splice threshold), then a small one: each answer
    whole and in order, on one upstream connection (back in the pool after each spliced body), the access log
    lines and the downstream metric exact, and the proxy made pipes (the bodies went through them)."""
    proxy = start_proxy("*")
    pid = proxy.serving_pids()[0]
    pipes_before = pipes(pid)
    before = scrape(lab)
    landed_before = len(origin.connections_to(WWW))
    sizes = (8 * MIB, 3 * MIB)
    with Client(lab, timeout=TIMEOUT) as client:
        client.send(b"".join(request_bytes("GET", f"http://{WWW}/blob?size={size}") for size in sizes)
                    + request_bytes("GET", f"http://{WWW}/hello"))
        for size in sizes:
            head = read_head(client.reader)
            assert head is not None and head.startswith(b"HTTP/1.1 200 ") and head_length(head) == size
            assert read_exactly(client, size) == blob(size)
        head = read_head(client.reader)
        assert head is not None and head.startswith(b"HTTP/1.1 200 ")
        hello = read_exactly(client, head_length(head))
        assert hello == f"hello from {WWW}:80\n".encode()
    assert len(origin.connections_to(WWW)) == landed_before + 1, "the upstream connection was not reused"
    assert pipes(pid) > pipes_before, "no pipe was ever made: the bodies were not spliced"

    def downs() -> list[int]:
        return [int(m["down"]) for line in proxy.lines() if (m := ACCESS_LINE.search(line)) and m["method"] == "GET"
                and "/blob" in m["target"]]

    assert eventually(lambda: len(downs()) == 2, timeout=TIMEOUT)
    assert downs() == list(sizes)
    after = scrape(lab)
    assert after[DOWN] - before[DOWN] == sum(sizes) + len(hello)


def serve_one(dest: Destination, length: int, send: int, end: str) -> threading.Thread:
    """The destination answers one request: a head with Content-Length `length`, `send` bytes of body, then
    `end`: "close" (a FIN) or "reset"."""

    def run() -> None:
        conn = dest.accept()
        reader = conn.makefile("rb")
        assert read_head(reader) is not None
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + b"\0" * send)
        if end == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reader.close()
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("end", ["close", "reset"])
def test_a_body_cut_short_by_the_server_is_a_cut_off_for_the_client(
        lab: Lab, origin: Origin, start_proxy: StartProxy, dest: Destination, end: str) -> None:
    start_proxy("*")
    thread = serve_one(dest, 8 * MIB, 3 * MIB, end)
    with Client(lab, timeout=TIMEOUT) as client:
        client.send(request_bytes("GET", f"http://{WWW}:9100/big"))
        head = read_head(client.reader)
        assert head is not None and head_length(head) == 8 * MIB
        got = 0
        with pytest.raises(ConnectionResetError):
            while chunk := client.sock.recv(MIB):  # a clean EOF here would fail the test
                got += len(chunk)
        assert got <= 3 * MIB
    thread.join(TIMEOUT)


def test_a_client_that_stops_reading_holds_the_server_back(
        lab: Lab, origin: Origin, start_proxy: StartProxy, dest: Destination) -> None:
    """512 MiB to a client that reads only the head for a while: the server is held back (a send blocks for
    2 s), the proxy does not grow; then the client reads everything, exactly."""
    proxy = start_proxy("*")
    pid = proxy.serving_pids()[0]
    total = 512 * MIB  # well above what the kernel may buffer on the way (below)
    # the server's socket, the proxy's two, the client's; the proxy's 256 KiB in Python and its splice pipe
    bound = buffered_at_most(lab, {"dest": 1, "router": 2, "client": 1}, held=256 * 1024 + MIB)
    assert bound < total // 2, bound  # a proxy that read without limit would take far more than this
    sent = [0]
    with PeakRss(pid) as rss, Client(lab, timeout=TIMEOUT) as client:
        client.send(request_bytes("GET", f"http://{WWW}:9100/big"))
        conn_thread = serve_one_held(dest, total, sent)
        head = read_head(client.reader)
        assert head is not None and head_length(head) == total
        assert eventually(lambda: len(sent) > 1, timeout=TIMEOUT), "the server was never held back"
        assert sent[0] < bound, (sent, bound)
        got = 0
        while got < total:
            chunk = client.reader.read1(MIB)
            assert chunk
            got += len(chunk)
        assert got == total
        conn_thread.join(TIMEOUT)
    assert rss.growth < 16 * MIB, rss.growth


def serve_one_held(dest: Destination, total: int, sent: list[int]) -> threading.Thread:
    def run() -> None:
        conn = dest.accept()
        reader = conn.makefile("rb")
        assert read_head(reader) is not None
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        conn.settimeout(2.0)  # a send that makes no progress for 2 s: held back
        piece = memoryview(b"\0" * MIB)
        left = total
        while left > 0:
            try:
                n = conn.send(piece[:min(left, MIB)])
            except TimeoutError:
                if len(sent) == 1:
                    sent.append(-1)
                    conn.settimeout(TIMEOUT)
                continue
            left -= n
            sent[0] += n
        reader.close()
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
