"""Lab fixtures: a fresh namespace lab per test, torn down also when the test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from egress_router.halab import HaLab
from egress_router.lab import DEMO_SERVERS, DEMO_SERVERS6, DEST_IPS, Lab
from egress_router.podlab import LAYOUTS, PodLab
from tests.lab.origin import Origin

LAB_TOOLS = ("nsenter", "ip", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore", "setpriv")
PODLAB_TOOLS = (*LAB_TOOLS, "dnsmasq", "getent")
HALAB_TOOLS = (*LAB_TOOLS, "iptables", "ip6tables", "getent")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lab/" in str(item.path):
            item.add_marker(pytest.mark.lab)


def require_lab(tools: tuple[str, ...] = LAB_TOOLS) -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (they create network namespaces)")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"lab tests need {', '.join(missing)} (scripts/bootstrap installs them: "
                    "apt-get install iptables iproute2 util-linux dnsmasq-base)")


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_lab()
    with Lab() as built:
        yield built


@pytest.fixture
def served(lab: Lab) -> Lab:
    """The lab with the demo's TCP/UDP servers running in the destination namespace."""
    lab.serve(DEMO_SERVERS)
    return lab


@pytest.fixture
def lab6() -> Iterator[Lab]:
    """A dual-stack lab (Lab(dual_stack=True)): the IPv4 topology plus its IPv6 addresses and routes."""
    require_lab()
    with Lab(dual_stack=True) as built:
        yield built


@pytest.fixture
def served6(lab6: Lab) -> Lab:
    """The dual-stack lab with the demo's TCP/UDP servers of both families in the destination namespace."""
    lab6.serve(DEMO_SERVERS + DEMO_SERVERS6)
    return lab6


@contextlib.contextmanager
def origins(lab: Lab) -> Iterator[Origin]:
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


@pytest.fixture
def origin(lab: Lab) -> Iterator[Origin]:
    with origins(lab) as server:
        yield server


# ------------------------------------------------------------ pod-network layouts (egress_router/podlab.py)
@pytest.fixture
def make_podlab() -> Iterator[Callable[..., PodLab]]:
    """Builds PodLabs on demand: make_podlab("cilium", node_in_egress_subnet=True, rp_filter=1).

    Every one is torn down when the test ends, also when it fails or when building it fails.
    """
    require_lab(PODLAB_TOOLS)
    built: list[PodLab] = []

    def make(layout: str, *, node_in_egress_subnet: bool = False, rp_filter: int = 0,
             ip_forward: bool = False, ipv6: bool = False) -> PodLab:
        if ipv6:
            require_lab((*PODLAB_TOOLS, "ip6tables-save", "ip6tables-restore"))
        podlab = PodLab(layout, node_in_egress_subnet=node_in_egress_subnet, rp_filter=rp_filter,
                        ip_forward=ip_forward, ipv6=ipv6)
        built.append(podlab)
        podlab.__enter__()
        return podlab

    try:
        yield make
    finally:
        for podlab in reversed(built):
            podlab.destroy()


@pytest.fixture(params=LAYOUTS)
def podlab(request: pytest.FixtureRequest, make_podlab: Callable[..., PodLab]) -> PodLab:
    """One pod-network layout per parameter (calico, cilium, openshift-sdn), node IP outside EGRESS_SOURCE's subnet."""
    return make_podlab(request.param)


@pytest.fixture(params=LAYOUTS)
def podlab_node_in_egress_subnet(request: pytest.FixtureRequest, make_podlab: Callable[..., PodLab]) -> PodLab:
    """The same layouts with the nodes' IPs inside EGRESS_SOURCE's subnet (192.0.2.11 and .12 on the LAN)."""
    return make_podlab(request.param, node_in_egress_subnet=True)


@pytest.fixture
def podlab_served(podlab: PodLab) -> PodLab:
    """A layout with the demo's TCP/UDP servers in the destination namespace."""
    podlab.serve(DEMO_SERVERS)
    return podlab


@pytest.fixture
def podlab_origin(podlab: PodLab) -> Iterator[Origin]:
    """The `origin` servers, in a layout's destination namespace."""
    with origins(podlab) as server:
        yield server


# ------------------------------------------------------------ HA: replicas on one LAN (egress_router/halab.py)
@pytest.fixture
def ha_lab() -> Iterator[HaLab]:
    """Two replica pods (pod0, pod1) on one LAN, each macvlan made on its own node; torn down also on failure."""
    require_lab(HALAB_TOOLS)
    with HaLab(2) as built:
        yield built


@pytest.fixture
def ha_lab3() -> Iterator[HaLab]:
    """The same with three replicas (pod0-pod2)."""
    require_lab(HALAB_TOOLS)
    with HaLab(3) as built:
        yield built
