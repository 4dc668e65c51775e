"""One run at a time per network namespace: a lock that lives in the namespace and dies with its holder.

An abstract unix socket name is bound per network namespace, and the kernel frees it the moment the
process that bound it exits, however it exits (SIGKILL included): no lock file to go stale, no
cleanup. The holder also listens, so a waiting run can name it (SO_PEERCRED gives the holder's pid).
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..core.errors import SetupError

log = logging.getLogger(__name__)

LOCK_NAME = b"\0egress-router/apply"
WAIT_SECONDS = 60.0  # a run takes about 0.1 s; a holder this slow is stuck or a long drift repair
POLL_SECONDS = 0.05


@contextmanager
def namespace_lock(timeout: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the namespace's lock for the body; wait up to `timeout` seconds for another holder."""
    sock = acquire(timeout)
    try:
        yield
    finally:
        sock.close()


def acquire(timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(LOCK_NAME)
            sock.listen(8)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise SetupError(f"cannot take the lock for this network namespace: {exc.strerror}") from None
        if time.monotonic() >= deadline:
            raise SetupError(f"another egress-router run{describe(holder_pid())} in this network namespace still "
                             f"holds its lock after {timeout:g} s; nothing was changed") from None
        if not announced:  # ask for the holder's pid once: each probe takes a place in its backlog
            log.info("Waiting for another egress-router run%s in this network namespace to finish",
                     describe(holder_pid()))
            announced = True
        time.sleep(POLL_SECONDS)


def holder_pid() -> int | None:
    """The pid of the process holding the lock, as this namespace's pid namespace sees it (None: unknown)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(LOCK_NAME)
            pid, _, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return None
    return pid or None


def describe(pid: int | None) -> str:
    return f" (pid {pid})" if pid else ""
