"""keepalived as the router's child: its files in the state directory, its state lines read without blocking.

keepalived runs in the foreground (--dont-fork) with the VRRP process only; its pid files are removed before each
start (a crash's would stop it: "already running"); it gets SIGTERM from the kernel should the router's main
thread die (PR_SET_PDEATHSIG), and then sends its priority-0 goodbye. Its notify FIFO is opened read-write and
non-blocking, with O_ASYNC: the kernel signals the router's loop when a state line arrives.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from .core import ha
from .core.errors import SetupError

log = logging.getLogger(__name__)

KEEPALIVED = "keepalived"
MISSING_KEEPALIVED = ("keepalived is not installed: high availability (EGRESS_HA_PEERS) runs it (apt-get install "
                      "keepalived; the egress-router image has it)")


class Keepalived:
    """keepalived as the router's child: its files in `directory`, its state lines read without blocking."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.conf, self.fifo, self.guard = directory / "keepalived.conf", directory / "keepalived.fifo", \
            directory / "guard"
        self.pidfile, self.vrrp_pidfile = directory / "keepalived.pid", directory / "vrrp.pid"
        self.process: subprocess.Popen[bytes] | None = None
        self.fd = -1
        self.buffer = b""
        self.started_at = 0.0

    def start(self, text: str, wake: int | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(text, encoding="utf-8")
        self.guard.write_text("0\n", encoding="ascii")
        for stale in (self.pidfile, self.vrrp_pidfile):  # a crash's pid files would stop it ("already running")
            stale.unlink(missing_ok=True)
        if not self.fifo.exists():
            os.mkfifo(self.fifo, 0o600)
        if self.fd < 0:  # read-write: the open never blocks, and the FIFO never sees its last writer go
            self.fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
            if wake is not None:
                fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
                fcntl.fcntl(self.fd, fcntl.F_SETSIG, wake)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_ASYNC)
        argv = [KEEPALIVED, "--dont-fork", "--log-console", "--log-detail", "--vrrp", "-f", str(self.conf),
                "-p", str(self.pidfile), "-r", str(self.vrrp_pidfile)]
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        except FileNotFoundError:
            raise SetupError(MISSING_KEEPALIVED) from None
        self.started_at = time.monotonic()
        threading.Thread(target=self.relay_log, args=(self.process,), name="keepalived-log", daemon=True).start()
        log.info("Started keepalived (pid %d), VRRP id %s", self.process.pid, vrid_of(text))

    def relay_log(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                log.debug("keepalived: %s", line)

    def states(self) -> list[str]:
        """The states keepalived wrote since the last call (MASTER, BACKUP, FAULT, STOP), oldest first."""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [state for line in lines if (state := ha.fifo_state(line.decode("ascii", "replace"))) is not None]

    def step_down(self, down: bool) -> None:
        """The track file: non-zero puts keepalived in FAULT (it stops being MASTER and sends priority 0)."""
        self.guard.write_text("1\n" if down else "0\n", encoding="ascii")

    def reload(self, text: str) -> None:
        self.conf.write_text(text, encoding="utf-8")
        if self.process is not None and self.process.poll() is None:
            # keepalived dies of a SIGHUP in its first moments, before its handlers are in place
            time.sleep(max(0.0, 0.3 - (time.monotonic() - self.started_at)))
            self.process.send_signal(signal.SIGHUP)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (keepalived says goodbye with priority 0: a standby takes over at once), then wait."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.process = None


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec only calls it


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the router (the thread that started it: the main one) dies, so
    keepalived never outlives it and says its priority-0 goodbye."""
    _LIBC.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def vrid_of(text: str) -> str:
    return next((line.split()[1] for line in text.splitlines() if "virtual_router_id" in line), "?")
