"""EGRESS_ROUTER_CONFIG_FILE for real: an EgressRouter object configures the router in a namespace lab exactly as
the variables do, a bad one changes nothing, and legacy mode reloads it on a ConfigMap swap."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from egress_router.core.egressrouter import from_env
from egress_router.lab import DEMO_TRAFFIC, DEST_IPS, ROUTER_POD_IP, SOURCE_IP, Lab, router_command
from tests.lab.test_live_legacy import IN_FORCE_WITHIN, Router, eventually, landed
from tests.lab.test_redirect import EXPECTED_LANDING
from tests.unit.test_rule_files import configmap_volume

SUPPLIED = ("EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_DESTINATION")


def config_file_env(lab: Lab, path: Path) -> dict[str, str]:
    """The lab's demo environment with its three variables moved into an EgressRouter file at `path`."""
    env = lab.router_env()
    router, _ = from_env(env, name="egress-router-lab")
    text = json.dumps(router.to_object()) if path.suffix == ".json" else yaml.safe_dump(router.to_object())
    path.write_text(text, encoding="utf-8")
    return {**{k: value for k, value in env.items() if k not in SUPPLIED}, "EGRESS_ROUTER_CONFIG_FILE": str(path)}


def test_an_egress_router_file_configures_the_namespace_as_the_variables_do(served: Lab, tmp_path: Path) -> None:
    result = served.run_router(config_file_env(served, tmp_path / "egressrouter.yaml"))
    assert result.returncode == 0, result.stderr
    for proto, port in DEMO_TRAFFIC:
        reply = served.request(proto, ROUTER_POD_IP, port)
        assert reply.landed == EXPECTED_LANDING[(proto, port)], (proto, port)
        assert reply.peer_ip == SOURCE_IP, (proto, port)
    from_file = served.snapshot("router")
    # the same configuration from the variables finds everything in place: the very same state
    again = served.run_router(served.router_env())
    assert again.returncode == 0, again.stderr
    assert served.snapshot("router") == from_file
    json_run = served.run_router(config_file_env(served, tmp_path / "egressrouter.json"))
    assert json_run.returncode == 0, json_run.stderr
    assert served.snapshot("router") == from_file


def test_a_bad_egress_router_file_is_one_line_and_touches_nothing(lab: Lab, tmp_path: Path) -> None:
    path = tmp_path / "egressrouter.yaml"
    env = config_file_env(lab, path)
    good = path.read_text(encoding="utf-8")
    path.write_text(good.replace("protocol: UDP", "protocol: ICMP"), encoding="utf-8")
    before = lab.snapshot("router")
    result = lab.run_router(env)
    assert result.returncode == 1
    assert result.stderr == (f"error: EGRESS_ROUTER_CONFIG_FILE={path}: spec.redirect.redirectRules[2].protocol: "
                             "'ICMP' is not TCP, UDP or SCTP\n")
    assert lab.snapshot("router") == before
    path.write_text(good, encoding="utf-8")
    both = lab.run_router({**env, "EGRESS_GATEWAY": "192.0.2.1"})
    assert both.returncode == 1 and both.stderr.startswith("error: EGRESS_GATEWAY: is set in the environment and "
                                                           f"also by EGRESS_ROUTER_CONFIG_FILE={path}")
    assert lab.snapshot("router") == before


def router_document(rules: str) -> str:
    """An EgressRouter for the lab's addresses with these EGRESS_DESTINATION rules, as YAML."""
    router, _ = from_env({"EGRESS_SOURCE": f"{SOURCE_IP}/24", "EGRESS_GATEWAY": "192.0.2.1",
                          "EGRESS_DESTINATION": rules}, name="egress-router-lab")
    return yaml.safe_dump(router.to_object())


@pytest.fixture
def live_router(served: Lab, tmp_path: Path) -> Iterator[tuple[Router, Path]]:
    """legacy mode configured by an EgressRouter in a ConfigMap-style volume (key egressrouter.yaml)."""
    configmap_volume(tmp_path, "..v1", {"egressrouter.yaml": router_document(f"80 tcp {DEST_IPS[0]}\n")})
    env = {k: value for k, value in served.router_env(mode="legacy").items() if k not in SUPPLIED}
    env["EGRESS_ROUTER_CONFIG_FILE"] = str(tmp_path / "egressrouter.yaml")
    router = Router(served, served.spawn("router", router_command(), env=env), 3.0)
    try:
        router.wait_log("Ready:")
        yield router, tmp_path
    finally:
        problems = router.stop_and_check()
    assert not problems, problems


def test_legacy_mode_reloads_the_egress_router_on_a_configmap_swap(served: Lab,
                                                                  live_router: tuple[Router, Path]) -> None:
    router, volume = live_router
    a, b = DEST_IPS[0], DEST_IPS[1]
    assert landed(served, 80) == a
    swapped = time.monotonic()
    configmap_volume(volume, "..v2", {"egressrouter.yaml": router_document(f"80 tcp {b}\n8080 tcp {a} 80\n")})
    assert eventually(lambda: landed(served, 80) == b, IN_FORCE_WITHIN) is not None, router.stderr
    print(f"swap to in force: {time.monotonic() - swapped:.2f} s (upper bound, includes the probe)")
    assert landed(served, 8080) == a
    # a bad edit: one line naming the file and the field, the rules in force stay
    seen = len(router.lines())
    configmap_volume(volume, "..v3", {"egressrouter.yaml": router_document(f"80 tcp {a}\n").replace("TCP", "ICMP")})
    line = router.wait_log("rejected", after=seen)
    assert f"EGRESS_ROUTER_CONFIG_FILE={volume / 'egressrouter.yaml'}: spec.redirect.redirectRules[0].protocol: " \
           "'ICMP' is not TCP, UDP or SCTP" in line, line
    assert landed(served, 80) == b
