"""High availability in the lab (egress_router/halab.py): replicas on one LAN, keepalived electing one; exactly one
holds EGRESS_SOURCE and is ready, a standby sends nothing out, the address moves on a crash, a stop and a return."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egress_router import ha
from egress_router.halab import METRICS_PORT, PEERS_NAME, SOURCE, SOURCE6, HaLab, children, macvlan_mac
from egress_router.lab import router_command
from tests.lab.conftest import HALAB_TOOLS, require_lab

TAKEOVER = 3.0  # seconds any test waits for a change that the benchmark measures in well under one


def until(check: Callable[[], bool], timeout: float = TAKEOVER, step: float = 0.02) -> float | None:
    """Seconds until `check` held (None: not within `timeout`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(step)
    return None


class Replicas:
    """The routers of a lab's pods, each with its own state directory (the pods share this machine's /run)."""

    def __init__(self, lab: HaLab, directory: Path):
        self.lab, self.dir = lab, directory
        self.processes: dict[int, subprocess.Popen[str]] = {}

    def env(self, i: int, **variables: str) -> dict[str, str]:
        return self.lab.router_env(i, EGRESS_HA_STATE_DIR=str(self.dir / f"pod{i}"), **variables)

    def start(self, i: int, **variables: str) -> subprocess.Popen[str]:
        self.processes[i] = self.lab.run_router(i, self.env(i, EGRESS_ROUTER_DEBUG="1", **variables))
        return self.processes[i]

    def log(self, i: int) -> str:
        return self.lab.output(self.processes[i])

    def ready(self, i: int) -> int:
        """`egress-router ready` in pod i: its exit code."""
        return self.lab.exec(self.lab.pod(i), ["env", f"EGRESS_HA_PEERS={self.lab.peers()}",
                                               f"EGRESS_HA_STATE_DIR={self.dir / f'pod{i}'}", *router_command(),
                                               "ready"]).returncode

    def active(self, timeout: float = 8.0) -> int:
        """The one replica holding EGRESS_SOURCE, once there is exactly one and it says it is ready."""
        assert until(lambda: len(self.lab.holders()) == 1 and self.lab.http_status(self.lab.holders()[0]) == 200,
                     timeout=timeout), self.logs()
        return self.lab.holders()[0]

    def start_all(self) -> tuple[int, int]:
        """Both replicas started; (the active one, the other) once one leads."""
        for i in range(2):
            self.start(i)
        active = self.active()
        return active, 1 - active

    def logs(self) -> str:
        return "\n\n".join(f"--- pod{i}\n{self.log(i)}" for i in self.processes)


def last_role(log: str) -> str:
    """What the last 'High availability: active/standby' line of a router's log says."""
    lines = [line.split("High availability: ", 1)[1] for line in log.splitlines()
             if "High availability: active" in line or "High availability: standby" in line]
    return lines[-1] if lines else "standby (never active)"


@pytest.fixture
def replicas(ha_lab: HaLab, tmp_path: Path) -> Iterator[Replicas]:
    yield Replicas(ha_lab, tmp_path)


def test_one_replica_holds_the_address_and_is_ready_the_other_sends_nothing(ha_lab: HaLab,
                                                                            replicas: Replicas) -> None:
    servers = ha_lab.serve_outside()
    active, standby = replicas.start_all()
    assert ha_lab.http_status(standby) == 503 and ha_lab.http_status(standby, "/healthz") == 200
    assert (replicas.ready(active), replicas.ready(standby)) == (0, 1)
    assert ha_lab.connect(active) == SOURCE
    with pytest.raises(OSError):  # the standby's default route is unreachable: refused, not sent elsewhere
        ha_lab.connect(standby)
    assert {reply.peer_ip for reply in servers.seen} == {SOURCE}
    routes = ha_lab.exec(ha_lab.pod(standby), ["ip", "route", "show", "default"], check=True).stdout
    assert routes.startswith("unreachable default"), routes
    assert ha_lab.gateway_neighbour(SOURCE) in (None, macvlan_mac(active))
    time.sleep(2.5)  # past a drift check: an idle replica finds nothing to repair (protocol names as numbers)
    assert "Repaired drift" not in replicas.logs(), replicas.logs()
    assert last_role(replicas.log(active)).startswith("active, holding 192.0.2.99/24")
    # (two replicas started together may both lead for an advert's time before the lower priority steps down)
    assert last_role(replicas.log(standby)).startswith("standby"), replicas.log(standby)


def test_a_crash_of_the_active_pod_moves_the_address_and_the_dead_one_lets_go(ha_lab: HaLab,
                                                                             replicas: Replicas) -> None:
    servers = ha_lab.serve_outside()
    active, other = replicas.start_all()
    assert ha_lab.connect(active) == SOURCE
    ha_lab.kill_pod(active)  # router and keepalived, no goodbye; the pod's namespace and address stay
    took = until(lambda: ha_lab.holders() == [active, other] or other in ha_lab.holders() and
                 ha_lab.http_status(other) == 200)
    assert took is not None, replicas.logs()
    assert until(lambda: ha_lab.connect(other) == SOURCE if ha_lab.http_status(other) == 200 else False) is not None
    # the dead replica's address expires by itself (its lifetime is no longer renewed)
    assert until(lambda: ha_lab.holders() == [other]) is not None, ha_lab.holders()
    assert until(lambda: ha_lab.gateway_neighbour(SOURCE) == macvlan_mac(other)) is not None
    assert ha_lab.arp_replies() == [macvlan_mac(other)]
    assert {reply.peer_ip for reply in servers.seen} == {SOURCE}


def test_a_stop_hands_over_at_once_and_a_returning_replica_stays_standby(ha_lab: HaLab, replicas: Replicas) -> None:
    active, other = replicas.start_all()
    replicas.processes[active].terminate()  # as the kubelet stops a container
    took = until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200)
    assert took is not None and took < 1.5, (took, replicas.logs())
    assert replicas.processes[active].wait(timeout=10) == 0
    assert ha_lab.holders() == [other]  # the leaving one gave the address up before keepalived said goodbye
    before = len(replicas.log(other))
    replicas.start(active)  # it comes back
    assert until(lambda: replicas.ready(active) == 1 and ha_lab.http_status(active) == 503, timeout=5) is not None
    time.sleep(2.0)  # longer than a takeover would take: nothing moves (nopreempt)
    assert ha_lab.holders() == [other] and replicas.ready(other) == 0, replicas.logs()
    assert "High availability: " not in replicas.log(other)[before:]  # no change of role at all


def test_a_leftover_address_is_removed_before_anything_else(ha_lab: HaLab, replicas: Replicas) -> None:
    ha_lab.exec(ha_lab.pod(1), ["ip", "addr", "add", f"{SOURCE}/24", "dev", "macvlan0"], check=True)
    replicas.start(1, EGRESS_HA_PEERS=f"{ha_lab.pod_ip(0)} {ha_lab.pod_ip(1)}")
    assert until(lambda: "removed 192.0.2.99/24 from macvlan0, left by an earlier run" in replicas.log(1)), \
        replicas.log(1)
    replicas.start(0)
    assert replicas.active() in (0, 1)


def test_peers_named_by_a_service_are_looked_up_again(ha_lab: HaLab, replicas: Replicas) -> None:
    ha_lab.set_peers([0])
    replicas.start(0, EGRESS_HA_PEERS=PEERS_NAME)
    assert replicas.active(timeout=ha.STARTUP_DELAY_BY_NAME + 5) == 0  # found by name: it waits before it may lead
    ha_lab.set_peers([0, 1])  # a new pod behind the headless Service
    replicas.start(1, EGRESS_HA_PEERS=PEERS_NAME)
    seen = f"High availability: the peers are now {ha_lab.pod_ip(0)}, {ha_lab.pod_ip(1)}"
    assert until(lambda: seen in replicas.log(0), timeout=6) is not None, replicas.logs()
    time.sleep(ha.STARTUP_DELAY_BY_NAME + 1)  # past the new replica's start-up delay: it heard the active one
    assert ha_lab.holders() == [0] and replicas.ready(1) == 1, replicas.logs()


def test_a_cut_heartbeat_path_leaves_one_holder_within_3_s_and_no_flap_when_it_heals(ha_lab: HaLab,
                                                                                    replicas: Replicas) -> None:
    servers = ha_lab.serve_outside()
    assert ha_lab.connect(replicas.start_all()[0]) == SOURCE  # the gateway has a neighbour entry for the address now
    for i in range(2):
        ha_lab.cut_heartbeat(i)  # both alive, neither hears the other: both take the address
    assert until(lambda: ha_lab.holders() == [0, 1], timeout=3) is not None, replicas.logs()
    two = time.monotonic()
    # the lower MAC (pod0's) gives way; the holder is pod1, whose MAC the gateway keeps
    assert until(lambda: ha_lab.holders() == [1], timeout=4) is not None, replicas.logs()
    both_for = time.monotonic() - two
    assert both_for < 3.0, (both_for, replicas.logs())
    assert until(lambda: ha_lab.gateway_neighbour(SOURCE) == macvlan_mac(1)) is not None, ha_lab.gateway_neighbour(
        SOURCE)
    assert ha_lab.arp_replies() == [macvlan_mac(1)]
    assert ha_lab.connect(1) == SOURCE and ha_lab.http_status(0) == 503 and ha_lab.http_status(1) == 200
    assert "giving way to 02:00:00:00:00:02" in replicas.log(0)
    for i in range(2):
        ha_lab.heal_heartbeat(i)
    assert until(lambda: "a standby again" in replicas.log(0), timeout=5) is not None, replicas.log(0)
    time.sleep(1.5)  # the healed pair settles: no second takeover
    assert ha_lab.holders() == [1] and last_role(replicas.log(1)).startswith("active"), replicas.logs()
    assert {reply.peer_ip for reply in servers.seen} == {SOURCE}


@pytest.mark.parametrize("fault", ["macvlan0 down", "the node's NIC down"])
def test_the_active_ones_egress_link_going_down_moves_the_address(ha_lab: HaLab, replicas: Replicas,
                                                                  fault: str) -> None:
    servers = ha_lab.serve_outside()
    active, other = replicas.start_all()
    # keepalived tracks the egress interface (its carrier too): FAULT, a priority-0 goodbye
    if fault == "macvlan0 down":
        ha_lab.egress_link(active, False)
    else:
        ha_lab.ip(f"host{active}", ["link set lan0 down"])
    took = until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200)
    assert took is not None and took < 2.0, (took, replicas.logs())
    assert ha_lab.connect(other) == SOURCE
    if fault == "macvlan0 down":  # the drift repair brings it back up; the old active is a standby then
        assert until(lambda: replicas.ready(active) == 1 and "Repaired drift" in replicas.log(active), timeout=6), \
            replicas.log(active)
    else:  # nothing the router can repair: it stays out until the NIC is back
        ha_lab.ip(f"host{active}", ["link set lan0 up"])
        assert until(lambda: replicas.ready(active) == 1 and ha_lab.http_status(active) == 503, timeout=6)
    time.sleep(1.0)
    assert ha_lab.holders() == [other]
    assert {reply.peer_ip for reply in servers.seen} == {SOURCE}


def state_file(replicas: Replicas, i: int) -> str:
    """What pod i's router wrote to its state file (`egress-router ready` reads it): the state."""
    path = replicas.dir / f"pod{i}" / "ha-state"
    return path.read_text(encoding="ascii").split()[0] if path.exists() else ""


def metrics(lab: HaLab, i: int) -> str:
    """The body of pod i's /metrics, fetched from the client."""
    with lab.entered("node"):
        sock = socket.create_connection((lab.pod_ip(i), METRICS_PORT), timeout=2.0)
    with sock:
        sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: {lab.pod_ip(i)}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1]


def test_a_replica_is_starting_until_its_keepalived_reports_a_state(ha_lab: HaLab, replicas: Replicas,
                                                                   tmp_path: Path) -> None:
    """Until keepalived's first state line a replica could not take over (a goodbye would not reach it): the
    state file, `egress-router ready` and the metrics say "starting", not "standby"; also after keepalived died,
    until the new one reports. keepalived here waits at a gate (a FIFO) the test opens."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    wrapper = tmp_path / "bin" / "keepalived"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nread go < {gate}\nexec {shutil.which("keepalived")} "$@"\n', encoding="ascii")
    wrapper.chmod(0o755)
    replicas.start(0)
    assert replicas.active() == 0
    router = replicas.start(1, PATH=f"{wrapper.parent}:{os.environ['PATH']}")
    assert until(lambda: "Started keepalived" in replicas.log(1) and ha_lab.http_status(1) == 503, timeout=10), \
        replicas.log(1)
    assert state_file(replicas, 1) == "starting"
    assert 'egress_router_ha_state{state="starting"} 1' in metrics(ha_lab, 1)
    ready = ha_lab.exec(ha_lab.pod(1), ["env", f"EGRESS_HA_PEERS={ha_lab.peers()}",
                                        f"EGRESS_HA_STATE_DIR={replicas.dir / 'pod1'}", *router_command(), "ready"])
    assert ready.returncode == 1 and ready.stderr.startswith("not ready: this replica is starting (its keepalived")
    with open(gate, "w", encoding="ascii") as opened:
        opened.write("go\n")
    assert until(lambda: state_file(replicas, 1) == "standby") is not None, replicas.log(1)
    text = metrics(ha_lab, 1)
    assert 'egress_router_ha_state{state="standby"} 1' in text and \
        'egress_router_ha_state{state="starting"} 0' in text, text
    assert state_file(replicas, 0) == "active" and 'egress_router_ha_state{state="active"} 1' in metrics(ha_lab, 0)
    # keepalived dies: starting again (the router starts a new one, which waits at the gate)
    (keepalived,) = children(router.pid)
    os.kill(keepalived, signal.SIGKILL)
    assert until(lambda: state_file(replicas, 1) == "starting" and "keepalived exited" in replicas.log(1),
                 timeout=5) is not None, replicas.log(1)
    with open(gate, "w", encoding="ascii") as opened:
        opened.write("go\n")
    assert until(lambda: state_file(replicas, 1) == "standby", timeout=5) is not None, replicas.log(1)
    assert ha_lab.holders() == [0]


def test_dual_stack_a_second_holder_of_the_ipv6_address_alone_counts(tmp_path: Path) -> None:
    """Dual-stack, the guard probes both reserved addresses: another MAC answering only for the IPv6 one (DAD)
    is a second holder; the active replica, with the lower MAC, gives way and the other takes both over."""
    require_lab(HALAB_TOOLS)
    with HaLab(2, dual_stack=True) as lab:
        lab.serve_outside()
        replicas = Replicas(lab, tmp_path)
        replicas.start(0)
        assert replicas.active() == 0 and lab.holders(SOURCE6) == [0]
        replicas.start(1)  # a standby (nopreempt): pod0, whose MAC is lower, stays the active one
        assert until(lambda: state_file(replicas, 1) == "standby", timeout=10) is not None, replicas.log(1)
        lab.ip(lab.pod(1), [f"addr add {SOURCE6}/64 dev macvlan0 nodad"])  # by hand: the IPv6 address only
        assert lab.holders(SOURCE6) == [0, 1] and lab.holders() == [0]
        two = time.monotonic()
        assert until(lambda: lab.holders(SOURCE6) == [1] and lab.holders() == [1], timeout=6) is not None, \
            replicas.logs()
        assert time.monotonic() - two < 3.0, replicas.logs()
        assert f"also answers for {SOURCE6} on the LAN" in replicas.log(0), replicas.log(0)
        assert "giving way to 02:00:00:00:00:02" in replicas.log(0)
        assert until(lambda: lab.http_status(1) == 200) is not None
        assert lab.connect(1, ipv6=True) == SOURCE6 and lab.connect(1) == SOURCE
        assert until(lambda: "a standby again" in replicas.log(0), timeout=5) is not None, replicas.log(0)
        assert until(lambda: state_file(replicas, 0) == "standby") is not None, replicas.log(0)
        assert lab.holders(SOURCE6) == [1] and lab.holders() == [1] and lab.http_status(0) == 503
