"""The proxies' reload decisions without privileges: what a reload says it changed, when it applies, fails or does
nothing, and the master-to-worker channel (text and sockets) as a worker reads it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from egress_router.core import variables as v
from egress_router.core.allowlist import AccessList, parse_access_list
from egress_router.core.config import load_http_proxy
from egress_router.core.forwards import Forward, parse_dns_destinations
from egress_router.proxy import metrics
from egress_router.proxy.metrics import SharedCounters
from egress_router.proxy.reload import (
    ControlReader,
    Reloader,
    acl_changes,
    forward_changes,
    forward_listeners,
    rule_source,
    send_update,
)
from egress_router.sources import read_files
from tests.unit.test_rule_files import configmap_volume


def test_acl_changes_name_added_and_removed_rules_and_reorders() -> None:
    old, new = parse_access_list("www.example.com\n!203.0.113.0/24\n*"), parse_access_list("*.example.org\n*")
    assert acl_changes(old, new) == ("+1 rule (*.example.org); -2 rules (www.example.com, !203.0.113.0/24); now 1 "
                                     "allow rule, 0 deny rules, default allow")
    assert acl_changes(parse_access_list("a.test\n!a.test"), parse_access_list("!a.test\na.test")) == \
        "the same rules in a new order (the first match decides); now 1 allow rule, 1 deny rule, default deny"
    assert acl_changes(old, parse_access_list("WWW.example.com.\n# a comment\n!203.0.113.0/24\n*")) is None
    many = parse_access_list("\n".join(f"h{i}.test" for i in range(7)))
    assert acl_changes(parse_access_list("h0.test"), many) == \
        "+6 rules (h1.test, h2.test, h3.test, h4.test, ... (2 more)); now 7 allow rules, 0 deny rules, default deny"


def test_forward_changes_say_added_removed_and_changed_ports() -> None:
    def forwards(text: str) -> tuple[Forward, ...]:
        return parse_dns_destinations(text)

    assert forward_changes(forwards("7000 a.test\n7001 b.test"), forwards("7000 c.test 80\n7002 b.test")) == \
        "+1 forward (7002 to b.test:7002), -1 (7001), 1 changed (7000 to c.test:80)"
    assert forward_changes(forwards("7000 a.test\n7001 b.test"), forwards("7000 a.test")) == "-1 forward (7001)"
    assert forward_changes(forwards("7000 a.test\n7001 b.test"), forwards("7001 d.test\n7000 c.test")) == \
        "2 forwards changed (7000 to c.test:7000, 7001 to d.test:7001)"
    assert forward_changes(forwards("7000 a.test\n7001 b.test"), forwards("# reordered\n7001 B.test.\n7000 a.test")) \
        is None
    assert {spec.port for spec in forward_listeners(forwards("7000 a.test\n7001 b.test"))} == {7000, 7001}


def http_reloader(env: dict[str, str], shared: SharedCounters) -> Reloader[AccessList]:
    source = rule_source(env, v.HTTP_DESTINATION)

    def parse(text: str) -> AccessList:
        return load_http_proxy(env, {source.path: text} if source.path else {}).acl

    return Reloader(source, load_http_proxy(env, read_files(env)).acl, parse, acl_changes, shared.row(0))


def test_a_reload_applies_once_refuses_bad_edits_and_ignores_what_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    configmap_volume(tmp_path, "..v1", {"allow": "www.example.com\n"})
    path = str(tmp_path / "allow")
    shared = SharedCounters(1)
    reloader = http_reloader({"EGRESS_HTTP_PROXY_DESTINATION_FILE": path}, shared)
    caplog.set_level(logging.DEBUG, logger="egress_router")
    assert reloader.poll([0]) is None  # the start-up check: the same rules, nothing to do
    assert reloader.poll([0]) is None  # nothing changed since
    configmap_volume(tmp_path, "..v2", {"allow": "www.example.com\nbad rule\n"})
    assert reloader.poll([0]) is None
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == (f"Reload failed (1 failed so far); the rules in force stay: "
                                  f"EGRESS_HTTP_PROXY_DESTINATION_FILE={path} line 2: 'bad rule': 'bad rule' has "
                                  "spaces inside; write one rule per line")
    assert shared.total(metrics.RELOAD_FAILURES) == 1 and shared.total(metrics.RELOADS) == 0
    configmap_volume(tmp_path, "..v3", {"allow": "api.example.com\n"})
    update = reloader.poll([0])
    assert update is not None and update.generation == 2 and update.trigger == "file changed"
    assert reloader.rules.name_verdict("www.example.com") is True  # not in force before commit
    reloader.commit(update)
    assert reloader.rules.name_verdict("api.example.com") is True
    assert reloader.rules.name_verdict("www.example.com") is False
    assert shared.total(metrics.RELOADS) == 1
    configmap_volume(tmp_path, "..v4", {"allow": "api.example.com\n"})  # the same text in a new file
    assert reloader.poll([0]) is None
    assert reloader.check("SIGHUP", [0]) is None  # and SIGHUP re-reads it: still nothing to do
    assert shared.total(metrics.RELOADS) == 1 and shared.total(metrics.RELOAD_FAILURES) == 1
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"Reloaded EGRESS_HTTP_PROXY_DESTINATION_FILE={path} (file changed, rules generation 2): "
                     "+1 rule (api.example.com); -1 rule (www.example.com); now 1 allow rule, 0 deny rules, "
                     "default deny"]
    os.unlink(tmp_path / "..data")  # the volume went away: a failed reload, the rules stay
    assert reloader.poll([0]) is None
    assert shared.total(metrics.RELOAD_FAILURES) == 2
    assert reloader.rules.name_verdict("api.example.com") is True


def test_inline_rules_are_revalidated_on_sighup_and_not_watched(caplog: pytest.LogCaptureFixture) -> None:
    reloader = http_reloader({"EGRESS_HTTP_PROXY_DESTINATION": "www.example.com"}, SharedCounters(1))
    caplog.set_level(logging.INFO, logger="egress_router")
    assert reloader.watch is None and reloader.poll([0]) is None
    assert reloader.check("SIGHUP", [0]) is None
    assert [r.getMessage() for r in caplog.records] == [
        "SIGHUP: the rules are inline in EGRESS_HTTP_PROXY_DESTINATION and cannot change without a restart; give "
        "them in EGRESS_HTTP_PROXY_DESTINATION_FILE to reload them"]


def test_the_channel_carries_updates_in_order_with_their_sockets() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listeners = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(300)]  # > one sendmsg's share
    received: list[tuple[int, str, list[tuple[int, int]]]] = []
    big = "# filler\n" * 100_000  # larger than the socket buffer: sent in pieces, read in pieces

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def deliver(generation: int, text: str, socks: list[socket.socket]) -> None:
            received.append((generation, text, [(s.family, s.type) for s in socks]))
            for sock in socks:
                sock.close()
            if generation == 3:
                done.set()

        reader = ControlReader(loop, worker, deliver)
        await loop.run_in_executor(None, lambda: (send_update(master, 2, "7000 a.test\n" * 40, listeners),
                                                  send_update(master, 3, big, [])))
        await asyncio.wait_for(done.wait(), 10)
        reader.close()

    try:
        asyncio.run(main())
    finally:
        master.close()
        for sock in listeners:
            sock.close()
    assert received == [(2, "7000 a.test\n" * 40, [(socket.AF_INET, socket.SOCK_STREAM)] * 300), (3, big, [])]
