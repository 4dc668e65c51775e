"""The DNS proxy's metrics: per-forward counters in shared memory (a slot table per worker) and their families."""

from __future__ import annotations

import hashlib
import heapq
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.exposition import Family, Labels, labelled, single
from .metrics import RELOAD_FAILURES, RELOADS, SharedCounters, by

if TYPE_CHECKING:
    from .dns_targets import Target

# Forwards with series of their own, per worker. 1,000 forwards is a measured case (benchmarks/), so the table
# holds a little more; a forward that finds no free slot (more forwards, or slots still held by forwards that a
# reload removed and whose connections drain) counts into the one shared slot, shown as port="other".
SLOTS = 1024
HEALTH = 16  # backends per forward whose health each worker publishes (more: worker 0's view alone)

# The cells of a slot. Each worker writes only its own table: one writer per cell, no locks.
KEY_PORT, KEY_HASH = 0, 1  # the forward: its port (0: a free slot) and a hash of its target
RELAYED, FAILED, REJECTED, UNRESOLVED, ABANDONED = range(2, 7)  # client connections, by result
OPEN, BYTES_UP, BYTES_DOWN = range(7, 10)
REFUSED, UNREACHABLE, TIMED_OUT = range(10, 13)  # backend connects that failed, by kind
ANSWERED, NOT_FOUND, LOOKUP_FAILED, LOOKUP_TIMEOUT = range(13, 17)  # DNS lookups of the forward's name, by result
DNS_FAILING = 17  # 1 while the last lookup failed
HEALTH_CELLS = 18  # HEALTH cells: a backend's hash, HEALTH_SEEN set, HEALTH_DOWN set while it is down; 0: none
SLOT_WIDTH = HEALTH_CELLS + HEALTH
COUNTED = range(RELAYED, DNS_FAILING)  # the cells that are summed over the workers
HEALTH_SEEN, HEALTH_DOWN = 1, 2

OTHER = "other"  # the label values of the shared slot
RESULTS = (("relayed", RELAYED), ("failed", FAILED), ("rejected", REJECTED), ("unresolved", UNRESOLVED),
           ("abandoned", ABANDONED))
KINDS = (("refused", REFUSED), ("unreachable", UNREACHABLE), ("timeout", TIMED_OUT))
LOOKUPS = (("answered", ANSWERED), ("not_found", NOT_FOUND), ("failed", LOOKUP_FAILED), ("timeout", LOOKUP_TIMEOUT))


def stable_hash(text: str) -> int:
    """60 bits of a hash that is the same in every process (str.__hash__ is not, across exec): a health cell
    holds one and its two flags in 64."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 4


class Slot:
    """One forward's cells in one worker's table; `cells[base + RELAYED] += 1` is the hot path's write."""

    __slots__ = ("cells", "base", "index", "void")

    def __init__(self, cells: memoryview, base: int, index: int, void: int):
        self.cells = cells
        self.base = base
        self.index = index  # the slot's number; -1: the shared "other" slot
        self.void = void  # where writes go once the slot is released (cells nobody reads)

    @classmethod
    def detached(cls) -> Slot:
        """Cells of its own, in no table (a Target made outside a worker: unit tests)."""
        cells = memoryview(bytearray(2 * SLOT_WIDTH * 8)).cast("Q")
        return cls(cells, 0, 0, SLOT_WIDTH)

    def add(self, cell: int, amount: int = 1) -> None:
        self.cells[self.base + cell] += amount

    def sub(self, cell: int, amount: int = 1) -> None:
        index = self.base + cell
        self.cells[index] = max(0, self.cells[index] - amount)

    def set(self, cell: int, value: int) -> None:
        self.cells[self.base + cell] = value

    def publish_health(self, backends: Iterable[tuple[int, bool]]) -> None:
        """(hash, down) of the forward's backends, the first HEALTH of them. Each cell is written whole, so a
        reader in another process sees each backend's old or new state, never a mix of two backends."""
        if self.index < 0:
            return
        start = self.base + HEALTH_CELLS
        written = 0
        for key, down in backends:
            if written == HEALTH:
                break
            self.cells[start + written] = (key << 2) | HEALTH_SEEN | (HEALTH_DOWN if down else 0)
            written += 1
        for cell in range(start + written, start + HEALTH):
            self.cells[cell] = 0


class ForwardTable:
    """Made before the workers fork: per worker SLOTS slots, the shared slot and a void slot."""

    def __init__(self, workers: int, slots: int = SLOTS):
        self.workers = max(1, workers)
        self.slots = slots
        self.width = (slots + 2) * SLOT_WIDTH  # the slots, then the shared one, then the void one
        self._map = mmap.mmap(-1, self.workers * self.width * 8, flags=mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("Q")

    def worker(self, index: int) -> WorkerSlots:
        return WorkerSlots(self, index)

    def other_base(self, worker: int) -> int:
        return worker * self.width + self.slots * SLOT_WIDTH

    def sums(self) -> tuple[dict[tuple[int, int], Totals], Totals]:
        """Every forward's cells summed over the workers (by key), and the shared slot's."""
        found: dict[tuple[int, int], Totals] = {}
        other = Totals()
        cells = self.cells
        for worker in range(self.workers):
            start = worker * self.width
            for slot in range(self.slots):
                base = start + slot * SLOT_WIDTH
                port = cells[base + KEY_PORT]
                if port:
                    found.setdefault((port, cells[base + KEY_HASH]), Totals()).take(cells, base)
            other.take(cells, self.other_base(worker))
        return found, other


class WorkerSlots:
    """One worker's part of the table: it alone claims, writes and releases these slots, so its own index of them
    (key -> slot, and the free ones) is the truth, and a claim costs a dict probe, not a scan."""

    def __init__(self, table: ForwardTable, worker: int):
        self.table = table
        self.cells = table.cells
        self.start = worker * table.width
        self.void = table.other_base(worker) + SLOT_WIDTH
        self.holders: dict[int, int] = {}  # slot -> targets holding it (a forward changed back while the old drains)
        self.used: dict[tuple[int, int], int] = {}  # (port, target hash) -> slot
        self.free: list[int] = []  # a heap: the lowest free slot is taken first
        self.scan()

    def base(self, slot: int) -> int:
        return self.start + slot * SLOT_WIDTH

    def scan(self) -> None:
        cells = self.cells
        self.used, self.free = {}, []
        for slot in range(self.table.slots):
            base = self.base(slot)
            if cells[base + KEY_PORT]:
                self.used[(cells[base + KEY_PORT], cells[base + KEY_HASH])] = slot
            else:
                self.free.append(slot)  # ascending: a heap already

    def started(self, keep: set[tuple[int, int]]) -> None:
        """A worker (re)starts: its open connections are none, its health reports stale; slots of forwards not
        in `keep` (a replaced worker's predecessor's removed forwards) are freed. The counts of the rest stay."""
        cells = self.cells
        for slot in range(self.table.slots + 1):
            base = self.base(slot)
            cells[base + OPEN] = 0
            for cell in range(base + HEALTH_CELLS, base + SLOT_WIDTH):
                cells[cell] = 0
            if slot < self.table.slots and (cells[base + KEY_PORT], cells[base + KEY_HASH]) not in keep:
                cells[base + KEY_PORT] = 0
        self.holders = {}
        self.scan()

    def claim(self, port: int, target: str) -> Slot:
        """The forward's slot: the one it had (a target that comes back, a replaced worker), else a free one,
        zeroed, else the shared one."""
        key = (port, stable_hash(target))
        cells = self.cells
        slot = self.used.get(key)
        if slot is not None:
            self.holders[slot] = self.holders.get(slot, 0) + 1
            return Slot(cells, self.base(slot), slot, self.void)
        if not self.free:
            return Slot(cells, self.base(self.table.slots), -1, self.void)
        slot = heapq.heappop(self.free)
        base = self.base(slot)
        for cell in range(base + 1, base + SLOT_WIDTH):
            cells[cell] = 0
        cells[base + KEY_HASH] = key[1]
        cells[base + KEY_PORT] = port  # last: a reader takes the slot as used only once it is zeroed
        self.used[key] = slot
        self.holders[slot] = 1
        return Slot(cells, base, slot, self.void)

    def release(self, slot: Slot) -> None:
        """The forward is gone and its last connection ended: the slot is free; late writes (a connect that was
        under way) go to the void slot."""
        if slot.index >= 0:
            left = self.holders.pop(slot.index, 1) - 1
            if left > 0:
                self.holders[slot.index] = left
            else:
                base = slot.base
                self.used.pop((self.cells[base + KEY_PORT], self.cells[base + KEY_HASH]), None)
                self.cells[base + KEY_PORT] = 0
                heapq.heappush(self.free, slot.index)
            slot.index = -2
        slot.base = self.void


class Totals:
    """A forward's cells added up over the workers; a backend's health: down when any worker has it down."""

    __slots__ = ("counts", "failing", "health")

    def __init__(self) -> None:
        self.counts = [0] * SLOT_WIDTH
        self.failing = 0
        self.health: dict[int, bool] = {}  # backend hash -> down

    def take(self, cells: memoryview, base: int) -> None:
        counts = self.counts
        for cell in COUNTED:
            counts[cell] += cells[base + cell]
        self.failing = max(self.failing, cells[base + DNS_FAILING])
        for cell in range(base + HEALTH_CELLS, base + SLOT_WIDTH):
            value = cells[cell]
            if value & HEALTH_SEEN:
                key = value >> 2
                self.health[key] = self.health.get(key, False) or bool(value & HEALTH_DOWN)


@dataclass(frozen=True, slots=True)
class ForwardRow:
    """What /metrics says about one forward (or, port "other", about the forwards without a slot)."""

    port: str
    target: str
    counts: Sequence[int]  # indexed by the cell constants
    failing: bool = False
    backends: tuple[tuple[str, bool], ...] = ()  # (address:port, up)
    counted: bool = True  # False: no worker has a slot for it (it counts in port="other"): no count series


def forward_rows(table: ForwardTable, targets: Iterable[Target]) -> list[ForwardRow]:
    """Worker 0's forwards in force, with every worker's counts and health; then the shared slot if used."""
    sums, other = table.sums()
    rows = []
    for target in sorted(targets, key=lambda t: t.forward.port):
        forward = target.forward
        name = forward.target()
        found = sums.get((forward.port, stable_hash(name)))
        totals = Totals() if found is None else found
        now = target.worker.loop.time()
        backends = tuple((b.text, not (b.down_until > now or totals.health.get(b.key, False)))
                         for b in target.backends)
        rows.append(ForwardRow(str(forward.port), name, totals.counts, bool(totals.failing) or target.failing,
                               backends, found is not None))
    if any(other.counts):
        rows.append(ForwardRow(OTHER, OTHER, other.counts, bool(other.failing)))
    return rows


def dns_families(shared: SharedCounters, table: ForwardTable, targets: Iterable[Target]) -> list[Family]:
    """The admin port's /metrics of the DNS proxy (collected by worker 0)."""
    return forward_families(forward_rows(table, targets), shared.total(RELOADS), shared.total(RELOAD_FAILURES))


def forward_families(rows: Sequence[ForwardRow], reloads: int, reload_failures: int) -> list[Family]:
    """The families of `rows` (pure: the unit tests give rows, the proxy its table's)."""
    counted = [r for r in rows if r.counted]
    named = [r for r in rows if r.port != OTHER]

    def each(cells: Sequence[tuple[str, int]], key: str) -> list[tuple[Labels, int]]:
        return [((("port", r.port), ("target", r.target), (key, value)), r.counts[cell])
                for r in counted for value, cell in cells]

    def one(cell: int) -> list[tuple[Labels, int]]:
        return [((("port", r.port), ("target", r.target)), r.counts[cell]) for r in counted]

    return [
        single("egress_router_dns_proxy_forwards", "gauge", "Forwards in force (worker 0's).", len(named)),
        labelled("egress_router_dns_proxy_connections_total", "counter", "Client connections by forward and result: "
                 "relayed (a backend connected), failed (no backend could be reached), rejected (the connection "
                 "limit, or a standby replica), unresolved (the name has not resolved yet), abandoned (closed "
                 "before any backend connected: the client left, or the proxy stopped). port=\"other\": forwards "
                 "beyond the slot table.",
                 each(RESULTS, "result")),
        labelled("egress_router_dns_proxy_open_connections", "gauge", "Client connections open now, by forward.",
                 one(OPEN)),
        labelled("egress_router_dns_proxy_bytes_total", "counter", "Payload bytes relayed, by forward and direction "
                 "(upstream: client to backend), counted as they flow.",
                 each((("upstream", BYTES_UP), ("downstream", BYTES_DOWN)), "direction")),
        labelled("egress_router_dns_proxy_backend_connect_failures_total", "counter", "Backend connects that failed, "
                 "by forward and kind: refused, unreachable (any other error), timeout.", each(KINDS, "kind")),
        labelled("egress_router_dns_proxy_dns_lookups_total", "counter", "DNS lookups of the forward's name, by "
                 "result (hosts file answers are not DNS lookups and are not counted); not_found, failed and "
                 "timeout are the failures.", each(LOOKUPS, "result")),
        labelled("egress_router_dns_proxy_dns_failing", "gauge", "1 while the last lookup of the forward's name "
                 "failed in some worker (the last good answer is used meanwhile, if there was one).",
                 [((("port", r.port), ("target", r.target)), int(r.failing)) for r in named]),
        labelled("egress_router_dns_proxy_backends", "gauge", "Backend addresses of the forward now (worker 0's "
                 "answer).", [((("port", r.port), ("target", r.target)), len(r.backends)) for r in named]),
        labelled("egress_router_dns_proxy_healthy_backends", "gauge", "Backends of the forward that get new "
                 "connections (backend_up 1).",
                 [((("port", r.port), ("target", r.target)), sum(up for _, up in r.backends)) for r in named]),
        labelled("egress_router_dns_proxy_backend_up", "gauge", "1: the backend gets new connections; 0: a "
                 "connect to it failed in some worker and that worker's active check has not succeeded since "
                 f"(combined over the workers; worker 0's view alone beyond {HEALTH} backends).",
                 [((("port", r.port), ("target", r.target), ("backend", text)), int(up))
                  for r in named for text, up in r.backends]),
        labelled("egress_router_dns_proxy_reloads_total", "counter", "Reloads of the forwards, by result.",
                 by("result", applied=reloads, failed=reload_failures)),
    ]
