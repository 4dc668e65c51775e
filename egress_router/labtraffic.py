"""Lab traffic: the demo's TCP/UDP servers and requests (both families), a ConfigMap volume, a TCP echo hub."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def family_of(ip: str) -> socket.AddressFamily:
    """The socket family of a literal address (IPv6 literals are the ones with a colon)."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def endpoint(address: tuple[Any, ...]) -> str:
    """A socket address as text: ip:port, [ip]:port for IPv6 (getsockname/accept give 4-tuples there)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Reply:
    """What a lab server reported: where the connection landed and the peer it saw."""

    landed: str  # ip:port ([ip]:port for IPv6) the server was reached on
    peer: str  # ip:port ([ip]:port for IPv6) of the client as the server saw it

    @property
    def peer_ip(self) -> str:
        """The peer's bare address, either family."""
        if self.peer.startswith("["):
            return self.peer[1:self.peer.index("]")]
        return self.peer.rsplit(":", 1)[0]


class Servers:
    """TCP/UDP servers (one thread, bounded) that answer '<landed ip:port> <peer ip:port>'."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="lab-servers", daemon=True)
        self._sockets: list[socket.socket] = [self._wake_r, self._wake_w]
        self.seen: list[Reply] = []

    def listen(self, proto: str, ip: str, port: int) -> None:
        """Listen on ip:port (the calling thread's network namespace; the family follows the address)."""
        if proto == "tcp":
            sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(64)
        else:
            sock = socket.socket(family_of(ip), socket.SOCK_DGRAM)
            sock.bind((ip, port))
        sock.setblocking(False)
        self._sockets.append(sock)
        self.selector.register(sock, selectors.EVENT_READ, proto)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()
        self.selector.close()

    def _loop(self) -> None:
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    return
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    self._answer(sock, key.data)

    def _answer(self, sock: socket.socket, proto: str) -> None:
        here = endpoint(sock.getsockname())
        # recorded before answering: a client that has its answer may look at `seen` at once
        if proto == "tcp":
            conn, peer = sock.accept()
            with conn:
                reply = Reply(here, endpoint(peer))
                self.seen.append(reply)
                conn.settimeout(2)
                conn.sendall(f"{reply.landed} {reply.peer}\n".encode())
        else:
            _, peer = sock.recvfrom(2048)
            reply = Reply(here, endpoint(peer))
            self.seen.append(reply)
            sock.sendto(f"{reply.landed} {reply.peer}\n".encode(), peer)


def request(entered: AbstractContextManager[Any], proto: str, ip: str, port: int, *,
            timeout: float = 3.0) -> Reply:
    """Send one TCP or UDP request to ip:port (IPv4 or IPv6) with a socket made inside `entered` (a lab
    namespace), and return what the server reported."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with entered:
        sock = socket.socket(family_of(ip), kind)
    with sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        if proto == "tcp":
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        else:
            sock.send(b"hello\n")
            data = sock.recv(4096)
    landed, peer = data.decode().split()
    return Reply(landed, peer)


class ConfigMapVolume:
    """A ConfigMap volume with one key: `<dir>/<key>` -> `..data/<key>`, `..data` -> a version directory.
    An update writes a new version directory, then renames a fresh `..data` symlink over the old one."""

    def __init__(self, directory: Path, key: str, text: str | None = None):
        self.directory, self.key, self.versions = directory, key, 0
        directory.mkdir(parents=True, exist_ok=True)
        if text is not None:
            self.swap(text)

    @property
    def path(self) -> str:
        return str(self.directory / self.key)

    def swap(self, text: str) -> float:
        """Update the key's content; returns the time.monotonic() of the atomic rename."""
        self.versions += 1
        version = f"..2026_12_01_00_00_{self.versions:02d}.{os.getpid()}"
        (self.directory / version).mkdir()
        (self.directory / version / self.key).write_text(text, encoding="utf-8")
        visible = self.directory / self.key
        if not visible.is_symlink():
            visible.symlink_to(Path("..data") / self.key)
        (self.directory / "..data_tmp").symlink_to(version)
        swapped = time.monotonic()
        os.rename(self.directory / "..data_tmp", self.directory / "..data")
        return swapped


class EchoHub:
    """A TCP echo service for many connections in one thread (selectors), in a lab namespace."""

    def __init__(self, lab: Any, role: str, ip: str, port: int):
        with lab.entered(role):
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((ip, port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.accepted = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"echo-hub-{ip}:{port}")
        self.thread.start()

    def _run(self) -> None:
        conns: set[socket.socket] = set()
        while not self.stopped.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        conns.add(conn)
                        self.selector.register(conn, selectors.EVENT_READ)
                        self.accepted += 1
                    continue
                with contextlib.suppress(OSError):
                    if data := sock.recv(65536):
                        sock.sendall(data)  # small messages: the client reads each answer before the next
                        continue
                self.selector.unregister(sock)
                conns.discard(sock)
                sock.close()
        for conn in conns:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.selector.close()
        self.listener.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def exchange_all(socks: list[socket.socket], tag: str) -> list[int]:
    """Each connection sends one line and must get it echoed back; the indexes of those that did not."""
    lost = []
    messages = [f"{tag} {i}\n".encode() for i in range(len(socks))]
    for i, sock in enumerate(socks):
        try:
            sock.sendall(messages[i])
        except OSError:
            lost.append(i)
    for i, sock in enumerate(socks):
        if i in lost:
            continue
        try:
            if recv_exactly(sock, len(messages[i])) != messages[i]:
                lost.append(i)
        except OSError:
            lost.append(i)
    return sorted(lost)
