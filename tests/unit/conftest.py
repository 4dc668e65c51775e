"""Fixtures of the unit tests that use real sockets (a file may define its own `loop` instead)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from tests.unit.segments import LoopbackSegments


def loops() -> list[str]:
    names = ["asyncio"]
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        names.append("uvloop")
    return names


@pytest.fixture(params=loops())
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A new event loop, asyncio's and (where installed) uvloop's, set as the current one."""
    new: asyncio.AbstractEventLoop
    if request.param == "uvloop":
        import uvloop

        new = uvloop.new_event_loop()
    else:
        new = asyncio.new_event_loop()
    asyncio.set_event_loop(new)
    yield new
    asyncio.set_event_loop(None)
    new.close()


@pytest.fixture
def segments() -> Iterator[LoopbackSegments]:
    """The loopback's TCP segments from the fixture's start (see LoopbackSegments)."""
    capture = LoopbackSegments()
    yield capture
    capture.close()
