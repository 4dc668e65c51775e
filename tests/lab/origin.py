"""A small HTTP/1.1 origin and TCP echo service for the proxy lab tests, plus the HTTP framing both sides use.

Listening sockets are made in the caller's network namespace (call `listen` inside `lab.entered(role)`);
one accept thread per socket and one thread per connection, every wait bounded. The origin records
each connection and each request it saw, so tests can check what really reached it (the Host header,
dropped hop-by-hop headers, the source address, or that nothing arrived at all).

Routes (any host): /hello, /headers (the raw request head back), /echo (the body back), /blob?size=N,
/chunked, /close (close-delimited), /status/204, /status/304, /slow?delay=S, /reset (a close-delimited
body cut by a TCP reset), /switch (101 Switching Protocols to any request), /early-hints (103 with a Link
header, then 200); anything else is 404. Listener kinds: 'http', 'echo', and 'stall' (accepts, never
reads: an upstream that does not drain).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

IO_TIMEOUT = 15.0  # a stuck peer ends a connection thread after this long
MAX_HEAD = 256 * 1024
MAX_BODY = 64 * 1024 * 1024
CHUNKS = (b"first chunk\n", b"second chunk\n", b"x" * 20000 + b"\n", b"last chunk\n")
CHUNKED_BODY = b"".join(CHUNKS)
CLOSE_BODY = b"this body ends when the connection does\n" * 100
ECHO_TAIL = b"[echo: end of input seen]\n"
SLOW_BODY = b"slow response done\n"
RESET_BODY = b"the origin resets the connection after this line\n" * 20
EARLY_HINT_LINK = "</style.css>; rel=preload; as=style"
HOP_HEADER = "X-Origin-Hop"  # the origin names it in its own Connection header


class ProtocolError(Exception):
    """The peer did not speak HTTP/1.1 as expected."""


def blob(size: int) -> bytes:
    """The deterministic body of /blob?size=N."""
    return random.Random(size).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ framing shared by origin and test clients

def read_head(reader: BinaryIO) -> bytes | None:
    """A message head up to and including the blank line; None at EOF before its first byte."""
    head = b""
    while True:
        line = reader.readline(MAX_HEAD + 1)
        if not line:
            if head:
                raise ProtocolError(f"connection closed inside a message head: {head[:200]!r}")
            return None
        head += line
        if len(head) > MAX_HEAD:
            raise ProtocolError("message head too large")
        if line in (b"\r\n", b"\n"):
            return head


def parse_fields(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(name, value)]) of a message head."""
    lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        fields.append((name.strip(), value.strip()))
    return lines[0], fields


def field(fields: list[tuple[str, str]] | tuple[tuple[str, str], ...], name: str) -> str | None:
    """The values of every `name` header joined with ', ' (None when absent)."""
    values = [value for key, value in fields if key.lower() == name.lower()]
    return ", ".join(values) if values else None


def read_exact(reader: BinaryIO, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ProtocolError(f"connection closed after {len(data)} of {size} body bytes")
    return data


def read_chunked(reader: BinaryIO, trailers: list[bytes] | None = None) -> bytes:
    """A chunked body; its trailer lines (without CRLF) go into `trailers` when given."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = reader.readline(1024)
        if not line.endswith(b"\n"):
            raise ProtocolError(f"bad chunk size line {line!r}")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = reader.readline(MAX_HEAD)
                if trailer in (b"\r\n", b"\n"):
                    return b"".join(parts)
                if not trailer:
                    raise ProtocolError("connection closed inside the trailers")
                if trailers is not None:
                    trailers.append(trailer.rstrip(b"\r\n"))
        total += size
        if total > MAX_BODY:
            raise ProtocolError("chunked body too large")
        parts.append(read_exact(reader, size))
        if reader.readline(3) not in (b"\r\n", b"\n"):
            raise ProtocolError("chunk not followed by CRLF")


@dataclass(frozen=True, slots=True)
class Response:
    """A response as a client read it."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        return field(self.headers, name)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def read_response(reader: BinaryIO, *, method: str = "GET") -> Response:
    """One response from `reader`, its body framed as RFC 9112 says (1xx responses are skipped)."""
    while True:
        head = read_head(reader)
        if head is None:
            raise ProtocolError("connection closed before a response")
        start, fields = parse_fields(head)
        version, _, rest = start.partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        if not 100 <= status < 200:
            break
    encoding = (field(fields, "Transfer-Encoding") or "").lower()
    length = field(fields, "Content-Length")
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "chunked" in encoding:
        body = read_chunked(reader)
    elif length is not None:
        body = read_exact(reader, int(length))
    else:
        body = reader.read()  # close-delimited
    return Response(version, status, reason, tuple(fields), body, head)


# ------------------------------------------------------------------ the origin

class Endpoints:
    """landed_ip and peer_ip for a record with `landed` and `peer` endpoint() texts."""

    __slots__ = ()
    landed: str
    peer: str

    @property
    def landed_ip(self) -> str:
        return host_of(self.landed)

    @property
    def peer_ip(self) -> str:
        return host_of(self.peer)


@dataclass(frozen=True, slots=True)
class Seen(Endpoints):
    """One request as the origin received it."""

    landed: str  # ip:port the origin was reached on
    peer: str  # ip:port of the proxy as the origin saw it
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    head: bytes
    body_length: int
    body_sha256: str
    trailers: tuple[bytes, ...] = ()  # trailer lines of a chunked body

    def header(self, name: str) -> str | None:
        return field(self.headers, name)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path



def endpoint(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A socket address as text: ip:port, or [ip]:port for IPv6."""
    host = sockaddr[0]
    return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"


def host_of(text: str) -> str:
    """The IP address of an endpoint() text."""
    return text.rsplit(":", 1)[0].strip("[]")


class Origin:
    """HTTP origins and echo services on any number of addresses; `stop` ends every thread it started."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.connections: list[tuple[str, str]] = []  # (landed, peer) for every accepted connection
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listeners: list[tuple[socket.socket, str]] = []
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()

    def listen(self, ip: str, port: int, kind: str = "http") -> None:
        """Bind in the current thread's network namespace; kind is 'http', 'echo' or 'stall'."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == "stall":  # a small window (inherited by accepted sockets): the sender soon has to wait
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((ip, port))
        sock.listen(128)
        sock.settimeout(0.2)  # the accept loop looks at the stop flag this often
        self._listeners.append((sock, kind))

    def start(self) -> None:
        for sock, kind in self._listeners:
            thread = threading.Thread(target=self._accept_loop, args=(sock, kind), daemon=True,
                                      name=f"origin-{kind}-{endpoint(sock.getsockname())}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        for thread in self._threads:
            thread.join(timeout=2)
        for sock, _ in self._listeners:
            sock.close()

    # what the tests look at
    def requests(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if path is None or s.path == path]

    def open_count(self) -> int:
        """Connections accepted and not yet ended."""
        with self._lock:
            return len(self._open)

    def connections_to(self, ip: str) -> list[tuple[str, str]]:
        with self._lock:
            return [c for c in self.connections if host_of(c[0]) == ip]

    # ------------------------------------------------------------ serving
    def _accept_loop(self, sock: socket.socket, kind: str) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            landed, seen_peer = endpoint(conn.getsockname()), endpoint(peer)
            with self._lock:
                self.connections.append((landed, seen_peer))
                self._open.add(conn)
            target = {"http": self._serve_http, "echo": self._serve_echo, "stall": self._serve_stall}[kind]
            thread = threading.Thread(target=self._connection, args=(target, conn, landed, seen_peer), daemon=True)
            thread.start()

    def _connection(self, target: Callable[[socket.socket, str, str], None], conn: socket.socket, landed: str,
                    peer: str) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            with contextlib.suppress(OSError, ProtocolError, ValueError):
                target(conn, landed, peer)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _serve_echo(self, conn: socket.socket, landed: str, peer: str) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.sendall(ECHO_TAIL)  # only after the client's half-close reached us
        conn.shutdown(socket.SHUT_WR)

    def _serve_stall(self, conn: socket.socket, landed: str, peer: str) -> None:
        self._stopping.wait(IO_TIMEOUT)  # never reads

    def _serve_http(self, conn: socket.socket, landed: str, peer: str) -> None:
        reader = conn.makefile("rb")
        drop_next = False
        while not self._stopping.is_set():
            head = read_head(reader)
            if head is None:
                return
            if drop_next:  # as a server closing an idle keep-alive connection just as a request arrives
                return
            start, fields = parse_fields(head)
            method, target, version = start.split(" ")
            encoding = (field(fields, "Transfer-Encoding") or "").lower()
            length = field(fields, "Content-Length")
            trailers: list[bytes] = []
            if "chunked" in encoding:
                body = read_chunked(reader, trailers)
            elif length is not None:
                body = read_exact(reader, int(length))
            else:
                body = b""
            seen = Seen(landed, peer, method, target, version, tuple(fields), head, len(body), sha256(body),
                        tuple(trailers))
            with self._lock:
                self.seen.append(seen)
            connection = (field(fields, "Connection") or "").lower()
            keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
            if not self._respond(conn, seen, body, keep) or not keep:
                return
            drop_next = urlsplit(target).path == "/drop-next"

    def _respond(self, conn: socket.socket, seen: Seen, body: bytes, keep: bool) -> bool:
        """Answer one request; False when the connection must end after it."""
        url = urlsplit(seen.target)
        query = parse_qs(url.query)
        path = url.path
        head_only = seen.method == "HEAD"
        extra = [("X-Landed", seen.landed), ("X-Peer", seen.peer)]
        if not keep:
            extra.append(("Connection", "close"))
        if path == "/chunked":
            self._send(conn, 200, extra + [("Transfer-Encoding", "chunked")], b"", head_only=True, length=False)
            if not head_only:
                for chunk in CHUNKS:
                    conn.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                conn.sendall(b"0\r\n\r\n")
            return True
        if path == "/close":
            fields = [(k, v) for k, v in extra if k != "Connection"] + [("Connection", "close")]
            self._send(conn, 200, fields, b"", head_only=True, length=False)
            if not head_only:
                conn.sendall(CLOSE_BODY)
            conn.shutdown(socket.SHUT_WR)
            return False
        if path == "/reset":  # a close-delimited body, cut off: the proxy must not make it look complete
            self._send(conn, 200, extra + [("Connection", "close")], b"", head_only=True, length=False)
            conn.sendall(RESET_BODY)
            self._stopping.wait(0.3)  # the proxy has read what was sent before the reset comes
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path == "/switch":  # switching protocols although the request asked for no upgrade
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: Upgrade\r\n\r\n"
                         b"bytes of another protocol")
            return False
        if path == "/early-hints":
            conn.sendall(f"HTTP/1.1 103 Early Hints\r\nLink: {EARLY_HINT_LINK}\r\n\r\n".encode())
            self._send(conn, 200, extra, b"final\n", head_only=head_only)
            return True
        if path in ("/status/204", "/status/304"):
            status = int(path.rsplit("/", 1)[1])
            fields = extra + ([("ETag", '"v1"')] if status == 304 else [])
            self._send(conn, status, fields, b"", head_only=True)
            return True
        if path in ("/hello", "/drop-next"):
            reply = f"hello from {seen.landed}\n".encode()
        elif path == "/headers":
            reply = seen.head
            extra += [("Connection", HOP_HEADER), (HOP_HEADER, "origin-only"), ("Keep-Alive", "timeout=30")]
        elif path == "/echo":
            reply = body
            extra += [("X-Body-Sha256", seen.body_sha256), ("X-Body-Length", str(seen.body_length))]
        elif path == "/blob":
            reply = blob(int(query.get("size", ["0"])[0]))
        elif path == "/slow":
            self._stopping.wait(float(query.get("delay", ["1"])[0]))
            reply = SLOW_BODY
        else:
            self._send(conn, 404, extra, b"not found\n", head_only=head_only)
            return True
        self._send(conn, 200, extra, reply, head_only=head_only)
        return True

    @staticmethod
    def _send(conn: socket.socket, status: int, fields: list[tuple[str, str]], body: bytes, *,
              head_only: bool, length: bool = True) -> None:
        reasons = {200: "OK", 204: "No Content", 304: "Not Modified", 404: "Not Found"}
        lines = [f"HTTP/1.1 {status} {reasons[status]}"] + [f"{k}: {v}" for k, v in fields]
        if length and status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Content-Type: application/octet-stream")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
