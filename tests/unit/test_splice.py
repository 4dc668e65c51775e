"""proxy/splice.py: a relay of two TCP connections (loopback) through pipes, on asyncio's loop and uvloop.

The two outer peers are plain blocking sockets driven from threads; the relay runs on the loop in the test's
thread until it ends (or, for the bounded cases, until a condition the peers' threads report)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from egress_router.proxy import splice
from egress_router.proxy.splice import A_FAILED, B_FAILED, CLOSED, DOWN, LIMIT, PIPE_SIZE, SHORT, UP, Relay

pytestmark = pytest.mark.skipif(not splice.available(), reason="splice(2) is Linux-only")  # always there on Linux

TIMEOUT = 20.0
HELD_BUF = 256 * 1024  # the fixed buffers of held_back_client


def loops() -> list[str]:
    names = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        names.append("uvloop")
    except ImportError:
        pass
    return names


@pytest.fixture(params=loops())
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    if request.param == "uvloop":
        import uvloop

        new = uvloop.new_event_loop()
    else:
        new = asyncio.new_event_loop()
    yield new
    new.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outer, inner): a connected TCP pair on the loopback; inner is non-blocking (the relay's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        inner, _ = listener.accept()
    inner.setblocking(False)
    return outer, inner


class Setup:
    """client <-> a ==relay== b <-> server."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **kw: Any):
        self.loop = loop
        self.client, a = tcp_pair()
        self.server, b = tcp_pair()
        self.counts = [0, 0]
        self.ends: list[str] = []
        self.done: asyncio.Future[str] = loop.create_future()
        self.relay = Relay(loop, a, b, self.count, self.end, **kw)
        self.a, self.b = a, b

    def count(self, direction: int, n: int) -> None:
        self.counts[direction] += n

    def end(self, how: str) -> None:
        self.ends.append(how)
        self.done.set_result(how)

    def run(self, *threads: Callable[[], None]) -> str:
        """Start the relay and the peers' threads; the loop runs until the relay ends."""
        errors: list[BaseException] = []

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:  # reported in the test's thread
                    errors.append(exc)
            return run

        started = [threading.Thread(target=guarded(fn)) for fn in threads]
        for thread in started:
            thread.start()
        self.relay.start()
        how = self.loop.run_until_complete(asyncio.wait_for(self.done, TIMEOUT))
        for thread in started:
            thread.join(TIMEOUT)
        if errors:
            raise errors[0]
        return how

    def close(self) -> None:
        self.client.close()
        self.server.close()


def payload(size: int, seed: bytes) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed).digest() * 2048
    while len(out) < size:
        out += block
    return bytes(out[:size])


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def test_both_ways_with_half_close_each_way(loop: asyncio.AbstractEventLoop) -> None:
    """The client sends a little and half-closes first; the server goes on sending 24 MiB, then closes:
    each side gets exactly what the other sent and its EOF, the counts are exact, the relay ends CLOSED."""
    s = Setup(loop)
    up, down = payload(300_000, b"up"), payload(24 << 20, b"down")
    got: dict[str, bytes] = {}

    def client() -> None:
        s.client.sendall(up)
        s.client.shutdown(socket.SHUT_WR)
        got["client"] = recv_all(s.client)

    def server() -> None:
        got["server"] = recv_all(s.server)  # the client's EOF arrives while the server has not sent a byte
        s.server.sendall(down)
        s.server.shutdown(socket.SHUT_WR)

    assert s.run(client, server) == CLOSED
    assert got["server"] == up and got["client"] == down
    assert s.counts == [len(up), len(down)]
    assert s.a.fileno() == -1 and s.b.fileno() == -1  # the relay closed its sockets
    s.close()


def test_server_half_closes_first_client_keeps_sending(loop: asyncio.AbstractEventLoop) -> None:
    s = Setup(loop)
    up, down = payload(16 << 20, b"up2"), payload(1000, b"down2")
    got: dict[str, bytes] = {}

    def server() -> None:
        s.server.sendall(down)
        s.server.shutdown(socket.SHUT_WR)
        got["server"] = recv_all(s.server)

    def client() -> None:
        got["client"] = recv_all(s.client)  # EOF first ...
        s.client.sendall(up)  # ... then the other direction still carries everything
        s.client.shutdown(socket.SHUT_WR)

    assert s.run(client, server) == CLOSED
    assert got == {"client": down, "server": up}
    assert s.counts == [len(up), len(down)]
    s.close()


@pytest.mark.parametrize("side", ["client", "server"])
def test_reset_is_passed_on(loop: asyncio.AbstractEventLoop, side: str) -> None:
    """A peer that resets: the other peer sees a reset too, never a clean end."""
    s = Setup(loop)
    resetting, other = (s.client, s.server) if side == "client" else (s.server, s.client)
    seen: list[BaseException | bytes] = []

    def reset() -> None:
        resetting.sendall(b"x" * 1000)
        resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetting.close()

    def watch() -> None:
        data = b""
        try:
            while chunk := other.recv(65536):
                data += chunk
            seen.append(data)
        except ConnectionResetError as exc:
            seen.append(exc)

    how = s.run(reset, watch)
    assert how == (A_FAILED if side == "client" else B_FAILED)
    assert len(seen) == 1 and isinstance(seen[0], ConnectionResetError), seen
    other.close()


def held_back_client(s: Setup, data: bytes, patience: float) -> tuple[threading.Event, list[int], Callable[[], None]]:
    """A client thread's body that sends `data` until a send makes no progress for `patience` s (it is held
    back: `stuck` is set, `sent` says how far it got), then sends the rest, half-closes and reads to the end.

    The client's send buffer and the relay's receive buffer on that side get fixed sizes (HELD_BUF): left to
    autotuning, a receive buffer may grow to tcp_rmem's maximum (32 MiB on some machines), and what is held
    on the way would depend on timing."""
    s.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HELD_BUF)
    s.a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HELD_BUF)
    stuck = threading.Event()
    sent = [0]

    def client() -> None:
        s.client.settimeout(patience)
        view = memoryview(data)
        try:
            while sent[0] < len(data):
                sent[0] += s.client.send(view[sent[0]:sent[0] + 65536])
        except TimeoutError:
            stuck.set()
            s.client.settimeout(TIMEOUT)
            s.client.sendall(view[sent[0]:])
        s.client.shutdown(socket.SHUT_WR)
        recv_all(s.client)

    return stuck, sent, client


def test_slow_reader_is_bounded_and_loses_nothing(loop: asyncio.AbstractEventLoop) -> None:
    """The server does not read: the client is stopped by TCP (its send blocks), the relay holds at most one
    pipe's worth; once the server reads, every byte arrives, in order."""
    s = Setup(loop)
    s.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    data = payload(64 << 20, b"slow")
    stuck, sent, client = held_back_client(s, data, 2.0)

    got = bytearray()
    held = [-1]

    def server() -> None:
        assert stuck.wait(TIMEOUT), "the client was never held back"
        held[0] = sent[0] - s.counts[UP]  # in the relay's pipe or the kernel's buffers on the way
        while chunk := s.server.recv(1 << 20):  # drained either way: a failure is reported, not a hang
            got.extend(chunk)
        s.server.close()

    s.run(client, server)
    # one pipe, and the two fixed buffers on the client's side (the kernel doubles what is asked for)
    assert 0 <= held[0] <= PIPE_SIZE + 4 * HELD_BUF, held
    assert bytes(got) == data
    assert s.counts[UP] == len(data)
    s.client.close()


def test_a_destination_that_does_not_drain_makes_the_relay_wait_not_spin(loop: asyncio.AbstractEventLoop,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With the server not reading and the pipe full, the relay's callbacks stop: no reader stays on a source
    whose pipe has no room (it would fire on every loop turn), and every byte still arrives once it reads."""
    calls = [0]
    pump = Relay._pump

    def counted(self: Relay, flow: Any) -> None:
        calls[0] += 1
        pump(self, flow)

    monkeypatch.setattr(Relay, "_pump", counted)
    s = Setup(loop)
    s.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    data = payload(32 << 20, b"spin")
    stuck, sent, client = held_back_client(s, data, 1.0)

    got = bytearray()
    during = [0]

    def server() -> None:
        assert stuck.wait(TIMEOUT), "the client was never held back"
        before = calls[0]
        threading.Event().wait(1.0)  # a window to count callbacks in, not a synchronisation
        during[0] = calls[0] - before
        while chunk := s.server.recv(1 << 20):
            got.extend(chunk)
        s.server.close()

    s.run(client, server)
    assert during[0] < 20, f"{during[0]} relay callbacks in 1 s of a blocked destination"
    assert bytes(got) == data
    s.client.close()


def test_abort_closes_both_without_on_end(loop: asyncio.AbstractEventLoop) -> None:
    """abort (grace, idle): both peers see the end (a clean one without `hard`), on_end is not called."""
    s = Setup(loop)
    moved: asyncio.Future[None] = loop.create_future()
    s.relay.on_bytes = lambda direction, n: moved.done() or moved.set_result(None)
    s.relay.start()
    s.client.sendall(b"hello")
    loop.run_until_complete(asyncio.wait_for(moved, TIMEOUT))
    s.relay.abort("grace")
    assert s.relay.ended == "grace" and s.ends == []
    assert recv_all(s.server) == b"hello"
    assert recv_all(s.client) == b""
    assert s.a.fileno() == -1 and s.b.fileno() == -1
    s.close()


def test_limit_hands_the_sockets_back(loop: asyncio.AbstractEventLoop) -> None:
    """DOWN limited to N bytes (a body of known length): exactly N go to the client, the rest stays unread
    in b's socket, which is handed back open."""
    s = Setup(loop, limit_down=5_000_000, up=False)
    body, rest = payload(5_000_000, b"body"), b"NEXT RESPONSE"
    got = bytearray()

    def server() -> None:
        s.server.sendall(body + rest)

    def client() -> None:
        while len(got) < len(body):
            got.extend(s.client.recv(1 << 20))

    assert s.run(server, client) == LIMIT
    assert bytes(got) == body and s.counts == [0, len(body)]
    assert s.a.fileno() != -1 and s.b.fileno() != -1
    s.b.setblocking(True)
    s.b.settimeout(TIMEOUT)
    assert s.b.recv(100) == rest
    s.client.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        s.client.recv(1)  # nothing after the body, and no EOF: the connection goes on
    s.a.close()
    s.b.close()
    s.close()


def test_short_body(loop: asyncio.AbstractEventLoop) -> None:
    s = Setup(loop, limit_down=1_000_000, up=False)

    def server() -> None:
        s.server.sendall(b"y" * 1000)
        s.server.close()

    def client() -> None:
        assert s.client.recv(1000) is not None

    assert s.run(server, client) == SHORT
    assert s.counts[DOWN] == 1000
    s.close()


def test_pipes_come_from_the_pool_and_go_back(loop: asyncio.AbstractEventLoop) -> None:
    """A relay takes two pipes when it starts and gives them back, empty, when it ends: the next relay makes
    no new descriptor. abort(hard) resets both peers and does not call on_end."""
    first = Setup(loop)
    first.relay.start()
    first.relay.abort("test")
    first.close()
    fds = len(os.listdir("/proc/self/fd"))
    s = Setup(loop)  # 4 new sockets (2 pairs)
    s.relay.start()
    assert len(os.listdir("/proc/self/fd")) == fds + 4, "the pipes were not taken from the pool"
    assert all(flow.pipe is not None for flow in s.relay.flows)
    s.relay.abort("test", hard=True)
    assert s.relay.ended == "test" and s.ends == []
    assert all(flow.pipe is None for flow in s.relay.flows)
    s.client.settimeout(TIMEOUT)
    with pytest.raises(ConnectionResetError):
        s.client.recv(1)
    s.close()


def test_no_pipe_to_be_had_changes_nothing(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup(loop)

    def no_pipe(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(splice, "_pool", [])
    monkeypatch.setattr(os, "pipe2", no_pipe)
    with pytest.raises(OSError):
        s.relay.start()
    monkeypatch.undo()
    assert s.relay.ended is None and s.a.fileno() != -1 and s.b.fileno() != -1
    s.client.sendall(b"still there")
    s.b.setblocking(True)
    s.a.setblocking(True)
    s.a.settimeout(TIMEOUT)
    assert s.a.recv(100) == b"still there"  # nothing was read: the caller's transport goes on
    s.a.close()
    s.b.close()
    s.close()
