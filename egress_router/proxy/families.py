"""The address families the router has a reserved egress source for, as the proxies read them from EGRESS_SOURCE."""

from __future__ import annotations

from collections.abc import Mapping


def egress_versions(env: Mapping[str, str] | None) -> frozenset[int] | None:
    """The IP versions EGRESS_SOURCE gives a source address for; None when it is not set (the network was
    configured elsewhere, by an init container: nothing is known, every family is tried)."""
    from ..core import variables as v
    from ..core.config import parse_sources

    if env is None or not v.SOURCE.is_set(env):
        return None
    return frozenset(interface.version for interface, _ in parse_sources(v.SOURCE.require(env)))

