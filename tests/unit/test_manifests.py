"""validate -f: the egress-router containers in Kubernetes manifests, checked offline (pure module and CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from egress_router.cli import main
from egress_router.manifests import Checked, Finding, Report, check

ROOT = Path(__file__).resolve().parents[2]
OPENSHIFT = {"pod.network.openshift.io/assign-macvlan": "true"}
REDIRECT_ENV = {
    "EGRESS_ROUTER_MODE": "init",
    "EGRESS_SOURCE": "192.0.2.99/24",
    "EGRESS_GATEWAY": "192.0.2.1",
    "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n203.0.113.12\n",
}
BAD_DESTINATION = "80 tcp 203.0.113.10\n8080 tcp 203.0.113.300\n"
BAD_DESTINATION_ERROR = ("error: EGRESS_DESTINATION line 2: '8080 tcp 203.0.113.300': '203.0.113.300' is not an "
                         "IPv4 address")


# ---------------------------------------------------------------- builders


def env_list(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "value": value} for name, value in values.items()]


def router(name: str = "egress-router", env: dict[str, str] | None = None, *, privileged: bool = True,
           image: str = "egress-router:latest", **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "env": env_list(REDIRECT_ENV if env is None else env)}
    if privileged:
        container["securityContext"] = {"privileged": True}
    container.update(extra)
    return container


PAUSE = {"name": "wait", "image": "registry.k8s.io/pause:3.9"}


def pod_spec(*init: dict[str, Any], containers: tuple[dict[str, Any], ...] = (PAUSE,)) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    return spec


def workload(kind: str, spec: dict[str, Any], name: str = "r", annotations: dict[str, str] | None = None,
             **fields: Any) -> dict[str, Any]:
    """An object of `kind` whose pod template (at that kind's path) is `spec`."""
    meta = {"annotations": dict(OPENSHIFT if annotations is None else annotations)}
    template = {"metadata": meta, "spec": spec}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}
    if kind == "CronJob":
        body = {"schedule": "@hourly", "jobTemplate": {"spec": {"template": template, **fields}}}
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": {"name": name}, "spec": body}
    body = {"template": template, **fields}
    if kind == "Deployment":
        body.setdefault("strategy", {"type": "Recreate"})
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": body}


def configmap(name: str, data: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def text(*documents: Any) -> str:
    return str(yaml.safe_dump_all(documents, sort_keys=False))


def run(*documents: Any, name: str = "x.yaml") -> Report:
    return check([(name, text(*documents))])


def lines(report: Report) -> list[str]:
    return [str(finding) for finding in report.findings]


def errors(report: Report) -> list[str]:
    return [str(finding) for finding in report.errors]


def warnings(report: Report) -> list[str]:
    return [str(finding) for finding in report.findings if finding.severity == "warning"]


def only_checked(report: Report) -> Checked:
    assert not report.failed, lines(report)
    assert len(report.checked) == 1, report.entries
    return report.checked[0]


# ---------------------------------------------------------------- each kind's pod template


KINDS = ["Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "ReplicationController",
         "DeploymentConfig", "Job", "CronJob"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_finds_its_pod_template(kind: str) -> None:
    report = run(workload(kind, pod_spec(router())))
    checked = only_checked(report)
    assert (checked.file, checked.obj, checked.container) == ("x.yaml", f"{kind}/r", "initContainer egress-router")
    assert checked.config is not None
    assert checked.config.mode == "init"
    assert str(checked.config.source) == "192.0.2.99/24"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_error_line_names_file_object_and_container(kind: str) -> None:
    report = run(workload(kind, pod_spec(router(env={**REDIRECT_ENV, "EGRESS_DESTINATION": BAD_DESTINATION}))))
    assert errors(report) == [f"x.yaml: {kind}/r: initContainer egress-router: {BAD_DESTINATION_ERROR}"]
    assert report.checked == ()


def test_app_container_is_checked_too() -> None:
    legacy = router("egress-router", {**REDIRECT_ENV, "EGRESS_ROUTER_MODE": "legacy"})
    checked = only_checked(run(workload("Pod", pod_spec(containers=(legacy,)))))
    assert checked.container == "container egress-router"
    assert checked.config is not None and checked.config.mode == "legacy"


@pytest.mark.parametrize(
    ("kind", "misplaced"),
    [
        ("CronJob", lambda spec: {"schedule": "@hourly", "template": {"spec": spec}}),  # a Job's path, not a CronJob's
        ("Deployment", lambda spec: {"replicas": 1, "spec": spec}),
        ("Pod", lambda spec: {"template": {"spec": spec}}),
    ],
)
def test_pod_spec_at_the_wrong_path_is_an_error(kind: str, misplaced: Any) -> None:
    body = misplaced(pod_spec(router()))
    if kind == "Pod":
        body = "not a pod spec"
    report = run({"apiVersion": "v1", "kind": kind, "metadata": {"name": "r"}, "spec": body})
    assert len(report.errors) == 1
    assert str(report.errors[0]).startswith(f"x.yaml: {kind}/r: error: no pod spec at ")
    assert report.checked == ()


# ---------------------------------------------------------------- which containers are egress-router's


@pytest.mark.parametrize(
    ("image", "egress"),
    [
        ("egress-router:latest", True),
        ("egress-router", True),
        ("registry.example.com:5000/openshift3/ose-egress-router:v3.11", True),
        ("quay.io/openshift/origin-egress-router@sha256:" + "a" * 64, True),
        ("registry.example.com:5000/egress-router:v1@sha256:" + "b" * 64, True),
        ("egress-router-cni:1.0", False),
        ("registry.example.com/egress-router/pause:3.9", False),
        ("nginx:1.25", False),
    ],
)
def test_container_found_by_image(image: str, egress: bool) -> None:
    container = {"name": "c", "image": image, "securityContext": {"privileged": True}}
    report = run(workload("Pod", pod_spec(containers=(container,))))
    if egress:
        # found: checked, and with no EGRESS_* variables it is a configuration error
        assert errors(report) == ["x.yaml: Pod/r: container c: error: EGRESS_SOURCE: is not set"]
    else:
        assert errors(report)[0].startswith("x.yaml: error: nothing to check")
        assert report.checked == ()


def test_container_found_by_egress_variable_whatever_its_image() -> None:
    checked = only_checked(run(workload("Pod", pod_spec(router(image="registry.example.com/team/relay:2")))))
    assert checked.container == "initContainer egress-router"


def test_other_containers_are_ignored() -> None:
    sidecar = {"name": "app", "image": "nginx:1.25", "env": [{"name": "PORT", "value": 8080}],  # a number: not ours
               "envFrom": [{"configMapRef": {"name": "absent"}}]}
    report = run(workload("Pod", pod_spec(router(), containers=(PAUSE, sidecar))),
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert only_checked(report).container == "initContainer egress-router"
    assert report.findings == ()


@pytest.mark.parametrize(
    "documents",
    [
        [],
        [None],
        [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}],
        [workload("Deployment", pod_spec(containers=({"name": "web", "image": "nginx:1.25"},)))],
    ],
)
def test_a_file_without_an_egress_router_container_is_an_error(documents: list[Any]) -> None:
    report = check([("x.yaml", text(*documents) if documents else "")])
    assert errors(report) == ["x.yaml: error: nothing to check: no egress-router container in this file (an image "
                              "named ...egress-router, or a container setting EGRESS_* variables)"]


# ---------------------------------------------------------------- the environment: ConfigMaps, order, expansion


def ref_env(name: str, configmap_name: str, key: str, optional: bool | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": configmap_name, "key": key}
    if optional is not None:
        ref["optional"] = optional
    return {"name": name, "valueFrom": {"configMapKeyRef": ref}}


def router_with(env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container = router(env={})
    container["env"] = env
    if env_from is not None:
        container["envFrom"] = env_from
    return container


BASE = env_list({k: v for k, v in REDIRECT_ENV.items() if k != "EGRESS_DESTINATION"})


def test_config_map_key_ref_resolved_from_a_block_scalar() -> None:
    manifest = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: routes}
data:
  rules: |
    # web
    80   tcp 203.0.113.10
    8080 tcp 203.0.113.11 80
    203.0.113.12
---
apiVersion: v1
kind: Pod
metadata:
  name: r
  annotations: {pod.network.openshift.io/assign-macvlan: "true"}
spec:
  initContainers:
    - name: egress-router
      image: egress-router:latest
      securityContext: {privileged: true}
      env:
        - {name: EGRESS_ROUTER_MODE, value: init}
        - {name: EGRESS_SOURCE, value: 192.0.2.99/24}
        - {name: EGRESS_GATEWAY, value: 192.0.2.1}
        - name: EGRESS_DESTINATION
          valueFrom: {configMapKeyRef: {name: routes, key: rules}}
  containers: [{name: wait, image: registry.k8s.io/pause:3.9}]
"""
    config = only_checked(check([("x.yaml", manifest)])).config
    assert config is not None and config.destinations is not None
    assert len(config.destinations.rules) == 2
    assert str(config.destinations.fallback) == "203.0.113.12"


def test_config_map_in_another_file_is_found_and_that_file_counts_as_checked() -> None:
    pod = workload("Pod", pod_spec(router_with([*BASE, ref_env("EGRESS_DESTINATION", "routes", "d")])))
    report = check([("cm.yaml", text(configmap("routes", {"d": "203.0.113.12"}))), ("pod.yaml", text(pod))])
    assert only_checked(report).file == "pod.yaml"


def test_config_map_error_in_data_is_reported_for_the_container_that_uses_it() -> None:
    pod = workload("Pod", pod_spec(router_with([*BASE, ref_env("EGRESS_DESTINATION", "routes", "d")])))
    report = run(configmap("routes", {"d": BAD_DESTINATION}), pod)
    assert errors(report) == [f"x.yaml: Pod/r: initContainer egress-router: {BAD_DESTINATION_ERROR}"]


def test_env_from_config_map_with_prefix() -> None:
    data = {"SOURCE": "192.0.2.99/24", "GATEWAY": "192.0.2.1", "DESTINATION": "203.0.113.12"}
    container = router_with([{"name": "EGRESS_ROUTER_MODE", "value": "init"}],
                            [{"configMapRef": {"name": "net"}, "prefix": "EGRESS_"}])
    config = only_checked(run(configmap("net", data), workload("Pod", pod_spec(container)))).config
    assert config is not None and str(config.gateway) == "192.0.2.1"


def test_env_wins_over_env_from_and_later_entries_win() -> None:
    container = router_with([{"name": "EGRESS_GATEWAY", "value": "192.0.2.7"},
                             {"name": "EGRESS_GATEWAY", "value": "192.0.2.254"}],
                            [{"configMapRef": {"name": "net"}}])
    report = run(configmap("net", REDIRECT_ENV), workload("Pod", pod_spec(container)))
    config = only_checked(report).config
    assert config is not None and str(config.gateway) == "192.0.2.254"
    assert warnings(report) == ["x.yaml: Pod/r: initContainer egress-router: warning: env EGRESS_GATEWAY is listed "
                                "more than once; the last one wins"]


def test_dollar_references_are_expanded_as_the_kubelet_does() -> None:
    env = [{"name": "NET", "value": "192.0.2"}, {"name": "EGRESS_SOURCE", "value": "$(NET).99/24"},
           {"name": "EGRESS_GATEWAY", "value": "$(NET).1"}, {"name": "EGRESS_ROUTER_MODE", "value": "init"},
           {"name": "EGRESS_DESTINATION", "value": "80 tcp 203.0.113.10 # $$(NET) is a literal"}]
    config = only_checked(run(workload("Pod", pod_spec(router_with(env))))).config
    assert config is not None and str(config.source) == "192.0.2.99/24" and str(config.gateway) == "192.0.2.1"
    undefined = env_list({**REDIRECT_ENV, "EGRESS_GATEWAY": "$(UNDEFINED)"})
    assert errors(run(workload("Pod", pod_spec(router_with(undefined))))) == [
        "x.yaml: Pod/r: initContainer egress-router: error: EGRESS_GATEWAY: '$(UNDEFINED)' is not an IPv4 address"]


@pytest.mark.parametrize(
    "env_from",
    [[{"configMapRef": {"name": "absent", "optional": True}}], []],
)
def test_optional_references_to_missing_config_maps_are_fine(env_from: list[dict[str, Any]]) -> None:
    env = [*BASE, {"name": "EGRESS_DESTINATION", "value": "203.0.113.12"},
           ref_env("EGRESS_ROUTER_DEBUG", "absent", "debug", optional=True),
           ref_env("EGRESS_POD_INTERFACE", "present", "absent-key", optional=True)]
    report = run(configmap("present", {"other": "x"}), workload("Pod", pod_spec(router_with(env, env_from))))
    config = only_checked(report).config
    assert config is not None and not config.debug and config.pod_interface == "eth0"
    assert report.findings == ()


@pytest.mark.parametrize(
    ("env", "env_from", "message"),
    [
        ([ref_env("EGRESS_DESTINATION", "absent", "d")], None,
         "env EGRESS_DESTINATION: ConfigMap 'absent' is not in the files checked"),
        ([ref_env("EGRESS_DESTINATION", "absent", "d", optional=False)], None,
         "env EGRESS_DESTINATION: ConfigMap 'absent' is not in the files checked"),
        ([ref_env("EGRESS_DESTINATION", "routes", "nope")], None,
         "env EGRESS_DESTINATION: ConfigMap 'routes' has no key 'nope', so the pod cannot start"),
        ([], [{"configMapRef": {"name": "absent"}}], "envFrom: ConfigMap 'absent' is not in the files checked"),
    ],
)
def test_missing_config_map_or_key_is_one_error(env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None,
                                                message: str) -> None:
    report = run(configmap("routes", {"d": "203.0.113.12"}), workload("Pod", pod_spec(router_with([*BASE, *env],
                                                                                              env_from))))
    assert len(report.errors) == 1, lines(report)  # not also 'EGRESS_DESTINATION: is not set', its consequence
    assert str(report.errors[0]).startswith(f"x.yaml: Pod/r: initContainer egress-router: error: {message}")


def test_config_map_in_another_namespace_is_not_used() -> None:
    pod = workload("Pod", pod_spec(router_with([*BASE, ref_env("EGRESS_DESTINATION", "routes", "d")])))
    pod["metadata"]["namespace"] = "egress"
    other = run(configmap("routes", {"d": "203.0.113.12"}, namespace="default"), pod)
    assert "ConfigMap 'routes' is not in the files checked" in errors(other)[0]
    same = run(configmap("routes", {"d": "203.0.113.12"}, namespace="egress"), pod)
    assert only_checked(same).config is not None


@pytest.mark.parametrize(
    ("value_from", "how"),
    [
        ({"secretKeyRef": {"name": "s", "key": "k"}}, "secretKeyRef"),
        ({"fieldRef": {"fieldPath": "metadata.annotations['egress/destination']"}}, "fieldRef"),
        ({"resourceFieldRef": {"resource": "limits.cpu"}}, "resourceFieldRef"),
    ],
)
def test_values_only_the_cluster_knows_are_warnings(value_from: dict[str, Any], how: str) -> None:
    report = run(workload("Pod", pod_spec(router_with([*BASE, {"name": "EGRESS_DESTINATION",
                                                               "valueFrom": value_from}]))))
    assert not report.failed
    where = "x.yaml: Pod/r: initContainer egress-router: warning: "
    assert warnings(report) == [
        f"{where}env EGRESS_DESTINATION comes from {how}: its value cannot be checked offline",
        f"{where}not fully checked (EGRESS_DESTINATION known only in the cluster): EGRESS_DESTINATION: is not set",
    ]
    assert report.checked[0].config is None


def test_secret_for_an_optional_variable_still_checks_the_rest() -> None:
    env = [*env_list(REDIRECT_ENV), {"name": "EGRESS_ROUTER_DEBUG", "valueFrom": {"secretKeyRef": {"name": "s",
                                                                                                   "key": "k"}}}]
    report = run(workload("Pod", pod_spec(router_with(env))))
    assert len(warnings(report)) == 1 and "EGRESS_ROUTER_DEBUG comes from secretKeyRef" in warnings(report)[0]
    assert only_checked(report).config is not None


def test_env_from_secret_is_a_warning() -> None:
    container = router_with(BASE, [{"secretRef": {"name": "routes"}}])
    report = run(workload("Pod", pod_spec(container)))
    assert not report.failed
    assert warnings(report)[0].endswith("warning: envFrom secretRef 'routes': Secret values cannot be checked offline")
    assert "not fully checked (envFrom secretRef 'routes' known only in the cluster)" in warnings(report)[1]


@pytest.mark.parametrize(
    ("value", "kind"),
    [("8080", "a number"), ("yes", "a boolean"), ("true", "a boolean"), ("1.5", "a number"), ("[a]", "a list")],
)
def test_unquoted_numbers_and_booleans_are_errors(value: str, kind: str) -> None:
    manifest = text(workload("Pod", pod_spec(router()))).replace(
        "value: init", f"value: init\n    - name: EGRESS_HTTP_PROXY_PORT\n      value: {value}")
    report = check([("x.yaml", manifest)])
    assert errors(report) == [f"x.yaml: Pod/r: initContainer egress-router: error: env EGRESS_HTTP_PROXY_PORT: value "
                              f"{yaml.safe_load(value)!r} is {kind}, not a string: quote it (the API server rejects "
                              "it)"]


def test_empty_value_and_null_config_map_value() -> None:
    manifest = text(workload("Pod", pod_spec(router()))).replace(
        "value: init", "value: init\n    - name: EGRESS_ROUTER_DEBUG\n      value:")
    config = only_checked(check([("x.yaml", manifest)])).config
    assert config is not None and not config.debug
    pod = workload("Pod", pod_spec(router_with([*env_list(REDIRECT_ENV), ref_env("EGRESS_ROUTER_DEBUG", "c", "d")])))
    assert errors(run(configmap("c", {"d": None}), pod)) == [
        "x.yaml: Pod/r: initContainer egress-router: error: env EGRESS_ROUTER_DEBUG: ConfigMap 'c' key 'd': the value "
        "is null, not a string: write \"\" for an empty value"]


def test_deeply_nested_yaml_is_one_error() -> None:
    report = check([("x.yaml", "[" * 5000 + "]" * 5000)])
    assert errors(report) == ["x.yaml: error: YAML nested too deeply to be a Kubernetes manifest"]


def test_misspelt_variable_is_a_warning_with_a_hint() -> None:
    report = run(workload("Pod", pod_spec(router(env={**REDIRECT_ENV, "EGRESS_GATEWAYS": "192.0.2.1"}))))
    assert not report.failed
    assert warnings(report) == ["x.yaml: Pod/r: initContainer egress-router: warning: EGRESS_GATEWAYS is not a "
                                "variable egress-router knows; it is ignored; did you mean EGRESS_GATEWAY?"]


# ---------------------------------------------------------------- documents, Lists, YAML errors


def test_multiple_documents_in_order() -> None:
    report = run(workload("Pod", pod_spec(router()), name="a"), None,
                 workload("Deployment", pod_spec(router("r2")), name="b", replicas=1))
    assert [(c.obj, c.container) for c in report.checked] == [("Pod/a", "initContainer egress-router"),
                                                              ("Deployment/b", "initContainer r2")]
    assert report.findings == ()


def test_list_items_including_nested_lists() -> None:
    inner = {"apiVersion": "v1", "kind": "List", "items": [workload("Pod", pod_spec(router()), name="b")]}
    outer = {"apiVersion": "v1", "kind": "List", "metadata": {},
             "items": [configmap("unused", {}), workload("Pod", pod_spec(router()), name="a"), inner]}
    report = run(outer)
    assert [c.obj for c in report.checked] == ["Pod/a", "Pod/b"]


def test_typed_list_kind() -> None:
    report = run({"apiVersion": "v1", "kind": "PodList", "items": [workload("Pod", pod_spec(router()))]})
    assert only_checked(report).obj == "Pod/r"


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("kind: Pod\nmetadata:\n  name: r\n   bad: indent\n", "x.yaml: error: YAML syntax error at line 4, column 7: "
                                                             "mapping values are not allowed here"),
        ("kind: Pod\nspec: [a, b\n", "x.yaml: error: YAML syntax error at line 3, column 1: expected ',' or ']', but "
                                     "got '<stream end>'"),
        ("a: 1\n---\nkind: Pod\n\tspec: {}\n", "x.yaml: error: YAML syntax error at line 4, column 1: found character "
                                               "'\\t' that cannot start any token"),
        ("kind: Pod\nname: \x07\n", "x.yaml: error: not YAML: unacceptable character #x0007: special characters are "
                                    "not allowed in \"<unicode string>\", position 16"),
    ],
)
def test_yaml_syntax_errors_are_one_line_with_the_line_number(manifest: str, message: str) -> None:
    report = check([("x.yaml", manifest), ("ok.yaml", text(workload("Pod", pod_spec(router()))))])
    assert lines(report) == [message]
    assert only_checked(Report(report.entries[1:])).file == "ok.yaml"  # the other file is still checked


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("just a string", "document 1 is not a Kubernetes object (a mapping with a kind)"),
        ({"apiVersion": "v1", "metadata": {"name": "r"}}, "document 1 has no kind"),
        ({"apiVersion": "v1", "kind": "List", "items": "x"}, "document 1: List without a list of items"),
    ],
)
def test_documents_that_are_not_objects(document: Any, message: str) -> None:
    assert errors(run(document)) == [f"x.yaml: error: {message}"]


def test_unnamed_object_is_labelled_by_its_document() -> None:
    pod = workload("Pod", pod_spec(router(env={**REDIRECT_ENV, "EGRESS_DESTINATION": BAD_DESTINATION})))
    del pod["metadata"]["name"]
    assert errors(run(configmap("c", {}), pod))[0].startswith(
        "x.yaml: Pod/(unnamed, document 2): initContainer egress-router: error: EGRESS_DESTINATION line 2")


# ---------------------------------------------------------------- production mistakes


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "ReplicaSet", "ReplicationController",
                                  "DeploymentConfig"])
def test_more_than_one_replica_is_an_error(kind: str) -> None:
    report = run(workload(kind, pod_spec(router()), replicas=2))
    assert errors(report) == [f"x.yaml: {kind}/r: initContainer egress-router: error: replicas is 2: every pod claims "
                              "192.0.2.99 on the same LAN (an address conflict); run one pod (replicas: 1), failover "
                              "comes from rescheduling"]
    assert only_checked(run(workload(kind, pod_spec(router()), replicas=1))).obj == f"{kind}/r"
    assert only_checked(run(workload(kind, pod_spec(router())))).obj == f"{kind}/r"  # unset: 1


def test_proxy_only_containers_may_have_replicas() -> None:
    proxy = {"name": "proxy", "image": "egress-router:latest",
             "env": [{"name": "EGRESS_HTTP_PROXY_DESTINATION", "value": "*.example.com"}]}
    checked = only_checked(run(workload("Deployment", pod_spec(containers=(proxy,)), replicas=3)))
    assert checked.config is not None and checked.config.source is None


@pytest.mark.parametrize("kind", ["Job", "CronJob"])
def test_parallel_jobs_are_an_error(kind: str) -> None:
    report = run(workload(kind, pod_spec(router()), parallelism=3))
    assert errors(report) == [f"x.yaml: {kind}/r: initContainer egress-router: error: parallelism is 3: every pod "
                              "claims 192.0.2.99 on the same LAN (an address conflict); set parallelism: 1"]


def test_daemon_set_is_a_warning() -> None:
    report = run(workload("DaemonSet", pod_spec(router())))
    assert not report.failed
    assert "warning: a DaemonSet runs a pod on every matching node" in warnings(report)[0]


def test_rolling_update_deployment_is_a_warning() -> None:
    deployment = workload("Deployment", pod_spec(router()), replicas=1)
    del deployment["spec"]["strategy"]
    report = run(deployment)
    assert not report.failed
    assert warnings(report) == ["x.yaml: Deployment/r: initContainer egress-router: warning: a RollingUpdate starts "
                                "the new pod while the old one still holds 192.0.2.99: use strategy: {type: Recreate}"]


# ---------------------------------------------------------------- high availability (EGRESS_HA_PEERS)


HA_ENV = {"EGRESS_ROUTER_MODE": "legacy", "EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1",
          "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n", "EGRESS_HA_PEERS": "r-peers"}
HA_LABELS = {"app": "r", "tier": "egress"}
HOSTNAME = "kubernetes.io/hostname"
SPREAD = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
    {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": {"app": "r"}}}]}}
ROLLING = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
HA_WHERE = "x.yaml: Deployment/r: container egress-router: "
NO_SPREAD = (HA_WHERE + "warning: EGRESS_HA_PEERS is set but no pod anti-affinity on kubernetes.io/hostname selects "
             "these pods: two replicas on one node fail together (add affinity.podAntiAffinity."
             "requiredDuringSchedulingIgnoredDuringExecution with topologyKey kubernetes.io/hostname)")


def ha_workload(kind: str = "Deployment", env: dict[str, str] | None = None, affinity: Any = SPREAD,
                **fields: Any) -> dict[str, Any]:
    spec = pod_spec(containers=(router(env=HA_ENV if env is None else env),))
    if affinity is not None:
        spec["affinity"] = affinity
    if kind == "Deployment":
        fields.setdefault("strategy", ROLLING)
    if kind != "DaemonSet":
        fields.setdefault("replicas", 2)
    body = workload(kind, spec, **fields)
    template = body["spec"] if kind == "Pod" else body["spec"]["template"]
    template["metadata"]["labels"] = dict(HA_LABELS)
    return body


def service(name: str = "r-peers", selector: dict[str, str] | None = None, namespace: str | None = None,
            **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata,
            "spec": {"selector": {"app": "r"} if selector is None else selector, "ports": [{"port": 9253}], **spec}}


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "ReplicaSet", "ReplicationController",
                                  "DeploymentConfig"])
def test_with_ha_replicas_are_no_error(kind: str) -> None:
    report = run(ha_workload(kind), service(clusterIP="None", publishNotReadyAddresses=True))
    assert lines(report) == []
    config = only_checked(report).config
    assert config is not None and config.ha is not None and config.ha.service == "r-peers"


def test_without_ha_the_replicas_error_and_the_rolling_update_warning_stay() -> None:
    report = run(ha_workload(env={k: v for k, v in HA_ENV.items() if k != "EGRESS_HA_PEERS"}))
    assert lines(report) == [
        HA_WHERE + "error: replicas is 2: every pod claims 192.0.2.99 on the same LAN (an address conflict); run one "
                   "pod (replicas: 1), failover comes from rescheduling",
        HA_WHERE + "warning: a RollingUpdate starts the new pod while the old one still holds 192.0.2.99: use "
                   "strategy: {type: Recreate}"]


def test_ha_peers_only_the_cluster_knows_still_count_as_ha() -> None:
    deployment = ha_workload(env={k: v for k, v in HA_ENV.items() if k != "EGRESS_HA_PEERS"})
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "EGRESS_HA_PEERS", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    assert lines(run(deployment)) == [HA_WHERE + "warning: env EGRESS_HA_PEERS comes from secretKeyRef: its value "
                                                 "cannot be checked offline"]


@pytest.mark.parametrize(("name", "affinity", "spread"), [
    ("required", SPREAD, True),
    ("preferred", {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100,
     "podAffinityTerm": {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": HA_LABELS}}}]}}, True),
    ("expressions", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": HOSTNAME,
     "labelSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["r", "s"]},
                                            {"key": "tier", "operator": "Exists"},
                                            {"key": "canary", "operator": "DoesNotExist"},
                                            {"key": "tier", "operator": "NotIn", "values": ["web"]}]}}]}}, True),
    ("empty selector: every pod", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": HOSTNAME, "labelSelector": {}}]}}, True),
    ("none", None, False),
    ("pod affinity, not anti", {"podAffinity": SPREAD["podAntiAffinity"]}, False),
    ("zones only", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "topology.kubernetes.io/zone", "labelSelector": {"matchLabels": {"app": "r"}}}]}}, False),
    ("other pods", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": HOSTNAME, "labelSelector": {"matchLabels": {"app": "web"}}}]}}, False),
    ("null selector: no pod", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": HOSTNAME}]}}, False),
    ("excluded by NotIn", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "topologyKey": HOSTNAME, "labelSelector": {"matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["egress"]}]}}]}}, False),
    ("unknown operator", {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "topologyKey": HOSTNAME, "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Gt",
                                                                          "values": ["1"]}]}}]}}, False),
])
def test_ha_without_anti_affinity_across_nodes_is_a_warning(name: str, affinity: Any, spread: bool) -> None:
    report = run(ha_workload(affinity=affinity))
    assert not report.failed
    assert lines(report) == ([] if spread else [NO_SPREAD])


def test_ha_daemon_set_is_spread_by_itself_and_claims_nothing_twice() -> None:
    assert lines(run(ha_workload("DaemonSet", affinity=None))) == []
    assert "a DaemonSet runs a pod on every matching node" in lines(run(workload("DaemonSet", pod_spec(router()))))[0]


@pytest.mark.parametrize(("strategy", "replicas", "stalls"), [
    (ROLLING, 2, None),
    ({"type": "Recreate"}, 2, None),
    ({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, 2, "0"),
    ({"type": "RollingUpdate"}, 2, "25%"),  # the default: 25% of 2 replicas rounds down to 0
    (None, 3, "25%"),
    (None, 4, None),  # 25% of 4 is 1
    ({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "50%"}}, 2, None),
])
def test_ha_rolling_update_that_can_replace_no_replica_is_a_warning(strategy: dict[str, Any] | None, replicas: int,
                                                                    stalls: str | None) -> None:
    deployment = ha_workload(strategy=strategy, replicas=replicas)
    if strategy is None:
        del deployment["spec"]["strategy"]
    warning = (HA_WHERE + f"warning: a RollingUpdate with maxUnavailable {stalls} lets no replica go until a new one "
               "is ready, and only the active replica is ever ready: the rollout never replaces any; set "
               "maxUnavailable: 1")
    assert lines(run(deployment)) == ([] if stalls is None else [warning])


NOT_PUBLISHED = (HA_WHERE + "warning: the headless Service/r-peers selects these pods without "
                 "publishNotReadyAddresses: true: the standbys are never ready, so its name never lists them and a "
                 "new replica is not found by its peers")


@pytest.mark.parametrize(("peers", "warned"), [
    (service(clusterIP="None"), True),
    (service(clusterIP="None", publishNotReadyAddresses=False), True),
    (service(clusterIP="None", selector=HA_LABELS, namespace="egress"), True),  # the router's namespace: unset
    (service(clusterIP="None", publishNotReadyAddresses=True), False),
    (service(), False),  # not headless: the clients' Service, whose endpoints must be the ready replica alone
    (service(clusterIP="None", selector={"app": "web"}), False),
    (service(clusterIP="None", selector={}), False),  # selects no pods
])
def test_ha_headless_service_without_not_ready_addresses_is_a_warning(peers: dict[str, Any], warned: bool) -> None:
    assert lines(run(ha_workload(), peers)) == ([NOT_PUBLISHED] if warned else [])


def test_ha_headless_service_in_other_files_or_namespaces() -> None:
    report = check([("x.yaml", text(ha_workload())), ("peers.yaml", text(service(clusterIP="None")))])
    assert lines(report) == [NOT_PUBLISHED]
    deployment = ha_workload()
    deployment["metadata"]["namespace"] = "egress"
    assert lines(run(deployment, service(clusterIP="None", namespace="other"))) == []
    assert lines(run(deployment, service(clusterIP="None", namespace="egress"))) == [NOT_PUBLISHED]


def test_ha_peers_given_as_addresses_need_no_headless_service() -> None:
    report = run(ha_workload(env={**HA_ENV, "EGRESS_HA_PEERS": "198.51.100.11, 198.51.100.12"}),
                 service(clusterIP="None"))
    assert lines(report) == []
    config = only_checked(report).config
    assert config is not None and config.ha is not None and config.ha.service is None


@pytest.mark.parametrize(
    "security_context",
    [None, {}, {"privileged": False}, {"capabilities": {"add": ["NET_RAW"]}}, {"runAsUser": 0},
     {"capabilities": {"drop": ["ALL"]}}],
)
def test_network_container_without_net_admin_is_an_error(security_context: dict[str, Any] | None) -> None:
    container = router(privileged=False)
    if security_context is not None:
        container["securityContext"] = security_context
    assert errors(run(workload("Pod", pod_spec(container)))) == [
        "x.yaml: Pod/r: initContainer egress-router: error: configures the network (EGRESS_SOURCE is set) but has no "
        "NET_ADMIN: set securityContext.privileged: true, or capabilities.add: [NET_ADMIN]"]


@pytest.mark.parametrize("capability", ["NET_ADMIN", "CAP_NET_ADMIN", "net_admin"])
def test_net_admin_capability_is_enough(capability: str) -> None:
    container = router(privileged=False, securityContext={"capabilities": {"add": [capability]}})
    spec = pod_spec(container)
    spec["securityContext"] = {"sysctls": [{"name": "net.ipv4.ip_forward", "value": "1"}]}
    report = run(workload("Pod", spec))
    assert only_checked(report).config is not None
    assert report.findings == ()


def test_capabilities_without_privileged_warn_about_forwarding_and_arp() -> None:
    container = router(privileged=False, securityContext={"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}})
    report = run(workload("Pod", pod_spec(container)))
    assert not report.failed
    assert [w.split(": warning: ")[1].split(":")[0] for w in warnings(report)] == [
        "NET_RAW is dropped", "not privileged, so /proc/sys is read-only"]


def test_proxy_only_container_needs_no_privileges() -> None:
    proxy = {"name": "proxy", "image": "egress-router:latest",
             "securityContext": {"runAsUser": 65534, "capabilities": {"drop": ["ALL"]}},
             "env": [{"name": "EGRESS_DNS_PROXY_DESTINATION", "value": "5432 db.example.com"}]}
    report = run(workload("Pod", pod_spec(router(env={**REDIRECT_ENV, "EGRESS_ROUTER_MODE": "dns-proxy"}),
                                          containers=(proxy,))))
    assert [(c.container, c.config.mode if c.config else None) for c in report.checked] == [
        ("initContainer egress-router", "dns-proxy"), ("container proxy", "dns-proxy")]
    assert report.findings == ()


def test_host_network_is_an_error() -> None:
    spec = pod_spec(router())
    spec["hostNetwork"] = True
    assert "error: hostNetwork: true: the router would reconfigure the node's own network" in errors(
        run(workload("Pod", spec)))[0]


@pytest.mark.parametrize(
    ("annotations", "extra_env", "warned"),
    [
        ({}, {}, True),
        ({"pod.network.openshift.io/assign-macvlan": "false"}, {}, True),
        ({"k8s.v1.cni.cncf.io/networks": "egress-lan"}, {}, False),
        ({}, {"EGRESS_INTERFACE": "eth1"}, False),
        (OPENSHIFT, {}, False),
    ],
)
def test_missing_macvlan_annotation_is_a_warning(annotations: dict[str, str], extra_env: dict[str, str],
                                                 warned: bool) -> None:
    report = run(workload("Deployment", pod_spec(router(env={**REDIRECT_ENV, **extra_env})), annotations=annotations))
    assert not report.failed
    assert any("the pod asks for no macvlan interface" in w for w in warnings(report)) is warned


def test_errors_of_one_container_leave_the_others_checked() -> None:
    bad = router("bad", {**REDIRECT_ENV, "EGRESS_DESTINATION": BAD_DESTINATION})
    report = run(workload("Pod", pod_spec(router("good"), bad), name="p"))
    assert errors(report) == [f"x.yaml: Pod/p: initContainer bad: {BAD_DESTINATION_ERROR}"]
    assert [c.container for c in report.checked] == ["initContainer good"]
    assert report.failed


def test_finding_format() -> None:
    assert str(Finding("error", "m", "f.yaml", "Pod/p", "container c")) == "f.yaml: Pod/p: container c: error: m"
    assert str(Finding("warning", "m", "f.yaml")) == "f.yaml: warning: m"


# ---------------------------------------------------------------- the CLI: validate -f


@pytest.fixture(autouse=True)
def no_egress_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EGRESS_"):
            monkeypatch.delenv(name)


def invoke(args: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, input=stdin, env=env)


def write(path: Path, *documents: Any) -> Path:
    path.write_text(text(*documents), encoding="utf-8")
    return path


def test_cli_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", workload("Pod", pod_spec(router())))
    result = invoke(["validate", "-f", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (f"{path}: Pod/r: initContainer egress-router: valid: init mode; source 192.0.2.99/24; "
                             "gateway 192.0.2.1; 1 port rule(s), fallback 203.0.113.12\n")
    assert result.stderr == ""


def test_cli_error_is_one_line_per_problem_and_exit_1(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", workload("Deployment", pod_spec(
        router(env={**REDIRECT_ENV, "EGRESS_DESTINATION": BAD_DESTINATION})), replicas=2))
    result = invoke(["validate", "-f", str(path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    where = f"{path}: Deployment/r: initContainer egress-router: error: "
    assert result.stderr.splitlines() == [
        where + BAD_DESTINATION_ERROR.removeprefix("error: "),
        where + "replicas is 2: every pod claims 192.0.2.99 on the same LAN (an address conflict); run one pod "
                "(replicas: 1), failover comes from rescheduling",
    ]


def test_cli_repeated_f_resolves_config_maps_across_files(tmp_path: Path) -> None:
    cm = write(tmp_path / "cm.yaml", configmap("routes", {"d": "203.0.113.12"}))
    pod = write(tmp_path / "pod.yaml", workload("Pod", pod_spec(router_with(
        [*BASE, ref_env("EGRESS_DESTINATION", "routes", "d")]))))
    alone = invoke(["validate", "-f", str(pod)])
    assert alone.exit_code == 1 and "ConfigMap 'routes' is not in the files checked" in alone.stderr
    together = invoke(["validate", "-f", str(cm), "--filename", str(pod)])
    assert together.exit_code == 0, together.stderr
    assert together.stdout.startswith(f"{pod}: Pod/r: initContainer egress-router: valid: init mode;")


def test_cli_stdin(tmp_path: Path) -> None:
    result = invoke(["validate", "-f", "-"], stdin=text(workload("Pod", pod_spec(router()))))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("<stdin>: Pod/r: initContainer egress-router: valid: ")
    bad = invoke(["validate", "-f", "-"], stdin="kind: [\n")
    assert bad.exit_code == 1
    assert bad.stderr.splitlines() == ["<stdin>: error: YAML syntax error at line 2, column 1: expected the node "
                                       "content, but found '<stream end>'"]


def test_json_files_are_read_as_json() -> None:
    import json

    pod = json.dumps(workload("Pod", pod_spec(router())), indent="\t")
    assert only_checked(check([("pod.json", pod)])).file == "pod.json"
    cut = pod[:-3]  # the last two closing braces
    assert errors(check([("pod.json", cut)])) == [
        f"pod.json: error: JSON syntax error at line {cut.count(chr(10)) + 1}, column 2: Expecting ',' delimiter"]


def test_cli_directory(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", workload("Pod", pod_spec(router()), name="a"))
    write(tmp_path / "b.yml", workload("Pod", pod_spec(router()), name="b"))
    (tmp_path / "notes.txt").write_text("not a manifest")
    result = invoke(["validate", "-f", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    assert [line.split(": ")[1] for line in result.stdout.splitlines()] == ["Pod/a", "Pod/b"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [("absent.yaml", None, "cannot read: No such file or directory"),
     ("binary.yaml", b"\xff\xfe\x00", "cannot read: 'utf-8' codec can't decode byte 0xff in position 0")],
)
def test_cli_unreadable_file_is_one_line(tmp_path: Path, name: str, content: bytes | None, reason: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    ok = write(tmp_path / "ok.yaml", workload("Pod", pod_spec(router())))
    result = invoke(["validate", "-f", str(path), "-f", str(ok)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0].startswith(f"{path}: error: {reason}")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout.startswith(f"{ok}: Pod/r: ")


def test_cli_nothing_to_check(tmp_path: Path) -> None:
    path = write(tmp_path / "svc.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}})
    result = invoke(["validate", "-f", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}: error: nothing to check: ")


def test_cli_f_ignores_the_callers_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", workload("Pod", pod_spec(router())))
    result = invoke(["validate", "-f", str(path)], env={"EGRESS_DESTINATION": "0 tcp bogus", "EGRESS_TYPO": "1"})
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


def test_cli_f_cannot_be_combined_with_config_options(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", workload("Pod", pod_spec(router())))
    result = invoke(["validate", "-f", str(path), "--source", "192.0.2.5"])
    assert result.exit_code == 2
    assert "--source cannot be combined with -f" in result.stderr


def test_cli_partly_checked_summary(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", workload("Pod", pod_spec(router_with(
        [*BASE, {"name": "EGRESS_DESTINATION", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]))))
    result = invoke(["validate", "-f", str(path)])
    assert result.exit_code == 0
    assert result.stdout == (f"{path}: Pod/r: initContainer egress-router: partly checked: the rest needs values only "
                             "the cluster has (see warnings)\n")
    assert len(result.stderr.splitlines()) == 2


def test_cli_validate_help_documents_f() -> None:
    result = invoke(["validate", "--help"])
    assert result.exit_code == 0
    assert "-f, --filename FILE" in result.stdout


def test_container_start_path_does_not_import_yaml() -> None:
    """The init container runs `egress-router` with no arguments: neither PyYAML nor manifests may load."""
    code = ("import sys; from egress_router import container as entry\n"
            "code = entry.run_container({'EGRESS_ROUTER_MODE': 'unit-test', 'EGRESS_SOURCE': '192.0.2.99',"
            " 'EGRESS_GATEWAY': '192.0.2.1', 'EGRESS_DESTINATION': '203.0.113.12'})\n"
            "import egress_router.cli\n"
            "print(code, 'yaml' in sys.modules, 'egress_router.manifests' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False False"


def test_cli_validate_several_files_as_a_shell_glob_expands_them(tmp_path: Path) -> None:
    """`egress-router validate -f examples/*.yaml`, as the READMEs print it: -f takes the first file, the
    shell's other words are FILE arguments; every file is checked."""
    paths = [write(tmp_path / f"r{n}.yaml", workload("Pod", pod_spec(router()), name=f"r{n}")) for n in range(3)]
    result = invoke(["validate", "-f", *map(str, paths)])
    assert result.exit_code == 0, result.stderr
    assert [line.split(": ", 1)[0] for line in result.stdout.splitlines()] == [str(p) for p in paths]
    assert invoke(["validate", *map(str, paths)]).stdout == result.stdout  # FILE arguments alone
    assert invoke(["validate", str(tmp_path)]).stdout == result.stdout  # a directory


def test_cli_validate_several_files_fails_on_any_bad_one(tmp_path: Path) -> None:
    good = write(tmp_path / "a.yaml", workload("Pod", pod_spec(router())))
    bad = write(tmp_path / "b.yaml", workload("Pod", pod_spec(router_with([*BASE[:2]])), name="b"))
    result = invoke(["validate", "-f", str(good), str(bad)])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{good}: Pod/r: ")
    assert f"{bad}: Pod/b: " in result.stderr


def test_cli_validate_examples_with_the_real_shell_glob() -> None:
    """The README's command line, run by a real shell in the repository."""
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m egress_router validate -f examples/*.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert done.returncode == 0, done.stderr
    checked = {line.split(": ", 1)[0] for line in done.stdout.splitlines()}
    assert checked == {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.yaml")}
