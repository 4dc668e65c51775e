"""Helpers of the proxies' reload lab tests: a rule file in a ConfigMap volume, a timed wait, 1,000 held connections."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from egress_router.labtraffic import ConfigMapVolume
from egress_router.labtraffic import EchoHub as EchoHub  # re-exported for the reload tests
from egress_router.labtraffic import exchange_all as exchange_all

HELD = 1000  # established connections that must survive a reload
# The contract: a change is in force within 2 s of the swap. The tests allow 1 s more: their own probes (a TCP
# connection each, made from this process, which also runs the origin and the echo threads) and the CPU steal of
# a 2-core machine under load must not fail a proxy that kept its promise; a proxy that polls the file every
# 0.5 s and applies in milliseconds is far inside 2 s, so 3 s still fails one that is broken (a missed change
# waits forever; one seen only at the next SIGHUP, too).
IN_FORCE_LIMIT = 2.0
MARGIN = 1.0


class RuleVolume(ConfigMapVolume):
    """A rule file as a ConfigMap volume holds it, plus an edit no watch can see."""

    def rewrite_unseen(self, text: str) -> None:
        """Rewrite the file in place with text of the same length and its old modification time: no stamp the
        watch looks at changes, so only a SIGHUP can make the proxy read it."""
        real = os.path.realpath(self.path)
        before = os.stat(real)
        data = text.encode()
        assert len(data) == before.st_size, "the unseen rewrite needs text of the same length"
        with open(real, "r+b") as file:  # the old times again before the close (inotify's CLOSE_WRITE)
            file.write(data)
            file.flush()
            os.utime(file.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
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


