"""The HTTP proxy's last answer on a connection leaves with the connection's FIN in the same segment
(ClientConnection.close corks the socket before the last write; the close pushes both).

A real Worker on the test's event loop (asyncio's and uvloop), listening on the loopback; an origin on the
loopback too (the rules allow 127.0.0.1); the segments seen by an AF_PACKET capture (tests/unit/segments.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from egress_router.core.config import load_http_proxy
from egress_router.proxy import metrics
from egress_router.proxy.http import ClientConnection
from egress_router.proxy.http_worker import Worker
from egress_router.proxy.metrics import SharedCounters
from tests.unit.segments import LoopbackSegments

TIMEOUT = 20.0
LOCAL = "127.0.0.1"


def listening() -> socket.socket:
    sock = socket.create_server((LOCAL, 0), backlog=64)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def http_proxy() -> AsyncIterator[tuple[Worker, int]]:
    """A worker whose rules allow the loopback, serving a fresh port; stopped (and drained) at the end."""
    settings = load_http_proxy({"EGRESS_HTTP_PROXY_DESTINATION": LOCAL, "EGRESS_PROXY_GRACE_SECONDS": "1"})
    worker = Worker(settings, SharedCounters(1), 0, ClientConnection)
    listener = listening()
    port = listener.getsockname()[1]
    running = asyncio.get_event_loop().create_task(worker.run([listener], alone=True))
    try:
        yield worker, port
    finally:
        worker.stopped.set()
        await asyncio.wait_for(running, TIMEOUT)


async def exchange(port: int, request: bytes) -> tuple[bytes, int]:
    """`request` from a new client connection, its answer read to the proxy's EOF; the client's port."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCAL, port), TIMEOUT)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return answer, client_port


def test_an_answer_that_ends_the_connection_leaves_with_its_fin_in_one_segment(
        loop: asyncio.AbstractEventLoop, segments: LoopbackSegments) -> None:
    """A proxied answer to a `Connection: close` request, and a refusal: each reaches the client whole, with the
    proxy's FIN in the segment that carries its last bytes (no segment with a FIN alone)."""
    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        await reader.read()  # the proxy keeps its upstream connection for the next request
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(origin, sock=listening())
        origin_port = server.sockets[0].getsockname()[1]
        async with server, http_proxy() as (worker, port):
            answer, client_port = await exchange(
                port, f"GET http://{LOCAL}:{origin_port}/ HTTP/1.1\r\nHost: {LOCAL}\r\nConnection: close\r\n\r\n"
                .encode())
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello")
            assert b"\r\nConnection: close\r\n" in answer
            assert segments.carrying(port, client_port) == [(len(answer), True)]

            refusal, client_port = await exchange(port, b"GET http://203.0.113.77/ HTTP/1.1\r\nHost: 203.0.113.77"
                                                        b"\r\nConnection: close\r\n\r\n")
            assert refusal.startswith(b"HTTP/1.1 403 ") and refusal.endswith(b"denied by the egress policy\n")
            assert segments.carrying(port, client_port) == [(len(refusal), True)]
            assert worker.shared.total(metrics.DENIED) == 1

    loop.run_until_complete(main())


def dechunked(data: bytes) -> bytes:
    """A chunked body without its framing; it must end with the last chunk and nothing after it."""
    out, at = bytearray(), 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            assert data[end:] == b"\r\n\r\n", "bytes after the last chunk"
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        assert data[end + 2 + size:end + 4 + size] == b"\r\n"
        at = end + 4 + size


@pytest.mark.parametrize("pause", [0.0, 0.001], ids=["fast-reader", "slow-reader"])
def test_a_large_answer_that_ends_the_connection_reaches_the_client_whole(
        loop: asyncio.AbstractEventLoop, pause: float) -> None:
    """A chunked answer far larger than what the socket takes at once, to a `Connection: close` request: the
    cork holds back only a last piece smaller than a segment and the close pushes it; a client that reads at
    once and one that reads slowly each get every byte as the origin sent it, then the EOF."""
    body = bytes(range(256)) * (3 * 1024 * 1024 // 256)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"  # the proxy passes it on in chunks of its own

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        await writer.drain()
        await reader.read()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(origin, sock=listening())
        origin_port = server.sockets[0].getsockname()[1]
        async with server, http_proxy() as (_, port):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.connect((LOCAL, port))
            client.setblocking(False)
            await loop.sock_sendall(client, f"GET http://{LOCAL}:{origin_port}/ HTTP/1.1\r\nHost: {LOCAL}\r\n"
                                    "Connection: close\r\n\r\n".encode())
            got = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 16384), TIMEOUT):
                got += chunk
                await asyncio.sleep(pause)
            client.close()
            head, _, received = bytes(got).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close" in head
            assert dechunked(received) == body

    loop.run_until_complete(main())
