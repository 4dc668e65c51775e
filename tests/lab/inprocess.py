"""Runs of the router inside this test process (for faults injected with monkeypatch), and snapshot helpers."""

from __future__ import annotations

import re

import pytest

from egress_router.lab import Lab


def failed_apply(lab: Lab) -> str:
    """Prepare and apply the lab's init-mode plan in its router namespace, in this process; the run must fail
    with a SetupError, whose message this returns."""
    from egress_router import router
    from egress_router.core.config import load
    from egress_router.core.errors import SetupError

    with lab.entered("router"):
        prepared = router.prepare(load(lab.router_env()))
        try:
            with pytest.raises(SetupError) as raised:
                router.apply(prepared)
        finally:
            prepared.rtnl.close()
    return str(raised.value)


def without_qdisc(snapshot: str) -> str:
    """Setting a link up the first time makes the kernel attach its default qdisc (noop -> noqueue), which
    stays when the link goes down again: kernel bookkeeping, not configuration a run could undo."""
    return re.sub(r" qdisc \S+ ", " qdisc - ", snapshot)
