"""The DNS proxy's connections on plain non-blocking sockets, dispatched from the worker's own epoll set.

Issue 16's profile: per short connection, asyncio's transports and protocols (two transports, their protocol
callbacks, the connect coroutine, a timer per connect) cost more CPU than relaying the bytes. Here:

- `Poller`: one epoll set per worker, itself one reader of the event loop. Each socket is registered once with
  a callback; its mask follows what the connection wants (level-triggered). Events for a descriptor closed in
  the same batch are skipped (its number may already belong to a new socket).
- `Listener`: accept4 in batches of ACCEPT_BATCH. Out of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM), the
  listener is left alone for STARVED_PAUSE seconds instead of spinning on a socket that stays readable; the
  connections wait in the backlog meanwhile, and a warning says so (once per STARVED_LOG seconds).
- `Connection`: the client socket, then the backend's (a non-blocking connect: writable means connected, SO_ERROR
  is read only when epoll reports an error or a hang-up; the next backend on failure, up to `settings.tries`).
  While it connects, the client is read up to PENDING_LIMIT bytes (then the kernel holds the rest), so a client
  that leaves is seen at once and its query goes out with the connect's completion. Then bytes both ways through
  one buffer per worker (recv_into, send), copied only when a send is short. A direction reads its
  source only when nothing of it waits to be sent: a peer that does not read stops the other one through TCP's
  window, nothing piles up here. Half-close: an EOF is passed on as shutdown(SHUT_WR) once what came before it
  is sent; when both directions have ended both sockets are closed (close() sends the FIN: one shutdown per
  connection). A reset (or any error) on one side is passed on as a reset (SO_LINGER 0) on the other.
  The relayed sides are read with EPOLLRDHUP: when the peer's FIN is already in and one read takes all there
  is, the bytes go on with MSG_MORE and the FIN right after them, in one segment (a short exchange like an
  HTTP response with `Connection: close` sends one segment fewer, the way haproxy does, and the proxy wakes
  up once fewer).
- `Deadlines`: the connect timeouts, one FIFO queue (the timeout is the same for every connect of a worker)
  and one timer for its head.

Per connection the sockets are C-level `_socket.socket` objects (socket.py's accept and close add Python frames and
nothing else here), and they leave the epoll set by their close (`Poller.forget`: one epoll_ctl fewer each).
The client sockets stay in blocking mode (accept4 without SOCK_NONBLOCK: one fcntl fewer per connection); every
recv and send on them passes MSG_DONTWAIT.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from collections.abc import Callable
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

from ..ha_view import ACTIVE, STANDBY_REFUSAL
from . import dns_metrics as cells
from . import metrics
from .dns_targets import Backend, Target

if TYPE_CHECKING:
    import asyncio

    from .dns import DnsWorker

log = logging.getLogger(__name__)

__all__ = ["ACCEPT_BATCH", "BUFFER", "Connection", "Deadlines", "Listener", "Poller"]

IN, OUT, ERR, HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
RDHUP = select.EPOLLRDHUP
READ = IN | RDHUP  # a side being relayed (see the module's text: the FIN passed on with the last bytes)
BUFFER = 256 * 1024  # one per worker: what one recv may take
ACCEPT_BATCH = 64  # accepts per readiness of a listener before other sockets get their turn
MAX_EVENTS = 1024
STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
STARVED_PAUSE = 0.25  # seconds a listener is left alone when no descriptor is left for a new connection
STARVED_LOG = 10.0  # at most one warning about it per this many seconds
_DONTWAIT = socket.MSG_DONTWAIT
_LAST = socket.MSG_DONTWAIT | socket.MSG_MORE  # the last bytes before a FIN that follows at once
_LINGER_RESET = struct.pack("ii", 1, 0)
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
PENDING_LIMIT = 256 * 1024  # client bytes held while the backend connection is being made
PARKED = -1  # a connection's mask for a socket taken out of the epoll set (see Connection.side_failed)


class Poller:
    """The worker's epoll set, one reader of `loop`; callbacks by descriptor, given the events."""

    __slots__ = ("loop", "epoll", "handlers", "dropped", "buffer", "view", "now")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.dropped: set[int] = set()  # descriptors let go of during the batch being dispatched
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)
        self.now = loop.time()  # the loop's clock at the batch: a connection's last activity
        loop.add_reader(self.epoll.fileno(), self.poll)

    def add(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.epoll.register(fd, mask)
        self.handlers[fd] = handler
        self.dropped.discard(fd)

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        """Before `fd` is closed or left out of the set (explicitly: a descriptor shared with another process,
        a listener's, would stay in the set after its close)."""
        if self.forget(fd):
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)

    def forget(self, fd: int) -> bool:
        """Before `fd`, a socket of this worker alone, is closed: its close takes it out of the epoll set (the
        kernel drops an entry when the last reference to the socket goes; a worker neither forks nor starts
        processes, and its sockets are not duplicated), so no epoll_ctl here. False: it was not registered."""
        if self.handlers.pop(fd, None) is None:
            return False
        self.dropped.add(fd)
        return True

    def poll(self) -> None:
        self.dropped.clear()
        self.now = self.loop.time()
        handlers, dropped = self.handlers, self.dropped
        for fd, events in self.epoll.poll(0, MAX_EVENTS):
            if fd in dropped:
                continue
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)

    def close(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()


class Deadlines:
    """Connect timeouts: (deadline, connection, attempt) in the order they were set, one timer for the first."""

    __slots__ = ("loop", "timeout", "queue", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float):
        self.loop = loop
        self.timeout = timeout
        self.queue: collections.deque[tuple[float, Connection, int]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, connection: Connection, attempt: int) -> None:
        self.queue.append((self.loop.time() + self.timeout, connection, attempt))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.fire)

    def fire(self) -> None:
        self.timer = None
        queue, now = self.queue, self.loop.time()
        while queue and queue[0][0] <= now:
            _, connection, attempt = queue.popleft()
            if connection.attempt == attempt and connection.sock_b is not None and connection.trying is not None:
                connection.timed_out()
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self.fire)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class Listener:
    """A listening socket of a forward's port: new connections for the target in force on that port."""

    __slots__ = ("worker", "sock", "port", "fd", "family", "paused", "warned")

    def __init__(self, worker: DnsWorker, sock: socket.socket):
        self.worker = worker
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.fd = sock.fileno()
        self.family = sock.family
        self.paused = False
        self.warned = -STARVED_LOG
        # inherited by every accepted socket (Linux): no setsockopt per connection
        sock.setsockopt(*_NODELAY)
        worker.poller.add(self.fd, IN, self.ready)

    def ready(self, events: int) -> None:
        worker, accept, family = self.worker, self.sock._accept, self.family  # type: ignore[attr-defined]
        for _ in range(ACCEPT_BATCH):
            try:
                # accept4, then a socket object of the C type (what socket.accept makes, less its Python frames;
                # the object's getsockname validates the descriptor); the listener has no timeout, nor its copies
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in STARVED:
                    self.starved(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    continue  # that connection is gone (or a firewall said no): the next one
                log.warning("Port %d: accept failed: %s", self.port, exc.strerror or exc)
                return
            try:
                sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:  # its getsockname failed: that connection is gone, the descriptor is closed
                os.close(fd)
                continue
            Connection(worker, worker.targets[self.port], sock, peer)

    def starved(self, exc: OSError) -> None:
        """No descriptor for the connection: this listener rests STARVED_PAUSE s (the kernel keeps the
        connections in its backlog), rather than being readable, and failing, in every turn of the loop."""
        worker = self.worker
        now = worker.loop.time()
        if now - self.warned >= STARVED_LOG:
            self.warned = now
            log.warning("Port %d: cannot accept connections: %s (%d open in this worker); they wait in the "
                        "listen backlog, retried every %g s", self.port, exc.strerror or exc,
                        len(worker.connections), STARVED_PAUSE)
        self.paused = True
        worker.poller.modify(self.fd, 0)
        worker.loop.call_later(STARVED_PAUSE, self.resume)

    def resume(self) -> None:
        if self.paused:  # not closed meanwhile (close clears it: the descriptor may belong to a new socket)
            self.paused = False
            self.worker.poller.modify(self.fd, IN)

    def close(self) -> None:
        self.paused = False
        self.worker.poller.remove(self.fd)
        self.sock.close()


def unsent(sock: _socket.socket | None) -> int:
    """Bytes in a socket's send queue (sent to the kernel, not yet acknowledged by the peer); 0 without one."""
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def pending_error(sock: _socket.socket | None, exc: OSError) -> OSError:
    """What really broke a socket that `exc` (ENOTCONN: a shutdown after the peer's reset, not yet read) hides:
    the reset itself, from SO_ERROR; else `exc`."""
    if exc.errno == errno.ENOTCONN and sock is not None:
        with contextlib.suppress(OSError):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                return OSError(code, os.strerror(code))
    return exc


def reset_close(sock: _socket.socket) -> None:
    """Close with a TCP reset: the peer sees a cut-off, not a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class Connection:
    """A client connection and, once connected, its backend connection."""

    __slots__ = ("worker", "target", "sock_a", "sock_b", "fd_a", "fd_b", "peer", "backend", "trying", "tried",
                 "tries_left", "attempt", "reason", "connected", "buf_up", "buf_down", "eof_up", "eof_down",
                 "mask_a", "mask_b", "last", "started", "up", "down", "ended", "closing", "queued")

    def __init__(self, worker: DnsWorker, target: Target, sock: _socket.socket, peer: object):
        self.worker = worker
        self.target = target
        self.sock_a: _socket.socket | None = sock  # the client's
        self.fd_a = sock.fileno()
        self.sock_b: _socket.socket | None = None  # the backend's (connecting or connected)
        self.fd_b = -1
        self.peer = peer
        self.backend: Backend | None = None  # connected to
        self.trying: Backend | None = None  # connecting to
        self.tried: tuple[Backend, ...] = ()
        self.tries_left = 0
        self.attempt = 0  # numbers the connects (a deadline of an earlier one is stale)
        self.reason = "no backend"  # why the last try failed
        self.connected = False
        self.buf_up: bytes | None = None  # client bytes the backend did not take yet
        self.buf_down: bytes | None = None
        self.eof_up = False  # the client sent its FIN
        self.eof_down = False
        self.mask_a = 0
        self.mask_b = 0
        self.last = self.started = worker.poller.now
        self.up = 0
        self.down = 0
        self.ended = ""
        self.closing = False
        self.queued: tuple[float, int, int] | None = None  # see still_sending
        self.admit()

    # ------------------------------------------------------------------ accepting and connecting

    def admit(self) -> None:
        worker, target = self.worker, self.target
        if worker.role is not None and not worker.role.cells[ACTIVE]:
            return self.refuse(f"refused: {STANDBY_REFUSAL}", cells.REJECTED)
        if worker.shared.total(metrics.OPEN) >= worker.settings.max_connections:
            return self.refuse("refused: connection limit reached", cells.REJECTED)
        if not target.ready:
            return self.refuse(f"refused: {target.forward.host} has not resolved yet", cells.UNRESOLVED)
        worker.counters.add(metrics.OPEN)
        target.slot.add(cells.OPEN)
        target.relays += 1
        worker.connections.add(self)
        # read while the backend connection is being made, up to PENDING_LIMIT (then the kernel holds the rest):
        # a query is usually there already, and a client that leaves is counted out at once
        self.mask_a = IN
        worker.poller.add(self.fd_a, IN, self.on_a)
        self.tries_left = worker.settings.tries
        self.connect()

    def refuse(self, how: str, cell: int) -> None:
        self.target.slot.add(cell)
        self.ended = self.reason = how
        self.closing = True
        sock, self.sock_a = self.sock_a, None
        assert sock is not None
        reset_close(sock)
        self.log_line()

    def connect(self) -> None:
        """Connect to the next backend to try; none left (or each failed at once): the client is closed."""
        target = self.target
        while self.tries_left > 0 and not self.closing:  # closing: the client left, no other backend is tried
            backend = target.choose(self.tried)
            if backend is None:
                break
            self.tries_left -= 1
            self.tried += (backend,)
            backend.open += 1
            self.trying = backend
            error = self.start_connect(backend)
            if error is None:
                return
            if error.errno in STARVED:  # this process is out of something: not the backend's fault
                backend.open -= 1
                self.trying = None
                self.reason = f"cannot connect to {backend.text}: {error.strerror}"
                break
            self.failed(backend, error)
        self.gave_up()

    def start_connect(self, backend: Backend) -> OSError | None:
        family = socket.AF_INET6 if isinstance(backend.address, IPv6Address) else socket.AF_INET
        try:
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, socket.IPPROTO_TCP)
        except OSError as exc:
            return exc
        try:
            sock.setsockopt(*_NODELAY)
            code = sock.connect_ex((backend.host, backend.port))
        except OSError as exc:
            sock.close()
            return exc
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return OSError(code, os.strerror(code))
        self.sock_b = sock
        self.fd_b = sock.fileno()
        self.mask_b = OUT
        self.worker.poller.add(self.fd_b, OUT, self.on_b)
        self.target.connecting.add(self)
        self.attempt += 1
        self.worker.deadlines.add(self, self.attempt)
        return None

    def drop_backend_socket(self) -> None:
        sock, self.sock_b = self.sock_b, None
        if sock is not None:
            self.worker.poller.forget(self.fd_b)
            sock.close()
        self.fd_b = -1

    def connect_done(self, events: int) -> None:
        sock, backend = self.sock_b, self.trying
        assert sock is not None and backend is not None
        # writable without an error: connected (a failed connect sets EPOLLERR), no getsockopt for it
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & (ERR | HUP) else 0
        if code == 0 and not events & OUT:
            return  # nothing decided yet
        self.target.connecting.discard(self)
        self.attempt += 1  # its deadline is stale now
        if code:
            self.drop_backend_socket()
            self.failed(backend, OSError(code, os.strerror(code)))
            self.connect()
            return
        self.trying = None
        self.tried = ()
        self.target.slot.add(cells.RELAYED)  # relayed once the backend connected, whatever happens next
        if self.closing:  # the client left meanwhile
            backend.open -= 1
            self.drop_backend_socket()
            return
        self.backend = backend
        self.connected = True
        if self.buf_up is not None:
            self.flush_up()  # what the client sent meanwhile (and its FIN, if it came), at once
        else:
            self.rearm()

    def timed_out(self) -> None:
        backend = self.trying
        assert backend is not None
        self.target.connecting.discard(self)
        self.attempt += 1
        self.drop_backend_socket()
        self.failed(backend, None)
        self.connect()

    def failed(self, backend: Backend, exc: OSError | None) -> None:
        """A connect to `backend` failed (None: it timed out): counted, the backend is marked down."""
        target = self.target
        backend.open -= 1
        self.trying = None
        if exc is None:
            self.reason = f"timed out connecting to {backend.text}"
            target.slot.add(cells.TIMED_OUT)
            target.mark_down(backend, "connect timed out")
            return
        self.reason = f"cannot connect to {backend.text}: {exc.strerror or exc}"
        target.slot.add(cells.REFUSED if exc.errno == errno.ECONNREFUSED else cells.UNREACHABLE)
        target.mark_down(backend, exc.strerror or str(exc))

    def gave_up(self) -> None:
        self.target.slot.add(cells.ABANDONED if self.closing else cells.FAILED)  # closing: the client left
        self.end(f"failed: {self.reason}", reset=True)

    def stop_connecting(self) -> None:
        """The worker is stopping: the connect in progress is dropped."""
        if self.trying is not None:
            self.target.connecting.discard(self)
            self.attempt += 1
            self.trying.open -= 1
            self.trying = None
            self.drop_backend_socket()

    # ------------------------------------------------------------------ relaying

    def rearm(self) -> None:
        """The epoll masks that what each direction waits for asks for."""
        if self.connected:
            mask_a = (READ if not self.eof_up and self.buf_up is None else 0) | \
                (OUT if self.buf_down is not None else 0)
            mask_b = (READ if not self.eof_down and self.buf_down is None else 0) | \
                (OUT if self.buf_up is not None else 0)
        else:  # connecting: the client is read up to PENDING_LIMIT
            mask_a = IN if not self.eof_up and (self.buf_up is None or len(self.buf_up) < PENDING_LIMIT) else 0
            mask_b = OUT
        poller = self.worker.poller
        # a parked socket stays out of the set until it is to be read or written again
        if mask_a != self.mask_a and self.sock_a is not None and not (mask_a == 0 and self.mask_a == PARKED):
            if self.mask_a == PARKED:
                poller.add(self.fd_a, mask_a, self.on_a)
            else:
                poller.modify(self.fd_a, mask_a)
            self.mask_a = mask_a
        if mask_b != self.mask_b and self.sock_b is not None and not (mask_b == 0 and self.mask_b == PARKED):
            if self.mask_b == PARKED:
                poller.add(self.fd_b, mask_b, self.on_b)
            else:
                poller.modify(self.fd_b, mask_b)
            self.mask_b = mask_b

    def on_a(self, events: int) -> None:
        if not self.connected:
            if not self.ended:
                self.read_early()
            return
        if events & OUT:
            self.flush_down()
        if events & (IN | ERR | HUP) and not self.ended:
            if self.eof_up or self.buf_up is not None:
                self.side_failed("client")  # not read: only an error or a hang-up gets here
            else:
                self.pump_up(events)

    def on_b(self, events: int) -> None:
        if not self.connected:
            self.connect_done(events)
            return
        if events & OUT:
            self.flush_up()
        if events & (IN | ERR | HUP) and not self.ended:
            if self.eof_down or self.buf_down is not None:
                self.side_failed("backend")
            else:
                self.pump_down(events)

    def read_early(self) -> None:
        """What the client sends while the backend connection is being made, kept (up to PENDING_LIMIT)."""
        a, held = self.sock_a, self.buf_up
        assert a is not None
        if self.eof_up or (held is not None and len(held) >= PENDING_LIMIT):
            return self.side_failed("client")  # not read: only an error or a hang-up gets here
        # into the worker's buffer, then copied at its size: a.recv(PENDING_LIMIT) would allocate 256 KiB per
        # connection, which malloc maps, shrinks and unmaps (three syscalls and a page fault each time)
        view = self.worker.poller.view
        try:
            n = a.recv_into(view, PENDING_LIMIT - (0 if held is None else len(held)), _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost("client", exc)
        if n == 0:
            self.eof_up = True
        else:
            self.last = self.worker.poller.now
            self.up += n
            slot = self.target.slot
            slot.cells[slot.base + cells.BYTES_UP] += n
            self.buf_up = bytes(view[:n]) if held is None else held + view[:n]
        self.rearm()

    def pump_up(self, events: int) -> None:
        """Client -> backend: one read, sent on at once. With RDHUP, a read short of the buffer took everything
        before the client's FIN (TCP queues a FIN behind all the bytes before it), so the FIN is passed on now."""
        a, b = self.sock_a, self.sock_b
        assert a is not None and b is not None
        view = self.worker.poller.view
        try:
            n = a.recv_into(view, BUFFER, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost("client", exc)
        if n == 0:
            self.eof_up = True
            return self.passed_on_up()
        self.last = self.worker.poller.now
        self.up += n
        slot = self.target.slot  # counted as they flow: a connection that lasts for days shows its bytes
        slot.cells[slot.base + cells.BYTES_UP] += n
        last = events & RDHUP and n < BUFFER
        try:
            sent = b.send(view[:n], _LAST if last else _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return self.lost("backend", exc)
        if sent < n:
            self.buf_up = bytes(view[sent:n])
            if not last:
                return self.rearm()
        if last:
            self.eof_up = True
            self.passed_on_up()

    def pump_down(self, events: int) -> None:
        """Backend -> client (see pump_up)."""
        a, b = self.sock_a, self.sock_b
        assert a is not None and b is not None
        view = self.worker.poller.view
        try:
            n = b.recv_into(view, BUFFER, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost("backend", exc)
        if n == 0:
            self.eof_down = True
            return self.passed_on_down()
        self.last = self.worker.poller.now
        self.down += n
        slot = self.target.slot
        slot.cells[slot.base + cells.BYTES_DOWN] += n
        last = events & RDHUP and n < BUFFER
        try:
            sent = a.send(view[:n], _LAST if last else _DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return self.lost("client", exc)
        if sent < n:
            self.buf_down = bytes(view[sent:n])
            if not last:
                return self.rearm()
        if last:
            self.eof_down = True
            self.passed_on_down()

    def flush_up(self) -> None:
        data, b = self.buf_up, self.sock_b
        if data is None or b is None:
            return
        try:
            sent = b.send(data, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost("backend", exc)
        self.last = self.worker.poller.now  # bytes taken: the connection carries data (a slow reader is not idle)
        self.buf_up = data[sent:] if sent < len(data) else None
        if self.buf_up is None and self.eof_up:
            return self.passed_on_up()
        self.rearm()

    def flush_down(self) -> None:
        data, a = self.buf_down, self.sock_a
        if data is None or a is None:
            return
        try:
            sent = a.send(data, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.lost("client", exc)
        self.last = self.worker.poller.now  # bytes taken: the connection carries data (a slow reader is not idle)
        self.buf_down = data[sent:] if sent < len(data) else None
        if self.buf_down is None and self.eof_down:
            return self.passed_on_down()
        self.rearm()

    def passed_on_up(self) -> None:
        """The client's FIN, once what it sent before is with the backend: the backend's FIN too if both have
        ended (close sends it: no shutdown first), else a half-close."""
        if self.buf_up is not None:
            return self.rearm()  # flush_up comes back here
        if self.eof_down and self.buf_down is None:
            return self.end("closed by both sides")
        try:
            assert self.sock_b is not None
            self.sock_b.shutdown(socket.SHUT_WR)
        except OSError as exc:
            return self.lost("backend", pending_error(self.sock_b, exc))
        self.rearm()

    def passed_on_down(self) -> None:
        if self.buf_down is not None:
            return self.rearm()
        if self.eof_up and self.buf_up is None:
            return self.end("closed by both sides")
        try:
            assert self.sock_a is not None
            self.sock_a.shutdown(socket.SHUT_WR)
        except OSError as exc:
            return self.lost("client", pending_error(self.sock_a, exc))
        self.rearm()

    def side_failed(self, side: str) -> None:
        """An error or a hang-up on a socket that is not being read: what went wrong, from SO_ERROR. A hang-up
        without an error is no failure: the peer's FIN came while this side is held back (its bytes wait for
        the other side to take the ones before) and ours went out already. epoll reports a hang-up whatever the
        mask, so the socket leaves the set (PARKED) until it is to be read again; its FIN is read then."""
        client = side == "client"
        sock = self.sock_a if client else self.sock_b
        if sock is None:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            return self.lost(side, OSError(code, os.strerror(code)))
        self.worker.poller.remove(self.fd_a if client else self.fd_b)
        if client:
            self.mask_a = PARKED
        else:
            self.mask_b = PARKED

    def lost(self, side: str, exc: OSError | None) -> None:
        """A side failed (a reset, mostly): the other side is reset too, so that a cut-off never looks like a
        clean end."""
        self.end(f"{side} connection lost{f' ({exc})' if exc else ''}", reset=True)

    # ------------------------------------------------------------------ ending

    def end(self, how: str, *, reset: bool = False) -> None:
        """Close both sockets (`reset`: with a reset) and count the connection out; a connect in progress
        goes on and closes its socket when it ends (it is counted, as relayed or abandoned)."""
        if self.ended:
            return
        self.ended = how
        self.closing = True
        poller = self.worker.poller
        close = reset_close if reset else _socket.socket.close
        sock, self.sock_a = self.sock_a, None
        if sock is not None:
            poller.forget(self.fd_a)
            close(sock)
        if self.trying is None and self.sock_b is not None:
            sock, self.sock_b = self.sock_b, None
            poller.forget(self.fd_b)
            close(sock)
        if self.worker.settings.debug or how.startswith(("refused", "failed")):
            self.log_line()
        self.finish()

    def still_sending(self, now: float) -> bool:
        """Whether a connection that looks idle (no byte read or sent for the idle timeout) is in fact moving
        bytes: what it sent may still sit in the kernel's send queues, leaving as slowly as the peer reads (a
        slow reader's socket turns writable only once half of a large queue is gone, which can take longer
        than the timeout). Non-empty queues (SIOCOUTQ) get one more timeout: their sizes are noted and the
        quiet spell starts again; at its end, queues of other sizes mean the bytes moved (once more), the same
        sizes that nothing left for a whole timeout: idle. A reader that stopped with bytes on the way is so
        let go after at most twice the timeout; one that reads a little per timeout is kept."""
        queued = (unsent(self.sock_a), unsent(self.sock_b))
        seen, self.queued = self.queued, None
        if seen is not None and seen[0] == self.last and seen[1:] == queued:
            return False  # not a byte left for a whole timeout
        if not (queued[0] or queued[1]):
            return False  # nothing on the way either
        self.last = now
        self.queued = (now, *queued)
        return True

    def abort(self, reason: str) -> None:
        """Cut (the grace period, a reload): with a reset, the peers must not take it for a clean end."""
        self.end(reason, reset=True)

    def expire(self, reason: str) -> None:
        """Idle too long: a clean close when nothing was cut (no bytes waiting to be sent), else a reset."""
        self.end(reason, reset=self.buf_up is not None or self.buf_down is not None or not self.connected)

    def finish(self) -> None:
        worker = self.worker
        if self in worker.connections:
            worker.connections.discard(self)
            worker.counters.sub(metrics.OPEN)
            self.target.slot.sub(cells.OPEN)
            self.target.relays -= 1
            worker.release_if_done(self.target)
        if self.backend is not None:
            self.backend.open -= 1
            self.backend = None

    @property
    def client(self) -> str:
        peer = self.peer
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "-"

    def log_line(self) -> None:
        duration = (self.worker.loop.time() - self.started) * 1000
        backend = self.backend.text if self.backend is not None else "-"
        level = logging.INFO if self.worker.settings.debug else logging.WARNING
        log.log(level, "%s -> :%d %s -> %s up=%d down=%d %.1fms %s", self.client, self.target.forward.port,
                self.target.forward.target(), backend, self.up, self.down, duration, self.ended)
