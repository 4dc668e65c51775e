"""High availability at the edge: keepalived supervised by the router, and the role it elects applied.

The router writes keepalived's configuration (core.ha), runs it as its child (keepalived.py: it gets
SIGTERM should the router die, and then sends its priority-0 goodbye), and reads its state lines from the
notify FIFO, whose O_ASYNC signal wakes the router's loop. MASTER: the held steps are applied (the reserved
addresses with a lifetime a thread renews, the routes through the egress interface, the announcements) and the
replica is ready; any other state: the addresses go (the kernel takes their routes along), the default routes
become unreachable, and it is not ready. Peers given as a Service name are re-resolved in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from pathlib import Path

from .core import ha
from .core.errors import SetupError
from .core.plan import Plan, Step
from .keepalived import KEEPALIVED, MISSING_KEEPALIVED, Keepalived
from .net import apply as apply_steps
from .net import arp
from .net.arpguard import HolderWatch, Prober
from .net.lock import namespace_lock
from .net.rtnl import FAMILIES, Rtnl
from .readiness import write_state

log = logging.getLogger(__name__)

GUARD_SECONDS = 0.1  # how often the active replica looks for a second holder of its address
GUARD_WAIT = 0.03  # how long it listens for one after each probe
CLEAR_PROBES = 3  # unanswered probes after which a replica that gave way is a standby again
RESOLVE_SECONDS = 2.0  # how often a Service name of the peers is looked up again
STARTUP_DELAY_BY_NAME = 8  # seconds a replica found by name waits before it may take over: its peers must list it


def check_can_run(state_dir: str) -> None:
    """Before any change: keepalived is there, and the state directory can be written."""
    import shutil

    if shutil.which(KEEPALIVED) is None:
        raise SetupError(MISSING_KEEPALIVED)
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.write_text("", encoding="ascii")
        probe.unlink()
    except OSError as exc:
        raise SetupError(f"EGRESS_HA_STATE_DIR {state_dir} is not writable ({exc.strerror or exc}): mount an "
                         "emptyDir there (a read-only root filesystem)") from None


class PeerWatch:
    """The replicas' addresses: as given, or a Service name looked up again every RESOLVE_SECONDS in a thread."""

    def __init__(self, settings: ha.HaSettings, version: int):
        self.settings, self.version = settings, version
        self.latest: tuple[ha.IPAddress, ...] = settings.addresses
        self.error = ""
        if settings.service is not None:
            self.latest = self.lookup()

    def start(self) -> None:
        """The lookups from now on, in a thread (started only here: the proxies' keeper forks before this)."""
        if self.settings.service is not None:
            threading.Thread(target=self.loop, name="ha-peers", daemon=True).start()

    def lookup(self) -> tuple[ha.IPAddress, ...]:
        assert self.settings.service is not None
        try:
            found = socket.getaddrinfo(self.settings.service, None, FAMILIES[self.version], socket.SOCK_DGRAM)
        except OSError as exc:
            if not self.error:
                log.warning("High availability: cannot look up the peers %s (%s); keeping %s",
                            self.settings.service, exc, ", ".join(map(str, self.latest)) or "none")
            self.error = str(exc)
            return self.latest
        self.error = ""
        return tuple(sorted({ip_address(str(info[4][0]).split("%")[0]) for info in found},
                            key=lambda a: a.packed))

    def loop(self) -> None:
        while True:
            time.sleep(RESOLVE_SECONDS)
            self.latest = self.lookup()


class Role:
    """The replica's part: standby (prepared steps, unreachable defaults) or active (the held steps too)."""

    def __init__(self, settings: ha.HaSettings, plan: Plan, context: apply_steps.Context, own: ha.IPAddress,
                 pod_interface: str, on_change: Callable[[bool], None] | None = None):
        self.settings, self.plan, self.context, self.own = settings, plan, context, own
        self.pod_interface = pod_interface
        self.active = False
        self.restarting = False
        self.wake: int = signal.SIGIO
        self.yield_to: str | None = None  # set by the guard thread: a second holder with a higher MAC
        self.yielded = False
        self.clear_probes = 0
        self.adverts: socket.socket | None = None  # while given way: VRRP packets from the peers, heard again
        self.yield_prober: Prober | None = None  # while given way: kept open (a packet socket costs ~16 ms to open)
        self.transitions = 0
        self.on_change = on_change
        self.directory = Path(settings.state_dir)
        self.keepalived = Keepalived(self.directory)
        self.peers = PeerWatch(settings, own.version)
        self.in_config: tuple[ha.IPAddress, ...] = ()
        self.renewer: threading.Thread | None = None
        self.renew_stop = threading.Event()
        self.elected: str | None = None  # keepalived's last state line since it (re)started; None: none yet
        self.state = ""
        self.write_state("starting")

    # ------------------------------------------------------------ steps
    def held(self) -> tuple[Step, ...]:
        """What taking over applies: the held steps as the active replica holds them."""
        return tuple(step for step in self.active_steps(self.plan) if ha.held_step(step, self.plan.interface))

    def active_steps(self, plan: Plan) -> tuple[Step, ...]:
        """`plan`'s steps, the reserved addresses with their lifetime."""
        return ha.active_steps(plan)

    def view(self, plan: Plan) -> Plan:
        """`plan` as this replica holds it now: active, with the held steps (addresses with their lifetime);
        standby, without them and with unreachable default routes."""
        return ha.replica_plan(plan, ha.ACTIVE if self.active else ha.STANDBY)

    def standby_steps(self) -> tuple[Step, ...]:
        return ha.standby_defaults(self.plan)

    def keepalived_text(self) -> str:
        self.in_config = self.peers.latest
        # found by name, a new replica waits before it may take over: its peers must list it first (they look
        # the name up every RESOLVE_SECONDS, and the Service's records take a few seconds to change)
        delay = STARTUP_DELAY_BY_NAME if self.settings.service is not None else 0
        text = ha.keepalived_config(own=self.own, peers=self.in_config, interface=self.pod_interface,
                                    vrid=self.settings.vrid, advert=self.settings.advert,
                                    fifo=str(self.keepalived.fifo), guard=str(self.keepalived.guard),
                                    startup_delay=delay, egress=self.plan.interface)
        return text

    def start(self, wake: int) -> None:
        self.wake = wake
        self.peers.start()
        self.keepalived.start(self.keepalived_text(), wake)

    # ------------------------------------------------------------ transitions
    def act(self) -> None:
        """Apply what keepalived said since last time (the newest state counts); reload it on a peer change;
        should it have exited, hold nothing and start it again (at most once a second)."""
        code = self.keepalived.exited()
        if code is not None:
            if self.active or not self.restarting:
                log.error("High availability: keepalived exited (status %s); this replica holds nothing until it "
                          "runs again", code)
            self.restarting = True
            self.elected = None  # no keepalived: this replica cannot take over until the new one reports
            self.become(False)
            self.refresh_state()
            if time.monotonic() - self.keepalived.started_at >= 1.0:
                self.keepalived.process = None
                self.keepalived.start(self.keepalived_text())
            return
        self.restarting = False
        if self.yield_to is not None:
            log.warning("High availability: giving way to %s, which holds %s too (its MAC is higher)", self.yield_to,
                        " or ".join(str(address.ip) for address in self.plan.addresses))
            self.yield_to = None
            self.yielded, self.clear_probes = True, 0
            self.keepalived.step_down(True)  # keepalived goes to FAULT: it sends priority 0 and stays out
            self.become(False)
        elif self.yielded:
            self.yielded_check()
        states = self.keepalived.states()
        if states:
            log.debug("keepalived states: %s", ", ".join(states))
            self.elected = states[-1]
            self.become(states[-1] == "MASTER")
        self.refresh_state()
        if self.peers.latest != self.in_config:
            log.info("High availability: the peers are now %s (were %s)", ", ".join(map(str, self.peers.latest)),
                     ", ".join(map(str, self.in_config)) or "none")
            self.keepalived.reload(self.keepalived_text())

    def become(self, active: bool) -> None:
        if active == self.active:
            return
        started = time.monotonic()
        with namespace_lock():
            if active:
                self.apply(self.held())
            else:
                self.stop_renewing()
                self.release()
            # the state written under the lock: `verify`, which holds it while it reads, sees both agree
            self.active = active
            self.transitions += 1
            self.refresh_state()
        if active:
            self.start_renewing()
        held = " and ".join(str(address) for address in self.plan.addresses)
        log.info("High availability: %s (%.1f ms)", f"active, holding {held}" if active else
                 f"standby, holding nothing (peers {', '.join(map(str, self.in_config)) or 'none'})",
                 (time.monotonic() - started) * 1000)
        if self.on_change is not None:
            self.on_change(active)

    def apply(self, steps: Sequence[Step]) -> None:
        apply_steps.apply(dataclasses.replace(self.plan, steps=tuple(steps)), self.context)

    def release_stale(self) -> None:
        """At start: a reserved address already on the egress interface was left by a run that died (its pod
        network namespace stays): a standby holds nothing."""
        for address in self.remove_addresses():
            log.warning("High availability: removed %s from %s, left by an earlier run; this replica holds it "
                        "only once elected", address, self.plan.interface)

    def release(self) -> None:
        """The reserved addresses off (their routes with them), the default routes unreachable."""
        self.remove_addresses()
        self.apply(self.standby_steps())

    def remove_addresses(self) -> list[object]:
        """The reserved addresses that were on the egress interface, removed."""
        rtnl: Rtnl = self.context.rtnl
        index = self.context.index(self.plan.interface)
        removed: list[object] = []
        for address in self.plan.addresses:
            family = FAMILIES[address.version]
            if (str(address.ip), address.network.prefixlen) in rtnl.addresses(index, family):
                rtnl.address(False, index, str(address.ip), address.network.prefixlen, family)
                removed.append(address)
        return removed

    # ------------------------------------------------------------ the address lifetime
    def start_renewing(self) -> None:
        self.renew_stop.clear()
        self.renewer = threading.Thread(target=self.renew_loop, name="ha-renew", daemon=True)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # signals are the loop's
        try:
            self.renewer.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop_renewing(self) -> None:
        self.renew_stop.set()
        if self.renewer is not None:
            self.renewer.join(timeout=2)
            self.renewer = None

    def renew_loop(self) -> None:
        """While active, in a thread of its own: every GUARD_SECONDS look for a second holder of the reserved
        addresses on the LAN (the heartbeat path may be cut while both replicas live; in dual-stack both are
        guarded, IPv4 by ARP and IPv6 by DAD, and a second holder of either counts), every RENEW_SECONDS renew the
        addresses' lifetime (should this process die, they expire). Of two holders the one with the lower MAC
        yields, once the other has shown for YIELD_AFTER (a holder missing from fewer than CLEAR_PROBES probes in a
        row still counts: a late answer must not restart the wait) and answers still: longer than a dead replica's
        address lives, so that a crashed replica's leftover expires first instead of making this one give way; the
        higher one announces itself again meanwhile, to keep the gateway."""
        guarded = [address.ip for address in self.plan.addresses]
        watch = HolderWatch(CLEAR_PROBES)
        announced = renewed = 0.0
        with Rtnl() as rtnl, Prober(self.plan.interface) as prober:
            index = socket.if_nametoindex(self.plan.interface)
            while not self.renew_stop.wait(GUARD_SECONDS):
                now = time.monotonic()
                if now - renewed >= ha.RENEW_SECONDS:
                    self.renew(rtnl, index)
                    renewed = now
                try:
                    found = prober.second_holders_of(guarded, GUARD_WAIT)
                    own = prober.mac(guarded[0].version).hex(":")
                except OSError as exc:
                    log.debug("High availability: the second-holder probe failed: %s", exc)
                    continue
                others = set().union(*found.values())
                seen = watch.update(now, others)
                if seen == "gone":
                    log.info("High availability: the second holder of %s is gone", " or ".join(map(str, guarded)))
                if not others or watch.since is None:  # yield to, or announce against, a holder there now only
                    continue
                other = min(others)
                if seen == "new":
                    log.warning("High availability: %s also answers for %s on the LAN (this replica is %s); the "
                                "lower MAC gives way if it stays %.1f s", other,
                                " and ".join(str(ip) for ip, macs in found.items() if macs), own, ha.YIELD_AFTER)
                if own < other:
                    if now - watch.since >= ha.YIELD_AFTER and self.yield_to is None:
                        self.yield_to = other
                        os.kill(os.getpid(), self.wake)  # the loop acts on it
                elif now - announced >= 1.0:
                    announced = now
                    with contextlib.suppress(OSError):
                        announce_all(self.plan)

    def renew(self, rtnl: Rtnl, index: int) -> None:
        for address in self.plan.addresses:
            try:
                rtnl.address(True, index, str(address.ip), address.network.prefixlen, FAMILIES[address.version],
                             ha.ADDRESS_LIFETIME, renew=True)
            except OSError as exc:
                log.warning("High availability: could not renew %s on %s: %s", address, self.plan.interface,
                            getattr(exc, "strerror", None) or exc)

    def yielded_check(self) -> None:
        """Given way: a plain standby again (keepalived may elect it) once the heartbeats are back (a VRRP advert
        from a peer arrived: the path healed, and the active one is heard again) or no other holder answered
        CLEAR_PROBES probes in a row (the other one is gone)."""
        if self.adverts is None:
            family = socket.AF_INET6 if self.own.version == 6 else socket.AF_INET
            self.adverts = socket.socket(family, socket.SOCK_RAW, ha.VRRP_PROTOCOL)
            self.adverts.setblocking(False)
        heard = False
        with contextlib.suppress(BlockingIOError):
            while True:
                _, sender = self.adverts.recvfrom(2048)
                heard = heard or ip_address(sender[0].split("%")[0]) in self.in_config
        guarded = [address.ip for address in self.plan.addresses]
        if self.yield_prober is None:
            self.yield_prober = Prober(self.plan.interface)
        try:
            others = set().union(*self.yield_prober.second_holders_of(guarded, GUARD_WAIT).values())
        except OSError:
            others = {"unknown"}
        self.clear_probes = 0 if others else self.clear_probes + 1
        if heard or self.clear_probes >= CLEAR_PROBES:
            self.yielded = False
            self.close_yield_sockets()
            self.keepalived.step_down(False)
            log.info("High availability: %s; a standby again", "the peers' heartbeats are back" if heard else
                     f"no other holder of {' or '.join(map(str, guarded))} any more")

    def close_yield_sockets(self) -> None:
        for sock in (self.adverts, self.yield_prober):
            if sock is not None:
                sock.close()
        self.adverts = self.yield_prober = None

    def current_state(self) -> str:
        """What the state file says: active; starting (keepalived has not reported a state since it started: a
        goodbye now would not reach it, and it would take over only after the master-down time); fault (keepalived
        in FAULT: the egress link is down, or this replica gave way to a second holder); standby (BACKUP: it takes
        over at once on a goodbye)."""
        if self.active:
            return "active"
        if self.elected is None:
            return "starting"
        return "standby" if self.elected in ("BACKUP", "MASTER") and not self.yielded else "fault"

    def refresh_state(self) -> None:
        if self.state != "stopped" and self.current_state() != self.state:
            self.write_state(self.current_state())

    @property
    def peer_count(self) -> int:
        """The replicas keepalived is configured with, this one included."""
        return len({*self.in_config, self.own})

    def write_state(self, state: str) -> None:
        """For `egress-router ready` (readiness.py), the metrics and the benchmark."""
        write_state(self.directory, state)
        self.state = state

    def stop(self) -> None:
        """The goodbye: the addresses off first (never two holders), then keepalived's priority 0."""
        if self.active:
            self.stop_renewing()
            with contextlib.suppress(Exception):
                self.release()
            self.active = False
        self.close_yield_sockets()
        self.write_state("stopped")
        self.keepalived.stop()


def own_address(rtnl: Rtnl, pod_interface: str, version: int) -> ha.IPAddress:
    """This replica's pod address of the peers' family (the heartbeats' source)."""
    try:
        index = socket.if_nametoindex(pod_interface)
    except OSError:
        raise SetupError(f"high availability: the pod interface {pod_interface!r} does not exist") from None
    for ip, _ in rtnl.addresses(index, FAMILIES[version]):
        address = ip_address(ip)
        if not address.is_link_local:
            return address
    raise SetupError(f"high availability: {pod_interface} has no IPv{version} address for the heartbeats")


def announce_all(plan: Plan) -> None:
    """The plan's announcements, from a thread (its own sockets, no shared netlink socket)."""
    from ipaddress import IPv4Address

    mac = Path(f"/sys/class/net/{plan.interface}/address").read_text(encoding="ascii").strip()
    for address in plan.addresses:
        if isinstance(address.ip, IPv4Address):
            arp.announce(plan.interface, mac, address.ip)
        else:
            from .net import ndp

            ndp.announce(plan.interface, mac, address.ip)
