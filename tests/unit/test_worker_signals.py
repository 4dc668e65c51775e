"""A proxy worker told to stop while it is still starting stops cleanly (the master's exit status depends on it)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

from egress_router.proxy.server import handle_stop_signals, spawn


def slow_starting_worker(ready: int) -> object:
    """A WorkerMain that says it runs, then takes 0.3 s before its stop handlers are in place."""

    def main(sockets: list[socket.socket], index: int, alone: bool, channel: socket.socket | None) -> int:
        os.write(ready, b"x")
        time.sleep(0.3)  # what a worker does before serving (event loop, listeners) made long on purpose
        loop = asyncio.new_event_loop()
        stopped = asyncio.Event()
        handle_stop_signals(loop, stopped, 0.0, alone)
        loop.run_until_complete(asyncio.wait_for(stopped.wait(), 5.0))
        return 0

    return main


def test_sigterm_during_start_up_waits_for_the_handler_and_the_worker_exits_0() -> None:
    read_end, write_end = os.pipe()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    try:
        pid = spawn(0, {0: []}, slow_starting_worker(write_end))  # type: ignore[arg-type]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    os.kill(pid, signal.SIGTERM)  # the worker is in its start-up: no handler yet
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"status {status:#x}"


def test_a_single_process_proxy_stopped_before_its_handlers_exist_drains_and_exits_0() -> None:
    from egress_router.proxy.server import serve

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the proxy process: serve() with one worker runs the worker in this very process
        code = 1
        try:
            os.close(read_end)
            code = serve("test proxy", [], 1, slow_starting_worker(write_end), 0.0)  # type: ignore[arg-type]
        finally:
            os._exit(code)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"
    os.close(read_end)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"status {status:#x}"
