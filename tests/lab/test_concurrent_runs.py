"""Runs in one network namespace take turns (net.lock): concurrent init runs, a held lock, a killed holder,
and an undo that fails is reported as failed (issue: two interleaved runs left zero NAT rules)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.lab import ROUTER_POD_IP, SOURCE_IP, Lab, router_command
from egress_router.net import lock
from tests.demo_rules import demo_dnat_rules, demo_snat_rules
from tests.lab.inprocess import failed_apply


def rules_in_place(lab: Lab) -> bool:
    """Exactly the demo's rules in both of our chains, as `iptables -S` prints them."""
    dnat = lab.exec("router", ["iptables", "-t", "nat", "-S", DNAT_CHAIN], check=True).stdout.splitlines()
    snat = lab.exec("router", ["iptables", "-t", "nat", "-S", SNAT_CHAIN], check=True).stdout.splitlines()
    return dnat == demo_dnat_rules() and snat == demo_snat_rules("macvlan0", SOURCE_IP)


def start_router(lab: Lab, env: dict[str, str]) -> subprocess.Popen[str]:
    return lab.spawn("router", router_command(), env=env)


def slow_restore(tmp_path: Path) -> str:
    """A PATH whose iptables-nft-restore takes 0.3 s more: the window in which unserialized runs read the
    same old state and apply over each other (kubelet restarting an init container mid-run)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    real = shutil.which("iptables-nft-restore")
    assert real is not None
    wrapper = bindir / "iptables-nft-restore"
    wrapper.write_text(f"#!/bin/sh\nsleep 0.3\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    return f"{bindir}:{os.environ.get('PATH', '')}"


def test_concurrent_init_runs_all_succeed_and_leave_every_rule(served: Lab, tmp_path: Path) -> None:
    """Four runs at once, five times over: one applies, the others wait and find everything in place."""
    env = served.router_env(PATH=slow_restore(tmp_path))
    for _ in range(5):
        served.exec("router", ["iptables", "-t", "nat", "-F"], check=True)
        served.exec("router", ["iptables", "-t", "nat", "-X"], check=True)
        served.exec("router", ["ip", "address", "flush", "dev", "macvlan0"], check=True)
        runs = [start_router(served, env) for _ in range(4)]
        results = [(run.wait(timeout=60), run.stderr.read() if run.stderr else "") for run in runs]
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        assert rules_in_place(served)
        # exactly one run made the changes; the others found everything in place
        assert sum("Applied 5 NAT rules" in err for _, err in results) == 1, results
        assert sum("network already configured" in err for _, err in results) == 3, results
    assert served.request("tcp", ROUTER_POD_IP, 80).landed == "203.0.113.10:80"


def test_a_run_waits_for_the_holder_and_names_it(served: Lab) -> None:
    with served.entered("router"):
        held = lock.acquire(1.0)  # bound in the router namespace by this test process
    try:
        run = start_router(served, served.router_env())
        time.sleep(1.0)
        assert run.poll() is None, "the run went ahead while the lock was held"
    finally:
        held.close()
    assert run.wait(timeout=30) == 0
    stderr = run.stderr.read() if run.stderr else ""
    assert "Waiting for another egress-router run (pid " in stderr
    assert rules_in_place(served)


def test_a_killed_holder_frees_the_lock_at_once(served: Lab) -> None:
    """The lock is an abstract socket: the kernel drops it with its process, SIGKILL included."""
    code = ("import socket, sys, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({lock.LOCK_NAME!r}); s.listen(1)\n"
            "print('held', flush=True); time.sleep(60)\n")
    holder = served.spawn("router", ["python3", "-c", code])
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with served.entered("router"):
        holder_pid = lock.holder_pid()
    # nsenter execs python in place, so the pid that bound the socket is the one we started
    assert holder_pid == holder.pid
    run = start_router(served, served.router_env())
    time.sleep(0.5)
    assert run.poll() is None
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    started = time.monotonic()
    assert run.wait(timeout=30) == 0
    assert time.monotonic() - started < 5
    assert rules_in_place(served)


def test_a_stuck_holder_is_a_clear_error_and_nothing_changes(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    before = lab.snapshot("router")
    with lab.entered("router"):
        held = lock.acquire(1.0)
        try:
            with pytest.raises(Exception) as raised:
                lock.acquire(0.3)
        finally:
            held.close()
    assert "still holds its lock after 0.3 s; nothing was changed" in str(raised.value)
    assert lab.snapshot("router") == before
    with lab.entered("router"):
        lock.acquire(0.3).close()  # free again


def test_a_failed_undo_is_not_reported_as_done(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step fails and so does the undo of an earlier one: the error must say so, not 'were undone'."""
    from egress_router.net.rtnl import NetlinkError, Route, Rtnl

    real_route, real_address = Rtnl.route, Rtnl.address

    def route(self: Rtnl, command: str, wanted: Route) -> None:
        if command == "replace" and wanted.dst_len == 0:
            raise NetlinkError(101, "Network is unreachable")
        real_route(self, command, wanted)

    def address(self: Rtnl, add: bool, index: int, ip: str, prefixlen: int, family: int = 2) -> None:
        if not add:
            raise NetlinkError(16, "Device or resource busy")
        real_address(self, add, index, ip, prefixlen, family)

    monkeypatch.setattr(Rtnl, "route", route)
    monkeypatch.setattr(Rtnl, "address", address)
    message = failed_apply(lab)
    assert "were undone" not in message
    assert "undoing the changes made before it failed too, for: add address 192.0.2.99/24 (Device or resource " \
           "busy)" in message
    assert message.endswith("the namespace is partly configured, run again to converge")
    # and the next run does converge
    assert lab.run_router(lab.router_env()).returncode == 0
