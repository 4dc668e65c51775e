"""Rule reloads of the proxies: the file watched, new rules validated, logged and counted once, then sent to workers.

One process decides: the master (or the only process). It reads the file when its stamp changes (a
ConfigMap's `..data` swap, an in-place write) or on SIGHUP, parses it with the core's own loader,
binds the listeners the new rules add (all of them, for every worker, or the reload fails), and then
sends each worker the validated text with the new sockets (SCM_RIGHTS) over its control channel. A
worker parses that very text again (not the file, which may have changed since), so every process
serves the same rules; a worker forked later starts from the rules in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..core import variables as v
from ..core.allowlist import AccessList
from ..core.errors import EgressRouterError
from ..core.forwards import Forward
from ..inotify import Notifier
from ..sources import FileWatch, read_rule_file
from . import metrics
from .listeners import Listen, bind_all, probe_ports
from .metrics import WorkerCounters

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 0.5  # how often the rule file's stamp is looked at (one stat)
SEND_TIMEOUT = 5.0  # a worker that takes longer to read an update is stuck: the master replaces it
HEADER = struct.Struct("!QII")  # generation, text length in bytes, sockets attached
FDS_PER_SEND = 250  # sockets sent with one sendmsg (Linux's SCM_MAX_FD is 253)
MAX_FDS = 253  # ... and taken by one recvmsg (which returns at most one sendmsg's sockets)
SHOWN = 4  # rules or forwards a reload's log line names, per kind


@dataclass(frozen=True, slots=True)
class RuleSource:
    """Where a proxy's rules come from: a file (watched, reloadable) or the inline variable (fixed)."""

    grammar: str  # EGRESS_HTTP_PROXY_DESTINATION, EGRESS_DNS_PROXY_DESTINATION
    file_variable: str
    path: str | None  # None: inline

    @property
    def where(self) -> str:
        return f"{self.file_variable}={self.path}" if self.path is not None else self.grammar


def rule_source(env: Mapping[str, str], grammar: v.Variable[str]) -> RuleSource:
    file = v.RULE_FILES[grammar.name]
    return RuleSource(grammar.name, file.name, file.read(env) if file.is_set(env) else None)


@dataclass(frozen=True, slots=True)
class Update(Generic[T]):
    """Validated rules on their way to the workers, with the sockets bound for the listeners they add."""

    generation: int
    text: str
    rules: T
    sockets: dict[int, list[socket.socket]]  # worker index -> its new listening sockets
    summary: str
    trigger: str

    def close_sockets(self) -> None:
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()


class Reloader(Generic[T]):
    """The deciding process's view of the rules: the ones in force, and how to read, check and describe new ones.

    `parse(text)` is the core's loader (errors name the file, the line and the text); `summarize(old, new)`
    says what changed, or None when nothing did; `listeners(rules)` is what the rules listen on.
    """

    def __init__(self, source: RuleSource, rules: T, parse: Callable[[str], T],
                 summarize: Callable[[T, T], str | None], counters: WorkerCounters,
                 listeners: Callable[[T], list[Listen]] | None = None):
        self.source = source
        self.rules = rules
        self.parse = parse
        self.summarize = summarize
        self.counters = counters  # the deciding process writes these cells, and no other process does
        self.listeners = listeners
        self.generation = 1
        self.text: str | None = None  # the text of the rules in force; None: not read since start-up
        # The watch starts before the first read, and that first read compares rules, not text, so an edit
        # made while the proxy was starting is neither lost nor taken for a change when there is none.
        self.watch = FileWatch([source.path]) if source.path is not None else None
        self.pending = self.watch is not None

    def specs(self) -> list[Listen]:
        """The listeners of the rules in force (what a restarted worker binds)."""
        return self.listeners(self.rules) if self.listeners is not None else []

    def poll(self, workers: Iterable[int]) -> Update[T] | None:
        """A reload if the file changed since the last look (cheap when it did not: one stat)."""
        if self.watch is None:
            return None
        if self.watch.changed():
            trigger = "file changed"
        elif self.pending:
            trigger = "start-up check"
        else:
            return None
        self.pending = False
        return self.check(trigger, workers)

    def check(self, trigger: str, workers: Iterable[int]) -> Update[T] | None:
        """Read and validate the rules, bind what they add; None when there is nothing to apply (logged)."""
        source = self.source
        try:
            if source.path is None:
                self.parse("")  # re-validates the inline rules (valid at start, so valid now)
                log.info("%s: the rules are inline in %s and cannot change without a restart; give them in %s "
                         "to reload them", trigger, source.grammar, source.file_variable)
                return None
            text = read_rule_file(source.path, source.file_variable)
            if text == self.text:
                log.debug("%s: %s is unchanged", trigger, source.where)
                return None
            rules = self.parse(text)
            summary = self.summarize(self.rules, rules)
            if summary is None:
                log.debug("%s: %s has the same rules", trigger, source.where)
                self.text = text
                return None
            sockets = self.bind_new(rules, workers)
        except EgressRouterError as exc:
            self.fail(str(exc))
            return None
        return Update(self.generation + 1, text, rules, sockets, summary, trigger)

    def bind_new(self, rules: T, workers: Iterable[int]) -> dict[int, list[socket.socket]]:
        """Sockets for the listeners `rules` add, one set per worker: all of them, or a SetupError naming the port."""
        if self.listeners is None:
            return {}
        old = set(self.specs())
        new = [spec for spec in self.listeners(rules) if spec not in old]
        if not new:
            return {}
        bound: dict[int, list[socket.socket]] = {}
        try:
            probe_ports(new)
            for index in workers:
                bound[index] = bind_all(new)
        except EgressRouterError as exc:
            for socks in bound.values():
                for sock in socks:
                    sock.close()
            raise type(exc)(f"{self.source.where}: {exc}") from None
        return bound

    def fail(self, message: str) -> None:
        self.counters.add(metrics.RELOAD_FAILURES)
        failed = self.counters.shared.total(metrics.RELOAD_FAILURES)
        log.error("Reload failed (%d failed so far); the rules in force stay: %s", failed, message)

    def commit(self, update: Update[T]) -> None:
        """Every worker has the update (or is being replaced): it is the rules in force now."""
        self.rules, self.text, self.generation = update.rules, update.text, update.generation
        self.counters.add(metrics.RELOADS)
        log.info("Reloaded %s (%s, rules generation %d): %s", self.source.where, update.trigger, update.generation,
                 update.summary)


# ------------------------------------------------------------ what changed, for the log line

def listed(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def acl_changes(old: AccessList, new: AccessList) -> str | None:
    """'+1 rule (*.example.org), -2 rules (...)'; 'same rules in a new order'; None when equal."""
    if old.rules == new.rules:
        return None
    before, after = [str(r) for r in old.rules], [str(r) for r in new.rules]
    known, kept = set(before), set(after)  # sets: 10,000 rules must not cost 10,000 x 10,000 comparisons
    added = [r for r in after if r not in known]
    removed = [r for r in before if r not in kept]
    parts = []
    if added:
        parts.append(f"+{len(added)} rule{'s' * (len(added) != 1)} ({listed(added)})")
    if removed:
        parts.append(f"-{len(removed)} rule{'s' * (len(removed) != 1)} ({listed(removed)})")
    if not parts:
        parts.append("the same rules in a new order (the first match decides)")
    return "; ".join(parts) + f"; now {new.describe()}"


def forward_changes(old: tuple[Forward, ...], new: tuple[Forward, ...]) -> str | None:
    """'+1 forward (7002 to 203.0.113.11:7002), -1 (7001), 1 changed (7000 to svc:80)'; None when equal."""
    before, after = {f.port: f for f in old}, {f.port: f for f in new}
    if before == after:
        return None
    added = [f"{p} to {f.target()}" for p, f in sorted(after.items()) if p not in before]
    removed = [str(p) for p in sorted(before) if p not in after]
    changed = [f"{p} to {f.target()}" for p, f in sorted(after.items()) if p in before and before[p] != f]
    parts: list[str] = []
    for sign, items, how in (("+", added, ""), ("-", removed, ""), ("", changed, " changed")):
        if items:
            noun = "" if parts else f" forward{'s' * (len(items) != 1)}"  # said once, in the first part
            parts.append(f"{sign}{len(items)}{noun}{how} ({listed(items)})")
    return ", ".join(parts)


def forward_listeners(forwards: tuple[Forward, ...]) -> list[Listen]:
    return [Listen(family, host, f.port) for f in forwards
            for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))]


# ------------------------------------------------------------ the control channel (master -> worker)

def send_update(channel: socket.socket, generation: int, text: str, sockets: list[socket.socket]) -> None:
    """One update on a worker's channel (blocking, bounded by the channel's timeout). Its sockets go with its
    first bytes, at most FDS_PER_SEND per byte sent (the kernel takes at most 253 in one message): a message has
    more bytes than it has batches, as every new port has a rule line of its own."""
    payload = text.encode("utf-8")
    message = HEADER.pack(generation, len(payload), len(sockets)) + payload
    fds = [s.fileno() for s in sockets]
    batches = [fds[i:i + FDS_PER_SEND] for i in range(0, len(fds), FDS_PER_SEND)]
    assert len(batches) <= len(message)
    offset = 0
    for number, batch in enumerate(batches):
        piece = message[offset:offset + 1] if number < len(batches) - 1 else message[offset:]
        offset += socket.send_fds(channel, [piece], batch)
    channel.sendall(message[offset:])


class ControlReader:
    """A worker's end of its channel: whole updates (generation, text, sockets) handed on in the order sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 deliver: Callable[[int, str, list[socket.socket]], None]):
        self.loop, self.channel, self.deliver = loop, channel, deliver
        self.buffer = bytearray()
        self.fds: list[int] = []
        channel.setblocking(False)
        loop.add_reader(channel.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, 1 << 16, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("Reading the master's control channel failed: %s", exc)
            data, fds = b"", []
        self.fds.extend(fds)
        if not data:  # the master is gone (the kernel sends this worker SIGTERM then)
            self.close()
            return
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            generation, length, count = HEADER.unpack_from(self.buffer)
            end = HEADER.size + length
            if len(self.buffer) < end:
                return
            text = bytes(self.buffer[HEADER.size:end]).decode("utf-8")
            del self.buffer[:end]
            mine, self.fds = self.fds[:count], self.fds[count:]
            sockets = [socket.socket(fileno=fd) for fd in mine]
            self.deliver(generation, text, sockets)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.channel.fileno())
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []
        self.channel.close()


# ------------------------------------------------------------ a worker's side

Apply = Callable[[int, T, list[socket.socket]], Awaitable[None]]  # (generation, rules, new sockets)


class WorkerReloads(Generic[T]):
    """How new rules reach one worker, applied one update at a time, in order.

    Alone (no master), the worker decides itself: it polls the file and handles SIGHUP. Under a master,
    it takes the master's updates from its channel and only parses their text again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, reloader: Reloader[T], apply: Apply[T], index: int,
                 alone: bool, channel: socket.socket | None):
        self.loop, self.reloader, self.apply, self.index, self.alone = loop, reloader, apply, index, alone
        self.queue: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self.tasks = [loop.create_task(self.consume())]
        self.reader: ControlReader | None = None
        self.sighup = False
        self.notifier: Notifier | None = None
        if alone:
            loop.add_signal_handler(signal.SIGHUP, self.queue.put_nowait, self.decide_on_sighup)
            self.sighup = True
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # serve() blocked it until now
            if reloader.watch is not None:
                self.tasks.append(loop.create_task(self.poll()))
                self.notifier = Notifier.open(reloader.watch.paths)
                if self.notifier is not None:
                    loop.add_reader(self.notifier.fd, self.notified)
        elif channel is not None:
            self.reader = ControlReader(loop, channel, self.received)
        log.debug("Worker %d (pid %d) serves rules generation %d", index, os.getpid(), reloader.generation)

    async def consume(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await job()
            except Exception:  # a reload must never end the worker
                log.exception("Worker %d could not apply new rules", self.index)

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.queue.empty():
                self.queue.put_nowait(self.decide_on_poll)

    def notified(self) -> None:
        """inotify events on the rule file's directory: look at once instead of at the next poll."""
        assert self.notifier is not None
        if self.notifier.drain() and self.queue.empty():
            self.queue.put_nowait(self.decide_on_poll)

    async def decide_on_poll(self) -> None:
        await self.decide(self.reloader.poll([self.index]))

    async def decide_on_sighup(self) -> None:
        await self.decide(self.reloader.check("SIGHUP", [self.index]))

    async def decide(self, update: Update[T] | None) -> None:
        if update is None:
            return
        await self.apply(update.generation, update.rules, update.sockets.get(self.index, []))
        self.reloader.commit(update)

    def received(self, generation: int, text: str, sockets: list[socket.socket]) -> None:
        async def job() -> None:
            try:
                rules = self.reloader.parse(text)
            except EgressRouterError as exc:  # validated by the master with the same parser: not expected
                log.error("Worker %d cannot parse the rules the master validated: %s", self.index, exc)
                for sock in sockets:
                    sock.close()
                return
            await self.apply(generation, rules, sockets)
            self.reloader.rules, self.reloader.text, self.reloader.generation = rules, text, generation
            log.debug("Worker %d (pid %d) applied rules generation %d", self.index, os.getpid(), generation)

        self.queue.put_nowait(job)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.notifier is not None:
            self.loop.remove_reader(self.notifier.fd)
            self.notifier.close()
            self.notifier = None
        if self.sighup:
            # stopping: a late SIGHUP must not kill the drain, so it waits blocked (removing the handler
            # puts the default action back)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            self.loop.remove_signal_handler(signal.SIGHUP)
            self.sighup = False
        if self.reader is not None:
            self.reader.close()
            self.reader = None
