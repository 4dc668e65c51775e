"""How bytes flow through the HTTP proxy's connections: batched writes, why a client is not read, the buffer bound."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .http_worker import Worker

# Why reading from a client is paused (bits of FlowControl.holds); it resumes when no reason is left.
QUEUED = 1  # pipelined requests wait behind the current one
BUFFERED = 2  # BUFFER_LIMIT bytes of body or tunnel data wait for an upstream connection
UPSTREAM_FULL = 4  # the upstream connection or tunnel does not drain what the proxy writes to it
WRITE_FULL = 8  # the client does not read the proxy's answers, and no upstream feeds it to pause instead
SPLICED = 16  # a splice relay (proxy/splice.py) reads the socket now, the transport must not: never released

BUFFER_LIMIT = 256 * 1024  # as in the DNS proxy: what is held for an upstream that is not connected yet


class Endpoint:
    """A connection whose output is gathered during a callback and written once at its end."""

    # Subclasses use slots too, and allocate what an idle connection does not need only when it is
    # needed (output list, parser, request queue): 10,000 idle connections should cost little memory.
    __slots__ = ("out",)
    worker: Worker
    transport: asyncio.Transport | None
    out: list[bytes] | None

    def send(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = [data]
            self.worker.dirty.append(self)
        else:
            out.append(data)

    def flush(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))


class FlowControl(Endpoint):
    """Every buffer is bounded: a client is read only while what it sends can go on, and an upstream (or
    tunnel) is read only while the client takes what it sends (`write_full`: the client's transport
    called pause_writing; `paused_source`: the transport paused for it)."""

    __slots__ = ("holds", "write_full", "paused_source")
    closing: bool
    holds: int
    write_full: bool
    paused_source: asyncio.Transport | None

    def hold(self, reason: int) -> None:
        """Stop reading from the client for `reason` (a bit) until it is released."""
        if not self.holds and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self.holds |= reason

    def release(self, reasons: int) -> None:
        """These reasons (bits) no longer hold; reading resumes if none is left."""
        holds = self.holds
        if holds & reasons:
            self.holds = holds = holds & ~reasons
            if not holds and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    def write_paused(self, source: asyncio.Transport | None) -> None:
        """The client is not reading what the proxy sends: stop reading `source`, which feeds it (an
        upstream connection or the tunnel), or the client itself if nothing does."""
        self.write_full = True
        if source is not None:
            source.pause_reading()
            self.paused_source = source
        else:
            self.hold(WRITE_FULL)

    def write_resumed(self) -> None:
        self.write_full = False
        source, self.paused_source = self.paused_source, None
        if source is not None and not source.is_closing():
            source.resume_reading()
        self.release(WRITE_FULL)

    def feeding(self, source: asyncio.Transport | None) -> None:
        """`source` now feeds the client (an upstream took the current request, or the tunnel opened):
        what was buffered for it is gone; while the client does not read, neither is `source`."""
        self.release(BUFFERED)
        if self.write_full and self.paused_source is None and source is not None:
            source.pause_reading()
            self.paused_source = source

    def stops_feeding(self, source: asyncio.Transport | None) -> None:
        """`source` no longer feeds the client (its response is complete): reading it is not the client's
        to pause any more (it may go back to the pool and serve another client)."""
        if source is not None and self.paused_source is source:
            self.paused_source = None
            if not source.is_closing():
                source.resume_reading()
