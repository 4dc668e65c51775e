"""Serving loops: one process, or worker processes sharing listening ports (SO_REUSEPORT) under a master.

With more than one worker, the master binds one socket per worker and address family before
forking, so a port that cannot be bound is reported at once, and the kernel spreads new connections
evenly over the workers. It restarts a worker that dies, forwards SIGTERM/SIGINT, and gives workers the grace period to
drain before it kills what is left. Each worker runs its own event loop (uvloop when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import math
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..core.errors import SetupError
from .metrics import SharedCounters

log = logging.getLogger(__name__)

WorkerMain = Callable[[list[socket.socket], int, bool], int]  # (sockets, index, alone)
RESTART_LIMIT = 5  # restarts within RESTART_WINDOW before the master gives up
RESTART_WINDOW = 60.0


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if there is one."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def raise_file_limit() -> int:
    """Raise the soft open-files limit to the hard one (10,000 connections need ~20,000 descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


@dataclass(frozen=True, slots=True)
class Listen:
    family: socket.AddressFamily
    host: str
    port: int


def listen_spec(port: int) -> list[Listen]:
    return [Listen(socket.AF_INET, "0.0.0.0", port), Listen(socket.AF_INET6, "::", port)]


def bind(spec: Listen, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((spec.host, spec.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_all(specs: list[Listen]) -> list[socket.socket]:
    """Bind every spec; IPv6 is skipped (with a log line) where the namespace has no IPv6."""
    sockets = []
    try:
        for spec in specs:
            try:
                sockets.append(bind(spec))
            except OSError as exc:
                if spec.family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.info("No IPv6 in this network namespace; listening on IPv4 only")
                    continue
                family = "IPv6" if spec.family == socket.AF_INET6 else "IPv4"
                raise SetupError(f"cannot listen on port {spec.port} ({family}): {exc.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def probe_ports(specs: list[Listen]) -> None:
    """SO_REUSEPORT would let us share a port someone else holds; binding without it first says so."""
    for spec in specs:
        try:
            with socket.socket(spec.family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if spec.family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind((spec.host, spec.port))
        except OSError as exc:
            if spec.family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise SetupError(f"cannot listen on port {spec.port}: {exc.strerror} (is another proxy "
                             "running?)") from None


def serve(name: str, specs: list[Listen], workers: int, worker_main: WorkerMain, grace: float) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.

    One worker runs in this very process: no master, no fork, one process's memory (a crash ends the
    container, which the kubelet restarts). More workers are forked and supervised by this process.
    """
    limit = raise_file_limit()
    ports = ",".join(sorted({str(s.port) for s in specs}))
    if workers == 1:
        log.info("Starting %s: one process on port(s) %s (open files limit %d)", name, ports, limit)
        probe_ports(specs)
        listening = bind_all(specs)
        try:
            return worker_main(listening, 0, True)
        except Exception:
            log.exception("%s failed", name)
            return 1
    log.info("Starting %s: %d worker processes on port(s) %s (open files limit %d)", name, workers, ports, limit)
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops | {signal.SIGCHLD})
    children: dict[int, int] = {}  # pid -> worker index
    probe_ports(specs)
    sockets: dict[int, list[socket.socket]] = {}
    for index in range(workers):
        sockets[index] = bind_all(specs)
    for index in range(workers):
        children[spawn(index, sockets, worker_main)] = index
    for socks in sockets.values():
        for sock in socks:
            sock.close()
    restarts: list[float] = []
    while True:
        info = signal.sigwaitinfo(stops | {signal.SIGCHLD})
        if info.si_signo in stops:
            log.info("Received %s; draining for up to %g s", signal.Signals(info.si_signo).name, grace)
            return stop_children(children, grace)
        for pid, status in reap():
            if pid not in children:
                continue
            index = children.pop(pid)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            log.error("Worker %d (pid %d) exited unexpectedly (%s)", index, pid, describe_status(status))
            if len(restarts) > RESTART_LIMIT:
                log.error("Workers keep dying (%d restarts in %g s); stopping", len(restarts), RESTART_WINDOW)
                stop_children(children, 0)
                return 1
            fresh = {index: bind_all(specs)}
            children[spawn(index, fresh, worker_main)] = index
            for sock in fresh[index]:
                sock.close()


def spawn(index: int, sockets: dict[int, list[socket.socket]], worker_main: WorkerMain) -> int:
    master = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        die_with_parent(master)
        for other, socks in sockets.items():
            if other != index:
                for sock in socks:
                    sock.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
        code = worker_main(sockets[index], index, False)
    except BaseException:
        log.exception("Worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def die_with_parent(master: int) -> None:
    """A worker must not outlive its master (killed with SIGKILL, say): ask the kernel for SIGTERM then."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is not available")
    if os.getppid() != master:  # the master died before the request took effect
        os._exit(1)


def reap() -> list[tuple[int, int]]:
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, status))


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def stop_children(children: dict[int, int], grace: float) -> int:
    for pid in children:
        with_suppressed(partial(os.kill, pid, signal.SIGTERM))
    deadline = time.monotonic() + grace + 1.0
    code = 0
    while children and time.monotonic() < deadline:
        for pid, status in reap():
            if children.pop(pid, None) is not None and status != 0:
                code = 1
        time.sleep(0.02)
    for pid in list(children):
        log.warning("Worker pid %d did not finish within the grace period; killing it", pid)
        with_suppressed(partial(os.kill, pid, signal.SIGKILL))
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        children.pop(pid)
    log.info("Stopped")
    return code


def with_suppressed(action: Callable[[], object]) -> None:
    with contextlib.suppress(ProcessLookupError):
        action()


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport | None) -> None:
    """Close with a TCP reset, so a peer that reset its side is seen as such on the other side too."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def handle_stop_signals(loop: asyncio.AbstractEventLoop, stopped: asyncio.Event, grace: float, alone: bool) -> None:
    """SIGTERM/SIGINT set `stopped`; a process serving alone logs it (under a master, the master does)."""

    def stop(signo: signal.Signals) -> None:
        if alone and not stopped.is_set():
            log.info("Received %s; draining for up to %g s", signo.name, grace)
        stopped.set()

    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop, signo)


def loop_worker(shared: SharedCounters, make_worker: Callable[[int], Any]) -> WorkerMain:
    """A WorkerMain that runs `make_worker(index).run(sockets, alone)` on a fresh event loop (uvloop if installed)."""

    def main(sockets: list[socket.socket], index: int, alone: bool) -> int:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        shared.reset_row(index)
        # Everything made so far (modules, settings, the allow list) lives as long as the process:
        # keep it out of the collector's way, so that a full collection scans only what serving
        # made (a full collection of the start-up objects alone takes ~4 ms: a latency spike).
        gc.collect()
        gc.freeze()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            code: int = loop.run_until_complete(make_worker(index).run(sockets, alone))
            return code
        finally:
            finish_tasks(loop)
            loop.close()

    return main


def finish_tasks(loop: asyncio.AbstractEventLoop, attempts: int = 20, wait: float = 0.1) -> None:
    """End background work (DNS refreshes, health checks, connects) with the worker, quietly and surely.

    A task may swallow one cancellation (Python 3.11's wait_for can, when the inner await finishes
    at the same moment), so tasks are cancelled again until they end; a process serving alone has no
    master that would kill it, so this must not wait forever.
    """
    pending = asyncio.all_tasks(loop)
    for _ in range(attempts):
        if not pending:
            return
        for task in pending:
            task.cancel()
        done, pending = loop.run_until_complete(asyncio.wait(pending, timeout=wait))
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" at exit
    if pending:
        log.warning("%d background task(s) did not end when cancelled: %s", len(pending),
                    ", ".join(sorted({t.get_coro().__qualname__ for t in pending})))  # type: ignore[union-attr]
