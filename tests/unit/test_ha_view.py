"""The role a high-availability keeper shares with its proxy processes (ha_view.py); the admin port's process tree."""

from __future__ import annotations

import os
import subprocess
import sys

from egress_router.admin import process_tree
from egress_router.core.exposition import render
from egress_router.ha_view import SharedRole


def test_the_role_is_seen_by_a_forked_process_as_the_keeper_writes_it() -> None:
    role = SharedRole(os.getpid())
    assert not role.active and role.ready() is not None and role.keeper == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a proxy process: it reads what the keeper publishes after the fork
        os.close(write)
        os.read(read, 1)
        os._exit(0 if role.active and role.ready() is None else 3)
    os.close(read)
    role.publish(True, 1, 2, "active")
    os.write(write, b"x")
    os.close(write)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    text = render(role.families())
    assert "egress_router_ha_active 1\n" in text and "egress_router_ha_transitions_total 1\n" in text
    assert "egress_router_ha_peers 2\n" in text
    assert 'egress_router_ha_state{state="active"} 1\n' in text
    assert 'egress_router_ha_state{state="standby"} 0\n' in text
    role.publish(False, 2, 2, "fault")
    assert role.state == "fault" and 'egress_router_ha_state{state="fault"} 1\n' in render(role.families())
    assert role.ready() == "not ready: this replica is a standby (another one holds EGRESS_SOURCE)"


def test_the_process_tree_holds_the_root_and_every_descendant() -> None:
    # a child that starts a grandchild and waits: both are in this process's tree, unrelated processes are not
    script = "import subprocess, sys; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True); p.wait()"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid() and {child.pid, grandchild} <= set(tree)
        assert os.getppid() not in tree
        assert process_tree(child.pid) == [child.pid, grandchild]
    finally:
        for pid in process_tree(child.pid)[::-1]:
            os.kill(pid, 9)
        child.wait()
