"""CONNECT tunnels on the splice relay (proxy/splice.py), for real: the client in the client namespace, a
destination the test drives itself in the dest namespace, the proxy in the router namespace between them.

The tunnel's bytes go through pipes (the proxy holds pipes after a transfer: its pool), and everything the
transports' relaying did still holds: half-close each way while the other direction carries on, resets
passed on each way, exact byte counts (access log and metrics), the idle timeout and the grace period."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from egress_router.lab import Lab
from egress_router.proxy.http_tunnel import SPLICE_AFTER
from tests.lab.origin import Origin
from tests.lab.test_http_proxy import ACCESS_LINE, Client, StartProxy, connect, eventually, scrape
from tests.lab.test_http_proxy import start_proxy as start_proxy  # the fixture

WWW = "203.0.113.10"
PEER_PORT = 9100
TIMEOUT = 10.0
UP = 'egress_router_http_bytes_total{direction="upstream"}'
DOWN = 'egress_router_http_bytes_total{direction="downstream"}'


class Destination:
    """A listener in the dest namespace whose accepted connections the test drives itself."""

    def __init__(self, lab: Lab):
        with lab.entered("dest"):
            self.sock = socket.create_server((WWW, PEER_PORT))
        self.sock.settimeout(TIMEOUT)

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(TIMEOUT)
        return conn


@pytest.fixture
def dest(lab: Lab) -> Iterator[Destination]:
    destination = Destination(lab)
    try:
        yield destination
    finally:
        destination.sock.close()


def payload(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 4096
    return (block * (size // len(block) + 1))[:size]


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def pipes(pid: int) -> int:
    """How many pipe descriptors process `pid` has open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return count


def open_tunnel(lab: Lab, dest: Destination, pid: int | None = None) -> tuple[Client, socket.socket]:
    """A tunnel to the destination; with the proxy's `pid`, past its first SPLICE_AFTER bytes (so on the relay:
    the proxy's pipes show it)."""
    client = Client(lab, timeout=TIMEOUT)
    assert connect(client, f"{WWW}:{PEER_PORT}").status == 200
    server = dest.accept()
    if pid is not None:
        # 64 KiB at a time, each read by the destination before the next: the proxy's write buffers are empty
        # when the next piece arrives past SPLICE_AFTER, which is when the tunnel moves to the relay
        before, piece = pipes(pid), payload(65536, b"warm")
        for _ in range(2 * SPLICE_AFTER // len(piece)):
            client.send(piece)
            got = bytearray()
            while len(got) < len(piece):
                got += server.recv(65536)
            assert got == piece
            if pipes(pid) > before:
                break
        assert pipes(pid) > before, "the tunnel was not spliced"
    return client, server


LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def test_spliced_tunnel_half_closes_each_way_and_counts_exactly(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                                dest: Destination) -> None:
    """The destination sends 8 MiB and half-closes while the client sends nothing; then the client sends 24 MiB
    and half-closes: each side gets exactly the other's bytes and an EOF, the access log line and the metrics
    count exactly those bytes, and the proxy now holds pipes (the relay's pool): the bytes went through them."""
    proxy = start_proxy("*")
    pid = proxy.serving_pids()[0]
    pipes_before = pipes(pid)
    before = scrape(lab)
    up, down = payload(24 << 20, b"up"), payload(8 << 20, b"down")
    client, server = open_tunnel(lab, dest)
    got: dict[str, bytes] = {}

    def server_side() -> None:
        server.sendall(down)
        server.shutdown(socket.SHUT_WR)
        got["server"] = read_all(server)

    thread = threading.Thread(target=server_side, daemon=True)
    thread.start()
    got["client"] = client.reader.read()  # up to the EOF passed on from the destination's half-close
    client.send(up)  # the other direction still carries everything
    client.sock.shutdown(socket.SHUT_WR)
    thread.join(TIMEOUT)
    assert got["client"] == down and got["server"] == up
    assert client.at_eof()
    client.close()
    server.close()
    assert pipes(pid) > pipes_before, "no pipe was ever made: the tunnel was not spliced"

    def logged() -> list[dict[str, str | None]]:
        return [m.groupdict() for line in proxy.lines() if (m := ACCESS_LINE.search(line))
                and m["method"] == "CONNECT"]

    assert eventually(lambda: bool(logged()), timeout=TIMEOUT)
    line = logged()[0]
    assert (line["target"], line["status"], line["up"], line["down"]) == \
        (f"{WWW}:{PEER_PORT}", "200", str(len(up)), str(len(down)))
    after = scrape(lab)
    assert after[UP] - before[UP] == len(up) and after[DOWN] - before[DOWN] == len(down)


@pytest.mark.parametrize("who", ["client", "destination"])
def test_a_reset_on_one_side_of_a_spliced_tunnel_is_a_reset_on_the_other(
        lab: Lab, origin: Origin, start_proxy: StartProxy, dest: Destination, who: str) -> None:
    proxy = start_proxy("*")
    client, server = open_tunnel(lab, dest, proxy.serving_pids()[0])
    client.send(b"ping")  # through the relay both ways first
    assert server.recv(4) == b"ping"
    server.sendall(b"pong")
    assert client.reader.read(4) == b"pong"
    if who == "client":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client.close()  # its reader goes too: the descriptor is closed now, with a reset
        other = server
    else:
        reset(server)
        other = client.sock
    with pytest.raises(ConnectionResetError):
        while other.recv(65536):
            pass
    client.close()
    other.close()


def test_an_idle_spliced_tunnel_is_closed_after_the_tunnel_idle_timeout(
        lab: Lab, origin: Origin, start_proxy: StartProxy, dest: Destination) -> None:
    proxy = start_proxy("*", EGRESS_HTTP_PROXY_TUNNEL_IDLE_TIMEOUT="2")
    client, server = open_tunnel(lab, dest, proxy.serving_pids()[0])
    started = time.monotonic()
    for _ in range(6):  # traffic every 0.5 s for 3 s: longer than the timeout, yet never idle that long
        client.send(b"tick")
        assert server.recv(4) == b"tick"
        time.sleep(0.5)  # the traffic's pace, not a synchronisation
    assert time.monotonic() - started > 2.5
    quiet = time.monotonic()
    assert server.recv(1) == b""  # then it is idle: the proxy ends it
    # the worker's clock is coarse (1 s, as before the relay): the last byte may be dated up to 1 s early
    assert 0.9 < time.monotonic() - quiet < 5.0
    assert client.at_eof()
    client.close()
    server.close()


def test_a_spliced_tunnel_goes_on_during_the_grace_period_and_ends_with_it(
        lab: Lab, origin: Origin, start_proxy: StartProxy, dest: Destination) -> None:
    proxy = start_proxy("*", EGRESS_PROXY_GRACE_SECONDS="2")
    client, server = open_tunnel(lab, dest, proxy.serving_pids()[0])
    client.send(b"before")
    assert server.recv(6) == b"before"
    stopped = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    data = payload(4 << 20, b"grace")
    server.sendall(data)  # the tunnel still carries bytes while the proxy drains
    assert client.reader.read(len(data)) == data
    assert proxy.process.wait(timeout=6) == 0
    assert 1.5 < time.monotonic() - stopped < 5.0
    assert server.recv(1) == b""
    assert client.at_eof()
    client.close()
    server.close()
