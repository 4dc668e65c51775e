"""validate -f: rule files and EGRESS_ROUTER_CONFIG_FILE through volumeMounts to ConfigMap volumes in the same
files, EgressRouter objects, and the pod-spec readers behind them (podfiles)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from egress_router.cli import main
from egress_router.core.egressrouter import FALLBACK_NOTE
from egress_router.podfiles import Macvlan, file_content, macvlan_of, nad_object, pod_networks

NETWORK = [{"name": "EGRESS_ROUTER_MODE", "value": "init"}, {"name": "EGRESS_SOURCE", "value": "192.0.2.99/24"},
           {"name": "EGRESS_GATEWAY", "value": "192.0.2.1"}]
RULES = "80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n"
ROUTER = """\
apiVersion: network.operator.openshift.io/v1
kind: EgressRouter
metadata: {name: partners}
spec:
  addresses: [{ip: 192.0.2.97/24, gateway: 192.0.2.1}]
  redirect:
    redirectRules:
      - {destinationIP: 203.0.113.30, port: 443, protocol: TCP}
"""


def configmap(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


def pod(env: list[dict[str, Any]], mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    router = {"name": "egress-router", "image": "egress-router:latest", "securityContext": {"privileged": True},
              "env": env, "volumeMounts": mounts}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "r", "annotations": {"pod.network.openshift.io/assign-macvlan": "true"}},
            "spec": {"initContainers": [router], "containers": [{"name": "w", "image": "registry.k8s.io/pause:3.9"}],
                     "volumes": volumes}}


def rules_file(path: str) -> list[dict[str, Any]]:
    return [*NETWORK, {"name": "EGRESS_DESTINATION_FILE", "value": path}]


RULES_VOLUME = [{"name": "rules", "configMap": {"name": "rules"}}]
RULES_MOUNT = [{"name": "rules", "mountPath": "/etc/egress"}]
WHERE = "Pod/r: initContainer egress-router"


def validate(tmp_path: Path, *documents: dict[str, Any]) -> Result:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(documents), encoding="utf-8")
    return CliRunner().invoke(main, ["validate", "-f", str(path)],
                              env={name: None for name in os.environ if name.startswith("EGRESS_")})


def lines(result: Result, tmp_path: Path) -> list[str]:
    prefix = f"{tmp_path / 'manifest.yaml'}: "
    return [line.removeprefix(prefix) for line in (result.stdout + result.stderr).splitlines()]


def test_a_rule_file_from_a_configmap_volume_is_checked(tmp_path: Path) -> None:
    result = validate(tmp_path, configmap("rules", {"destination": RULES}),
                      pod(rules_file("/etc/egress/destination"), RULES_MOUNT, RULES_VOLUME))
    assert result.exit_code == 0, result.output
    assert lines(result, tmp_path) == [f"{WHERE}: valid: init mode; source 192.0.2.99/24; gateway 192.0.2.1; "
                                       "2 port rule(s), no fallback"]


def test_a_bad_line_in_the_configmap_names_the_file_and_the_line(tmp_path: Path) -> None:
    result = validate(tmp_path, configmap("rules", {"destination": RULES + "81 tcp 203.0.113\n"}),
                      pod(rules_file("/etc/egress/destination"), RULES_MOUNT, RULES_VOLUME))
    assert result.exit_code == 1
    assert lines(result, tmp_path) == [f"{WHERE}: error: EGRESS_DESTINATION_FILE=/etc/egress/destination line 3: "
                                       "'81 tcp 203.0.113': '203.0.113' is not an IPv4 address"]


@pytest.mark.parametrize(("mount", "volume", "path"), [
    ({"name": "rules", "mountPath": "/etc/egress/"}, {"name": "rules", "configMap": {"name": "rules"}},
     "/etc/egress/..data/destination"),
    ({"name": "rules", "mountPath": "/etc/egress"},
     {"name": "rules", "configMap": {"name": "rules", "items": [{"key": "destination", "path": "nat/rules.txt"}]}},
     "/etc/egress/nat/rules.txt"),
    ({"name": "rules", "mountPath": "/etc/egress-rules", "subPath": "destination"},
     {"name": "rules", "configMap": {"name": "rules"}}, "/etc/egress-rules"),
])
def test_items_subpath_and_the_data_directory(tmp_path: Path, mount: dict[str, Any], volume: dict[str, Any],
                                              path: str) -> None:
    result = validate(tmp_path, configmap("rules", {"destination": RULES}), pod(rules_file(path), [mount], [volume]))
    assert result.exit_code == 0, result.output
    assert "2 port rule(s)" in result.stdout and result.stderr == ""


@pytest.mark.parametrize(("path", "mounts", "volumes", "message"), [
    ("/etc/egress/missing", RULES_MOUNT, RULES_VOLUME,
     "EGRESS_DESTINATION_FILE=/etc/egress/missing: ConfigMap 'rules' (volume 'rules') has no key for 'missing', so "
     "the file will not exist"),
    ("/etc/egress/destination", [{"name": "rulez", "mountPath": "/etc/egress"}], RULES_VOLUME,
     "EGRESS_DESTINATION_FILE=/etc/egress/destination: its volumeMount names volume 'rulez', which the pod does not "
     "define"),
    ("/etc/egress", RULES_MOUNT, RULES_VOLUME,
     "EGRESS_DESTINATION_FILE=/etc/egress: is the mount point of volume 'rules': a directory, not a file"),
    ("/etc/egress/other", RULES_MOUNT,
     [{"name": "rules", "configMap": {"name": "rules", "items": [{"key": "destination", "path": "destination"}]}}],
     "EGRESS_DESTINATION_FILE=/etc/egress/other: ConfigMap 'rules' (volume 'rules') has no key for 'other'"),
])
def test_a_file_that_will_not_exist_is_an_error(tmp_path: Path, path: str, mounts: list[dict[str, Any]],
                                                volumes: list[dict[str, Any]], message: str) -> None:
    result = validate(tmp_path, configmap("rules", {"destination": RULES}), pod(rules_file(path), mounts, volumes))
    assert result.exit_code == 1
    found = lines(result, tmp_path)
    assert len(found) == 1 and found[0].startswith(f"{WHERE}: error: {message}"), found


@pytest.mark.parametrize(("mounts", "volumes", "why"), [
    (RULES_MOUNT, [{"name": "rules", "secret": {"secretName": "rules"}}], "volume 'rules' is a secret"),
    ([], [], "no volumeMount of the container holds it"),
    (RULES_MOUNT, [{"name": "rules", "configMap": {"name": "elsewhere"}}],
     "ConfigMap 'elsewhere' (volume 'rules') is not in the files checked"),
])
def test_a_file_known_only_in_the_cluster_is_a_warning(tmp_path: Path, mounts: list[dict[str, Any]],
                                                       volumes: list[dict[str, Any]], why: str) -> None:
    result = validate(tmp_path, configmap("rules", {"destination": RULES}),
                      pod(rules_file("/etc/egress/destination"), mounts, volumes))
    assert result.exit_code == 0, result.output
    assert lines(result, tmp_path) == [
        f"{WHERE}: partly checked: the rest needs values only the cluster has (see warnings)",
        f"{WHERE}: warning: not fully checked (EGRESS_DESTINATION_FILE: {why}): "
        "EGRESS_DESTINATION_FILE=/etc/egress/destination: was not read"]


def test_a_config_file_from_a_configmap_is_checked_as_the_router_reads_it(tmp_path: Path) -> None:
    env = [{"name": "EGRESS_ROUTER_MODE", "value": "legacy"},
           {"name": "EGRESS_ROUTER_CONFIG_FILE", "value": "/etc/egress/router.yaml"}]
    good = validate(tmp_path, configmap("rules", {"router.yaml": ROUTER}), pod(env, RULES_MOUNT, RULES_VOLUME))
    assert good.exit_code == 0, good.output
    assert lines(good, tmp_path) == [f"{WHERE}: valid: legacy mode; source 192.0.2.97/24; gateway 192.0.2.1; "
                                     "1 port rule(s), no fallback"]
    broken = validate(tmp_path, configmap("rules", {"router.yaml": ROUTER.replace("TCP", "ICMP")}),
                      pod(env, RULES_MOUNT, RULES_VOLUME))
    assert broken.exit_code == 1
    assert lines(broken, tmp_path) == [
        f"{WHERE}: error: EGRESS_ROUTER_CONFIG_FILE=/etc/egress/router.yaml: spec.redirect.redirectRules[0].protocol: "
        "'ICMP' is not TCP, UDP or SCTP"]
    both = validate(tmp_path, configmap("rules", {"router.yaml": ROUTER}),
                    pod([*env, {"name": "EGRESS_GATEWAY", "value": "192.0.2.1"}], RULES_MOUNT, RULES_VOLUME))
    assert both.exit_code == 1
    assert "error: EGRESS_GATEWAY: is set in the environment and also by EGRESS_ROUTER_CONFIG_FILE" in both.stderr


def test_an_egress_router_object_is_checked(tmp_path: Path) -> None:
    router = yaml.safe_load(ROUTER)
    result = validate(tmp_path, router)
    assert result.exit_code == 0, result.output
    assert lines(result, tmp_path) == ["EgressRouter/partners: valid: legacy mode; source 192.0.2.97/24; gateway "
                                       "192.0.2.1; 1 port rule(s), no fallback"]
    router["spec"]["redirect"]["fallbackIP"] = "203.0.113.31"
    warned = validate(tmp_path, router)
    assert warned.exit_code == 0
    assert f"EgressRouter/partners: warning: spec.redirect.fallbackIP: {FALLBACK_NOTE}" in lines(warned, tmp_path)
    router["spec"]["addresses"].append({"ip": "192.0.2.96/24", "gateway": "192.0.2.1"})
    failed = validate(tmp_path, router)
    assert failed.exit_code == 1
    assert lines(failed, tmp_path) == ["EgressRouter/partners: error: spec.addresses: has 2 addresses: egress-router "
                                       "configures one (EGRESS_SOURCE); run one router per reserved address"]


# ---------------------------------------------------------------- podfiles, directly


def test_file_content_through_the_longest_mount() -> None:
    container = {"volumeMounts": [{"name": "a", "mountPath": "/etc"}, {"name": "b", "mountPath": "/etc/egress"}]}
    spec = {"volumes": [{"name": "a", "configMap": {"name": "a"}}, {"name": "b", "configMap": {"name": "b"}}]}
    data = {"a": {"egress": "wrong"}, "b": {"rules": "right"}}
    assert file_content("/etc/egress/rules", container, spec, data.get).text == "right"
    assert file_content("/etc/egressx", container, spec, data.get).error  # /etc's volume, no key 'egressx'


def test_pod_networks_and_their_macvlan() -> None:
    assert pod_networks({"k8s.v1.cni.cncf.io/networks": "lan, other/wan@net2"}) == [(None, "lan"), ("other", "wan")]
    assert pod_networks({"k8s.v1.cni.cncf.io/networks": '[{"name": "lan", "namespace": "n"}]'}) == [("n", "lan")]
    assert pod_networks({}) == []
    lan = nad_object("lan", None, "Private", "eth2")
    assert macvlan_of([lan], [(None, "lan")], "egress") == Macvlan("Private", "eth2")
    assert macvlan_of([lan], [(None, "wan")], None) is None
    assert macvlan_of([nad_object("lan", "a", "VEPA", None)], [(None, "lan")], "b") is None  # another namespace


def test_a_config_file_known_only_in_the_cluster_is_a_warning(tmp_path: Path) -> None:
    env = [{"name": "EGRESS_ROUTER_CONFIG_FILE", "value": "/etc/egress/router.yaml"}]
    secret = validate(tmp_path, pod(env, RULES_MOUNT, [{"name": "rules", "secret": {"secretName": "rules"}}]))
    assert secret.exit_code == 0, secret.output
    assert lines(secret, tmp_path) == [
        f"{WHERE}: partly checked: the rest needs values only the cluster has (see warnings)",
        f"{WHERE}: warning: not fully checked (EGRESS_ROUTER_CONFIG_FILE: volume 'rules' is a secret): the "
        "EgressRouter it names is known only in the cluster"]
    from_secret = [{"name": "EGRESS_ROUTER_CONFIG_FILE",
                    "valueFrom": {"secretKeyRef": {"name": "paths", "key": "router"}}}]
    hidden = validate(tmp_path, pod(from_secret, RULES_MOUNT, RULES_VOLUME))
    assert hidden.exit_code == 0, hidden.output
    assert (f"{WHERE}: warning: not fully checked (EGRESS_ROUTER_CONFIG_FILE comes from secretKeyRef): the "
            "EgressRouter it names is known only in the cluster") in lines(hidden, tmp_path)
    missing = validate(tmp_path, configmap("rules", {"other": "x"}), pod(env, RULES_MOUNT, RULES_VOLUME))
    assert missing.exit_code == 1
    assert lines(missing, tmp_path) == [
        f"{WHERE}: error: EGRESS_ROUTER_CONFIG_FILE=/etc/egress/router.yaml: ConfigMap 'rules' (volume 'rules') has "
        "no key for 'router.yaml', so the file will not exist"]
