"""High availability in the proxy modes: the container's first process keeps the replica's role, the proxy is its child.

The keeper sets the network up as a standby (router.set_up), forks the proxy (its master and workers, or its
one process, exactly as without high availability) and then runs the role's loop as legacy mode does: keepalived
as its child, its state lines woken by SIGIO, the address taken and given up. A parent rather than a thread: the
proxies wait on signals of their own (their master's sigtimedwait, their event loops' handlers), and the role's
loop needs the signals the kubelet sends, which go to the container's first process.

Every proxy process sees the role in shared memory (ha_view.SharedRole): a standby's proxy refuses at once
what reaches it, its /ready answers 503. On SIGTERM the keeper passes the signal on (the proxy stops accepting
and drains) and gives the address up at once (the next replica takes over while this one drains), then waits
for the drain. Should the proxy
die, the keeper gives the address up and exits with it (the kubelet restarts the container); should the keeper
die, the proxy and keepalived get SIGTERM from the kernel (PR_SET_PDEATHSIG), and the address lapses by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping

from .core.config import RouterConfig
from .ha import Role
from .ha_view import SharedRole
from .live import REANNOUNCE_AFTER_SECONDS, WAKE
from .net import apply as apply_steps
from .router import Prepared, log_ready, set_up

log = logging.getLogger(__name__)

STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
SIGNALS = STOPS | {signal.SIGHUP, WAKE, signal.SIGCHLD}
POLL_SECONDS = 0.5
EXTRA_WAIT = 5.0  # beyond the proxy's grace period: its master kills what is left at grace + 1 s


def serve_replica(config: RouterConfig, env: Mapping[str, str], admin_socket: socket.socket | None) -> int:
    """A proxy replica of a high-availability router, until SIGTERM/SIGINT or the proxy's end; the exit code."""
    # a stop during set-up waits until it is complete; SIGHUP is the proxy's reload, never "die"
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    prepared, role = set_up(config)
    assert role is not None
    try:
        shared = SharedRole(os.getpid())
        log_ready(config, prepared, role)
        child = fork_proxy(config, env, admin_socket, shared, prepared, before)
        if admin_socket is not None:
            admin_socket.close()  # the proxy's now
        return Keeper(role, prepared, shared, child, grace_seconds(config)).run()
    finally:
        prepared.rtnl.close()


def grace_seconds(config: RouterConfig) -> float:
    settings = config.http_proxy or config.dns_proxy
    assert settings is not None
    return settings.grace_seconds


def fork_proxy(config: RouterConfig, env: Mapping[str, str], admin_socket: socket.socket | None,
               shared: SharedRole, prepared: Prepared, mask: set[int | signal.Signals]) -> int:
    """The proxy in a child process; returns its pid."""
    keeper = os.getpid()
    pid = os.fork()
    if pid:
        log.debug("High availability: the proxy runs as pid %d under this keeper (pid %d)", pid, keeper)
        return pid
    code = 1
    try:
        from .proxy.server import die_with_parent

        die_with_parent(keeper)
        prepared.rtnl.close()  # the keeper's; the proxy does not change the network
        # the stop and reload signals stay blocked until the proxy's own handlers take them (as without a keeper);
        # SIGIO (its rule file's inotify signal) and SIGCHLD (its master's) are the proxy's to unblock
        signal.pthread_sigmask(signal.SIG_SETMASK, set(mask) | {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        code = run_proxy(config, env, admin_socket, shared)
    except BaseException:
        log.exception("The proxy failed")
    finally:
        logging.shutdown()
        os._exit(code)


def run_proxy(config: RouterConfig, env: Mapping[str, str], admin_socket: socket.socket | None,
              shared: SharedRole) -> int:
    if config.http_proxy is not None:
        from .proxy.http import run_http_proxy

        return run_http_proxy(config.http_proxy, env, admin_socket, shared)
    assert config.dns_proxy is not None
    from .proxy.dns import run_dns_proxy

    return run_dns_proxy(config.dns_proxy, env, admin_socket, shared)


class Keeper:
    """The role's loop beside the proxy it supervises."""

    def __init__(self, role: Role, prepared: Prepared, shared: SharedRole, child: int, grace: float):
        self.role, self.prepared, self.shared, self.child, self.grace = role, prepared, shared, child, grace
        self.status: int | None = None  # the proxy's wait status, once it ended

    def run(self) -> int:
        role = self.role
        role.start(WAKE)
        self.publish()
        announce_at: float | None = None
        while True:
            wait = POLL_SECONDS if announce_at is None else max(0.0, min(POLL_SECONDS, announce_at - time.monotonic()))
            received = signal.sigtimedwait(SIGNALS, wait)
            signo = received.si_signo if received is not None else None
            if signo in STOPS:
                assert signo is not None
                return self.stop(signal.Signals(signo))
            if signo == signal.SIGHUP:
                self.signal_proxy(signal.SIGHUP)  # the proxy reloads its rules
            if self.proxy_ended():
                return self.proxy_gone()
            was = role.active
            role.act()
            self.publish()
            if role.active and not was:
                announce_at = time.monotonic() + REANNOUNCE_AFTER_SECONDS
            if announce_at is not None and time.monotonic() >= announce_at:
                announce_at = None
                if role.active:  # as legacy mode does: a second announcement once switches have settled
                    apply_steps.announce(role.view(role.plan), self.prepared.context)

    def publish(self) -> None:
        role = self.role
        self.shared.publish(role.active, role.transitions, role.peer_count, role.state)

    def stop(self, signo: signal.Signals) -> int:
        """The address goes at once (another replica takes over now) while the proxy drains: the proxy is told first
        (it stops accepting; what still reaches it is refused as a standby's), then the address is given up and
        keepalived says goodbye, which takes keepalived a second or so to finish; then the drain is waited for."""
        log.info("Received %s; handing EGRESS_SOURCE over, then draining the proxy for up to %g s", signo.name,
                 self.grace)
        role = self.role
        self.shared.publish(False, role.transitions, role.peer_count, "stopped")
        self.signal_proxy(signo)
        role.stop()
        self.publish()
        deadline = time.monotonic() + self.grace + EXTRA_WAIT
        while not self.proxy_ended() and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
        if not self.proxy_ended():
            log.error("The proxy (pid %d) did not stop within %g s; killing it", self.child, self.grace + EXTRA_WAIT)
            self.signal_proxy(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                self.status = os.waitpid(self.child, 0)[1]
        log.info("Exiting")
        return self.exit_code()

    def proxy_gone(self) -> int:
        log.error("The proxy exited (%s); this replica gives EGRESS_SOURCE up and exits", self.describe())
        self.role.stop()
        self.publish()
        code = self.exit_code()
        return code if code != 0 else 1  # a proxy that ends by itself is a failure of the container

    def proxy_ended(self) -> bool:
        """The proxy has ended (reaped here: keepalived, the other child, is reaped by its own Popen)."""
        if self.status is None:
            try:
                pid, status = os.waitpid(self.child, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == self.child:
                self.status = status
        return self.status is not None

    def signal_proxy(self, signo: signal.Signals) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signo)

    def exit_code(self) -> int:
        if self.status is None:
            return 1
        return 1 if os.WIFSIGNALED(self.status) else os.waitstatus_to_exitcode(self.status)

    def describe(self) -> str:
        if self.status is None:
            return "status unknown"
        if os.WIFSIGNALED(self.status):
            return f"killed by {signal.Signals(os.WTERMSIG(self.status)).name}"
        return f"exit status {os.waitstatus_to_exitcode(self.status)}"
