"""Fixtures of the unit tests that use real sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.segments import LoopbackSegments


@pytest.fixture
def segments() -> Iterator[LoopbackSegments]:
    """The loopback's TCP segments from the fixture's start (see LoopbackSegments)."""
    capture = LoopbackSegments()
    yield capture
    capture.close()
