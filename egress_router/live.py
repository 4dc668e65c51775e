"""Legacy mode after set-up: reload the rules when their files change or on SIGHUP, and repair drift.

The loop waits for signals with a short timeout, so one thread does everything in turn: a stop
signal, a reload and a repair never run at the same time. Reloads and repairs hold the namespace lock
(net.lock) as set-up does, and change only what differs (net.apply): the NAT chains are replaced in one
iptables-restore, so connections to unchanged destinations keep their conntrack entries and flow on.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import inforce, inotify
from .core import variables as v
from .core.config import RouterConfig
from .core.errors import ConfigError, EgressRouterError
from .core.nat import NatRules
from .core.plan import Plan, Step, build_plan
from .core.podnet import PodFacts
from .core.redirect import Destinations
from .core.steps import Address, Announce, Route
from .net import apply as apply_steps
from .net import conntrack, iptables
from .net.lock import namespace_lock

if TYPE_CHECKING:
    from .ha import Role
from .sources import FileWatch, load_files, read_files, watched_paths

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the rule files are stat'ed: a swap is in force well within 2 s
SETTLE_SECONDS = 0.05
SETTLE_ROUNDS = 20  # at most 1 s
REANNOUNCE_AFTER_SECONDS = 2.0  # as ifup does: a second announcement once switches have settled
STOPS = frozenset({signal.SIGTERM, signal.SIGINT})
WAKE = signal.SIGIO  # the kernel's signal for inotify events on the watched directories
SIGNALS = STOPS | {signal.SIGHUP, WAKE}


@dataclass
class Counts:
    """What the loop did, for the log lines (and the metrics of the operability issue)."""

    reloads: int = 0
    reload_failures: int = 0
    repairs: int = 0
    repair_failures: int = 0


class Live:
    """The running legacy-mode router: the plan in force and what it was built from."""

    def __init__(self, env: Mapping[str, str], config: RouterConfig, plan: Plan, facts: PodFacts | None,
                 context: apply_steps.Context, role: Role | None = None):
        self.env = env
        self.role = role  # high availability: this replica's part (ha.py); None: the only replica
        self.config = config
        self.plan = plan
        self.facts = facts
        self.context = context
        self.counts = Counts()
        self.problem: str | None = None  # why the plan does not hold (the last repair failed): /healthz says it
        self.watch = FileWatch(watched_paths(env))
        self.notifier = inotify.Notifier.open(self.watch.paths)
        if self.notifier is not None:
            self.notifier.signal_on_events(WAKE)
        self.stale = False  # the files changed between set-up and now: reload at once
        if self.watch.paths:
            try:
                files = read_files(env)
                self.stale = load_files(env, files) != config
            except ConfigError:
                self.stale = True
            if not self.stale:
                inforce.record(files)

    def run(self) -> int:
        """Until SIGTERM/SIGINT (blocked by the caller since before set-up); returns the signal received."""
        now = time.monotonic()
        announce_at: float | None = now + REANNOUNCE_AFTER_SECONDS
        check_at = now + self.config.drift_seconds if self.config.drift_seconds else None
        if self.role is not None:
            self.role.start(WAKE)
            announce_at = None  # a replica announces when it becomes the active one
        if self.stale:
            self.reload("changed during set-up")
        while True:
            due = [t for t in (announce_at, check_at) if t is not None]
            wait = min([POLL_SECONDS, *(max(0.0, t - time.monotonic()) for t in due)])
            received = signal.sigtimedwait(SIGNALS, wait)
            if received is not None and received.si_signo in STOPS:
                if self.role is not None:
                    self.role.stop()
                return received.si_signo
            if self.notifier is not None and received is not None and received.si_signo == WAKE:
                self.notifier.drain()
            if self.role is not None:
                was = self.role.active
                self.role.act()
                if self.role.active and not was:
                    announce_at = time.monotonic() + REANNOUNCE_AFTER_SECONDS
            if received is not None and received.si_signo == signal.SIGHUP:
                self.reload("SIGHUP")
            elif self.watch.changed():
                self.settle()
                self.reload("a changed file")
            now = time.monotonic()
            if announce_at is not None and now >= announce_at:
                apply_steps.announce(self.view(self.plan), self.context)
                announce_at = None
            if check_at is not None and now >= check_at:
                self.repair()
                check_at = time.monotonic() + self.config.drift_seconds

    # ------------------------------------------------------------ reload

    def settle(self) -> None:
        """Wait until the files stop changing (bounded): a file written in place is read once complete, not
        while its writer is halfway (a ConfigMap swap is atomic and settles at once)."""
        for _ in range(SETTLE_ROUNDS):
            time.sleep(SETTLE_SECONDS)
            if not self.watch.changed():
                return

    def reload(self, why: str) -> None:
        sources = ", ".join(f"{f.name}={f.read(self.env)}" for f in (v.CONFIG_FILE, *v.RULE_FILES.values())
                            if f.is_set(self.env))
        try:
            files = read_files(self.env)
            config = load_files(self.env, files)
            unchanged_elsewhere = dataclasses.replace(config, destinations=self.config.destinations,
                                                      warnings=self.config.warnings)
            if unchanged_elsewhere != self.config:
                raise ConfigError(sources or "the configuration", "changes more than the rules: only the rules "
                                  "reload; restart the pod to apply the rest")
        except ConfigError as exc:
            self.counts.reload_failures += 1
            log.error("Reload (%s) rejected, the rules in force stay: %s (%d rejected so far)", why, exc,
                      self.counts.reload_failures)
            return
        if config == self.config:
            if not sources:
                log.info("Reload (%s): the rules are inline (EGRESS_DESTINATION); they change only with a restart",
                         why)
            else:
                inforce.record(files)  # the same rules (comments or layout may differ)
                log.debug("Reload (%s): %s unchanged", why, sources)
            return
        plan = build_plan(config, self.plan.interface, self.facts)
        try:  # the address is unchanged (only rules reload): no announcement
            self.converge(tuple(step for step in self.view(plan).steps if not isinstance(step, Announce)))
        except EgressRouterError as exc:
            self.counts.reload_failures += 1
            log.error("Reload (%s) failed, the rules in force stay: %s (%d failed so far)", why, exc,
                      self.counts.reload_failures)
            return
        old, new = self.config.destinations, config.destinations
        self.config, self.plan = config, plan
        if self.role is not None:
            self.role.plan = plan
        inforce.record(files)
        self.counts.reloads += 1
        flows = ""
        if old is not None and new is not None:
            try:
                if forgotten := conntrack.repointed_udp_flows(old, new):
                    flows = f", {forgotten} UDP flow(s) re-pointed"
            except Exception as exc:  # the rules are in force; only old flows keep their destination longer
                log.warning("Could not re-point the UDP flows of changed rules (they follow the new rules once "
                            "idle for the conntrack UDP timeout): %s", exc)
        log.info("Reloaded %s (%s): %s%s (reload %d)", sources, why, describe_change(old, new), flows,
                 self.counts.reloads)

    # ------------------------------------------------------------ drift

    def repair(self) -> None:
        """Re-apply the steps that no longer hold; one line per repaired step."""
        try:
            with namespace_lock():
                plan = self.view(self.plan)
                drifted = apply_steps.drift(plan, self.context)
                if not drifted:
                    return
                self.apply_locked(repair_steps(plan, drifted), quiet=True)
        except EgressRouterError as exc:
            self.counts.repair_failures += 1
            self.problem = f"drift repair failed: {exc}"
            log.error("Drift repair failed (will try again in %g s): %s", self.config.drift_seconds, exc)
            return
        self.problem = None
        for step in drifted:
            if not isinstance(step, Announce):
                self.counts.repairs += 1
                log.warning("Repaired drift: %s no longer held; re-applied (repair %d)", what(step),
                            self.counts.repairs)

    def view(self, plan: Plan) -> Plan:
        """The plan as this replica must hold it now: whole, or a standby's part (high availability)."""
        return plan if self.role is None else self.role.view(plan)

    def converge(self, steps: tuple[Step, ...]) -> None:
        with namespace_lock():
            self.apply_locked(steps, quiet=False)

    def apply_locked(self, steps: tuple[Step, ...], *, quiet: bool) -> None:
        context = self.context
        context.nat_before = {version: iptables.read_state(tools[0]) for version, tools in context.tools.items()}
        with (muted(apply_steps.log, iptables.log) if quiet else nothing()):
            apply_steps.apply(dataclasses.replace(self.plan, steps=steps), context)


def repair_steps(plan: Plan, drifted: list[Step]) -> tuple[Step, ...]:
    """What a repair applies, in plan order: the drifted steps; with a route among them, the plan's addresses
    too (one removed after drift read it takes its routes along, and a route naming it as source could not be
    added before it; applying one that holds changes nothing); the announcements of a family whose address
    came back."""
    chosen = set(drifted)
    if any(isinstance(step, Route) for step in drifted):
        chosen.update(step for step in plan.steps if isinstance(step, Address))
    readdressed = {step.address.version for step in drifted if isinstance(step, Address)}
    chosen.update(step for step in plan.steps if isinstance(step, Announce) and step.address.version in readdressed)
    return tuple(step for step in plan.steps if step in chosen)


def what(step: Step) -> str:
    """A drifted step as the admin would check it: its iproute2/sysctl command, or the iptables summary."""
    if isinstance(step, NatRules):
        return f"the {iptables.describe(step)} ({step.tool})"
    return f"'{step.render().strip()}'"


def describe_change(old: Destinations | None, new: Destinations | None) -> str:
    """'+1 -0 ~2 rule(s) (5 now)': redirect rules added, removed and changed (same port, other target)."""
    before = {(r.proto, r.port, r.ip.version): r for r in (old.rules if old else ())}
    after = {(r.proto, r.port, r.ip.version): r for r in (new.rules if new else ())}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for key in after.keys() & before.keys() if after[key] != before[key])
    text = f"+{added} -{removed} ~{changed} rule(s) ({len(after)} now)"
    for family in ("fallback", "fallback6"):
        was, now = getattr(old, family, None), getattr(new, family, None)
        if was != now:
            text += f", {'IPv6 ' if family == 'fallback6' else ''}fallback {was or 'none'} -> {now or 'none'}"
    return text


@contextmanager
def muted(*loggers: logging.Logger) -> Iterator[None]:
    """The appliers' own info lines off while a repair runs: the repair logs one line per step itself."""
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextmanager
def nothing() -> Iterator[None]:
    yield
