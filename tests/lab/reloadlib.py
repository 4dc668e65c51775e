"""Helpers of the proxies' reload lab tests: a rule file in a ConfigMap volume, a timed wait, 1,000 held connections."""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egress_router.lab import Lab
from tests.unit.test_rule_files import configmap_volume

HELD = 1000  # established connections that must survive a reload
# The contract: a change is in force within 2 s of the swap. The tests allow 1 s more: their own probes (a TCP
# connection each, made from this process, which also runs the origin and the echo threads) and the CPU steal of
# a 2-core machine under load must not fail a proxy that kept its promise; a proxy that polls the file every
# 0.5 s and applies in milliseconds is far inside 2 s, so 3 s still fails one that is broken (a missed change
# waits forever; one seen only at the next SIGHUP, too).
IN_FORCE_LIMIT = 2.0
MARGIN = 1.0


class RuleVolume:
    """A rule file as a ConfigMap volume holds it: `<dir>/<name>` -> `..data/<name>`, `..data` -> a version dir."""

    def __init__(self, directory: Path, name: str, text: str):
        self.directory, self.name = directory, name
        self.versions = 0
        self.swap(text)

    @property
    def path(self) -> str:
        return str(self.directory / self.name)

    def swap(self, text: str) -> float:
        """What the kubelet does on a ConfigMap change (a new version dir, `..data` renamed over); when it did it."""
        self.versions += 1
        configmap_volume(self.directory, f"..2026_12_01_00_00_{self.versions:02d}.{os.getpid()}",
                         {self.name: text})
        return time.monotonic()

    def rewrite_unseen(self, text: str) -> None:
        """Rewrite the file in place with text of the same length and its old modification time: no stamp the
        watch looks at changes, so only a SIGHUP can make the proxy read it."""
        real = os.path.realpath(self.path)
        before = os.stat(real)
        data = text.encode()
        assert len(data) == before.st_size, "the unseen rewrite needs text of the same length"
        with open(real, "r+b") as file:
            file.write(data)
        os.utime(real, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(real)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def in_force_after(since: float, check: Callable[[], bool], what: str, log: Callable[[], str]) -> float:
    """Seconds from `since` (the swap) until `check()` holds; fails past IN_FORCE_LIMIT + MARGIN. Printed too."""
    deadline = since + IN_FORCE_LIMIT + MARGIN
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not in force within {IN_FORCE_LIMIT + MARGIN:g} s of the swap:\n{log()}")
        time.sleep(0.02)
    elapsed = time.monotonic() - since
    print(f"reload in force: {what}: {elapsed * 1000:.0f} ms after the swap")
    return elapsed


def wait_until(check: Callable[[], bool], what: str, log: Callable[[], str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s:\n{log()}")
        time.sleep(0.02)


def sighup(pid: int) -> None:
    os.kill(pid, signal.SIGHUP)


@contextlib.contextmanager
def file_limit(needed: int) -> Iterator[None]:
    """This test process holds both ends of the held connections (client sockets and echo sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed:
        pytest.fail(f"the hard open-files limit {hard} is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class EchoHub:
    """A TCP echo service for many connections in one thread (selectors); bounded per-connection backlog."""

    def __init__(self, lab: Lab, role: str, ip: str, port: int):
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
        conns: dict[socket.socket, bytearray] = {}
        while not self.stopped.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        conns[conn] = bytearray()
                        self.selector.register(conn, selectors.EVENT_READ)
                        self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        sock.sendall(data)  # small messages: the client reads each answer before the next
                        continue
                except OSError:
                    pass
                self.selector.unregister(sock)
                conns.pop(sock, None)
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
