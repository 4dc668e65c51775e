"""Lab fixtures: a fresh namespace lab per test, torn down also when the test fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from egress_router.lab import DEMO_SERVERS, DEST_IPS, Lab
from tests.lab.origin import Origin


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in str(item.path):
            item.add_marker(pytest.mark.lab)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (they create network namespaces)")
    missing = [t for t in ("nsenter", "ip", "iptables-save", "iptables-restore", "setpriv") if not shutil.which(t)]
    if missing:
        pytest.skip(f"lab tests need {', '.join(missing)} (apt-get install iptables iproute2 util-linux)")
    with Lab() as built:
        yield built


@pytest.fixture
def served(lab: Lab) -> Lab:
    """The lab with the demo's TCP/UDP servers running in the destination namespace."""
    lab.serve(DEMO_SERVERS)
    return lab


@pytest.fixture
def origin(lab: Lab) -> Iterator[Origin]:
    """HTTP origins on 203.0.113.10-12:80 and 203.0.113.10:8081, TCP echo on 203.0.113.10-12:7000 (destination)."""
    server = Origin()
    with lab.entered("dest"):
        for ip in DEST_IPS:
            server.listen(ip, 80)
            server.listen(ip, 7000, kind="echo")
        server.listen(DEST_IPS[0], 8081)
    server.start()
    try:
        yield server
    finally:
        server.stop()
