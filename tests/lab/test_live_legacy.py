"""Legacy mode keeps living: its rule file reloaded on a ConfigMap swap or SIGHUP, bad edits refused with
the old rules in force, connections to unchanged destinations kept, and drift repaired within 5 s."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egress_router.lab import DEST_IPS, ROUTER_POD_IP, SOURCE_IP, Lab, router_command
from egress_router.labtraffic import ConfigMapVolume
from tests.lab.origin import Origin
from tests.lab.proxyproc import ProxyProcess

A, B, C = DEST_IPS
IN_FORCE_WITHIN = 2.0 + 1.0  # the contract is 2 s from the swap; 1 s of margin for a loaded 2-core machine
REPAIRED_WITHIN = 5.0
CONNECTIONS = 1000


class Router(ProxyProcess):
    """egress-router in legacy mode in the router namespace, its log collected."""

    def wait_log(self, pattern: str, timeout: float = 10.0, after: int = 0) -> str:
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines()[after:]:
                if compiled.search(line):
                    return line
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no log line matching {pattern!r} within {timeout} s:\n{self.stderr}")
            time.sleep(0.02)


class Volume(ConfigMapVolume):
    """A ConfigMap volume with one key, `destination`, updated as the kubelet does."""

    def __init__(self, directory: Path, text: str):
        super().__init__(directory, "destination", text)

    def update(self, text: str) -> float:
        return self.swap(text)


StartRouter = Callable[..., Router]


def legacy_routers(lab: Lab, make_env: Callable[..., dict[str, str]]) -> Iterator[StartRouter]:
    """The body of a fixture that starts legacy-mode routers in `lab` (`make_env(*args, mode=..., **extra)`
    gives the environment), each ready when returned, and checks at the end that they stopped cleanly."""
    started: list[Router] = []

    def start(*args: str, **extra: str) -> Router:
        env = make_env(*args, mode="legacy", **extra)
        if "EGRESS_DESTINATION_FILE" in extra:
            env.pop("EGRESS_DESTINATION")
        router = Router(lab, lab.spawn("router", router_command(), env=env), 3.0)
        started.append(router)
        router.wait_log("Ready:")
        return router

    yield start
    problems = [problem for router in started for problem in router.stop_and_check()]
    assert not problems, problems


@pytest.fixture
def start_router(lab: Lab) -> Iterator[StartRouter]:
    yield from legacy_routers(lab, lambda **extra: lab.router_env("", **extra))


def landed(lab: Lab, port: int) -> str | None:
    """The address a TCP connection to the router's port lands on (the lab's demo servers say it)."""
    try:
        return lab.request("tcp", ROUTER_POD_IP, port, timeout=1.0).landed.rsplit(":", 1)[0]
    except (OSError, ValueError):
        return None


def eventually(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `check` held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_a_configmap_swap_is_in_force_within_2_s(served: Lab, start_router: StartRouter, tmp_path: Path) -> None:
    volume = Volume(tmp_path, f"80 tcp {A}\n")
    router = start_router(EGRESS_DESTINATION_FILE=volume.path)
    assert landed(served, 80) == A
    seen = len(router.lines())
    swapped = volume.update(f"80 tcp {B}\n8080 tcp {A} 80\n")
    assert eventually(lambda: landed(served, 80) == B, IN_FORCE_WITHIN) is not None, router.stderr
    print(f"swap to in force: {time.monotonic() - swapped:.2f} s (upper bound, includes the probe)")
    assert landed(served, 8080) == A
    line = router.wait_log(r"Reloaded EGRESS_DESTINATION_FILE=", after=seen)
    assert "+1 -0 ~1 rule(s) (2 now)" in line and "(reload 1)" in line, line
    assert served.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP
    volume.update(f"80 tcp {B}\n8080 tcp {A} 80\n")  # the same rules again: nothing to do, nothing logged
    time.sleep(1.0)
    assert not [line for line in router.lines() if "(reload 2)" in line]


def test_sighup_reloads_what_the_watch_cannot_see(served: Lab, start_router: StartRouter, tmp_path: Path) -> None:
    rules = tmp_path / "destination"
    rules.write_text(f"80 tcp {A}\n", encoding="utf-8")
    router = start_router(EGRESS_DESTINATION_FILE=str(rules))
    stamp = os.stat(rules)
    # same size, same inode, and the old times again before the file is closed (inotify's CLOSE_WRITE)
    with open(rules, "r+", encoding="utf-8") as file:
        file.write(f"80 tcp {B}\n")
        file.flush()
        os.utime(file.fileno(), ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    time.sleep(1.0)
    assert landed(served, 80) == A  # the watch saw nothing
    router.process.send_signal(signal.SIGHUP)
    assert eventually(lambda: landed(served, 80) == B, IN_FORCE_WITHIN) is not None, router.stderr
    assert "Reloaded" in router.wait_log(r"\(SIGHUP\)")


def test_sighup_with_inline_rules_keeps_running_and_says_why(served: Lab, start_router: StartRouter) -> None:
    router = start_router(EGRESS_DESTINATION=f"80 tcp {A}\n")
    router.process.send_signal(signal.SIGHUP)
    line = router.wait_log(r"Reload \(SIGHUP\)")
    assert "inline" in line and "restart" in line, line
    assert router.process.poll() is None
    assert landed(served, 80) == A


def test_a_bad_edit_keeps_the_rules_in_force_and_the_next_good_one_applies(
        served: Lab, start_router: StartRouter, tmp_path: Path) -> None:
    volume = Volume(tmp_path, f"80 tcp {A}\n")
    router = start_router(EGRESS_DESTINATION_FILE=volume.path)
    volume.update(f"80 tcp {B}\n81 tcp 203.0.113\n")
    line = router.wait_log(r"rejected")
    assert f"EGRESS_DESTINATION_FILE={volume.path} line 2: '81 tcp 203.0.113': " in line, line
    assert "the rules in force stay" in line and "(1 rejected so far)" in line, line
    assert landed(served, 80) == A  # nothing of the bad edit applied, not even its good first line
    volume.update("")  # emptied: also refused
    assert "(2 rejected so far)" in router.wait_log(r"is empty")
    assert landed(served, 80) == A
    volume.update(f"80 tcp {C} 7000\n")  # the demo servers: C listens on 7000
    assert eventually(lambda: landed(served, 80) == C, IN_FORCE_WITHIN) is not None, router.stderr


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def hello_from(lab: Lab, port: int) -> str | None:
    """Where an HTTP GET /hello through the router's port lands (the origin says it)."""
    try:
        with lab.entered("client"):
            conn = socket.create_connection((ROUTER_POD_IP, port), timeout=1.0)
        with conn:
            conn.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError:
        return None
    found = re.search(rb"hello from ([0-9.]+):", data)
    return found.group(1).decode() if found else None


def test_established_connections_survive_a_reload_of_other_rules(lab: Lab, origin: Origin,
                                                                 start_router: StartRouter, tmp_path: Path) -> None:
    volume = Volume(tmp_path, f"7000 tcp {A}\n80 tcp {A}\n")
    start_router(EGRESS_DESTINATION_FILE=volume.path)
    raise_fd_limit(4 * CONNECTIONS + 256)  # ours, and the origin's, which runs in this process
    conns: list[socket.socket] = []
    try:
        with lab.entered("client"):
            for _ in range(CONNECTIONS):
                conns.append(socket.create_connection((ROUTER_POD_IP, 7000), timeout=10))
        for index, conn in enumerate(conns):
            conn.sendall(b"before %d\n" % index)
            assert read_line(conn) == b"before %d\n" % index
        assert hello_from(lab, 80) == A
        volume.update(f"7000 tcp {A}\n80 tcp {B}\n")
        assert eventually(lambda: hello_from(lab, 80) == B, IN_FORCE_WITHIN) is not None
        lost = 0
        for index, conn in enumerate(conns):
            try:
                conn.sendall(b"after %d\n" % index)
                lost += read_line(conn) != b"after %d\n" % index
            except OSError:
                lost += 1
        assert lost == 0, f"{lost} of {CONNECTIONS} connections lost"
        assert len(origin.connections_to(A)) >= CONNECTIONS
    finally:
        for conn in conns:
            conn.close()


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------ drift

DRIFTS = {
    "the nat table flushed": [["iptables", "-t", "nat", "-F"]],
    "a jump deleted": [["iptables", "-t", "nat", "-D", "PREROUTING", "-j", "EGRESS-ROUTER-DNAT"]],
    "our chain emptied": [["iptables", "-t", "nat", "-F", "EGRESS-ROUTER-DNAT"]],
    "the default route deleted": [["ip", "route", "del", "default"]],
    "the address removed": [["ip", "address", "del", f"{SOURCE_IP}/24", "dev", "macvlan0"]],
    "the mark rules flushed": [["iptables", "-t", "mangle", "-F"]],
    "the policy rule deleted": [["ip", "rule", "del", "priority", "7910"]],
    "forwarding turned off": [["sysctl", "-qw", "net.ipv4.ip_forward=0"]],
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_drift_is_repaired_within_5_s(served: Lab, start_router: StartRouter, drift: str) -> None:
    # another owner's rule in the same table, which a repair must leave as it is
    served.exec("router", ["iptables", "-t", "nat", "-I", "PREROUTING", "-p", "udp", "--dport", "9999",
                           "-j", "RETURN"], check=True)
    router = start_router(EGRESS_DESTINATION=f"80 tcp {A}\n")
    converged = served.snapshot("router")
    assert landed(served, 80) == A
    seen = len(router.lines())
    for argv in DRIFTS[drift]:
        served.exec("router", argv, check=True)
    if drift != "the nat table flushed":
        served.exec("router", ["iptables", "-t", "nat", "-C", "PREROUTING", "-p", "udp", "--dport", "9999",
                               "-j", "RETURN"], check=True)
    took = eventually(lambda: served.snapshot("router") == converged or drift == "the nat table flushed"
                      and repaired_but_foreign_gone(served, converged), REPAIRED_WITHIN)
    assert took is not None, f"not repaired within {REPAIRED_WITHIN} s:\n{router.stderr}"
    print(f"{drift}: repaired after {took:.2f} s")
    line = router.wait_log(r"Repaired drift: ", after=seen)
    assert "(repair 1)" in line, line
    assert landed(served, 80) == A
    assert served.request("tcp", ROUTER_POD_IP, 80).peer_ip == SOURCE_IP


def repaired_but_foreign_gone(lab: Lab, converged: str) -> bool:
    """After `iptables -t nat -F` the foreign rule is gone too (its owner must restore it, not us)."""
    foreign = "-A PREROUTING -p udp -m udp --dport 9999 -j RETURN"
    return lab.snapshot("router") == converged.replace(foreign + "\n", "")


def test_no_repair_without_drift_and_none_when_turned_off(served: Lab, start_router: StartRouter) -> None:
    router = start_router(EGRESS_DESTINATION=f"80 tcp {A}\n", EGRESS_ROUTER_DRIFT_SECONDS="0.2")
    time.sleep(1.5)  # several checks
    assert "Repaired" not in router.stderr
    router.stop()
    off = start_router(EGRESS_DESTINATION=f"80 tcp {A}\n", EGRESS_ROUTER_DRIFT_SECONDS="0")
    served.exec("router", ["ip", "route", "del", "default"], check=True)
    time.sleep(2.5)
    assert "Repaired" not in off.stderr
    assert "default" not in served.exec("router", ["ip", "route", "show"], check=True).stdout


def test_a_udp_flow_follows_a_changed_rule_at_once(served: Lab, start_router: StartRouter, tmp_path: Path) -> None:
    """One client port sending without pause: its tracked flow would keep the old destination for as long
    as it keeps sending; the reload deletes it, as kube-proxy does for UDP. TCP keeps its connections."""
    volume = Volume(tmp_path, f"53 udp {A} 5353\n7000 tcp {C}\n")
    router = start_router(EGRESS_DESTINATION_FILE=volume.path)
    with served.entered("client"):
        flow = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with flow:
        flow.bind(("0.0.0.0", 40053))
        flow.settimeout(1.0)
        flow.connect((ROUTER_POD_IP, 53))

        def answer() -> str:
            flow.send(b"hello\n")
            return flow.recv(4096).decode().split()[0].rsplit(":", 1)[0]

        assert answer() == A
        held = served.request("tcp", ROUTER_POD_IP, 7000)  # (a new TCP connection works throughout)
        assert held.landed.startswith(C)
        volume.update(f"53 udp {C} 7001\n7000 tcp {C}\n")
        took = eventually(lambda: answer() == C, IN_FORCE_WITHIN)
        assert took is not None, router.stderr
        line = router.wait_log(r"Reloaded ")
        assert "1 UDP flow(s) re-pointed" in line, line


def test_verify_checks_the_rules_in_force_while_an_edit_is_refused(served: Lab, start_router: StartRouter,
                                                                   tmp_path: Path) -> None:
    """A probe running `egress-router verify` in the router's container must not fail a router that
    refused a bad edit and keeps serving the old rules: it verifies those, and says why in a note."""
    volume = Volume(tmp_path, f"80 tcp {A}\n")
    router = start_router(EGRESS_DESTINATION_FILE=volume.path)
    env = served.router_env("", mode="legacy", EGRESS_DESTINATION_FILE=volume.path)
    env.pop("EGRESS_DESTINATION")

    def verify() -> subprocess.CompletedProcess[str]:
        return served.exec("router", [*router_command(), "verify"], env=env)

    assert verify().returncode == 0
    volume.update(f"80 tcp {B}\n81 tcp 203.0.113\n")
    router.wait_log("rejected")
    result = verify()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("note: the files differ from the rules in force (the running router refuses "
                                    f"them: EGRESS_DESTINATION_FILE={volume.path} line 2:"), result.stdout
    volume.update(f"80 tcp {B}\n")
    assert eventually(lambda: landed(served, 80) == B, IN_FORCE_WITHIN) is not None
    result = verify()
    assert result.returncode == 0 and "note:" not in result.stdout, result.stdout
    router.stop()
    volume.update(f"80 tcp {B}\n81 tcp 203.0.113\n")
    result = verify()  # no router running: the record is not believed, the file is what there is
    assert result.returncode == 2 and "line 2" in result.stderr, result.stdout + result.stderr
