"""examples/*.yaml: valid Kubernetes (offline schemas), pass `egress-router validate -f`, and fail it when broken."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner, Result
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from egress_router.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KUBERNETES_VERSION = "1.31.0"  # fixed, so a new kubernetes-validate release cannot change the verdict
NO_SCHEMA = {("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"),  # CRDs: no bundled schema
             ("network.operator.openshift.io/v1", "EgressRouter")}
DOCUMENTATION_NETWORKS = [ipaddress.ip_network(net) for net in
                          ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
EGRESS_IMAGE = "egress-router:latest"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind == "Pod":
        return dict(doc["spec"])
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    assert kind in ("Service", "ConfigMap", "NetworkAttachmentDefinition", "EgressRouter"), \
        f"the test does not know {kind}"
    return None


def egress_containers(path: Path) -> list[tuple[int, str, int, dict[str, Any]]]:
    """(document index, 'initContainers' or 'containers', index, container) of every egress-router container."""
    found = []
    for number, doc in enumerate(documents(path)):
        spec = pod_spec(doc)
        for key in ("initContainers", "containers"):
            for index, container in enumerate((spec or {}).get(key, [])):
                if container["image"] == EGRESS_IMAGE:
                    found.append((number, key, index, container))
    return found


def egress_routers(path: Path) -> list[dict[str, Any]]:
    """The EgressRouter objects of an example: `validate -f` checks each as egress-router would take it."""
    return [doc for doc in documents(path) if doc["kind"] == "EgressRouter"]


def checked(path: Path) -> int:
    """How many `valid:` lines `validate -f` prints for the example."""
    return len(egress_containers(path)) + len(egress_routers(path))


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args, env={name: None for name in os.environ if name.startswith("EGRESS_")})


def test_there_are_examples_of_every_kind_promised() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"redirect-pod.yaml", "redirect-deployment.yaml", "redirect-configmap.yaml", "http-proxy.yaml",
            "http-proxy-single.yaml", "dns-proxy.yaml", "multus-redirect-pod.yaml",
            "multus-redirect-deployment.yaml", "egressrouter.yaml", "egressrouter-configmap.yaml",
            "redirect-reload.yaml", "legacy-redirect-deployment.yaml", "multus-dual-stack-redirect-pod.yaml"} <= names
    index = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    for name in names:
        assert f"[{name}]({name})" in index, f"examples/README.md does not list {name}"


# ---------------------------------------------------------------- (a) offline schema validation


def test_the_schema_validator_is_strict_and_really_checks() -> None:
    """Guard against a validator that passes everything: an unknown field and a numeric env value must fail."""
    pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "X", "value": "1"}]}]}}
    assert kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True) == "1.31"
    for broken in ({**pod, "spec": {**pod["spec"], "hostNetwrok": True}},
                   {**pod, "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "X", "value": 1}]}]}}):
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_passes_strict_schema_validation(path: Path) -> None:
    validated = 0
    for doc in documents(path):
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA:
            # Explicitly: the validator has no schema for this CRD, so it is checked by hand below.
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            if doc["kind"] == "EgressRouter":
                check_egress_router(doc)
            else:
                check_network_attachment_definition(doc)
        else:
            assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.31"
        validated += 1
    # every example has at least the router and its Service, but for the EgressRouter, which is the router
    assert validated >= (1 if egress_routers(path) else 2)


def check_egress_router(doc: dict[str, Any]) -> None:
    """The EgressRouter CRD's schema (openshift/api networkoperator/v1), checked by hand: fields, enums, ranges."""
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"} and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= {"mode", "redirect", "networkInterface", "addresses"}
    assert spec["mode"] == "Redirect" and "redirect" in spec  # Redirect mode requires its config
    assert set(spec["networkInterface"]) == {"macvlan"}
    assert set(spec["networkInterface"]["macvlan"]) <= {"mode", "master"}
    assert spec["networkInterface"]["macvlan"]["mode"] in ("Bridge", "Private", "VEPA", "Passthru")
    for address in spec["addresses"]:
        assert set(address) <= {"ip", "gateway"}
        ipaddress.ip_interface(address["ip"])
        assert "/" in address["ip"]  # CIDR notation
        ipaddress.ip_address(address["gateway"])
    assert set(spec["redirect"]) <= {"redirectRules", "fallbackIP"}
    for rule in spec["redirect"].get("redirectRules", []):
        assert set(rule) <= {"destinationIP", "port", "protocol", "targetPort"}
        assert {"destinationIP", "port", "protocol"} <= set(rule)
        ipaddress.ip_address(rule["destinationIP"])
        assert rule["protocol"] in ("TCP", "UDP", "SCTP")
        assert all(isinstance(rule[key], int) and 1 <= rule[key] <= 65535 for key in ("port", "targetPort")
                   if key in rule)


def check_network_attachment_definition(doc: dict[str, Any]) -> None:
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(doc["spec"]) == {"config"}
    config = json.loads(doc["spec"]["config"])
    assert config["type"] == "macvlan"
    assert config["master"] == "eth0"
    assert config["name"] == doc["metadata"]["name"]
    assert config["ipam"] == {}  # no IPAM: the router configures EGRESS_SOURCE itself
    assert config["mode"] in ("bridge", "private", "vepa", "passthru")
    assert re.fullmatch(r"\d+\.\d+\.\d+", config["cniVersion"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_uses_documentation_addresses_and_the_image(path: Path) -> None:
    content = path.read_text(encoding="utf-8")
    addresses = re.findall(r"(?<![\w.:])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])", content)
    addresses += re.findall(r"(?<![\w:])([0-9a-f]{1,4}:[0-9a-f:]*:[0-9a-f:]*)(?![\w:])", content)
    assert addresses, "an example without addresses?"
    for text in addresses:
        address = ipaddress.ip_address(text)
        assert any(address in net for net in DOCUMENTATION_NETWORKS), f"{text} is not a documentation address"
    containers = egress_containers(path)
    assert containers or egress_routers(path), f"no {EGRESS_IMAGE} container (or EgressRouter) in {path.name}"


# ---------------------------------------------------------------- (b) egress-router validate -f


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_passes_egress_router_validate(path: Path) -> None:
    result = invoke(["validate", "-f", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # not even a warning: the examples show the recommended form
    summaries = result.stdout.splitlines()
    assert len(summaries) == checked(path)
    for line in summaries:
        assert line.startswith(f"{path}: ")
        assert ": valid: " in line


def test_all_examples_together() -> None:
    result = invoke(["validate", *(arg for path in EXAMPLES for arg in ("-f", str(path)))])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == sum(checked(path) for path in EXAMPLES)


# ---------------------------------------------------------------- a broken copy of each example fails


def break_container(docs: list[dict[str, Any]], number: int, key: str, index: int) -> str:
    """Make one container's configuration wrong; the variable that is now wrong."""
    container = pod_spec_of(docs[number])[key][index]
    env = {item["name"]: item for item in container["env"]}
    if "EGRESS_ROUTER_CONFIG_FILE" in env:  # the EgressRouter in the ConfigMap it names: break it there
        configmap = next(doc for doc in docs if doc["kind"] == "ConfigMap"
                         and any("kind: EgressRouter" in value for value in doc["data"].values()))
        key = next(key for key, value in configmap["data"].items() if "kind: EgressRouter" in value)
        router = yaml.safe_load(configmap["data"][key])
        router["spec"]["addresses"][0]["gateway"] = "192.0.2.300"
        configmap["data"][key] = yaml.safe_dump(router)
        return "EGRESS_ROUTER_CONFIG_FILE"
    for variable, bad_line in (("EGRESS_DESTINATION", "8080 tcp 203.0.113.300"),
                               ("EGRESS_HTTP_PROXY_DESTINATION", "203.0.113.0/33"),
                               ("EGRESS_DNS_PROXY_DESTINATION", "0 db.example.com")):
        if variable not in env:
            continue
        item = env[variable]
        if "value" in item:
            item["value"] = item["value"].rstrip("\n") + f"\n{bad_line}\n"
        else:  # from a ConfigMap in the same file: break it there
            ref = item["valueFrom"]["configMapKeyRef"]
            configmap = next(doc for doc in docs if doc["kind"] == "ConfigMap"
                             and doc["metadata"]["name"] == ref["name"])
            configmap["data"][ref["key"]] = configmap["data"][ref["key"]].rstrip("\n") + f"\n{bad_line}\n"
        return variable
    env["EGRESS_GATEWAY"]["value"] = "192.0.2.300"
    return "EGRESS_GATEWAY"


def pod_spec_of(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


BROKEN_CASES = [(path, number, key, index) for path in EXAMPLES
                for number, key, index, _ in egress_containers(path)]


@pytest.mark.parametrize(("path", "number", "key", "index"), BROKEN_CASES,
                         ids=[f"{case[0].name}-{case[2]}-{case[3]}" for case in BROKEN_CASES])
def test_broken_copy_of_example_fails_naming_file_object_and_container(tmp_path: Path, path: Path, number: int,
                                                                       key: str, index: int) -> None:
    docs = documents(path)
    variable = break_container(docs, number, key, index)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    result = invoke(["validate", "-f", str(copy)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    doc = docs[number]
    container = pod_spec_of(doc)[key][index]
    where = f"{copy}: {doc['kind']}/{doc['metadata']['name']}: {key.removesuffix('s')} {container['name']}: error: "
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith(where)]
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(where + variable)
    # the other containers of the example are still reported valid
    assert len(result.stdout.splitlines()) == checked(path) - 1


ROUTER_EXAMPLES = [path for path in EXAMPLES if egress_routers(path)]


@pytest.mark.parametrize("path", ROUTER_EXAMPLES, ids=[path.name for path in ROUTER_EXAMPLES])
def test_broken_copy_of_an_egress_router_example_fails_naming_the_field(tmp_path: Path, path: Path) -> None:
    docs = documents(path)
    router = next(doc for doc in docs if doc["kind"] == "EgressRouter")
    router["spec"]["redirect"]["redirectRules"][-1]["protocol"] = "ICMP"
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    result = invoke(["validate", "-f", str(copy)])
    assert result.exit_code == 1
    index = len(router["spec"]["redirect"]["redirectRules"]) - 1
    assert result.stderr == (f"{copy}: EgressRouter/{router['metadata']['name']}: error: spec.redirect.redirectRules"
                             f"[{index}].protocol: 'ICMP' is not TCP, UDP or SCTP\n")


@pytest.mark.parametrize("path", ROUTER_EXAMPLES, ids=[path.name for path in ROUTER_EXAMPLES])
def test_an_egress_router_example_converts_to_manifests_that_pass_validate(tmp_path: Path, path: Path) -> None:
    for target in ("pod", "deployment"):
        result = invoke(["convert", str(path), "--to", target])
        assert result.exit_code == 0, result.output
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
        for doc in docs:  # the generated objects are valid Kubernetes too (the NAD checked by hand)
            if doc["kind"] == "NetworkAttachmentDefinition":
                config = json.loads(doc["spec"]["config"])
                assert (config["type"], config["ipam"], config["mode"]) == ("macvlan", {}, "bridge")
            else:
                assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.31"
        generated = tmp_path / f"{target}.yaml"
        generated.write_text(result.stdout, encoding="utf-8")
        checked_result = invoke(["validate", "-f", str(generated)])
        assert checked_result.exit_code == 0 and checked_result.stderr == "", checked_result.output
        assert ": valid: init mode; source 192.0.2.99/24" in checked_result.stdout
