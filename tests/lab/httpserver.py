"""Python's http.server (HTTP/1.1) serving a directory in a lab namespace, for the real-client tests of both
proxies: started by pid (nsenter without --fork execs it), waited for until it listens, ended by its pid."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from egress_router.lab import Lab

START_TIMEOUT = 10.0


def accepts(lab: Lab, role: str, ip: str, port: int) -> bool:
    """Whether something in `role` accepts TCP connections on ip:port."""
    with lab.entered(role):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def end_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it outstays a few seconds: by the process's own pid, nothing else."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def serving(lab: Lab, role: str, ip: str, port: int, root: Path, log: Path,
            env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """http.server on ip:port in `role`, serving `root`; its request log (stderr) in `log`."""
    with open(log, "wb") as sink:
        process = subprocess.Popen([*lab.enter_argv(role), sys.executable, "-u", "-m", "http.server", "--bind", ip,
                                    "--directory", str(root), "--protocol", "HTTP/1.1", str(port)],
                                   stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                   env=None if env is None else dict(env))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(lab, role, ip, port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"http.server did not listen on {ip}:{port} (exit {process.poll()}):\n"
                            f"{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield process
    finally:
        end_process(process)
