"""proxy/dns_conn.py: the DNS proxy's connections on plain sockets, in a real DnsWorker, on the loopback.

The worker runs on the test's event loop (asyncio's and uvloop), with its listener and its backend on
127.0.0.1; clients and backends are asyncio streams on the same loop, or plain sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address

import pytest

from egress_router.core.config import DnsProxySettings
from egress_router.core.forwards import Forward
from egress_router.proxy import dns_conn
from egress_router.proxy import dns_metrics as m
from egress_router.proxy.dns import DnsWorker
from egress_router.proxy.dns_metrics import ForwardTable
from egress_router.proxy.metrics import SharedCounters
from tests.unit.segments import LoopbackSegments

TIMEOUT = 20.0
LOCAL = "127.0.0.1"
SMALL = 256 * 1024


def kernel_max(name: str) -> int:
    """The maximum a TCP buffer may autotune to (the third field of /proc/sys/net/ipv4/tcp_rmem or tcp_wmem)."""
    with open(f"/proc/sys/net/ipv4/{name}") as handle:
        return int(handle.read().split()[2])


@contextlib.asynccontextmanager
async def proxy_to(backend_port: int, rcvbuf: int = 0, sndbuf: int = 0,
                   **changes: object) -> AsyncIterator[tuple[DnsWorker, int]]:
    """A worker forwarding a fresh loopback port to `backend_port`; its listen socket's port. `rcvbuf`,
    `sndbuf`: the buffers of the client sockets it accepts (inherited from the listener)."""
    listener = socket.create_server((LOCAL, 0), backlog=64)
    listener.setblocking(False)
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    port = listener.getsockname()[1]
    settings = DnsProxySettings(forwards=(Forward(port, IPv4Address(LOCAL), backend_port),), debug=True, workers=1,
                                connect_timeout=2.0, idle_timeout=60.0, max_connections=1000, ttl_min=1.0,
                                ttl_max=300.0, grace_seconds=1.0)
    settings = dataclasses.replace(settings, **changes)  # type: ignore[arg-type]
    worker = DnsWorker(settings, SharedCounters(1), ForwardTable(1), 0)
    await worker.listen([listener])
    try:
        yield worker, port
    finally:
        for connection in list(worker.connections):
            connection.abort("test over")
        for listeners in worker.servers.values():
            for each in listeners:
                each.close()
        worker.deadlines.close()
        worker.poller.close()


def listening() -> socket.socket:
    """A loopback listener (given to the loop as a socket: no name to resolve, so no resolver thread; uvloop's
    would outlive the test, and take signals that other tests block in their own thread only)."""
    sock = socket.create_server((LOCAL, 0), backlog=64)
    sock.setblocking(False)
    return sock


def connected(port: int, sndbuf: int = 0) -> socket.socket:
    sock = socket.socket()
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.connect((LOCAL, port))  # the loopback's handshake completes at once
    sock.setblocking(False)
    return sock


def cell(worker: DnsWorker, port: int, which: int) -> int:
    slot = worker.targets[port].slot
    return slot.cells[slot.base + which]


async def until(check: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_bytes_and_fins_of_both_sides_before_the_connect_is_seen_reach_the_other_side(
        loop: asyncio.AbstractEventLoop) -> None:
    """The client's bytes and FIN arrive before the proxy has seen its backend connect complete, and the backend
    answers and ends at once: everything reaches the other side, the FINs as FINs, counted once."""
    got: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting\n")
        writer.write_eof()
        got.append(await reader.read())
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(backend, sock=listening())
        async with server, proxy_to(server.sockets[0].getsockname()[1]) as (worker, port):
            reader, writer = await asyncio.open_connection(sock=connected(port))
            writer.write(b"hello")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"greeting\n"
            writer.close()
            await until(lambda: not worker.connections and got, "the connection to end")
            assert got == [b"hello"]
            assert [cell(worker, port, c) for c in (m.RELAYED, m.ABANDONED, m.FAILED, m.BYTES_UP, m.BYTES_DOWN,
                                                    m.OPEN)] == [1, 0, 0, 5, 9, 0]
            assert worker.targets[port].backends[0].open == 0

    loop.run_until_complete(main())


def test_a_backend_that_does_not_read_stops_the_client_and_the_relay_holds_one_buffer(
        loop: asyncio.AbstractEventLoop) -> None:
    """A backend that reads nothing for a while: the proxy stops reading the client (the client's own write
    buffer fills), holds at most one read's worth itself, and then delivers every byte in order."""
    body = os.urandom(48 << 20)
    start_reading = asyncio.Event()
    digests: list[str] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await start_reading.wait()
        digests.append(hashlib.sha256(await reader.read()).hexdigest())
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(backend, sock=listening())
        # the kernel's buffers, fixed where the test owns the socket (autotuning would grow them toward
        # tcp_rmem's maximum): the client's send buffer, the backend's receive buffer, and the proxy's receive
        # buffer on the client side through the listener (accepted sockets inherit it)
        server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
        async with server, proxy_to(server.sockets[0].getsockname()[1], rcvbuf=SMALL) as (worker, port):
            _, writer = await asyncio.open_connection(sock=connected(port, sndbuf=SMALL))
            writer.write(body)
            writer.write_eof()
            sizes = [-1]
            while sizes[-1] != (now := writer.transport.get_write_buffer_size()) or not worker.connections:
                sizes.append(now)  # until it stops moving: the proxy and the kernel hold what they will hold
                await asyncio.sleep(0.3)
            taken = len(body) - now
            # each fixed buffer is doubled by the kernel; the proxy's send buffer toward the backend autotunes
            bound = 3 * 2 * SMALL + kernel_max("tcp_wmem") + dns_conn.BUFFER
            assert taken <= bound, f"{taken} bytes taken from a client whose backend reads nothing (bound {bound})"
            [connection] = worker.connections
            held = len(connection.buf_up or b"")
            assert held <= dns_conn.BUFFER
            start_reading.set()
            await until(lambda: digests, "the backend to read it all")
            assert digests == [hashlib.sha256(body).hexdigest()]
            assert cell(worker, port, m.BYTES_UP) == len(body)
            writer.close()

    loop.run_until_complete(main())


def test_a_client_that_ends_while_held_back_after_the_backend_ended_is_not_taken_for_a_failure(
        loop: asyncio.AbstractEventLoop) -> None:
    """The backend sends its greeting and FIN at once (the proxy shuts the client's side), then reads slowly;
    the client sends more than the buffers hold, then its FIN. With the client's FIN queued behind bytes the
    proxy holds back, the client socket is hung up both ways (epoll reports it whatever the mask) without
    any error: every byte must still reach the backend, and the connection end cleanly."""
    body = os.urandom(24 << 20)
    start_reading = asyncio.Event()
    got: list[bytes] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting\n")
        writer.write_eof()
        await start_reading.wait()
        got.append(await reader.read())
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(backend, sock=listening())
        async with server, proxy_to(server.sockets[0].getsockname()[1]) as (worker, port):
            reader, writer = await asyncio.open_connection(sock=connected(port))
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"greeting\n"
            writer.write(body)
            writer.write_eof()
            await asyncio.sleep(1.0)  # the FIN arrives behind bytes the proxy cannot pass on yet
            start_reading.set()
            await until(lambda: got, "the backend to read everything")
            assert len(got[0]) == len(body) and got[0] == body
            await until(lambda: not worker.connections, "the connection to end")
            assert cell(worker, port, m.BYTES_UP) == len(body)
            writer.close()

    loop.run_until_complete(main())


def test_a_reset_on_either_side_reaches_the_other_as_a_reset(loop: asyncio.AbstractEventLoop) -> None:
    endings: list[str] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line == b"reset me\n":  # the backend resets
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.write(b"ok\n")
        try:
            endings.append("eof" if await reader.read() == b"" else "data")
        except ConnectionResetError:
            endings.append("reset")
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(backend, sock=listening())
        async with server, proxy_to(server.sockets[0].getsockname()[1]) as (worker, port):
            reader, writer = await asyncio.open_connection(sock=connected(port))
            writer.write(b"reset me\n")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            reader, writer = await asyncio.open_connection(sock=connected(port))
            writer.write(b"hi\n")
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"ok\n"
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                       struct.pack("ii", 1, 0))
            writer.transport.abort()  # the client resets
            await until(lambda: endings, "the backend to see the end")
            assert endings == ["reset"]
            await until(lambda: not worker.connections, "the connections to end")

    loop.run_until_complete(main())


def fill_descriptors() -> list[int]:
    """Descriptors opened until there is none left under the current limit."""
    taken = []
    while True:
        try:
            taken.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            return taken


def test_out_of_descriptors_the_listener_rests_and_takes_the_waiting_connections_later(
        loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture) -> None:
    """With no descriptor left, accept fails while the listener stays readable: the worker must neither spin
    nor drop what waits in the backlog. With two back, one connection is served (its client and backend
    sockets); with one, a connection is accepted but gets no backend socket: it is refused and counted as
    failed, and the backend is not blamed. The backend never accepts (its backlog completes the connects), so
    only the proxy takes descriptors."""
    caplog.set_level(logging.INFO)
    backend = socket.create_server((LOCAL, 0), backlog=64)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients = [socket.socket() for _ in range(12)]  # made before the descriptors run out
    spare: list[int] = []

    async def settle() -> None:
        await asyncio.sleep(3 * dns_conn.STARVED_PAUSE)

    async def main() -> None:
        async with proxy_to(backend.getsockname()[1]) as (worker, port):
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
            try:
                spare.extend(fill_descriptors())
                for client in clients:
                    client.setblocking(False)
                    client.connect_ex((LOCAL, port))
                await until(lambda: "cannot accept connections: Too many open files" in caplog.text,
                            "the worker to run out of descriptors")
                cpu = time.process_time()
                await asyncio.sleep(1.0)
                spent = time.process_time() - cpu
                assert spent < 0.5, f"the worker spun on a listener it could not accept from: {spent:.2f} s of CPU"
                assert not worker.connections
                os.close(spare.pop())
                os.close(spare.pop())
                await until(lambda: cell(worker, port, m.RELAYED) == 1, "one connection to be served")
                await settle()
                assert (cell(worker, port, m.RELAYED), cell(worker, port, m.FAILED)) == (1, 0)
                os.close(spare.pop())
                await until(lambda: cell(worker, port, m.FAILED) == len(clients) - 1, "the rest to be refused")
                assert "failed: cannot connect to" in caplog.text and "Too many open files" in caplog.text
            finally:
                for fd in spare:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert (cell(worker, port, m.UNREACHABLE), cell(worker, port, m.OPEN)) == (0, 1)
            assert worker.targets[port].backends[0].down_until == 0.0  # not the backend's fault

    try:
        loop.run_until_complete(main())
    finally:
        for client in clients:
            client.close()
        backend.close()


def test_a_connect_that_times_out_tries_the_next_backend_and_the_client_that_left_is_not_retried(
        loop: asyncio.AbstractEventLoop) -> None:
    """The connect deadline queue: a backend that does not answer (a listener whose backlog is full, so its
    SYNs go unanswered) times out; with one backend the client is closed after the timeout, counted failed."""
    full = socket.socket()
    full.bind((LOCAL, 0))
    full.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: the next SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)

    async def main() -> None:
        await asyncio.sleep(0.2)
        async with proxy_to(full.getsockname()[1], connect_timeout=0.5) as (worker, port):
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(sock=connected(port))
            writer.write(b"query")
            try:
                data = await asyncio.wait_for(reader.read(), TIMEOUT)
            except ConnectionResetError:
                data = b""
            elapsed = time.monotonic() - started
            assert data == b""
            assert 0.4 < elapsed < 3.0, elapsed
            assert cell(worker, port, m.TIMED_OUT) == 1 and cell(worker, port, m.FAILED) == 1
            assert worker.targets[port].backends[0].open == 0
            writer.close()

    try:
        loop.run_until_complete(main())
    finally:
        for filler in fillers:
            filler.close()
        full.close()


def epoll_targets(epfd: int) -> set[int]:
    """The descriptors registered in the epoll set `epfd`, as the kernel lists them (its 'tfd:' lines)."""
    with open(f"/proc/self/fdinfo/{epfd}") as handle:
        return {int(line.split()[1]) for line in handle if line.startswith("tfd:")}


def test_the_sockets_of_ended_connections_leave_the_epoll_set_by_their_close(
        loop: asyncio.AbstractEventLoop) -> None:
    """Poller.forget makes no epoll_ctl: the close of a connection's sockets must take them out of the kernel's
    set (and out of the handlers), clean ends and resets alike, while the listener stays registered."""
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(5))
        writer.write_eof()
        await reader.read()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(backend, sock=listening())
        async with server, proxy_to(server.sockets[0].getsockname()[1]) as (worker, port):
            poller = worker.poller
            before = epoll_targets(poller.epoll.fileno())
            listener_fds = {each.fd for listeners in worker.servers.values() for each in listeners}
            assert listener_fds and listener_fds <= before
            seen: set[int] = set()
            for n in range(20):
                reader, writer = await asyncio.open_connection(sock=connected(port))
                await until(lambda: worker.connections, "the connection to be accepted")
                (connection,) = worker.connections
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"hello"
                seen |= {connection.fd_a, connection.fd_b}
                assert {connection.fd_a, connection.fd_b} <= epoll_targets(poller.epoll.fileno())
                if n % 2:
                    writer.transport.abort()  # a reset: the backend's socket is reset-closed
                else:
                    writer.close()
                await until(lambda: not worker.connections, "the connection to end")
            assert epoll_targets(poller.epoll.fileno()) == before
            assert not seen & set(poller.handlers)

    loop.run_until_complete(main())


def test_a_shutdown_after_the_peers_unread_reset_is_reported_as_the_reset() -> None:
    """The FIN passed on to a side that reset meanwhile (its reset not read yet): shutdown() fails with ENOTCONN,
    which says nothing; the connection's line must say what happened, the reset, kept in SO_ERROR."""
    server = listening()
    mine = socket.create_connection(server.getsockname())
    theirs, _ = server.accept()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    theirs.close()  # a reset
    server.close()
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # the reset has arrived once a shutdown fails
            try:
                mine.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failure = exc
                break
            assert time.monotonic() < deadline, "the reset did not arrive"
            time.sleep(0.01)
        assert failure.errno == errno.ENOTCONN
        told = dns_conn.pending_error(mine, failure)
        assert told.errno == errno.ECONNRESET, told
        other = OSError(errno.EPIPE, "broken pipe")
        assert dns_conn.pending_error(mine, other) is other  # anything else is told as it is
    finally:
        mine.close()


def test_what_the_client_sends_in_pieces_while_the_backend_connect_waits_reaches_it_whole(
        loop: asyncio.AbstractEventLoop) -> None:
    """The early read (Connection.read_early): bytes that arrive in several pieces while the backend's SYNs go
    unanswered (a listener whose accept queue is full) are held and, once the connect completes, sent whole and
    in order, the client's FIN after them; counted once, the connection ends clean."""
    full = socket.socket()
    full.bind((LOCAL, 0))
    full.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: the next SYNs are dropped until it has room again
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    pieces = [bytes([65 + i]) * size for i, size in enumerate((1000, 20000, 3, 70000))]
    sent = b"".join(pieces)

    async def main() -> None:
        await asyncio.sleep(0.2)
        async with proxy_to(full.getsockname()[1], connect_timeout=15.0) as (worker, port):
            reader, writer = await asyncio.open_connection(sock=connected(port))
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write_eof()
            await until(lambda: worker.connections and next(iter(worker.connections)).eof_up,
                        "the pieces and the FIN to be held")
            (connection,) = worker.connections
            assert not connection.connected and connection.buf_up == sent and connection.eof_up
            fillers_at = {f.getsockname() for f in fillers}
            full.setblocking(False)
            backend = None
            deadline = time.monotonic() + TIMEOUT
            while backend is None:  # make room; the proxy's SYN is answered on one of its retries
                assert time.monotonic() < deadline, "the proxy's connect never reached the backend"
                try:
                    sock, peer = full.accept()
                except BlockingIOError:
                    await asyncio.sleep(0.05)
                    continue
                if peer in fillers_at:
                    sock.close()
                else:
                    backend = sock
            with backend:
                backend.setblocking(False)
                got = b""
                while True:
                    chunk = await loop.sock_recv(backend, 65536)
                    if not chunk:
                        break
                    got += chunk
                assert got == sent
                await loop.sock_sendall(backend, b"answer")
                backend.shutdown(socket.SHUT_WR)
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"answer"
            writer.close()
            await until(lambda: not worker.connections, "the connection to end")
            assert [cell(worker, port, c) for c in (m.RELAYED, m.FAILED, m.BYTES_UP, m.BYTES_DOWN)] == \
                [1, 0, len(sent), 6]

    try:
        loop.run_until_complete(main())
    finally:
        for filler in fillers:
            filler.close()
        full.close()


# ---------------------------------------------------------------- a FIN that came with the last bytes

def data_and_fin(sock: socket.socket, data: bytes) -> None:
    """`data` and the FIN in one segment: corked by MSG_MORE, pushed by the shutdown."""
    assert sock.send(data, socket.MSG_MORE) == len(data)
    sock.shutdown(socket.SHUT_WR)


async def read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    got = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT):
        got += chunk
    return got


def test_a_reply_whose_fin_came_with_it_leaves_with_its_fin_in_one_segment_and_the_other_way_stays_open(
        loop: asyncio.AbstractEventLoop, segments: LoopbackSegments) -> None:
    """The backend's answer and FIN arrive in one segment: the proxy reads them in one wake-up (EPOLLRDHUP) and
    sends them on as one segment, the half-close passed on at once; the client may still send, and its bytes
    and FIN reach the backend after that."""
    async def main() -> None:
        backend_listener = listening()
        async with proxy_to(backend_listener.getsockname()[1]) as (worker, port):
            client = connected(port)
            client_port = client.getsockname()[1]
            await loop.sock_sendall(client, b"question")
            backend, _ = await asyncio.wait_for(loop.sock_accept(backend_listener), TIMEOUT)
            backend.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(backend, 100), TIMEOUT) == b"question"
            data_and_fin(backend, b"answer " * 100)
            assert await read_all(loop, client) == b"answer " * 100  # to its EOF
            assert segments.carrying(port, client_port) == [(700, True)]
            await loop.sock_sendall(client, b"afterwards")
            client.shutdown(socket.SHUT_WR)
            assert await read_all(loop, backend) == b"afterwards"
            await until(lambda: not worker.connections, "the connection to end")
            assert [cell(worker, port, c) for c in (m.RELAYED, m.FAILED, m.BYTES_UP, m.BYTES_DOWN)] == \
                [1, 0, 18, 700]
            client.close()
            backend.close()
        backend_listener.close()

    loop.run_until_complete(main())


def test_a_request_whose_fin_came_with_it_reaches_the_backend_in_one_segment_and_the_answer_still_comes_back(
        loop: asyncio.AbstractEventLoop, segments: LoopbackSegments) -> None:
    """The client's request and FIN in one segment reach the backend as one (the proxy half-closes at once); the
    backend's answer and FIN, which end the connection, reach the client as one too (the close sends the FIN
    behind the bytes held back by MSG_MORE)."""
    async def main() -> None:
        backend_listener = listening()
        async with proxy_to(backend_listener.getsockname()[1]) as (worker, port):
            client = connected(port)
            client_port = client.getsockname()[1]
            backend, _ = await asyncio.wait_for(loop.sock_accept(backend_listener), TIMEOUT)
            backend.setblocking(False)
            proxy_port = backend.getpeername()[1]
            await asyncio.sleep(0.2)  # the connect seen: this is the relay's path, not the early read's
            assert next(iter(worker.connections)).connected
            data_and_fin(client, b"GET / HTTP/1.0\r\n\r\n")
            assert await read_all(loop, backend) == b"GET / HTTP/1.0\r\n\r\n"
            data_and_fin(backend, b"HTTP/1.0 200 OK\r\n\r\nbody")
            assert await read_all(loop, client) == b"HTTP/1.0 200 OK\r\n\r\nbody"
            assert segments.carrying(proxy_port, backend.getsockname()[1]) == \
                [(18, True)]
            assert segments.carrying(port, client_port) == [(23, True)]
            await until(lambda: not worker.connections, "the connection to end")
            assert [cell(worker, port, c) for c in (m.RELAYED, m.FAILED, m.BYTES_UP, m.BYTES_DOWN)] == \
                [1, 0, 18, 23]
            client.close()
            backend.close()
        backend_listener.close()

    loop.run_until_complete(main())


def test_an_answer_with_its_fin_that_the_client_cannot_take_at_once_is_held_and_the_fin_follows_it(
        loop: asyncio.AbstractEventLoop) -> None:
    """The backend's 32 KiB answer and its FIN are in before the proxy reads (the test does not yield between
    them), and the client takes only a few KiB at once (small buffers on both ends): the read that saw the FIN
    sends part, the rest is held with the FIN already read; the client, reading slowly, gets every byte, then
    the EOF."""
    body = hashlib.sha256(b"seed").digest() * (32 * 1024 // 32)

    async def main() -> None:
        backend_listener = listening()
        async with proxy_to(backend_listener.getsockname()[1], sndbuf=4096) as (worker, port):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect((LOCAL, port))
            client.setblocking(False)
            backend, _ = await asyncio.wait_for(loop.sock_accept(backend_listener), TIMEOUT)
            backend.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            backend.setblocking(False)
            await until(lambda: worker.connections and next(iter(worker.connections)).connected, "the connect")
            data_and_fin(backend, body)
            await until(lambda: any(c.eof_down and c.buf_down is not None for c in worker.connections),
                        "the last bytes held with the backend's FIN already read")
            got = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 1024), TIMEOUT):
                got += chunk
                await asyncio.sleep(0.001)
            assert len(got) == len(body) and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
            client.close()
            await until(lambda: not worker.connections, "the connection to end")
            assert [cell(worker, port, c) for c in (m.RELAYED, m.FAILED, m.BYTES_DOWN)] == [1, 0, len(body)]
            backend.close()
        backend_listener.close()

    loop.run_until_complete(main())
