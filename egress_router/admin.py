"""The admin port of the modes that stay up: /healthz, /ready and /metrics (Prometheus text) over HTTP/1.1.

One small server, two ways to run it: a thread beside legacy mode's signal loop, or an asyncio server
on a proxy's event loop (the proxies' first worker; a master binds the socket once, so a replaced
worker serves it again). Every answer closes the connection: scrapes and probes are rare, and a
request head must arrive within HEAD_TIMEOUT, so a slow or hostile client holds nothing for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import platform
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__
from .core.errors import SetupError
from .core.exposition import CONTENT_TYPE, Family, render, single

if TYPE_CHECKING:
    from .ha_view import SharedRole

log = logging.getLogger(__name__)

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 5.0
THREADS = 8  # connections the threaded server handles at once; more wait in the backlog
PAGES = ("/healthz", "/ready", "/metrics")
Check = Callable[[], str | None]  # None: fine; else why not (the body of the 503)


def always_fine() -> str | None:
    return None


@dataclass
class Admin:
    """What the pages answer: `health` for /healthz, `ready` for /ready, `collect` for /metrics."""

    mode: str
    collect: Callable[[], Iterable[Family]]
    health: Check = always_fine
    ready: Check = always_fine
    pids: Callable[[], Sequence[int]] = field(default=lambda: (os.getpid(),))  # the processes of process_*
    scrapes: int = 0

    def respond(self, head: bytes) -> bytes:
        """The whole response (head and body) to one request head."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return response(400, "bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in PAGES:
            return response(404, f"not found: the admin port serves {', '.join(PAGES)}\n", head_only=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return response(405, "only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        head_only = method == "HEAD"
        if target == "/metrics":
            self.scrapes += 1
            try:
                body = render([*self.collect(), *standard_families(self.mode, self.pids())])
            except Exception as exc:  # a collector's bug must not take the router down; the scrape shows it failed
                log.exception("Collecting the metrics failed")
                return response(500, f"collecting the metrics failed: {exc}\n", head_only=head_only)
            return response(200, body, content_type=CONTENT_TYPE, head_only=head_only)
        problem = (self.health if target == "/healthz" else self.ready)()
        if problem is None:
            return response(200, "ok\n", head_only=head_only)
        return response(503, problem.rstrip("\n") + "\n", head_only=head_only)


def response(status: int, body: str, *, content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
             extra: str = "") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              500: "Internal Server Error", 503: "Service Unavailable"}[status]
    data = body.encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            f"Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n").encode()
    return head if head_only else head + data


# ------------------------------------------------------------ the socket

def bind(port: int) -> socket.socket:
    """A listening socket on every address (IPv6 and IPv4 where the kernel has IPv6); SetupError when busy."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        where: tuple[str, int] = ("::", port)
    except OSError:  # no IPv6 in this network namespace
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        where = ("0.0.0.0", port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        why = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise SetupError(f"the admin port {port} (EGRESS_METRICS_PORT) cannot be opened: {why}; choose another "
                         "port, or off") from None
    sock.set_inheritable(False)
    return sock


# ------------------------------------------------------------ the threaded server (legacy mode)

def serve_in_thread(sock: socket.socket, admin: Admin) -> threading.Thread:
    """Accept on `sock` in a daemon thread until the process ends; each connection in a thread of its own
    (at most THREADS at once), so one slow client does not hold up the probes."""
    slots = threading.BoundedSemaphore(THREADS)

    def one(conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(HEAD_TIMEOUT)
                head = read_head(conn)
                if head is not None:
                    conn.sendall(admin.respond(head))
        except OSError:
            pass
        finally:
            slots.release()

    def accept_loop() -> None:
        while True:
            slots.acquire()
            try:
                conn, _ = sock.accept()
            except OSError:
                slots.release()
                if sock.fileno() < 0:
                    return
                time.sleep(0.1)  # EMFILE and the like: try again shortly
                continue
            threading.Thread(target=one, args=(conn,), name="admin-conn", daemon=True).start()

    thread = threading.Thread(target=accept_loop, name="admin", daemon=True)
    # Signals are the main thread's business (legacy mode waits for them with sigtimedwait): the server's
    # threads start with every signal blocked (a thread inherits its creator's mask), so none lands on them.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread


def read_head(conn: socket.socket) -> bytes | None:
    data = b""
    deadline = time.monotonic() + HEAD_TIMEOUT
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT or time.monotonic() > deadline:
            conn.sendall(response(400, "request head too long or too slow\n"))
            return None
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


# ------------------------------------------------------------ the asyncio server (the proxies)

class AdminProtocol(asyncio.Protocol):
    __slots__ = ("admin", "transport", "data", "timer")

    def __init__(self, admin: Admin, loop: asyncio.AbstractEventLoop):
        self.admin = admin
        self.transport: asyncio.Transport | None = None
        self.data = b""
        self.timer = loop.call_later(HEAD_TIMEOUT, self.too_slow)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.data += data
        if b"\r\n\r\n" in self.data:
            self.finish(self.admin.respond(self.data))
        elif len(self.data) > HEAD_LIMIT:
            self.finish(response(400, "request head too long\n"))

    def too_slow(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.finish(response(400, "request head too slow\n"))

    def finish(self, answer: bytes) -> None:
        self.timer.cancel()
        assert self.transport is not None
        self.transport.write(answer)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


async def serve_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, admin: Admin) -> asyncio.AbstractServer:
    return await loop.create_server(lambda: AdminProtocol(admin, loop), sock=sock, backlog=64)


# ------------------------------------------------------------ build and process metrics

def standard_families(mode: str, pids: Sequence[int]) -> list[Family]:
    families = [single("egress_router_build_info", "gauge", "The running egress-router: version, Python and mode "
                       "(always 1).", 1, (("version", __version__), ("python", platform.python_version()),
                                          ("mode", mode)))]
    families.extend(process_families(pids))
    return families


TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def process_families(pids: Sequence[int]) -> list[Family]:
    """process_* as client libraries name them, summed over `pids` (a proxy's master and workers); the start
    time is the first one's."""
    ticks = rss = vsize = fds = 0
    start = max_fds = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            vsize += int(fields[20])
            rss += int(fields[21]) * PAGE
            if start is None:
                start = boot_time() + int(fields[19]) / TICKS
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            if max_fds is None:
                max_fds = open_files_limit(pid)
        except (OSError, ValueError, IndexError):
            continue  # a worker that just ended
    families = [
        single("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.",
               ticks / TICKS),
        single("process_resident_memory_bytes", "gauge", "Resident memory size, in bytes.", rss),
        single("process_virtual_memory_bytes", "gauge", "Virtual memory size, in bytes.", vsize),
        single("process_open_fds", "gauge", "Open file descriptors.", fds),
    ]
    if start is not None:
        families.append(single("process_start_time_seconds", "gauge", "Start time of the process since the Unix "
                               "epoch, in seconds.", start))
    if max_fds is not None:
        families.append(single("process_max_fds", "gauge", "The open file descriptors limit.", max_fds))
    return families


_boot: list[float] = []


def boot_time() -> float:
    if not _boot:
        with open("/proc/stat", encoding="ascii") as stat:
            _boot.append(float(next(line for line in stat if line.startswith("btime")).split()[1]))
    return _boot[0]


def open_files_limit(pid: int) -> float | None:
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return float("inf") if value == "unlimited" else float(value)
    return None


def family_pids() -> list[int]:
    """This process and, under a master, the master and its other workers (/proc's children lists)."""
    me, parent = os.getpid(), os.getppid()
    with contextlib.suppress(OSError):
        with open(f"/proc/{parent}/task/{parent}/children", encoding="ascii") as children:
            siblings = [int(pid) for pid in children.read().split()]
        if me in siblings:
            return [parent, *siblings]
    return [me]


async def serve_in_worker(loop: asyncio.AbstractEventLoop, sock: socket.socket | None, index: int, alone: bool,
                          mode: str, collect: Callable[[], Iterable[Family]],
                          role: SharedRole | None = None) -> asyncio.AbstractServer | None:
    """A proxy worker's part: the first worker serves the admin port (bound by the starting process and kept
    open by a master, so a replaced first worker serves it again); the others close their copy. `role`: a
    high-availability replica's (ha_keeper.py): /ready only on the active one, the egress_router_ha_* families, and
    the process_* families over the keeper's whole tree (keeper, keepalived, the proxy's processes)."""
    if sock is None:
        return None
    if index != 0:
        sock.close()
        return None
    if role is not None:
        keeper = role.keeper
        admin = Admin(mode, lambda: [*collect(), *role.families()], ready=role.ready,
                      pids=lambda: process_tree(keeper))
    else:
        admin = Admin(mode, collect, pids=(lambda: (os.getpid(),)) if alone else family_pids)
    return await serve_async(loop, sock, admin)


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, read from /proc."""
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [child for child in children(pid) if child not in found]
    return found


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a thread that forks is the parent, not the main one)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
            found += [int(child) for child in handle.read().split()]
    return found
