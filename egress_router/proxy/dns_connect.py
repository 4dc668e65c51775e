"""The DNS proxy's backend connect, one per client connection, without a Task or asyncio.wait_for.

Per connection those two cost about as much CPU as relaying a short exchange (issue 16's profile): here
`connect` starts loop.create_connection's coroutine and `advance` steps it by hand each time the future it waits
on is done, as a Task's step would; a call_later timer is the connect timeout, which cancels that future and then
the coroutine, as wait_for does. The relay (dns.Relay) is told through `connected` (from its backend protocol's
connection_made, before anything is read from the backend) and `gave_up` (no backend left to try).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING

from . import dns_metrics as cells
from .dns_targets import Backend, Target

if TYPE_CHECKING:
    from .dns import DnsWorker


class Connecting(asyncio.Protocol):
    """The connect part of a client connection (dns.Relay): the backends tried, in turn, up to `settings.tries`."""

    __slots__ = ("tried", "tries_left", "reason", "trying", "attempt", "waiting", "timer", "expired")
    worker: DnsWorker
    target: Target

    def __init__(self) -> None:
        self.tried: tuple[Backend, ...] = ()  # a tuple: nothing held per idle connection once connected
        self.tries_left = 0
        self.reason = "no backend"  # why the last try failed
        self.trying: Backend | None = None  # the backend of the connect in progress
        self.attempt: Coroutine[object, None, object] | None = None  # its coroutine; None: no connect running
        self.waiting: object = None  # what that coroutine waits on
        self.timer: asyncio.TimerHandle | None = None  # its timeout
        self.expired = False  # the timeout fired: the coroutine is to end with CancelledError

    def backend_side(self) -> asyncio.Protocol:
        """The protocol of the backend connection (its connection_made calls `connected`)."""
        raise NotImplementedError

    def gave_up(self) -> None:
        """Every backend tried has failed (or none is left to try)."""
        raise NotImplementedError

    def connect_started(self) -> None:
        """A connect made it (called by `connected`, before it takes the transport): no timeout, no retry."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tried = ()

    def connect(self) -> None:
        """Connect to the next backend to try; none left (or every try failed at once): the client is closed."""
        worker, target = self.worker, self.target
        while self.tries_left > 0:
            backend = target.choose(self.tried)
            if backend is None:
                break
            self.tries_left -= 1
            self.tried += (backend,)
            backend.open += 1
            self.trying = backend
            self.expired = False
            self.attempt = worker.loop.create_connection(self.backend_side, backend.host, backend.port)
            target.connecting.add(self)
            self.timer = worker.loop.call_later(worker.settings.connect_timeout, self.timed_out)
            exc = self.advance()
            if exc is None:
                return  # waiting (advance is called again), or connected
            self.failed(backend, exc)  # at once (a network that is unreachable): the next one
        self.gave_up()

    def advance(self, waited: object = None) -> BaseException | None:
        """Run the connect coroutine up to its next wait, as a Task's step would; the error that ended it, if any.
        `waited`: the future that was done (a done-callback); a stale one (an earlier attempt's) is ignored."""
        attempt = self.attempt
        if attempt is None or waited is not self.waiting:
            return None
        try:
            # expired: what wait_for does, the coroutine gets CancelledError (uvloop then closes the socket)
            step = attempt.throw(asyncio.CancelledError()) if self.expired else attempt.send(None)
        except StopIteration:  # connected (connected() has run) and the coroutine returned
            self.attempt = self.waiting = None
            self.target.connecting.discard(self)
            return None
        except (OSError, asyncio.CancelledError) as exc:
            self.attempt = self.waiting = None
            self.target.connecting.discard(self)
            if self.timer is not None:
                self.timer.cancel()
            return exc
        self.waiting = step
        if isinstance(step, asyncio.Future):
            step.add_done_callback(self.resumed)
        else:  # a bare yield: run it again on the next turn of the loop, as a Task does
            self.worker.loop.call_soon(self.resumed, step)
        return None

    def resumed(self, waited: object) -> None:
        exc = self.advance(waited)
        if exc is not None and self.trying is not None:
            self.failed(self.trying, exc)
            self.connect()

    def timed_out(self) -> None:
        """The connect timeout: the coroutine is cancelled, the future it waits on first (as wait_for does: what
        that future registered is unregistered before the socket is closed); its CancelledError counts as the
        timeout. A future that is done already has its result on the way (resumed is scheduled): that counts."""
        waiting = self.waiting
        if self.attempt is None:
            return
        if isinstance(waiting, asyncio.Future):
            if waiting.done():
                return
            waiting.cancel()
        self.expired = True

    def stop_connecting(self) -> None:
        """The worker is stopping: the connect in progress is dropped, its socket closed while the loop still
        runs (closed later, with the loop, uvloop would report the connect's end on a closed loop)."""
        attempt, self.attempt = self.attempt, None
        self.target.connecting.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if isinstance(self.waiting, asyncio.Future):
            self.waiting.cancel()  # as wait_for does; and no error is set on it later that nobody would read
        if attempt is not None:
            attempt.close()  # GeneratorExit where it waits: create_connection closes its transport

    def failed(self, backend: Backend, exc: BaseException) -> None:
        target = self.target
        backend.open -= 1
        self.trying = None
        if isinstance(exc, asyncio.CancelledError):
            self.reason = f"timed out connecting to {backend.text}"
            target.slot.add(cells.TIMED_OUT)
            target.mark_down(backend, "connect timed out")
            return
        assert isinstance(exc, OSError)
        self.reason = f"cannot connect to {backend.text}: {exc.strerror or exc}"
        target.slot.add(cells.REFUSED if isinstance(exc, ConnectionRefusedError) else cells.UNREACHABLE)
        target.mark_down(backend, exc.strerror or str(exc))
