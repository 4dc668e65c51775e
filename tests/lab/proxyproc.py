"""A proxy process in a lab namespace: output collected as it comes, a clean stop, no leftovers; run unprivileged."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

import pytest

from egress_router.lab import GATEWAY_LAN_IP, ROUTER_POD_IP, SOURCE_IP, Lab, router_command

LOG_SIGNS_OF_TROUBLE = ("Traceback", "Task was destroyed", "never retrieved", "Exception in callback")


def connection_refused(connect: Callable[[], Any]) -> bool:
    """True when a new connection is refused: the proxy no longer listens.

    A connection that reached the accept queue just before the listener closed is reset instead
    (the kernel completed its handshake; closing the listener resets it). That is the stop in
    progress, not yet the end state, so it counts as "not refused yet" and the caller polls again.
    """
    try:
        conn = connect()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    conn.close()
    return False


class ProxyProcess:
    """egress-router running a proxy mode; the tests of each mode add readiness and log helpers."""

    def __init__(self, lab: Lab, process: subprocess.Popen[str], grace: float):
        self.lab, self.process, self.grace = lab, process, grace
        self.workers: list[tuple[int, str]] = []  # (pid, start time): killed at teardown if they outlive the master
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._collect, args=(stream,), daemon=True)
                         for stream in (process.stderr, process.stdout) if stream is not None]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children", encoding="ascii") as handle:
                return [int(pid) for pid in handle.read().split()]
        except OSError:
            return []

    def serving_pids(self) -> list[int]:
        """The processes that hold the connections: the workers, or the proxy itself when it runs alone."""
        return self.children() or [self.process.pid]

    def remember_workers(self) -> None:
        """Note the workers (with their start times) once the proxy is ready."""
        self.workers = [(pid, start_time(pid)) for pid in self.children()]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, then wait; kills the workers (by pid) and the master if they outstay `timeout`."""
        children = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.grace + 3 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=10)
            raise
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def stop_and_check(self) -> list[str]:
        """Stop it at a test's end; what was wrong: no clean stop, a non-zero exit, leftover workers, a
        traceback or an asyncio complaint in its log (the output is printed, pytest shows it on failure)."""
        pid = self.process.pid
        problems = []
        try:
            code = self.stop()
        except subprocess.TimeoutExpired:
            problems.append(f"pid {pid} did not stop on SIGTERM")
            code = 0
        finally:
            if left := self.kill_leftover_workers():
                problems.append(f"workers {left} outlived their master pid {pid}")
            print(f"--- proxy pid {pid} stderr:\n{self.stderr}")
        if code != 0:
            problems.append(f"pid {pid} exited with {code}")
        problems += [f"pid {pid} wrote {sign!r}" for sign in LOG_SIGNS_OF_TROUBLE if sign in self.stderr]
        return problems

    def kill_leftover_workers(self) -> list[int]:
        """Workers that outlived their master (they would keep the namespace alive): kill them, by pid."""
        left = [pid for pid, started in self.workers if start_time(pid) == started]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


class ClientConnection:
    """One connection from the client namespace to the proxy (a socket and a buffered reader on it)."""

    def __init__(self, lab: Lab, port: int, host: str = ROUTER_POD_IP, timeout: float = 10.0):
        with lab.entered("client"):
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def read_slowly(read: Callable[[int], bytes], seconds: float, size: int, pause: float, digest: Any) -> int:
    """A slow reader: `read(size)` with `pause` s between reads for `seconds`, each piece into `digest`
    (a hashlib object); the bytes read. The stream must not end meanwhile (an assertion says after how much)."""
    got, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        chunk = read(size)
        assert chunk, f"the stream ended after {got} bytes, during the slow reading"
        digest.update(chunk)
        got += len(chunk)
        time.sleep(pause)
    return got


def proxy_env(defaults: Mapping[str, str], *, network: bool, variables: Mapping[str, str]) -> dict[str, str]:
    """A proxy's environment in a test: ours without any EGRESS_*, the mode's test defaults, the network
    part (macvlan source and gateway: the single-container layout) when asked, then the test's own.
    No admin port unless the test asks: tests run several proxies side by side in one namespace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
    env["EGRESS_METRICS_PORT"] = "off"
    env.update(defaults)
    if network:
        env.update(EGRESS_SOURCE=f"{SOURCE_IP}/24", EGRESS_GATEWAY=GATEWAY_LAN_IP)
    env.update(variables)
    return env


def spawn_proxy(lab: Lab, env: Mapping[str, str], prefix: Sequence[str] = (),
                program: Sequence[str] | None = None) -> subprocess.Popen[str]:
    """egress-router (or `program`) in the router namespace, with the lab's hosts files, behind `prefix`."""
    return lab.spawn("router", [*prefix, *(router_command() if program is None else program)], env=dict(env), etc=True)


def check_stopped(started: Sequence[ProxyProcess]) -> None:
    """A start_proxy fixture's teardown: every proxy it started must stop cleanly (stop_and_check)."""
    problems = [problem for proxy in started for problem in proxy.stop_and_check()]
    assert not problems, "\n".join(problems) + "\n" + "\n\n".join(p.stderr for p in started)


def start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: tells a pid from a later process that got the same number."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--"]


def unprivileged_program(lab: Lab, probe_imports: str) -> tuple[list[str], dict[str, str]]:
    """How uid 65534 can start egress-router here: the venv's script, else the system python on its packages.

    A venv made from an interpreter under /root (mode 0700, as pyenv's often is) cannot be run by
    another user; the system interpreter of the same version can run the same packages, if it can
    import `probe_imports` (a comma-separated module list) with them.
    """
    import egress_router

    program = router_command()
    if lab.exec("router", [*UNPRIVILEGED, *program, "--version"]).returncode == 0:
        return program, {}
    project = str(Path(egress_router.__file__).resolve().parent.parent)
    site = [path for path in sys.path if path.endswith("site-packages")]
    env = {"PYTHONPATH": ":".join([project, *site])}
    tried = [program[0]]
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(python, os.X_OK):
            tried.append(python)
            probe = [python, "-c", f"import {probe_imports}"]
            if lab.exec("router", [*UNPRIVILEGED, *probe], env={**os.environ, **env}).returncode == 0:
                return [python, "-m", "egress_router"], env
    pytest.fail(f"uid 65534 cannot run egress-router with any of {tried} (PYTHONPATH={env['PYTHONPATH']})")


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return dict(line.split(":\t", 1) for line in handle.read().splitlines() if ":\t" in line)


def rss_bytes(pid: int) -> int:
    """The resident set size of a process now."""
    return int(status_fields(pid)["VmRSS"].split()[0]) * 1024


class PeakRss:
    """`with PeakRss(pid) as peak:` samples the process's RSS every 20 ms; `peak.growth`: the highest
    sample less the RSS at the start, in bytes."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self.start = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss_bytes(self.pid))

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start
