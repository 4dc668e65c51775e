"""examples/*.yaml: valid Kubernetes (offline schemas), pass `egress-router validate -f`, fail it when broken, and
have what production needs (pinned images, labels, resources, probes, termination messages, a ServiceAccount)."""

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

from egress_router import __version__
from egress_router.admin import PAGES
from egress_router.cli import main
from egress_router.core.nat import NatRules
from egress_router.core.plan import build_plan
from egress_router.core.variables import DEFAULT_METRICS_PORT
from egress_router.manifests import check

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KUBERNETES_VERSION = "1.31.0"  # fixed, so a new kubernetes-validate release cannot change the verdict
NO_SCHEMA = {("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition"),  # CRDs: no bundled schema
             ("network.operator.openshift.io/v1", "EgressRouter"),
             ("security.openshift.io/v1", "SecurityContextConstraints"),
             ("monitoring.coreos.com/v1", "PodMonitor")}
DOCUMENTATION_NETWORKS = [ipaddress.ip_network(net) for net in
                          ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
EGRESS_IMAGE = f"egress-router:{__version__}"  # the release the examples are for (setup.cfg reads it)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind == "Pod":
        return dict(doc["spec"])
    if kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    assert kind in ("Service", "ConfigMap", "NetworkAttachmentDefinition", "EgressRouter", "ServiceAccount",
                    "SecurityContextConstraints", "Namespace", "PodMonitor", "PodDisruptionBudget"), \
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
            "redirect-reload.yaml", "legacy-redirect-deployment.yaml", "multus-dual-stack-redirect-pod.yaml",
            "ha-redirect-deployment.yaml", "ha-http-proxy-deployment.yaml"} <= names
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
            elif doc["kind"] == "SecurityContextConstraints":
                check_security_context_constraints(doc)
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


SCC_REQUIRED = {"allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork", "allowHostPID", "allowHostPorts",
                "allowPrivilegedContainer", "allowedCapabilities", "defaultAddCapabilities", "priority",
                "readOnlyRootFilesystem", "requiredDropCapabilities", "volumes"}  # openshift/api's CRD: required
SCC_FIELDS = SCC_REQUIRED | {"apiVersion", "kind", "metadata", "allowPrivilegeEscalation", "allowedUnsafeSysctls",
                             "defaultAllowPrivilegeEscalation", "forbiddenSysctls", "fsGroup", "groups", "runAsUser",
                             "seLinuxContext", "seccompProfiles", "supplementalGroups", "users", "allowedFlexVolumes"}


def check_security_context_constraints(doc: dict[str, Any]) -> None:
    """openshift/api security/v1 SecurityContextConstraints, by hand; and the least privilege egress-router needs."""
    assert SCC_REQUIRED <= set(doc) <= SCC_FIELDS, set(doc) ^ SCC_REQUIRED
    for flag in ("allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork", "allowHostPID", "allowHostPorts",
                 "allowPrivilegedContainer", "allowPrivilegeEscalation"):
        assert doc[flag] is False, flag
    assert doc["allowedCapabilities"] == ["NET_ADMIN", "NET_RAW"]  # nothing more: the minimal set
    assert not set(doc["requiredDropCapabilities"] or ()) & set(doc["allowedCapabilities"])
    for strategy, allowed in (("runAsUser", {"MustRunAs", "MustRunAsRange", "MustRunAsNonRoot", "RunAsAny"}),
                              ("seLinuxContext", {"MustRunAs", "RunAsAny"}), ("fsGroup", {"MustRunAs", "RunAsAny"}),
                              ("supplementalGroups", {"MustRunAs", "RunAsAny"})):
        assert doc[strategy]["type"] in allowed, strategy
    assert "hostPath" not in doc["volumes"] and "*" not in doc["volumes"]


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
        assert production_problems(docs) == []  # as ready to apply as the examples


# ---------------------------------------------------------------- (c) what production needs

ADMIN_PORT = 9253
HA_PEERS = "EGRESS_HA_PEERS"
PAUSE = "registry.k8s.io/pause:"
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
          "app.kubernetes.io/part-of", "app.kubernetes.io/version")
COMPONENTS = {"init": "redirect", "legacy": "redirect", "http-proxy": "http-proxy", "dns-proxy": "dns-proxy"}
QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?")
SCALE = {None: 1.0, "m": 0.001, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(value: Any) -> float:
    match = QUANTITY.fullmatch(str(value))
    assert match, f"{value!r} is not a quantity this test reads"
    return float(match[1]) * SCALE[match[2]]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(Kind/name, pod metadata, pod spec) of every object that makes pods."""
    found = []
    for doc in docs:
        if doc["kind"] == "Pod":
            found.append((f"Pod/{doc['metadata']['name']}", doc["metadata"], doc["spec"]))
        elif "template" in doc.get("spec", {}):
            template = doc["spec"]["template"]
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", template["metadata"], template["spec"]))
    return found


def is_router(container: dict[str, Any]) -> bool:
    return str(container["image"]).split(":")[0].endswith("egress-router")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def production_problems(docs: list[dict[str, Any]], image: str = EGRESS_IMAGE) -> list[str]:
    """What a cluster admin's rollout would trip over, one line each (empty: ready to apply as it is)."""
    problems: list[str] = []
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Namespace":
            continue  # a namespace belongs to the cluster admin, not to one router
        missing = [label for label in LABELS if label not in labels]
        if missing:
            problems.append(f"{where}: no label {', '.join(missing)}")
        elif labels["app.kubernetes.io/name"] != "egress-router" or labels["app.kubernetes.io/version"] != __version__:
            problems.append(f"{where}: labels {labels}")
    for where, metadata, spec in pod_specs(docs):
        labels = metadata.get("labels", {})
        if [label for label in LABELS if label not in labels]:
            problems.append(f"{where}: the pod template lacks app.kubernetes.io labels")
        account = spec.get("serviceAccountName")
        if ("ServiceAccount", account) not in objects:
            problems.append(f"{where}: its serviceAccountName {account!r} is not defined beside it")
        elif objects["ServiceAccount", account].get("automountServiceAccountToken") is not False \
                or spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: the router needs no API token: automountServiceAccountToken: false")
        for key in ("initContainers", "containers"):
            for container in spec.get(key, []):
                problems += container_problems(f"{where}: {key.removesuffix('s')} {container['name']}", key,
                                               container, labels, image)
        if any(HA_PEERS in env_of(container) for container in spec["containers"]):
            problems += ha_problems(where, labels, spec, docs)
    for doc in docs:
        if doc["kind"] != "Service":
            continue
        peers = doc["spec"].get("clusterIP") == "None" and doc["spec"].get("publishNotReadyAddresses") is True
        if doc["spec"].get("publishNotReadyAddresses") and not peers:
            problems.append(f"Service/{doc['metadata']['name']}: sends clients to pods that are not ready")
        for port in doc["spec"]["ports"]:
            if not peers and (port.get("targetPort") == "metrics"
                              or ADMIN_PORT in (port["port"], port.get("targetPort"))):
                problems.append(f"Service/{doc['metadata']['name']}: exposes the admin port to clients")
    return problems


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def ha_problems(where: str, labels: dict[str, str], spec: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """A high-availability router (EGRESS_HA_PEERS): its peers Service, spread, budget, state directory, grace."""
    problems = []
    (router,) = [container for container in spec["containers"] if HA_PEERS in env_of(container)]
    peers = env_of(router)[HA_PEERS].split(".")[0]
    service = next((doc for doc in docs if doc["kind"] == "Service" and doc["metadata"]["name"] == peers), None)
    body = {} if service is None else service["spec"]
    if not selects(body.get("selector", {}), labels) or body.get("clusterIP") != "None" \
            or body.get("publishNotReadyAddresses") is not True:
        problems.append(f"{where}: {HA_PEERS} names no headless Service of these pods with publishNotReadyAddresses")
    anti = spec.get("affinity", {}).get("podAntiAffinity", {})
    terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    if not any(term["topologyKey"] == "kubernetes.io/hostname"
               and selects(term["labelSelector"]["matchLabels"], labels) for term in terms):
        problems.append(f"{where}: no required pod anti-affinity across nodes")
    if not any(doc["kind"] == "PodDisruptionBudget" and selects(doc["spec"]["selector"]["matchLabels"], labels)
               and doc["spec"].get("minAvailable") == 1 for doc in docs):
        problems.append(f"{where}: no PodDisruptionBudget with minAvailable: 1")
    volumes = {volume["name"] for volume in spec.get("volumes", []) if "emptyDir" in volume}
    if not any(mount["mountPath"] == env_of(router).get("EGRESS_HA_STATE_DIR", "/run/egress-router")
               and mount["name"] in volumes for mount in router.get("volumeMounts", [])):
        problems.append(f"{where}: no emptyDir at the state directory")
    if spec.get("terminationGracePeriodSeconds", 30) < 5:
        problems.append(f"{where}: terminationGracePeriodSeconds below 5: no time for the hand-over")
    return problems


def container_problems(where: str, key: str, container: dict[str, Any], pod_labels: dict[str, str],
                       image: str) -> list[str]:
    problems = []
    name, _, tag = str(container["image"]).rpartition(":")
    if not name or "/" in tag or tag == "latest":
        problems.append(f"{where}: image {container['image']!r} is not pinned to a tag")
    elif is_router(container) and container["image"] != image:
        problems.append(f"{where}: image {container['image']!r} is not {image}")
    if container.get("imagePullPolicy") != "IfNotPresent":
        problems.append(f"{where}: imagePullPolicy {container.get('imagePullPolicy')!r}, not IfNotPresent")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                problems.append(f"{where}: no {kind}.{resource} (a ResourceQuota rejects the pod)")
    if not any(problem.startswith(f"{where}: no ") for problem in problems):
        for resource in ("cpu", "memory"):
            if quantity(resources["requests"][resource]) > quantity(resources["limits"][resource]):
                problems.append(f"{where}: requests.{resource} above limits.{resource}")
    if (key == "initContainers" or is_router(container)) and \
            container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        problems.append(f"{where}: terminationMessagePolicy is not FallbackToLogsOnError")
    if key == "containers":
        problems += probe_problems(where, container)
    if is_router(container):
        mode = env_of(container).get("EGRESS_ROUTER_MODE", "http-proxy" if "EGRESS_HTTP_PROXY_DESTINATION" in
                                     env_of(container) else "dns-proxy")
        if pod_labels.get("app.kubernetes.io/component") != COMPONENTS.get(mode, mode):
            problems.append(f"{where}: a {mode} router's pod is labelled component "
                            f"{pod_labels.get('app.kubernetes.io/component')!r}")
    return problems


def probe_problems(where: str, container: dict[str, Any]) -> list[str]:
    """A long-running egress-router container: readiness and liveness, on the admin port (named `metrics`) or
    `egress-router verify`. pause has nothing to answer probes with and is the only container allowed none."""
    if not is_router(container):
        return [] if str(container["image"]).startswith(PAUSE) else [f"{where}: a container the test does not know"]
    problems = []
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    admin = env_of(container).get("EGRESS_METRICS_PORT")
    ha = HA_PEERS in env_of(container)
    for probe, paths in (("readinessProbe", ("/ready",) if ha else ("/ready", "/healthz")),
                         ("livenessProbe", ("/healthz",))):
        spec = container.get(probe)
        if spec is None:
            problems.append(f"{where}: no {probe}")
        elif spec.get("exec", {}).get("command") == ["egress-router", "ready"]:
            if probe != "readinessProbe" or not ha:
                problems.append(f"{where}: {probe} is egress-router ready, which only a high-availability "
                                "router's readiness may be")
            elif spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3) > 2:
                problems.append(f"{where}: readinessProbe follows a takeover more slowly than 2 s")
        elif "httpGet" in spec:
            if spec["httpGet"].get("port") != "metrics" or spec["httpGet"].get("path") not in paths:
                problems.append(f"{where}: {probe} is not {' or '.join(paths)} on the port named metrics")
        elif ha or spec.get("exec", {}).get("command") != ["egress-router", "verify"]:
            problems.append(f"{where}: {probe} is neither the admin port nor egress-router verify")
    if admin is not None and (ports.get("metrics") != int(admin) or int(admin) != ADMIN_PORT):
        problems.append(f"{where}: EGRESS_METRICS_PORT={admin} but containerPort metrics is {ports.get('metrics')}")
    if "metrics" in ports and admin is None:
        problems.append(f"{where}: a metrics port, but EGRESS_METRICS_PORT is not spelled out")
    return problems


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_is_ready_for_production(path: Path) -> None:
    assert production_problems(documents(path)) == []


def test_the_probes_and_the_port_are_the_admin_ports() -> None:
    """What the examples name is what the router serves: its default port, its pages."""
    assert ADMIN_PORT == DEFAULT_METRICS_PORT
    paths = {container[probe]["httpGet"]["path"] for path in EXAMPLES for _, _, spec in pod_specs(documents(path))
             for container in spec["containers"] for probe in ("readinessProbe", "livenessProbe")
             if "httpGet" in container.get(probe, {})}
    assert paths == {"/ready", "/healthz"} and paths < set(PAGES)


def test_the_image_tag_is_the_release_setup_cfg_builds() -> None:
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r"^version = attr: egress_router.__version__$", setup, re.MULTILINE)
    assert f"egress-router:{__version__}" == EGRESS_IMAGE and not EGRESS_IMAGE.endswith(":latest")


ROUTER_POD = """\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: r
  labels: {app.kubernetes.io/name: egress-router, app.kubernetes.io/instance: r, app.kubernetes.io/component: redirect,
           app.kubernetes.io/part-of: cluster-egress, app.kubernetes.io/version: "%(version)s"}
automountServiceAccountToken: false
---
apiVersion: v1
kind: Pod
metadata:
  name: r
  labels: {app.kubernetes.io/name: egress-router, app.kubernetes.io/instance: r, app.kubernetes.io/component: redirect,
           app.kubernetes.io/part-of: cluster-egress, app.kubernetes.io/version: "%(version)s"}
spec:
  serviceAccountName: r
  automountServiceAccountToken: false
  initContainers:
    - name: setup
      image: %(image)s
      imagePullPolicy: IfNotPresent
      terminationMessagePolicy: FallbackToLogsOnError
      env: [{name: EGRESS_ROUTER_MODE, value: init}]
      resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {cpu: 500m, memory: 128Mi}}
  containers:
    - name: router
      image: %(image)s
      imagePullPolicy: IfNotPresent
      terminationMessagePolicy: FallbackToLogsOnError
      env: [{name: EGRESS_ROUTER_MODE, value: legacy}, {name: EGRESS_METRICS_PORT, value: "9253"}]
      ports: [{name: metrics, containerPort: 9253}]
      readinessProbe: {httpGet: {path: /healthz, port: metrics}}
      livenessProbe: {httpGet: {path: /healthz, port: metrics}}
      resources: {requests: {cpu: 20m, memory: 48Mi}, limits: {cpu: 500m, memory: 128Mi}}
"""


def router_pod() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(ROUTER_POD % {"image": EGRESS_IMAGE, "version": __version__})]


def test_the_production_checks_pass_a_good_pod() -> None:
    assert production_problems(router_pod()) == []


def _init(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return docs[1]["spec"]["initContainers"][0]  # type: ignore[no-any-return]


def _router(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return docs[1]["spec"]["containers"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "change", "problem"), [
    ("latest", lambda docs: _init(docs).update(image="egress-router:latest"),
     "Pod/r: initContainer setup: image 'egress-router:latest' is not pinned to a tag"),
    ("untagged", lambda docs: _router(docs).update(image="quay.example/egress-router"),
     "Pod/r: container router: image 'quay.example/egress-router' is not pinned to a tag"),
    ("another release", lambda docs: _router(docs).update(image="egress-router:0.0.9"),
     "Pod/r: container router: image 'egress-router:0.0.9' is not egress-router:" + __version__),
    ("pull policy", lambda docs: _init(docs).update(imagePullPolicy="Always"),
     "Pod/r: initContainer setup: imagePullPolicy 'Always', not IfNotPresent"),
    ("init resources", lambda docs: _init(docs).pop("resources"),
     "Pod/r: initContainer setup: no requests.cpu (a ResourceQuota rejects the pod)"),
    ("no memory limit", lambda docs: _router(docs)["resources"]["limits"].pop("memory"),
     "Pod/r: container router: no limits.memory (a ResourceQuota rejects the pod)"),
    ("request above limit", lambda docs: _router(docs)["resources"]["requests"].update(memory="1Gi"),
     "Pod/r: container router: requests.memory above limits.memory"),
    ("termination message", lambda docs: _init(docs).pop("terminationMessagePolicy"),
     "Pod/r: initContainer setup: terminationMessagePolicy is not FallbackToLogsOnError"),
    ("no readiness", lambda docs: _router(docs).pop("readinessProbe"), "Pod/r: container router: no readinessProbe"),
    ("probe by number", lambda docs: _router(docs)["livenessProbe"]["httpGet"].update(port=9253),
     "Pod/r: container router: livenessProbe is not /healthz on the port named metrics"),
    ("liveness on /ready", lambda docs: _router(docs)["livenessProbe"]["httpGet"].update(path="/ready"),
     "Pod/r: container router: livenessProbe is not /healthz on the port named metrics"),
    ("port mismatch", lambda docs: _router(docs)["env"][1].update(value="9254"),
     "Pod/r: container router: EGRESS_METRICS_PORT=9254 but containerPort metrics is 9253"),
    ("label", lambda docs: docs[1]["metadata"]["labels"].pop("app.kubernetes.io/version"),
     "Pod/r: no label app.kubernetes.io/version"),
    ("component", lambda docs: docs[1]["metadata"]["labels"].update({"app.kubernetes.io/component": "dns-proxy"}),
     "Pod/r: container router: a legacy router's pod is labelled component 'dns-proxy'"),
    ("token", lambda docs: docs[1]["spec"].pop("automountServiceAccountToken"),
     "Pod/r: the router needs no API token: automountServiceAccountToken: false"),
    ("service account", lambda docs: docs[1]["spec"].update(serviceAccountName="other"),
     "Pod/r: its serviceAccountName 'other' is not defined beside it"),
])
def test_the_production_checks_catch_each_regression(name: str, change: Any, problem: str) -> None:
    docs = router_pod()
    change(docs)
    assert problem in production_problems(docs)


# ---------------------------------------------------------------- high availability


HA_EXAMPLE = ROOT / "examples" / "ha-redirect-deployment.yaml"


def _ha(docs: list[dict[str, Any]], kind: str, name: str = "egress-router-ha") -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name)


def _ha_router(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _ha(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def _ha_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _ha(docs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _env(container: dict[str, Any], name: str, value: str | None) -> None:
    container["env"] = [item for item in container["env"] if item["name"] != name]
    if value is not None:
        container["env"].append({"name": name, "value": value})


HA_WHERE = "Deployment/egress-router-ha"
HA_CONTAINER = f"{HA_WHERE}: container egress-router"


@pytest.mark.parametrize(("example", "mode", "name"), [
    (HA_EXAMPLE, "legacy", "egress-router-ha"),
    (ROOT / "examples" / "ha-http-proxy-deployment.yaml", "http-proxy", "egress-http-proxy-ha")])
def test_the_ha_examples_are_one_router_in_two_replicas_behind_two_services(example: Path, mode: str,
                                                                            name: str) -> None:
    docs = documents(example)
    deployment = _ha(docs, "Deployment", name)
    router = deployment["spec"]["template"]["spec"]["containers"][0]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2 and env_of(router)["EGRESS_ROUTER_MODE"] == mode
    peers = _ha(docs, "Service", env_of(router)[HA_PEERS])
    client = _ha(docs, "Service", name)
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert "clusterIP" not in client["spec"] and "publishNotReadyAddresses" not in client["spec"]
    for selector in (peers["spec"]["selector"], client["spec"]["selector"],
                     deployment["spec"]["selector"]["matchLabels"],
                     _ha(docs, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"]):
        assert selects(selector, labels)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1  # see the next test
    assert router["readinessProbe"]["exec"]["command"] == ["egress-router", "ready"]


def test_only_an_ha_example_that_can_roll_passes_validate(tmp_path: Path) -> None:
    """The example as it is: no finding. Its mistakes: one warning each; without EGRESS_HA_PEERS, the error."""
    def stderr(change: Any) -> list[str]:
        docs = documents(HA_EXAMPLE)
        change(docs)
        copy = tmp_path / HA_EXAMPLE.name
        copy.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
        result = invoke(["validate", "-f", str(copy)])
        assert result.exit_code == (1 if result.stderr.count(": error: ") else 0)
        return [line.removeprefix(f"{copy}: {HA_CONTAINER}: ") for line in result.stderr.splitlines()]

    assert stderr(lambda docs: None) == []
    assert stderr(lambda docs: _ha_pod(docs).pop("affinity")) == [
        "warning: EGRESS_HA_PEERS is set but no pod anti-affinity on kubernetes.io/hostname selects these pods: two "
        "replicas on one node fail together (add affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuring"
        "Execution with topologyKey kubernetes.io/hostname)"]
    assert stderr(lambda docs: _ha(docs, "Service", "egress-router-ha-peers")["spec"].pop(
        "publishNotReadyAddresses")) == [
        "warning: the headless Service/egress-router-ha-peers selects these pods without publishNotReadyAddresses: "
        "true: the standbys are never ready, so its name never lists them and a new replica is not found by its "
        "peers"]
    maxunavailable_0 = ("warning: a RollingUpdate with maxUnavailable 0 lets no replica go until a new one is "
                        "ready, and only the active replica is ever ready: the rollout never replaces any; set "
                        "maxUnavailable: 1")
    assert stderr(lambda docs: _ha(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"].update(
        maxSurge=1, maxUnavailable=0)) == [maxunavailable_0]
    assert stderr(lambda docs: _ha(docs, "Deployment")["spec"].pop("strategy")) == [
        maxunavailable_0.replace("maxUnavailable 0", "maxUnavailable 25%")]  # the default: 25% of 2, rounded down
    assert stderr(lambda docs: _env(_ha_router(docs), HA_PEERS, None)) == [
        "error: replicas is 2: every pod claims 192.0.2.96 on the same LAN (an address conflict); run one pod "
        "(replicas: 1), failover comes from rescheduling",
        "warning: a RollingUpdate starts the new pod while the old one still holds 192.0.2.96: use strategy: "
        "{type: Recreate}"]


@pytest.mark.parametrize(("name", "change", "problem"), [
    ("readiness on /healthz", lambda docs: _ha_router(docs).update(readinessProbe={"httpGet": {
        "path": "/healthz", "port": "metrics"}, "periodSeconds": 1, "failureThreshold": 1}),
     f"{HA_CONTAINER}: readinessProbe is not /ready on the port named metrics"),
    ("readiness verify", lambda docs: _ha_router(docs).update(readinessProbe={"exec": {
        "command": ["egress-router", "verify"]}}),
     f"{HA_CONTAINER}: readinessProbe is neither the admin port nor egress-router verify"),
    ("slow readiness", lambda docs: _ha_router(docs)["readinessProbe"].update(periodSeconds=10),
     f"{HA_CONTAINER}: readinessProbe follows a takeover more slowly than 2 s"),
    ("liveness ready", lambda docs: _ha_router(docs).update(livenessProbe={"exec": {
        "command": ["egress-router", "ready"]}}),
     f"{HA_CONTAINER}: livenessProbe is egress-router ready, which only a high-availability router's readiness "
     "may be"),
    ("peers not published", lambda docs: _ha(docs, "Service", "egress-router-ha-peers")["spec"].pop(
        "publishNotReadyAddresses"),
     f"{HA_WHERE}: EGRESS_HA_PEERS names no headless Service of these pods with publishNotReadyAddresses"),
    ("peers elsewhere", lambda docs: _env(_ha_router(docs), HA_PEERS, "egress-router-ha.ns.svc.cluster.local"),
     f"{HA_WHERE}: EGRESS_HA_PEERS names no headless Service of these pods with publishNotReadyAddresses"),
    ("no anti-affinity", lambda docs: _ha_pod(docs).pop("affinity"),
     f"{HA_WHERE}: no required pod anti-affinity across nodes"),
    ("no budget", lambda docs: docs.remove(_ha(docs, "PodDisruptionBudget")),
     f"{HA_WHERE}: no PodDisruptionBudget with minAvailable: 1"),
    ("no state volume", lambda docs: _ha_router(docs).pop("volumeMounts"),
     f"{HA_WHERE}: no emptyDir at the state directory"),
    ("state elsewhere", lambda docs: _env(_ha_router(docs), "EGRESS_HA_STATE_DIR", "/var/run/egress"),
     f"{HA_WHERE}: no emptyDir at the state directory"),
    ("short grace", lambda docs: _ha_pod(docs).update(terminationGracePeriodSeconds=2),
     f"{HA_WHERE}: terminationGracePeriodSeconds below 5: no time for the hand-over"),
    ("clients to standbys", lambda docs: _ha(docs, "Service")["spec"].update(publishNotReadyAddresses=True),
     "Service/egress-router-ha: sends clients to pods that are not ready"),
    ("admin port to clients", lambda docs: _ha(docs, "Service", "egress-router-ha-peers")["spec"].pop("clusterIP"),
     "Service/egress-router-ha-peers: exposes the admin port to clients"),
])
def test_the_production_checks_catch_each_ha_regression(name: str, change: Any, problem: str) -> None:
    docs = documents(HA_EXAMPLE)
    assert production_problems(docs) == []
    change(docs)
    assert problem in production_problems(docs)


def test_egress_router_ready_is_no_probe_of_a_router_without_ha() -> None:
    docs = router_pod()
    _router(docs)["readinessProbe"] = {"exec": {"command": ["egress-router", "ready"]}, "periodSeconds": 1,
                                       "failureThreshold": 1}
    assert production_problems(docs) == ["Pod/r: container router: readinessProbe is egress-router ready, which only "
                                          "a high-availability router's readiness may be"]


def test_an_admin_port_behind_a_fallback_is_exempt_from_it() -> None:
    """A fallback redirects every port without a rule that arrives on the pod interface; the examples' probes
    and scrapes of the admin port must still reach the router: its connections leave the DNAT chain first."""
    report = check([(str(path), path.read_text(encoding="utf-8")) for path in EXAMPLES])
    behind = [entry for entry in report.checked if entry.config is not None and entry.config.metrics_port
              and entry.config.destinations is not None and entry.config.destinations.fallbacks]
    assert [entry.file for entry in behind] == [str(ROOT / "examples" / "egressrouter-configmap.yaml")]
    for entry in behind:
        assert entry.config is not None
        (nat,) = [step for step in build_plan(entry.config, "macvlan0").steps if isinstance(step, NatRules)]
        lines = nat.render().splitlines()
        exempt = lines.index(f"-A EGRESS-ROUTER-DNAT -i eth0 -p tcp -m tcp --dport {ADMIN_PORT} -j RETURN")
        fallback = next(i for i, line in enumerate(lines) if line.endswith("-j DNAT --to-destination 203.0.113.62"))
        assert exempt < fallback


# ---------------------------------------------------------------- the PodMonitor


MONITOR = ROOT / "examples" / "monitoring" / "podmonitor.yaml"


def test_the_pod_monitor_scrapes_every_admin_port_of_the_examples() -> None:
    (monitor,) = documents(MONITOR)
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                                    "podTargetLabels", "sampleLimit"}
    assert [label for label in LABELS if label not in monitor["metadata"]["labels"]] == []
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert quantity(endpoint["scrapeTimeout"].removesuffix("s")) < quantity(endpoint["interval"].removesuffix("s"))
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = 0
    for path in EXAMPLES:
        for where, metadata, spec in pod_specs(documents(path)):
            if any(port.get("name") == "metrics" for container in spec["containers"]
                   for port in container.get("ports", [])):
                assert selector.items() <= metadata["labels"].items(), f"{path.name}: {where} is not scraped"
                scraped += 1
    assert scraped >= 5  # the proxies and the legacy routers with the admin port on
    index = (ROOT / "examples" / "README.md").read_text(encoding="utf-8")
    assert "[monitoring/podmonitor.yaml](monitoring/podmonitor.yaml)" in index
