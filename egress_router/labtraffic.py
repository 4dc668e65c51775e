"""Lab helpers the reload tests and benchmarks share: a ConfigMap volume updated as the kubelet updates
it, and a TCP echo service that holds many connections in one thread."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any


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
