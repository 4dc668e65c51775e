"""Serving loops: one process, or worker processes sharing listening ports (SO_REUSEPORT) under a master.

With more than one worker, the master binds one socket per worker and address family before
forking, so a port that cannot be bound is reported at once, and the kernel spreads new connections
evenly over the workers. It restarts a worker that dies, forwards SIGTERM/SIGINT, and gives workers the grace period to
drain before it kills what is left. Each worker runs its own event loop (uvloop when installed).
The master also decides rule reloads (file changes, SIGHUP: proxy/reload.py) and hands them to the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ..inotify import Notifier
from .cpus import auto_workers, available_cpus
from .listeners import Listen, bind_all, listen_spec, probe_ports
from .metrics import SharedCounters
from .reload import POLL_SECONDS, SEND_TIMEOUT, Reloader, Update, send_update

__all__ = ["Listen", "Master", "auto_workers", "available_cpus", "bind_all", "listen_spec", "loop_worker",
           "probe_ports", "serve"]

log = logging.getLogger(__name__)

# (sockets, index, alone, control channel from the master: None when alone)
WorkerMain = Callable[[list[socket.socket], int, bool, socket.socket | None], int]
WAKE = signal.SIGIO
RESTART_LIMIT = 5  # restarts within RESTART_WINDOW before the master gives up
RESTART_WINDOW = 60.0


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


def serve(name: str, specs: list[Listen], workers: int, worker_main: WorkerMain, grace: float,
          reloader: Reloader[Any] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.

    One worker runs in this very process: no master, no fork, one process's memory (a crash ends the
    container, which the kubelet restarts); it reloads its rules itself. More workers are forked and
    supervised by this process, which also decides reloads (`reloader`) and sends them to the workers.
    """
    limit = raise_file_limit()
    ports = ",".join(sorted({str(s.port) for s in specs}))
    if reloader is not None:
        # SIGHUP means "reload" from now on, never "die": blocked until a loop handles it (the worker's,
        # when alone; the master's sigtimedwait otherwise), so one that comes early waits instead.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if workers == 1:
        log.info("Starting %s: one process on port(s) %s (open files limit %d)", name, ports, limit)
        # A stop that comes once the port accepts but before the loop's handlers are in place waits for them
        # (handle_stop_signals unblocks), and then drains, instead of killing the process outright.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        probe_ports(specs)
        listening = bind_all(specs)
        try:
            return worker_main(listening, 0, True, None)
        except Exception:
            log.exception("%s failed", name)
            return 1
    log.info("Starting %s: %d worker processes on port(s) %s (open files limit %d)", name, workers, ports, limit)
    return Master(worker_main, grace, reloader).run(specs, workers)


class Master:
    """The supervising process: forks the workers, replaces those that die, stops them, hands them reloads."""

    def __init__(self, worker_main: WorkerMain, grace: float, reloader: Reloader[Any] | None):
        self.worker_main, self.grace, self.reloader = worker_main, grace, reloader
        self.children: dict[int, int] = {}  # pid -> worker index
        self.channels: dict[int, socket.socket] = {}  # worker index -> the master's end of its control channel
        self.stops = {signal.SIGTERM, signal.SIGINT}
        self.waited = self.stops | {signal.SIGCHLD} | ({signal.SIGHUP} if reloader is not None else set())
        self.notifier: Notifier | None = None
        if reloader is not None and reloader.watch is not None:
            self.waited |= {WAKE}  # inotify events on the rule file's directory, signalled by the kernel

    def run(self, specs: list[Listen], workers: int) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.waited)
        if WAKE in self.waited and self.reloader is not None and self.reloader.watch is not None:
            self.notifier = Notifier.open(self.reloader.watch.paths)
            if self.notifier is not None:
                self.notifier.signal_on_events(WAKE)
        probe_ports(specs)
        sockets: dict[int, list[socket.socket]] = {}
        for index in range(workers):
            sockets[index] = bind_all(specs)
        for index in range(workers):
            self.start(index, sockets)
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        restarts: list[float] = []
        while True:
            if self.reloader is None:
                info: signal.struct_siginfo | None = signal.sigwaitinfo(self.waited)
            else:
                info = signal.sigtimedwait(self.waited, POLL_SECONDS)
                if info is not None and info.si_signo == WAKE:
                    if self.notifier is not None:
                        self.notifier.drain()
                    info = None  # look at the file now, as a poll does
            if info is None or info.si_signo == signal.SIGHUP:
                assert self.reloader is not None
                indexes = sorted(self.children.values())
                update = self.reloader.poll(indexes) if info is None else self.reloader.check("SIGHUP", indexes)
                if update is not None:
                    self.hand_out(update)
                continue
            if info.si_signo in self.stops:
                log.info("Received %s; draining for up to %g s", signal.Signals(info.si_signo).name, self.grace)
                return stop_children(self.children, self.grace)
            for pid, status in reap():
                if pid not in self.children:
                    continue
                index = self.children.pop(pid)
                with contextlib.suppress(KeyError):
                    self.channels.pop(index).close()
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                log.error("Worker %d (pid %d) exited unexpectedly (%s)", index, pid, describe_status(status))
                if len(restarts) > RESTART_LIMIT:
                    log.error("Workers keep dying (%d restarts in %g s); stopping", len(restarts), RESTART_WINDOW)
                    stop_children(self.children, 0)
                    return 1
                # the rules in force now, not those of the start: the fork copies the reloader's
                fresh = {index: bind_all(self.reloader.specs() if self.reloader is not None else specs)}
                self.start(index, fresh)
                for sock in fresh[index]:
                    sock.close()

    def start(self, index: int, sockets: dict[int, list[socket.socket]]) -> None:
        ours = theirs = None
        if self.reloader is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        others = [channel for channel in self.channels.values()] + ([ours] if ours is not None else [])
        pid = spawn(index, sockets, self.worker_main, theirs, others)
        self.children[pid] = index
        if ours is not None and theirs is not None:
            theirs.close()
            ours.settimeout(SEND_TIMEOUT)
            self.channels[index] = ours

    def hand_out(self, update: Update[Any]) -> None:
        """Every worker gets the update; one that cannot take it (stuck, dying) is replaced, with these rules."""
        assert self.reloader is not None
        try:
            for pid, index in list(self.children.items()):
                try:
                    send_update(self.channels[index], update.generation, update.text, update.sockets.get(index, []))
                except (OSError, KeyError) as exc:
                    log.error("Worker %d (pid %d) did not take the new rules (%s); replacing it", index, pid,
                              getattr(exc, "strerror", None) or exc)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.reloader.commit(update)
        finally:
            update.close_sockets()  # the workers have their own copies


def spawn(index: int, sockets: dict[int, list[socket.socket]], worker_main: WorkerMain,
          channel: socket.socket | None = None, others: list[socket.socket] | None = None) -> int:
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
        for sock in others or ():  # the master's ends of the control channels
            sock.close()
        # SIGTERM and SIGINT stay blocked (as the master has them) until the worker's handlers are in place
        # (handle_stop_signals): one sent while the worker starts waits for them instead of killing it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        code = worker_main(sockets[index], index, False, channel)
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
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # a worker starts with them blocked


def loop_worker(shared: SharedCounters, make_worker: Callable[[int], Any]) -> WorkerMain:
    """A WorkerMain that runs `make_worker(index).run(sockets, alone, channel)` on a fresh event loop (uvloop if
    installed)."""

    def main(sockets: list[socket.socket], index: int, alone: bool, channel: socket.socket | None) -> int:
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
            code: int = loop.run_until_complete(make_worker(index).run(sockets, alone, channel))
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
