"""A high-availability replica's role as its proxy processes see it: a few cells of memory the keeper writes.

The keeper (ha_keeper.py) makes the memory before it forks the proxy, so the proxy's master and every worker
it forks later share it. A proxy worker reads one cell per request (a standby refuses it at once) and the
admin port's /ready and /metrics read the rest. One writer, the keeper; a reader may see a count a moment old.
"""

from __future__ import annotations

import mmap

from .core.exposition import Family, single

ACTIVE, TRANSITIONS, PEERS, KEEPER = range(4)
STANDBY_REFUSAL = ("this egress router replica is a standby: another replica holds EGRESS_SOURCE (the Service "
                   "sends clients to the ready, active one)")


class SharedRole:
    """Made by the keeper before the proxy forks; `publish` there, the properties everywhere."""

    def __init__(self, keeper: int):
        self._map = mmap.mmap(-1, 8 * 4, flags=mmap.MAP_SHARED)
        self.cells = memoryview(self._map).cast("q")
        self.cells[KEEPER] = keeper

    def publish(self, active: bool, transitions: int, peers: int) -> None:
        self.cells[TRANSITIONS] = transitions
        self.cells[PEERS] = peers
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

    def families(self) -> list[Family]:
        return families(self.active, int(self.cells[TRANSITIONS]), int(self.cells[PEERS]))


def families(active: bool, transitions: int, peers: int) -> list[Family]:
    """The egress_router_ha_* families, the same in every mode."""
    return [
        single("egress_router_ha_active", "gauge", "1 while this replica is the active one and holds EGRESS_SOURCE "
               "(high availability), else 0.", int(active)),
        single("egress_router_ha_transitions_total", "counter", "Times this replica became active or standby.",
               transitions),
        single("egress_router_ha_peers", "gauge", "The replicas keepalived is configured with, this one included.",
               peers),
    ]
