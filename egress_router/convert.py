"""`egress-router convert`: an EgressRouter object <-> a legacy-style router Pod or Deployment (or its env list)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .core import egressrouter
from .core import variables as v
from .core.config import given
from .core.egressrouter import EgressRouter
from .core.errors import ConfigError
from .kubedocs import KubeObject, parse_objects
from .manifests import OPENSHIFT_MACVLAN, POD_SPEC_PATHS, configmaps_of, router_containers
from .podfiles import MULTUS_NETWORKS, NAD_KIND, macvlan_of, nad_object, pod_networks

TARGETS = ("env", "pod", "deployment", "egressrouter")
DEFAULT_IMAGE = f"egress-router:{__version__}"  # pinned: `:latest` with IfNotPresent runs whatever a node has
PAUSE_IMAGE = "registry.k8s.io/pause:3.9"
# An init container that runs for a fraction of a second, and a pause container: small, but stated (a namespace
# with a ResourceQuota rejects pods whose containers have none)
INIT_RESOURCES = {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}
PAUSE_RESOURCES = {"requests": {"cpu": "1m", "memory": "1Mi"}, "limits": {"cpu": "10m", "memory": "8Mi"}}


@dataclass(frozen=True, slots=True)
class Converted:
    """The output text (YAML) and the warnings for stderr."""

    text: str
    warnings: tuple[str, ...] = ()


def convert(name: str, text: str, to: str, *, image: str = DEFAULT_IMAGE, macvlan: str = "multus") -> Converted:
    """Convert the objects in `text` (read from `name`); ConfigError on anything without a counterpart."""
    objects, problems = parse_objects(name, text)
    if problems:
        raise ConfigError(name, problems[0])
    routers = [obj for obj in objects if egressrouter.is_egress_router(obj.body)]
    if to == "egressrouter":
        if len(routers) == 1 and len(objects) == 1:  # already one: checked, with the API's defaults spelled out
            router = _from_object(name, routers[0])
            return Converted(dump([router.to_object()]))
        return to_egress_router(name, objects)
    if len(routers) != 1:
        found = ", ".join(obj.label for obj in objects) or "nothing"
        raise ConfigError(name, f"--to {to} converts one EgressRouter object; found {found}"
                          + ("" if routers else " (from a Pod or Deployment: --to egressrouter)"))
    router = _from_object(name, routers[0])
    if to == "env":
        return Converted(dump([env_list(router)], explicit_start=False))
    sdn = macvlan == "openshift-sdn"
    documents = [] if sdn else [nad_object(network_name(router), router.namespace, router.macvlan_mode,
                                           router.master)]
    for document in documents:
        document["metadata"]["labels"] = labels(router, image)
    documents.append(service_account(router, image))
    documents.append(pod_object(router, image, sdn) if to == "pod" else deployment_object(router, image, sdn))
    interface = ("OpenShift SDN's, asked for by the assign-macvlan annotation" if sdn
                 else "Multus', the NetworkAttachmentDefinition below")
    header = (f"# From EgressRouter/{router.name}: the reserved address on a macvlan interface ({interface}),\n"
              "# an init container that configures it and the NAT rules, a pause container that keeps them.\n"
              "# Add a Service for the ports clients use. Check before applying: egress-router validate -f FILE\n")
    warnings: tuple[str, ...] = ()
    if sdn and (router.macvlan_mode != egressrouter.DEFAULT_MACVLAN_MODE or router.master):
        warnings = ("spec.networkInterface.macvlan: dropped: OpenShift SDN's assign-macvlan annotation takes no "
                    "mode or master (use --macvlan multus to keep them)",)
    return Converted(header + dump(documents), warnings)


def _from_object(name: str, obj: KubeObject) -> EgressRouter:
    try:
        return egressrouter.from_object(obj.body)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {obj.label}", str(exc)) from None


def network_name(router: EgressRouter) -> str:
    return f"{router.name}-macvlan"


def env_list(router: EgressRouter) -> list[dict[str, str]]:
    env = {v.MODE.name: "init", **router.env()}
    return [{"name": key, "value": value} for key, value in env.items()]


def labels(router: EgressRouter, image: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels (the version: the image's tag)."""
    return {"app": router.name, "app.kubernetes.io/name": "egress-router", "app.kubernetes.io/instance": router.name,
            "app.kubernetes.io/component": "redirect", "app.kubernetes.io/part-of": "egress-router",
            "app.kubernetes.io/version": image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else "unknown"}


def service_account(router: EgressRouter, image: str) -> dict[str, Any]:
    """The router's own account, without an API token: it never talks to the API server."""
    metadata = {**_identity(router), "labels": labels(router, image)}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata, "automountServiceAccountToken": False}


def pod_template(router: EgressRouter, image: str, sdn: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod's metadata (labels, the macvlan annotation) and its spec: init container + pause container."""
    annotation = {OPENSHIFT_MACVLAN: "true"} if sdn else {MULTUS_NETWORKS: network_name(router)}
    metadata = {"labels": labels(router, image), "annotations": annotation}
    init = {"name": "egress-router", "image": image, "imagePullPolicy": "IfNotPresent",
            "securityContext": {"privileged": True}, "env": env_list(router), "resources": INIT_RESOURCES,
            # the one-line error of a bad configuration shows in `kubectl describe pod`
            "terminationMessagePolicy": "FallbackToLogsOnError"}
    pause = {"name": "egress-router-wait", "image": PAUSE_IMAGE, "imagePullPolicy": "IfNotPresent",
             "resources": PAUSE_RESOURCES,
             "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                 "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": 65535}}
    spec = {"serviceAccountName": router.name, "automountServiceAccountToken": False, "initContainers": [init],
            "containers": [pause]}
    return metadata, spec


def pod_object(router: EgressRouter, image: str, sdn: bool = False) -> dict[str, Any]:
    metadata, spec = pod_template(router, image, sdn)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**_identity(router), **metadata}, "spec": spec}


def deployment_object(router: EgressRouter, image: str, sdn: bool = False) -> dict[str, Any]:
    metadata, spec = pod_template(router, image, sdn)
    # one replica and Recreate: two pods would claim the same reserved address on the LAN
    body = {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": {"app": router.name}},
            "template": {"metadata": metadata, "spec": spec}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {**_identity(router), "labels": labels(router, image)}, "spec": body}


def _identity(router: EgressRouter) -> dict[str, str]:
    return {"name": router.name, **({"namespace": router.namespace} if router.namespace else {})}


@dataclass(frozen=True, slots=True)
class RouterEnvironment:
    """An egress-router container's environment as the kubelet would give it, for `convert`."""

    obj: KubeObject
    container: str
    values: Mapping[str, str]
    files: Mapping[str, str]  # path -> content of the files its variables name, where the files checked hold them
    problems: tuple[str, ...]  # errors, and what is known only in the cluster
    pod_metadata: Mapping[str, Any]


def router_environments(objects: Sequence[KubeObject]) -> list[RouterEnvironment]:
    """Every egress-router container of the workloads among `objects` (ConfigMaps looked up among them too)."""
    configmaps = configmaps_of(objects)
    found = []
    for obj in objects:
        path = POD_SPEC_PATHS.get(obj.kind)
        spec = _at(obj.body, path or ())
        if path is None or not spec:
            continue
        for label, _, env in router_containers(obj, spec, configmaps):
            problems = [message for severity, message in env.problems if severity == "error"]
            problems += [f"{name} comes from {how}: known only in the cluster" for name, how in env.unknown.items()
                         if name.startswith("EGRESS_")]
            problems += [f"{name}: {why}: known only in the cluster" for name, why in env.unread.items()]
            problems += [f"{source}: known only in the cluster" for source in env.opaque]
            found.append(RouterEnvironment(obj, label, dict(env.values), dict(env.files), tuple(problems),
                                           _at(obj.body, (*path[:-1], "metadata"))))
    return found


def _at(body: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    value: Any = body
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def to_egress_router(name: str, objects: Sequence[KubeObject]) -> Converted:
    """The EgressRouter for the one redirect-mode router of a Pod or a workload (its egress-router container)."""
    found = router_environments(objects)
    if not found:
        raise ConfigError(name, "--to egressrouter converts a Pod or a workload with an egress-router container; "
                          "found none")
    proxies = [item for item in found if _proxy(item.values)]
    if len(found) > 1 and not proxies:
        where = ", ".join(f"{item.obj.label} {item.container}" for item in found)
        raise ConfigError(name, f"holds {len(found)} egress-router containers ({where}): an EgressRouter has one "
                          "configuration; convert one at a time")
    item = (proxies or found)[0]  # a proxy has no counterpart: its error says so, rather than picking another
    where = f"{name}: {item.obj.label}: {item.container}"
    if item.problems:
        raise ConfigError(where, item.problems[0])
    router, warnings = _router(item, objects, where)
    comment = "".join(f"# {line}\n" for line in warnings if line.startswith("spec.redirect.fallbackIP"))
    return Converted(comment + dump([router.to_object()]), warnings)


def _proxy(env: Mapping[str, str]) -> bool:
    try:
        mode = v.MODE.read(env)
    except ConfigError:
        return False
    return mode in v.PROXY_MODES or given(env, v.HTTP_DESTINATION) or given(env, v.DNS_DESTINATION)


def _router(item: RouterEnvironment, objects: Sequence[KubeObject], where: str) -> tuple[EgressRouter, tuple[str, ...]]:
    from .sources import with_config_file

    found = item.obj.body.get("metadata")
    metadata: Mapping[str, Any] = found if isinstance(found, dict) else {}
    annotations = item.pod_metadata.get("annotations")
    networks = pod_networks(annotations if isinstance(annotations, Mapping) else {})
    definitions = [obj.body for obj in objects if obj.kind == NAD_KIND]
    macvlan = macvlan_of(definitions, networks, item.obj.namespace)
    notes: tuple[str, ...] = ()
    if macvlan is None and networks:
        notes = (f"the macvlan NetworkAttachmentDefinition of {MULTUS_NETWORKS} is not in the files: "
                 f"spec.networkInterface.macvlan is the API's default (mode {egressrouter.DEFAULT_MACVLAN_MODE})",)
    try:
        env = with_config_file(item.values, item.files)
        router, warnings = egressrouter.from_env(
            env, item.files, name=str(metadata.get("name") or "egress-router"), namespace=item.obj.namespace,
            macvlan_mode=macvlan.mode if macvlan else egressrouter.DEFAULT_MACVLAN_MODE,
            master=macvlan.master if macvlan else None)
    except ConfigError as exc:
        raise ConfigError(where, str(exc)) from None
    return router, (*warnings, *notes)


def dump(documents: Sequence[Any], *, explicit_start: bool = True) -> str:
    """YAML documents; multiline strings (rule lists) as literal blocks, one rule a line."""
    import yaml

    # a representer of our own, not on SafeDumper itself; libyaml's emitter when PyYAML has it (faster)
    dumper_class: Any = type("Dumper", (getattr(yaml, "CSafeDumper", yaml.SafeDumper),), {})

    def text(dumper: Any, value: str) -> Any:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    dumper_class.add_representer(str, text)
    text_out: str = yaml.dump_all(documents, Dumper=dumper_class, sort_keys=False, default_flow_style=False, width=1000,
                                  explicit_start=explicit_start)
    return text_out
