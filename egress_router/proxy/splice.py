"""Relaying bytes between two connected sockets with splice(2): socket -> pipe -> socket, no copy through Python.

API (Linux only: `available()` says whether os.splice exists):

    relay = Relay(loop, a, b, on_bytes, on_end, limit_down=None, up=True, down=True, pass_resets=True)
    relay.start()
    ...
    relay.abort(reason, hard=False)

- `a`, `b`: connected non-blocking stream sockets (`socket.socket`; `adopt(fd, family)` makes one from a raw
  descriptor without a syscall). The relay owns them from `start()` on: it closes them when it ends, except
  when it ends with LIMIT (the caller gets them back, still open). Give it dups (`os.dup`) when something else
  (an event loop's transport) still holds the sockets, and keep that transport paused meanwhile.
- Direction UP is a -> b, DOWN is b -> a; `up=False`/`down=False` leave a direction alone (not read, never
  shut down). Each direction is independent: an EOF read from its source is passed on as shutdown(SHUT_WR) of
  its destination once the pipe is drained (half-close), while the other direction goes on.
- `on_bytes(direction, n)`: called for every splice into a destination, with the bytes it delivered (count
  them exactly there: what is still in a pipe when a connection fails was never delivered). `relay.last` is
  the loop's clock at the last delivery, for idle timeouts.
- `on_end(how)`, exactly once, after the relay let go of both sockets (unless `abort` ended it; `relay.error`:
  the OSError of a failure): CLOSED (every relayed direction saw its EOF and passed it on), A_FAILED /
  B_FAILED (an error on that side's socket, ECONNRESET, EPIPE or another: the *other* side was closed with a
  reset, SO_LINGER 0, so that its peer sees a reset and not a clean end, as proxy/server.reset does for
  transports; `pass_resets=False`: the other side is just closed, the caller decides), LIMIT (`limit_down`
  bytes went b -> a: the sockets are handed back open, nothing shut down), SHORT (b's EOF came before
  `limit_down` bytes: nothing is shut down and both sockets are closed; a caller whose peer must see a
  cut-off, not a clean end, resets its own reference to a).
- `abort(reason, hard=False)`: stop now, close both sockets (`hard`: with a reset), no `on_end`. For grace,
  idle timeouts and reloads. `relay.ended` is then `reason`.

Flow control: the pipe is each direction's only buffer (at most PIPE_SIZE bytes, F_SETPIPE_SZ where the
system allows, the default 64 KiB otherwise). A direction reads its source only when its pipe is empty, and
while its destination would block it waits for the destination to become writable and reads nothing: a peer
that does not read stops the other peer (through TCP's window), nothing piles up.

Descriptors: two pipes (four descriptors) per relay, taken when it starts (`start` raises OSError, having
changed nothing, when none can be made: EMFILE; the caller goes on without the relay) and given back when it
ends, to a small pool per process (POOL_SIZE empty pipes, emptied in a forked child) for the next relay. Pipes
are taken at the start, not when bytes come, so that a relay can never be stuck half-way without one; callers
start relays only for connections that move data (proxy/http_tunnel.py: a tunnel past its first SPLICE_AFTER
bytes; proxy/http_upstream.py: a body of at least SPLICE_BODY_MIN), so idle connections hold none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Callable

__all__ = ["A_FAILED", "B_FAILED", "CLOSED", "DOWN", "LIMIT", "PIPE_SIZE", "POOL_SIZE", "Relay", "SHORT", "UP",
           "adopt", "available"]

UP, DOWN = 0, 1  # a -> b, b -> a
CLOSED, A_FAILED, B_FAILED, LIMIT, SHORT = "closed", "a failed", "b failed", "limit", "short"
PIPE_SIZE = 1024 * 1024  # asked for with F_SETPIPE_SZ (the default /proc/sys/fs/pipe-max-size)
POOL_SIZE = 16  # empty pipes kept per process for the next connection that moves data
ROUNDS = 8  # reads per callback before other connections get their turn (epoll is level-triggered)

_SPLICE = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RESET = struct.pack("ii", 1, 0)
_SETPIPE = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GETPIPE = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_Pipe = tuple[int, int, int]  # read end, write end, capacity in bytes
_pool: list[_Pipe] = []


def available() -> bool:
    """splice(2) can be used here (Linux, Python 3.10+)."""
    return _SPLICE is not None


def adopt(fd: int, family: int) -> socket.socket:
    """A socket object for stream socket `fd` (owning it), without the syscalls that would detect its kind."""
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP if family != socket.AF_UNIX else 0, fd)


def _new_pipe() -> _Pipe:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, _SETPIPE, PIPE_SIZE)
    except OSError:  # over pipe-max-size or the user's pipe-user-pages quota: the default size is still a pipe
        size = fcntl.fcntl(w, _GETPIPE)
    return r, w, size


def _take_pipe() -> _Pipe:
    return _pool.pop() if _pool else _new_pipe()


def _give_pipe(pipe: _Pipe) -> None:
    if len(_pool) < POOL_SIZE:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def _clear_pool() -> None:
    """In a forked child: the parent's pipes are not this process's to share."""
    while _pool:
        r, w, _ = _pool.pop()
        os.close(r)
        os.close(w)


os.register_at_fork(after_in_child=_clear_pool)


class _Flow:
    """One direction: src -> pipe -> dst."""

    __slots__ = ("index", "src", "dst", "pipe", "held", "reading", "writing", "eof", "done", "left")

    def __init__(self, index: int, src: int, dst: int, left: int):
        self.index = index
        self.src = src
        self.dst = dst
        self.pipe: _Pipe | None = None
        self.held = 0  # bytes in the pipe
        self.reading = False  # a reader is registered on src
        self.writing = False  # a writer is registered on dst
        self.eof = False
        self.done = False
        self.left = left  # bytes still allowed (a limit), -1: no limit


class Relay:
    """Two sockets relayed both ways (or one) through pipes with splice(2); see the module's docstring."""

    __slots__ = ("loop", "socks", "fds", "flows", "on_bytes", "on_end", "last", "ended", "pass_resets", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket,
                 on_bytes: Callable[[int, int], None], on_end: Callable[[str], None], *,
                 limit_down: int | None = None, up: bool = True, down: bool = True, pass_resets: bool = True):
        self.loop = loop
        self.pass_resets = pass_resets
        self.error: OSError | None = None  # what ended it with A_FAILED or B_FAILED
        self.socks = (a, b)
        self.fds = (a.fileno(), b.fileno())
        self.on_bytes = on_bytes
        self.on_end = on_end
        self.last = loop.time()
        self.ended: str | None = None
        flows = []
        if up:
            flows.append(_Flow(UP, self.fds[0], self.fds[1], -1))
        if down:
            flows.append(_Flow(DOWN, self.fds[1], self.fds[0], -1 if limit_down is None else limit_down))
        self.flows = flows

    def start(self) -> None:
        """Take the pipes (OSError if there are none to be had: nothing changed then), then relay."""
        try:
            for flow in self.flows:
                flow.pipe = _take_pipe()
        except OSError:
            for flow in self.flows:
                pipe, flow.pipe = flow.pipe, None
                if pipe is not None:
                    _give_pipe(pipe)
            raise
        for flow in self.flows:
            self._pump(flow)  # what is already there moves at once; otherwise a reader waits for it
            if self.ended is not None:
                return

    # ------------------------------------------------------------ moving bytes
    def _pump(self, flow: _Flow) -> None:
        splice = _SPLICE
        assert splice is not None
        rounds = 0
        while True:
            if flow.held:
                pipe = flow.pipe
                assert pipe is not None
                try:
                    n = splice(pipe[0], flow.dst, flow.held, flags=_FLAGS)
                except BlockingIOError:
                    self._wait_writable(flow)
                    return
                except OSError as exc:
                    self._failed(flow.dst, exc)
                    return
                flow.held -= n
                self.last = self.loop.time()
                self.on_bytes(flow.index, n)
                if self.ended is not None:  # the callback aborted the relay
                    return
                continue
            if flow.writing:
                flow.writing = False
                self.loop.remove_writer(flow.dst)
            if flow.eof or flow.left == 0:
                self._flow_done(flow)
                return
            rounds += 1
            if rounds > ROUNDS:  # more to read, later: the reader stays registered
                self._wait_readable(flow)
                return
            pipe = flow.pipe
            assert pipe is not None  # taken in start, kept to the end
            want = pipe[2] if flow.left < 0 else min(pipe[2], flow.left)
            try:
                n = splice(flow.src, pipe[1], want, flags=_FLAGS)
            except BlockingIOError:  # the pipe is empty, so it is the socket that has nothing now
                self._wait_readable(flow)
                return
            except OSError as exc:
                self._failed(flow.src, exc)
                return
            if n == 0:
                flow.eof = True
            else:
                flow.held = n
                if flow.left > 0:
                    flow.left -= n

    def _wait_readable(self, flow: _Flow) -> None:
        if not flow.reading:
            flow.reading = True
            self.loop.add_reader(flow.src, self._pump, flow)

    def _wait_writable(self, flow: _Flow) -> None:
        """The destination is full: read nothing until it takes what the pipe holds."""
        if flow.reading:
            flow.reading = False
            self.loop.remove_reader(flow.src)
        if not flow.writing:
            flow.writing = True
            self.loop.add_writer(flow.dst, self._pump, flow)

    def _unregister(self, flow: _Flow) -> None:
        if flow.reading:
            flow.reading = False
            self.loop.remove_reader(flow.src)
        if flow.writing:
            flow.writing = False
            self.loop.remove_writer(flow.dst)

    def _flow_done(self, flow: _Flow) -> None:
        self._unregister(flow)
        flow.done = True
        pipe, flow.pipe = flow.pipe, None
        if pipe is not None:
            _give_pipe(pipe)  # empty: held is 0 here
        if flow.left == 0:
            self._finish(LIMIT)
            return
        if flow.left > 0:  # an EOF before the limit
            self._finish(SHORT)
            return
        with contextlib.suppress(OSError):  # the peer may be gone already: its own direction tells
            self.socks[1 - flow.index].shutdown(socket.SHUT_WR)  # UP's destination is b, DOWN's is a
        if all(f.done for f in self.flows):
            self._finish(CLOSED)

    def _failed(self, fd: int, exc: OSError) -> None:
        """An error on `fd`'s socket: the other one is reset, both closed."""
        self.error = exc
        side = 0 if fd == self.fds[0] else 1
        if self.pass_resets:
            with contextlib.suppress(OSError):
                self.socks[1 - side].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._finish(A_FAILED if side == 0 else B_FAILED)

    def _finish(self, how: str) -> None:
        self._stop(close=how != LIMIT)
        self.ended = how
        self.on_end(how)

    def _stop(self, *, close: bool) -> None:
        for flow in self.flows:
            self._unregister(flow)
            pipe, flow.pipe = flow.pipe, None
            if pipe is not None:
                if flow.held:  # bytes never delivered: this pipe cannot serve another connection
                    os.close(pipe[0])
                    os.close(pipe[1])
                else:
                    _give_pipe(pipe)
            flow.held = 0
            flow.done = True
        if close:
            for sock in self.socks:
                sock.close()

    def abort(self, reason: str, *, hard: bool = False) -> None:
        """End now (grace, idle timeout, reload): both sockets closed (`hard`: with a reset), no on_end."""
        if self.ended is not None:
            return
        self.ended = reason
        if hard:
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._stop(close=True)

