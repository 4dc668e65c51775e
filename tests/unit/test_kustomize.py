"""examples/kustomize: every overlay rendered offline with `kubectl kustomize`, valid Kubernetes, and each router in it
checked as `egress-router validate -f` checks it, with what production needs."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from egress_router.manifests import check
from tests.unit.test_examples import KUBERNETES_VERSION, production_problems

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "examples" / "kustomize"
OVERLAYS = {"redirect": "init", "http-proxy": "http-proxy", "dns-proxy": "dns-proxy", "multus": "init"}
# Which kubectl binaries render the overlays: `kubectl` on PATH, or several, separated by os.pathsep (e.g. a
# current kubectl and Debian 12's kubectl 1.20 unpacked elsewhere), so one run shows they render the same.
KUBECTLS = os.environ.get("EGRESS_TEST_KUBECTL", "kubectl").split(os.pathsep)
# kustomize v5 names fields it still renders but no longer likes; anything else on stderr fails the test.
DEPRECATION = re.compile(r"# Warning: '(bases|commonLabels|patchesStrategicMerge)' is deprecated\. .*")
# What kustomize v2.0.3 (Debian 12's kubectl 1.20) knows; newer-only fields (labels, patches, components,
# replicas, sortOptions, ...) would fail there.
V2_FIELDS = {"resources", "bases", "commonLabels", "commonAnnotations", "images", "namespace", "namePrefix",
             "nameSuffix", "patchesStrategicMerge", "patchesJson6902", "configMapGenerator", "secretGenerator",
             "generatorOptions", "vars", "crds", "apiVersion", "kind"}


def kubectl(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: the kustomize overlays are rendered with `kubectl kustomize` "
                    "(on Debian: apt-get install kubernetes-client; .ci/run installs it where no kubectl is)")
    return found


def render(binary: str, overlay: str) -> tuple[str, list[dict[str, Any]]]:
    done = subprocess.run([kubectl(binary), "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": os.devnull})
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if not DEPRECATION.fullmatch(line)] == []
    return done.stdout, [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[str, list[dict[str, Any]]]]:
    return {overlay: render(KUBECTLS[0], overlay) for overlay in OVERLAYS}


def test_there_is_one_overlay_per_mode() -> None:
    assert {path.name for path in (KUSTOMIZE / "overlays").iterdir()} == set(OVERLAYS)


@pytest.mark.parametrize("directory", sorted(str(path.parent.relative_to(KUSTOMIZE))
                                             for path in KUSTOMIZE.rglob("kustomization.yaml")))
def test_only_fields_kustomize_v2_knows(directory: str) -> None:
    kustomization = yaml.safe_load((KUSTOMIZE / directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kustomization) <= V2_FIELDS, set(kustomization) - V2_FIELDS
    for base in kustomization.get("resources", []):  # v2.0.3 takes files only there; directories go in bases
        assert (KUSTOMIZE / directory / base).is_file(), f"{directory}: {base} belongs in bases"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_kubernetes(rendered: dict[str, tuple[str, list[dict[str, Any]]]],
                                          overlay: str) -> None:
    _, docs = rendered[overlay]
    kinds = sorted(doc["kind"] for doc in docs)
    extra = ["NetworkAttachmentDefinition"] if overlay == "multus" else []
    assert kinds == sorted(["Namespace", "ServiceAccount", "Service", "Deployment", *extra])
    for doc in docs:
        if doc["kind"] == "NetworkAttachmentDefinition":  # a CRD: no bundled schema
            config = json.loads(doc["spec"]["config"])
            assert (config["type"], config["ipam"], config["name"]) == ("macvlan", {}, doc["metadata"]["name"])
        else:
            assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.31"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_the_validate_checker_in_its_mode(rendered: dict[str, tuple[str, list[dict[str, Any]]]],
                                                         overlay: str) -> None:
    text, docs = rendered[overlay]
    report = check([(f"overlays/{overlay}", text)])
    assert report.findings == (), [str(finding) for finding in report.findings]  # not even a warning
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    routers = [c for key in ("initContainers", "containers") for c in spec.get(key, [])
               if c["image"].startswith("egress-router:")]
    assert len(report.checked) == len(routers) >= 1
    modes = {entry.config.mode for entry in report.checked if entry.config is not None}
    assert modes == {OVERLAYS[overlay]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_ready_for_production(rendered: dict[str, tuple[str, list[dict[str, Any]]]], overlay: str) -> None:
    _, docs = rendered[overlay]
    assert production_problems(docs) == []
    (namespace,) = [doc for doc in docs if doc["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], doc["metadata"]
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector  # a selector cannot change once applied
    assert selector["app.kubernetes.io/instance"] == namespace["metadata"]["name"]
    (service,) = [doc for doc in docs if doc["kind"] == "Service"]
    assert service["spec"]["selector"] == selector and service["spec"]["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    if overlay == "multus":  # the base's OpenShift annotation removed, the NAD's name asked for
        assert "pod.network.openshift.io/assign-macvlan" not in annotations
        (nad,) = [doc for doc in docs if doc["kind"] == "NetworkAttachmentDefinition"]
        networks = json.loads(annotations["k8s.v1.cni.cncf.io/networks"])
        assert networks == [{"name": nad["metadata"]["name"], "interface": "net1"}]
    else:
        assert annotations == {"pod.network.openshift.io/assign-macvlan": "true"}


def test_every_overlay_has_its_own_address_and_namespace(rendered: dict[str, tuple[str, list[dict[str, Any]]]]) -> None:
    """All four applied side by side: no two pods claim one reserved address."""
    sources, namespaces = [], []
    for _, docs in rendered.values():
        (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
        (setup,) = deployment["spec"]["template"]["spec"]["initContainers"]
        env = {item["name"]: item["value"] for item in setup["env"]}
        sources.append(ipaddress.ip_interface(env["EGRESS_SOURCE"]).ip)
        namespaces.append(deployment["metadata"]["namespace"])
    assert len(set(sources)) == len(sources) == len(OVERLAYS)
    assert len(set(namespaces)) == len(namespaces)
    assert all(source in ipaddress.ip_network("192.0.2.0/24") for source in sources)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kubectl_renders_the_same(rendered: dict[str, tuple[str, list[dict[str, Any]]]], overlay: str) -> None:
    """The first kubectl again (rendering is deterministic) and every other one named in EGRESS_TEST_KUBECTL."""
    for binary in KUBECTLS:
        assert render(binary, overlay)[0] == rendered[overlay][0], binary
