"""EGRESS_ROUTER_CONFIG_FILE for real: an EgressRouter object configures the router in a namespace lab exactly as
the variables do, and a bad one changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from egress_router.core.egressrouter import from_env
from egress_router.lab import DEMO_TRAFFIC, ROUTER_POD_IP, SOURCE_IP, Lab
from tests.lab.test_redirect import EXPECTED_LANDING

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
