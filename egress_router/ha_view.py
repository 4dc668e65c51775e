"""A high-availability replica's role as its proxy processes see it: a few cells of memory the keeper writes.

The keeper (ha_keeper.py) makes the memory before it forks the proxy, so the proxy's master and every worker
it forks later share it. A proxy worker reads one cell per request (a standby refuses it at once) and the
admin port's /ready and /metrics read the rest. One writer, the keeper; a reader may see a count a moment old.
"""

from __future__ import annotations

import mmap

from .core.exposition import Family, labelled, single
from .readiness import STATES

ACTIVE, TRANSITIONS, PEERS, KEEPER, STATE = range(5)
NAMES = tuple(STATES)  # a state's cell value is its index here
STANDBY_REFUSAL = ("this egress router replica is a standby: another replica holds EGRESS_SOURCE (the Service "
                   "sends clients to the ready, active one)")


class SharedRole:
    """Made by the keeper before the proxy forks; `publish` there, the properties everywhere."""

    def __init__(self, keeper: int):
        self._map = mmap.mmap(-1, 8 * 5, flags=mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("q")
        self.cells[KEEPER] = keeper

    def publish(self, active: bool, transitions: int, peers: int, state: str) -> None:
        self.cells[TRANSITIONS] = transitions
        self.cells[PEERS] = peers
        self.cells[STATE] = NAMES.index(state) if state in NAMES else -1
        self.cells[ACTIVE] = int(active)  # last: a reader that sees it active sees the count of this change

    @property
    def active(self) -> bool:
        return bool(self.cells[ACTIVE])

    @property
    def keeper(self) -> int:
        """The pid of the process that holds the role (the container's first process)."""
        return int(self.cells[KEEPER])

    def ready(self) -> str | None:
        """The admin port's /ready: fine only on the active replica."""
        return None if self.active else "not ready: this replica is a standby (another one holds EGRESS_SOURCE)"

    @property
    def state(self) -> str:
        index = int(self.cells[STATE])
        return NAMES[index] if 0 <= index < len(NAMES) else ""

    def families(self) -> list[Family]:
        return families(self.active, int(self.cells[TRANSITIONS]), int(self.cells[PEERS]), self.state)


def families(active: bool, transitions: int, peers: int, state: str) -> list[Family]:
    """The egress_router_ha_* families, the same in every mode."""
    return [
        single("egress_router_ha_active", "gauge", "1 while this replica is the active one and holds EGRESS_SOURCE "
               "(high availability), else 0.", int(active)),
        single("egress_router_ha_transitions_total", "counter", "Times this replica became active or standby.",
               transitions),
        single("egress_router_ha_peers", "gauge", "The replicas keepalived is configured with, this one included.",
               peers),
        labelled("egress_router_ha_state", "gauge", "1 for this replica's state, 0 for the others: starting (its "
                 "keepalived has not reported yet: it cannot take over), standby (it takes over on a goodbye), fault "
                 "(out of the election: egress link down, or given way to a second holder), active, stopped.",
                 [((("state", name),), int(state == name)) for name in NAMES]),
    ]
