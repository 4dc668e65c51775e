"""The HA lab without egress-router: topology, one ARP answer per holder, faults, teardown; then one router in it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from egress_router.halab import (
    CLIENT,
    LAN_GATEWAY,
    OUT_GATEWAY,
    OUT_IPS,
    OUT_IPS6,
    PEERS_NAME,
    POD_GATEWAY,
    SOURCE,
    VRRP,
    HaLab,
    alive,
    children,
)
from egress_router.lab import ETC_NETNS
from tests.lab.conftest import HALAB_TOOLS, require_lab

WINDOW = 0.3  # how long a test listens for something that must not arrive
ARRIVES = 3.0  # the bound for something that must arrive (it returns as soon as it does)


def wait_for(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll until check() is truthy (bounded); fail with what it last returned."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {check} returned {result!r}")
        time.sleep(0.01)


def links(lab: HaLab, role: str) -> dict[str, dict[str, object]]:
    result = lab.exec(role, ["ip", "-d", "-j", "addr", "show"], check=True)
    return {link["ifname"]: link for link in json.loads(result.stdout)}


def ipv4(link: dict[str, object]) -> list[str]:
    infos = link.get("addr_info", [])
    assert isinstance(infos, list)
    return [f"{a['local']}/{a['prefixlen']}" for a in infos if a["family"] == "inet"]


def hold(lab: HaLab, i: int) -> None:
    """Give pod i the egress source by hand, as a takeover would."""
    lab.ip(lab.pod(i), [f"addr add {SOURCE}/24 dev macvlan0"])


def netns_processes(lab: HaLab, role: str) -> list[int]:
    """Every process (other than zombies) whose network namespace is this lab namespace."""
    target = os.stat(lab.path(role)).st_ino
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target and alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


# ------------------------------------------------------------ topology
def test_each_pod_has_its_pod_ip_a_default_route_via_the_node_and_an_empty_macvlan(ha_lab3: HaLab) -> None:
    lab = ha_lab3
    for i in range(3):
        pod = links(lab, lab.pod(i))
        assert sorted(pod) == ["eth0", "lo", "macvlan0"], "the macvlan's parent must not be in the pod"
        assert ipv4(pod["eth0"]) == [f"198.51.100.1{i}/24"]
        assert ipv4(pod["macvlan0"]) == []
        macvlan = pod["macvlan0"]
        assert macvlan["address"] == lab.macvlan_mac(i) and "UP" in str(macvlan["flags"])
        info = macvlan["linkinfo"]
        assert isinstance(info, dict) and info["info_kind"] == "macvlan" and info["info_data"]["mode"] == "bridge"
        routes = lab.exec(lab.pod(i), ["ip", "route"], check=True).stdout
        assert routes.splitlines()[0].strip() == f"default via {POD_GATEWAY} dev eth0"
        assert "macvlan0" not in routes  # a standby has no way out but what a takeover installs
        host = links(lab, f"host{i}")
        assert sorted(host) == ["lan0", "lo"] and ipv4(host["lan0"]) == []  # the node NIC: the parent
        assert f"{lab.pod_ip(i)}\t{PEERS_NAME}" in lab.exec(lab.pod(i), ["cat", "/etc/hosts"], etc=True).stdout
    gw = links(lab, "gw")
    assert ipv4(gw["br0"]) == [f"{LAN_GATEWAY}/24"] and ipv4(gw["wan0"]) == [f"{OUT_GATEWAY}/24"]
    assert all(gw[f"lan{i}"].get("master") == "br0" for i in range(3))
    assert lab.read_sysctl("gw", "net.ipv4.ip_forward") == "1"
    assert lab.read_sysctl("node", "net.ipv4.ip_forward") == "0"
    assert ipv4(links(lab, "node")["br0"]) == [f"{POD_GATEWAY}/24", f"{CLIENT}/24"]
    assert lab.peers() == "198.51.100.10 198.51.100.11 198.51.100.12"
    env = lab.router_env(2, EGRESS_HA_ADVERT_SECONDS="0.1")
    assert env["EGRESS_HA_PEERS"] == lab.peers() and env["EGRESS_HA_ADVERT_SECONDS"] == "0.1"
    assert env["EGRESS_SOURCE"] == f"{SOURCE}/24" and env["EGRESS_INTERFACE"] == "macvlan0"


def test_one_arp_answer_per_holder(ha_lab: HaLab) -> None:
    lab = ha_lab
    assert lab.arp_replies() == [] and lab.holders() == []
    hold(lab, 0)
    assert lab.holders() == [0]
    assert lab.arp_replies() == [lab.macvlan_mac(0)]  # once, with the macvlan's MAC (no ghost from a parent)
    hold(lab, 1)  # a second holder on the LAN is seen as such
    assert lab.holders() == [0, 1]
    assert sorted(lab.arp_replies()) == [lab.macvlan_mac(0), lab.macvlan_mac(1)]


def test_observations_from_other_threads_see_the_lab(ha_lab: HaLab) -> None:
    """holders and gateway_neighbour answer the same from any thread (a benchmark's sampler thread), whether
    the main thread queried a namespace first or not (pyroute2 keeps an IPRoute's socket per thread)."""
    lab = ha_lab
    hold(lab, 1)
    lab.gateway_neighbour(SOURCE)  # the gateway's namespace queried from this thread first
    with lab.entered("gw"):  # a connection attempt from the gateway: its kernel resolves SOURCE
        attempt = socket.socket()
    with attempt, contextlib.suppress(OSError):
        attempt.settimeout(2.0)
        attempt.connect((SOURCE, 9))
    wait_for(lambda: lab.gateway_neighbour(SOURCE) == lab.macvlan_mac(1))
    seen: list[object] = []

    def sample() -> None:
        seen.extend([lab.holders(), lab.gateway_neighbour(SOURCE), lab.holders(), lab.gateway_neighbour(SOURCE)])

    for _ in range(2):  # two threads one after the other (a new thread may get a finished one's id)
        worker = threading.Thread(target=sample)
        worker.start()
        worker.join(timeout=10)
    assert seen == [[1], lab.macvlan_mac(1)] * 4
    assert lab.holders() == [1] and lab.gateway_neighbour(SOURCE) == lab.macvlan_mac(1)


def test_the_gateway_reaches_the_outside_and_the_pods_do_not(ha_lab: HaLab) -> None:
    lab = ha_lab
    servers = lab.serve_outside()
    for ip in OUT_IPS:
        for port in (80, 7000):
            reply = lab.request("tcp", ip, port, role="gw", timeout=2.0)
            assert (reply.landed, reply.peer_ip) == (f"{ip}:{port}", OUT_GATEWAY)
    # no leak: the node does not forward, so only a macvlan leads out
    with pytest.raises(OSError):
        lab.request("tcp", OUT_IPS[0], 80, role=lab.pod(0), timeout=WINDOW)
    assert len(servers.seen) == 4


def test_the_client_reaches_each_pod_ip(ha_lab3: HaLab) -> None:
    lab = ha_lab3
    for i in range(3):
        with lab.entered(lab.pod(i)):
            listener = socket.create_server((lab.pod_ip(i), 8000))
        with listener:
            listener.settimeout(2.0)
            with lab.entered("node"):
                client = socket.socket()
            with client:
                client.settimeout(2.0)
                client.bind((CLIENT, 0))
                client.connect((lab.pod_ip(i), 8000))
                conn, peer = listener.accept()
                conn.close()
        assert peer[0] == CLIENT


def test_connect_returns_the_source_the_outside_saw(ha_lab: HaLab) -> None:
    """A takeover done by hand in pod1 (what a legacy router does): the client's connection to pod1 leaves
    from the egress source; pod0, without the rules, refuses."""
    lab = ha_lab
    servers = lab.serve_outside()
    hold(lab, 1)
    lab.sysctl(lab.pod(1), "net.ipv4.ip_forward", "1")
    lab.ip(lab.pod(1), [f"route add {OUT_IPS[0]}/32 via {LAN_GATEWAY} dev macvlan0"])
    for rule in ([f"-t nat -A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination {OUT_IPS[0]}"],
                 [f"-t nat -A POSTROUTING -o macvlan0 -j SNAT --to-source {SOURCE}"]):
        lab.exec(lab.pod(1), ["iptables", "-w", *rule[0].split()], check=True)
    assert lab.connect(1, 80) == SOURCE
    assert servers.seen[-1].peer_ip == SOURCE and servers.seen[-1].landed == f"{OUT_IPS[0]}:80"
    assert lab.gateway_neighbour(SOURCE) == lab.macvlan_mac(1)
    assert lab.gateway_neighbour("192.0.2.98") is None
    with pytest.raises(ConnectionRefusedError):
        lab.connect(0, 80)
    with pytest.raises(ConnectionRefusedError):  # no rule for port 7000 in pod1
        lab.connect(1, 7000)


def test_egress_link_down_and_up(ha_lab: HaLab) -> None:
    lab = ha_lab
    hold(lab, 0)
    lab.egress_link(0, False)
    assert "UP" not in str(links(lab, lab.pod(0))["macvlan0"]["flags"])
    assert lab.arp_replies() == []
    lab.egress_link(0, True)
    wait_for(lambda: lab.arp_replies() == [lab.macvlan_mac(0)])


# ------------------------------------------------------------ a container crash
def test_kill_pod_kills_every_process_started_there_and_leaves_the_namespace(ha_lab: HaLab) -> None:
    lab = ha_lab
    hold(lab, 0)
    # a parent that respawns its child at once (as keepalived's does), and a second tree
    respawner = lab.spawn(lab.pod(0), ["sh", "-c", "while :; do sleep 300; done"])
    tree = lab.spawn(lab.pod(0), ["sh", "-c", "sleep 300 & sleep 300 & wait"])
    other = lab.spawn(lab.pod(1), ["sleep", "300"])
    wait_for(lambda: len(children(respawner.pid)) == 1 and len(children(tree.pid)) == 2)
    started = {respawner.pid, tree.pid, *children(respawner.pid), *children(tree.pid)}
    assert set(netns_processes(lab, lab.pod(0))) == started
    killed = lab.kill_pod(0)
    assert set(killed) == started
    assert netns_processes(lab, lab.pod(0)) == []
    assert respawner.returncode == tree.returncode == -9
    assert other.poll() is None  # the other replica lives on
    # the namespace outlives the container, address included: a dead holder still answers ARP
    assert os.path.exists(lab.path(lab.pod(0)))
    assert ipv4(links(lab, lab.pod(0))["eth0"]) == ["198.51.100.10/24"]
    assert lab.holders() == [0] and lab.arp_replies() == [lab.macvlan_mac(0)]
    assert lab.kill_pod(0) == []


# ------------------------------------------------------------ the heartbeat path
def delivered(lab: HaLab, sender: int, receiver: int, proto: int = VRRP, *, window: float = ARRIVES) -> bool:
    """Whether one raw IP packet of `proto` from pod `sender` reaches pod `receiver` within `window` seconds."""
    token = secrets.token_bytes(8)
    with lab.entered(lab.pod(receiver)):
        rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    with lab.entered(lab.pod(sender)):
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    with rx, tx:
        try:
            tx.sendto(token, (lab.pod_ip(receiver), 0))
        except PermissionError:  # dropped by OUTPUT: netfilter says so to the sender
            return False
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            rx.settimeout(left)
            try:
                packet = rx.recv(2048)
            except TimeoutError:
                return False
            if packet.endswith(token):  # the IP header comes first
                return True
        return False


def test_cut_heartbeat_drops_vrrp_in_and_out_and_nothing_else(ha_lab: HaLab) -> None:
    lab = ha_lab
    assert delivered(lab, 0, 1) and delivered(lab, 1, 0)
    lab.cut_heartbeat(0)
    assert not delivered(lab, 0, 1, window=WINDOW)  # out
    assert not delivered(lab, 1, 0, window=WINDOW)  # in
    assert delivered(lab, 0, 1, proto=253) and delivered(lab, 1, 0, proto=253)  # another protocol passes
    lab.heal_heartbeat(0)
    assert delivered(lab, 0, 1) and delivered(lab, 1, 0)
    lab.cut_heartbeat(1)
    assert not delivered(lab, 0, 1, window=WINDOW)
    lab.heal_heartbeat(1)
    assert delivered(lab, 0, 1)


# ------------------------------------------------------------ peers by name
def test_set_peers_rewrites_the_hosts_files_in_place(ha_lab3: HaLab) -> None:
    lab = ha_lab3

    def resolved() -> list[str]:
        result = lab.exec(lab.pod(0), ["getent", "ahostsv4", PEERS_NAME], etc=True, check=True)
        return sorted({line.split()[0] for line in result.stdout.splitlines()})

    assert resolved() == ["198.51.100.10", "198.51.100.11", "198.51.100.12"]
    hosts = os.path.join(ETC_NETNS, lab.ns[lab.pod(0)], "hosts")
    inode = os.stat(hosts).st_ino
    lab.set_peers([0, 2])
    assert resolved() == ["198.51.100.10", "198.51.100.12"]
    assert os.stat(hosts).st_ino == inode  # the same file: a running process's bind mount sees the change


# ------------------------------------------------------------ teardown
def test_teardown_leaves_nothing_behind_when_the_body_fails() -> None:
    require_lab(HALAB_TOOLS)
    with pytest.raises(RuntimeError, match="the test failed"), HaLab(3) as lab:
        names = list(lab.ns.values())
        process = lab.spawn(lab.pod(2), ["sh", "-c", "sleep 300 & wait"])
        wait_for(lambda: children(process.pid))
        pids = [process.pid, *children(process.pid)]
        raise RuntimeError("the test failed")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [name for name in names if name in listed or os.path.exists(f"/run/netns/{name}")]
    assert not [name for name in names if os.path.exists(os.path.join(ETC_NETNS, name))]
    assert not [pid for pid in pids if alive(pid)]


def test_teardown_leaves_nothing_behind_when_the_build_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    require_lab(HALAB_TOOLS)
    lab = HaLab(2)

    def broken(replicas: object) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(lab, "set_peers", broken)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        lab.__enter__()
    assert not [name for name in lab.ns.values() if os.path.exists(f"/run/netns/{name}")]
    assert not [name for name in lab.ns.values() if os.path.exists(os.path.join(ETC_NETNS, name))]


# ------------------------------------------------------------ IPv6, and a router in the lab
def test_dual_stack_lab() -> None:
    require_lab(HALAB_TOOLS)
    with HaLab(2, dual_stack=True) as lab:
        lab.serve_outside()
        reply = lab.request("tcp", OUT_IPS6[0], 80, role="gw", timeout=2.0)
        assert reply.peer_ip == "2001:db8:203::1"
        routes = lab.exec(lab.pod(1), ["ip", "-6", "route", "show", "default"], check=True).stdout
        assert routes.startswith("default via 2001:db8:100::1 dev eth0")
        env = lab.router_env(0)
        assert env["EGRESS_SOURCE"] == f"{SOURCE}/24,2001:db8:2::99/64"
        lab.ip(lab.pod(1), ["addr add 2001:db8:2::99/64 dev macvlan0 nodad"])
        assert lab.holders("2001:db8:2::99") == [1] and lab.holders() == []
        lab.cut_heartbeat(0)  # VRRP over IPv6 too
        rules = lab.exec(lab.pod(0), ["ip6tables", "-S"], check=True).stdout
        assert "-A INPUT -i eth0 -p vrrp -j DROP" in rules and "-A OUTPUT -o eth0 -p vrrp -j DROP" in rules
        lab.heal_heartbeat(0)
        assert "vrrp" not in lab.exec(lab.pod(0), ["ip6tables", "-S"], check=True).stdout


def test_run_router_starts_egress_router_in_a_pod(ha_lab: HaLab) -> None:
    lab = ha_lab
    lab.serve_outside()
    router = lab.run_router(0, lab.router_env(0))

    def source() -> str | None:
        try:
            return lab.connect(0, 80, timeout=0.5)
        except OSError:
            return None

    wait_for(source, timeout=15.0)
    assert source() == SOURCE and lab.connect(0, 7000) == SOURCE
    assert lab.holders() == [0] and lab.gateway_neighbour(SOURCE) == lab.macvlan_mac(0)
    assert lab.http_status(0) == 200 and lab.http_status(1) is None
    router.terminate()
    assert router.wait(timeout=10) == 0, lab.output(router)
    assert "Ready:" in lab.output(router)


def test_run_router_in_a_dual_stack_lab() -> None:
    require_lab(HALAB_TOOLS)
    with HaLab(2, dual_stack=True) as lab:
        lab.serve_outside()
        router = lab.run_router(1, lab.router_env(1))

        def source6() -> str | None:
            try:
                return lab.connect(1, 80, timeout=0.5, ipv6=True)
            except OSError:
                return None

        wait_for(source6, timeout=15.0)
        assert source6() == "2001:db8:2::99" and lab.connect(1, 7000) == SOURCE
        assert lab.holders("2001:db8:2::99") == [1] and lab.gateway_neighbour("2001:db8:2::99") == lab.macvlan_mac(1)
        router.terminate()
        assert router.wait(timeout=10) == 0, lab.output(router)
