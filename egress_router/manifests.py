"""Kubernetes YAML -> the egress-router containers in it, each checked as it would start in the cluster (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .core import egressrouter
from .core import variables as v
from .core.config import NAT_MODES, RouterConfig, load
from .core.errors import ConfigError
from .kubedocs import KubeObject, parse_objects
from .podfiles import file_content

Severity = Literal["error", "warning"]

# kind -> keys leading from the object to its PodSpec
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "DeploymentConfig": ("spec", "template", "spec"),  # OpenShift 3.x, apps.openshift.io/v1
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# kinds whose spec.replicas says how many identical pods run at once
REPLICATED = ("Deployment", "StatefulSet", "ReplicaSet", "ReplicationController", "DeploymentConfig")
OPENSHIFT_MACVLAN = "pod.network.openshift.io/assign-macvlan"
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
HOSTNAME = "kubernetes.io/hostname"  # the node label pod anti-affinity spreads replicas over
OFFLINE_SOURCES = ("secretKeyRef", "fieldRef", "resourceFieldRef", "fileKeyRef")

_REFERENCE = re.compile(r"\$\$|\$\(([^)]*)\)")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem, printed as one line: file, object, container (where known), severity, message."""

    severity: Severity
    message: str
    file: str
    obj: str = ""
    container: str = ""

    def __str__(self) -> str:
        return ": ".join([part for part in (self.file, self.obj, self.container) if part]
                         + [self.severity, self.message])


@dataclass(frozen=True, slots=True)
class Checked:
    """An egress-router container without errors; config is None when it needs values only the cluster has."""

    file: str
    obj: str
    container: str
    config: RouterConfig | None

    @property
    def where(self) -> str:
        return ": ".join(part for part in (self.file, self.obj, self.container) if part)


@dataclass(frozen=True, slots=True)
class Report:
    """Everything found, in file and document order."""

    entries: tuple[Finding | Checked, ...]

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(entry for entry in self.entries if isinstance(entry, Finding))

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "error")

    @property
    def checked(self) -> tuple[Checked, ...]:
        return tuple(entry for entry in self.entries if isinstance(entry, Checked))

    @property
    def failed(self) -> bool:
        return bool(self.errors)


@dataclass(frozen=True, slots=True)
class _ConfigMap:
    file: str
    namespace: str | None
    name: str
    data: Mapping[str, Any]


@dataclass(slots=True)
class _Environment:
    """A container's environment as the kubelet would build it, plus what cannot be known offline."""

    values: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # name -> where its value comes from
    opaque: list[str] = field(default_factory=list)  # envFrom sources whose variable names are unknown
    broken: set[str] = field(default_factory=set)  # variables with an error of their own already reported
    incomplete: bool = False  # an envFrom error was reported: any variable may be missing because of it
    problems: list[tuple[Severity, str]] = field(default_factory=list)
    used_files: set[str] = field(default_factory=set)  # files whose ConfigMaps were used
    files: dict[str, str] = field(default_factory=dict)  # path -> content of the files the variables name
    unread: dict[str, str] = field(default_factory=dict)  # file variable -> why its content is unknown offline


def check(sources: Sequence[tuple[str, str]]) -> Report:
    """Check every egress-router container in `sources` ((file name, text) pairs, all read by the caller).

    ConfigMaps are looked up across all the sources, as if they were applied together.
    """
    files = [(name, objects, [Finding("error", problem, name) for problem in problems])
             for name, text in sources for objects, problems in [parse_objects(name, text)]]
    configmaps = configmaps_of([obj for _, objects, _ in files for obj in objects])
    services = [obj for _, objects, _ in files for obj in objects if obj.kind == "Service"]
    checked = []
    used: set[str] = set()
    for _, objects, _ in files:
        found: list[Finding | Checked] = []
        for obj in objects:
            entries, files_used = _check_object(obj, configmaps, services)
            found += entries
            used |= files_used
        checked.append(found)
    report: list[Finding | Checked] = []
    for (name, _, problems), found in zip(files, checked, strict=True):
        report += problems + found
        if not problems and not found and name not in used:
            report.append(Finding("error", "nothing to check: no egress-router container in this file (an image "
                                  "named ...egress-router, or a container setting EGRESS_* variables)", name))
    return Report(tuple(report))


def configmaps_of(objects: Sequence[KubeObject]) -> list[_ConfigMap]:
    """The ConfigMaps among `objects`, for router_containers to look references up in."""
    return [_ConfigMap(obj.file, obj.namespace, _mapping(obj.body["metadata"])["name"], _mapping(obj.body.get("data")))
            for obj in objects
            if obj.kind == "ConfigMap" and isinstance(_mapping(obj.body.get("metadata")).get("name"), str)]


def _check_object(obj: KubeObject, configmaps: Sequence[_ConfigMap],
                  services: Sequence[KubeObject] = ()) -> tuple[list[Finding | Checked], set[str]]:
    """The findings and summaries of one object's egress-router containers, and the files whose ConfigMaps it used
    (`services`: the Services applied with it, for a high-availability router's peers)."""
    if egressrouter.is_egress_router(obj.body):
        return _check_egress_router(obj), set()
    path = POD_SPEC_PATHS.get(obj.kind)
    if path is None:
        return [], set()
    spec = _nested(obj.body, path) if isinstance(_nested_any(obj.body, path), dict) else None
    if spec is None:
        return [Finding("error", f"no pod spec at {'.'.join(path)}", obj.file, obj.label)], set()
    pod_metadata = _nested(obj.body, path[:-1] + ("metadata",))
    entries: list[Finding | Checked] = []
    used: set[str] = set()
    for label, container, env in router_containers(obj, spec, configmaps):
        problems = list(env.problems)
        config = _load(env, problems)
        claims = (config.configures_network if config is not None
                  else bool(env.values.get("EGRESS_SOURCE", "").strip()) or "EGRESS_SOURCE" in env.unknown
                  or v.CONFIG_FILE.is_set(env.values))
        if claims:
            problems += _privilege_problems(container, spec, config)
            problems += _placement_problems(obj, spec, pod_metadata, env, config, services)
        used |= env.used_files  # with the files of the Services of peers
        entries += [Finding(severity, message, obj.file, obj.label, label) for severity, message in problems]
        if not any(severity == "error" for severity, _ in problems):
            entries.append(Checked(obj.file, obj.label, label, config))
    return entries, used


def router_containers(obj: KubeObject, spec: Mapping[str, Any],
                      configmaps: Sequence[_ConfigMap]) -> Iterator[tuple[str, Mapping[str, Any], _Environment]]:
    """Each egress-router container of a pod spec: its label, the container and its environment (files read)."""
    for key, title in (("initContainers", "initContainer"), ("containers", "container")):
        for container in _list(spec.get(key)):
            if not isinstance(container, dict):
                continue
            env = _environment(container, configmaps, obj.namespace)
            if _is_egress_router(container, env):
                _read_files(env, container, spec, configmaps, obj.namespace)
                yield f"{title} {container.get('name') or '(unnamed)'}", container, env


def _read_files(env: _Environment, container: Mapping[str, Any], spec: Mapping[str, Any],
                configmaps: Sequence[_ConfigMap], namespace: str | None) -> None:
    """The files the variables name, through the container's volumeMounts to ConfigMap volumes in the same files."""
    def lookup(name: Any) -> Mapping[str, Any] | None:
        configmap = _find(configmaps, name, namespace)
        if configmap is not None:
            env.used_files.add(configmap.file)
        return None if configmap is None else configmap.data

    for variable in (v.CONFIG_FILE, *v.RULE_FILES.values()):
        if variable.name in env.unknown or variable.name in env.broken or not variable.is_set(env.values):
            continue
        try:
            path = variable.read(env.values)
        except ConfigError:
            continue  # load() reports the bad path itself
        content = file_content(path, container, spec, lookup)
        if content.text is not None:
            env.files[path] = content.text
        elif content.error:
            env.problems.append(("error", f"{variable.name}={path}: {content.error}"))
            env.broken.add(variable.name)
        else:
            env.unread[variable.name] = content.unknown


def _check_egress_router(obj: KubeObject) -> list[Finding | Checked]:
    """An EgressRouter object, checked as egress-router would take it from EGRESS_ROUTER_CONFIG_FILE."""
    try:
        router = egressrouter.from_object(obj.body)
        config = load({**router.env(), v.MODE.name: "legacy"})
    except ConfigError as exc:
        return [Finding("error", str(exc), obj.file, obj.label)]
    found: list[Finding | Checked] = []
    if router.destinations.fallback is not None:
        found.append(Finding("warning", f"spec.redirect.fallbackIP: {egressrouter.FALLBACK_NOTE}", obj.file, obj.label))
    return [*found, Checked(obj.file, obj.label, "", config)]


def _environment(container: Mapping[str, Any], configmaps: Sequence[_ConfigMap], namespace: str | None) -> _Environment:
    """envFrom first, then env in order (later wins), with $(VAR) references expanded as the kubelet does."""
    env = _Environment()
    for source in _list(container.get("envFrom")):
        source = _mapping(source)
        prefix = str(source.get("prefix") or "")
        if "configMapRef" in source:
            ref = _mapping(source["configMapRef"])
            configmap = _find(configmaps, ref.get("name"), namespace)
            if configmap is None:
                if not ref.get("optional"):
                    env.problems.append(("error", f"envFrom: {_missing_configmap(ref.get('name'))}"))
                    env.incomplete = True
                continue
            env.used_files.add(configmap.file)
            for key, value in configmap.data.items():
                if _string_value(env, f"envFrom: ConfigMap {configmap.name!r} key {key!r}", value):
                    env.values[prefix + str(key)] = value
                else:
                    env.broken.add(prefix + str(key))
        elif "secretRef" in source:
            secret = _mapping(source["secretRef"]).get("name")
            env.opaque.append(f"envFrom secretRef {secret!r}")
            env.problems.append(("warning", f"envFrom secretRef {secret!r}: Secret values cannot be checked offline"))
    seen: set[str] = set()
    for item in _list(container.get("env")):
        item = _mapping(item)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            env.problems.append(("error", "an env entry has no name"))
            continue
        if name in seen:
            env.problems.append(("warning", f"env {name} is listed more than once; the last one wins"))
        seen.add(name)
        value_from = _mapping(item.get("valueFrom"))
        if not value_from:
            value = "" if item.get("value") is None else item["value"]  # `value:` alone is an empty value
            if not _string_value(env, f"env {name}", value):
                env.broken.add(name)
            else:
                env.values[name] = _expand(value, env, name)
                if name in env.unknown and name.startswith("EGRESS_"):
                    env.problems.append(("warning", f"env {name} uses {env.unknown[name]}: its value cannot be "
                                                    "checked offline"))
            continue
        env.values.pop(name, None)
        env.unknown.pop(name, None)
        env.broken.discard(name)
        if "configMapKeyRef" in value_from:
            ref = _mapping(value_from["configMapKeyRef"])
            configmap = _find(configmaps, ref.get("name"), namespace)
            wanted = str(ref.get("key"))
            if configmap is not None and wanted in configmap.data:
                env.used_files.add(configmap.file)
                value = configmap.data[wanted]
                if _string_value(env, f"env {name}: ConfigMap {configmap.name!r} key {wanted!r}", value):
                    env.values[name] = value
                else:
                    env.broken.add(name)
            elif not ref.get("optional"):
                missing = (_missing_configmap(ref.get("name")) if configmap is None
                           else f"ConfigMap {configmap.name!r} has no key {wanted!r}, so the pod cannot start "
                                "(or set optional: true)")
                env.problems.append(("error", f"env {name}: {missing}"))
                env.broken.add(name)
            elif configmap is not None:
                env.used_files.add(configmap.file)
            continue
        how = next((kind for kind in OFFLINE_SOURCES if kind in value_from), "an unknown valueFrom")
        env.unknown[name] = how
        if name.startswith("EGRESS_"):
            env.problems.append(("warning", f"env {name} comes from {how}: its value cannot be checked offline"))
    return env


def _expand(value: str, env: _Environment, name: str) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others kept as written, $$ is a '$'."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        reference = match.group(1)
        if reference in env.unknown:
            env.unknown[name] = f"$({reference}) from {env.unknown[reference]}"
        return env.values.get(reference, match.group(0))

    env.unknown.pop(name, None)
    return _REFERENCE.sub(replace, value)


def _string_value(env: _Environment, what: str, value: Any) -> bool:
    """The API server takes only strings here; YAML turns 8080, yes and on into numbers and booleans."""
    if isinstance(value, str):
        return True
    if value is None:
        env.problems.append(("error", f"{what}: the value is null, not a string: write \"\" for an empty value"))
        return False
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, int | float)
            else f"a {type(value).__name__}")
    env.problems.append(("error", f"{what}: value {value!r} is {kind}, not a string: quote it (the API server "
                                  "rejects it)"))
    return False


def _find(configmaps: Sequence[_ConfigMap], name: Any, namespace: str | None) -> _ConfigMap | None:
    """An object without a namespace lands in the namespace it is applied to: it matches any."""
    for configmap in configmaps:
        if configmap.name == name and (None in (configmap.namespace, namespace) or configmap.namespace == namespace):
            return configmap
    return None


def _missing_configmap(name: Any) -> str:
    return (f"ConfigMap {name!r} is not in the files checked, so the pod cannot start if it is not in the cluster "
            "(add its file with another -f, or set optional: true)")


def _is_egress_router(container: Mapping[str, Any], env: _Environment) -> bool:
    image = container.get("image")
    if isinstance(image, str):
        repository = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
        if repository.endswith("egress-router"):
            return True
    names = [_mapping(item).get("name") for item in _list(container.get("env"))]
    return any(isinstance(name, str) and name.startswith("EGRESS_") for name in [*names, *env.values])


def _load(env: _Environment, problems: list[tuple[Severity, str]]) -> RouterConfig | None:
    """config.load(); an error that may only come from a value we could not see is a warning, not an error."""
    name = v.CONFIG_FILE.name
    if name in env.broken:
        return None  # its error is reported: the rest follows from it
    if name in env.unread or name in env.unknown:
        why = f"{name}: {env.unread[name]}" if name in env.unread else f"{name} comes from {env.unknown[name]}"
        problems.append(("warning", f"not fully checked ({why}): the EgressRouter it names is known only in the "
                                    "cluster"))
        return None
    try:
        values: Mapping[str, str] = env.values
        if v.CONFIG_FILE.is_set(values) and v.CONFIG_FILE.read(values) in env.files:
            from .sources import with_config_file  # the EgressRouter document is parsed (YAML) where it is read

            values = with_config_file(values, env.files)
        config = load(values, env.files)
    except ConfigError as exc:
        if env.incomplete or any(name == exc.variable or name in str(exc) for name in env.broken):
            return None  # a consequence of an error already reported for that variable
        hidden = [name for name in env.unknown if name == exc.variable or name in str(exc)]
        unread = [f"{name}: {why}" for name, why in env.unread.items() if name in str(exc)]
        if hidden or unread or env.opaque:
            why = ", ".join(hidden) or ", ".join(env.opaque)
            why = ", ".join([f"{why} known only in the cluster"] * bool(hidden or not unread) + unread)
            problems.append(("warning", f"not fully checked ({why}): {exc}"))
        else:
            problems.append(("error", str(exc)))
        return None
    problems += [("warning", warning) for warning in config.warnings]
    return config


def _privilege_problems(container: Mapping[str, Any], spec: Mapping[str, Any],
                        config: RouterConfig | None) -> list[tuple[Severity, str]]:
    context = _mapping(container.get("securityContext"))
    if context.get("privileged") is True:
        return []
    capabilities = _mapping(context.get("capabilities"))
    added = {_capability(name) for name in _list(capabilities.get("add"))}
    dropped = {_capability(name) for name in _list(capabilities.get("drop"))}
    if not added & {"NET_ADMIN", "ALL"}:
        return [("error", "configures the network (EGRESS_SOURCE is set) but has no NET_ADMIN: set "
                          "securityContext.privileged: true, or capabilities.add: [NET_ADMIN]")]
    problems: list[tuple[Severity, str]] = []
    if dropped & {"NET_RAW", "ALL"} and not added & {"NET_RAW", "ALL"}:
        problems.append(("warning", "NET_RAW is dropped: the gratuitous ARP announcement is skipped, so the "
                                    "gateway may keep the reserved IP's old MAC address for minutes"))
    sysctls = {_mapping(item).get("name"): _mapping(item).get("value")
               for item in _list(_mapping(spec.get("securityContext")).get("sysctls"))}
    if config is not None and config.mode in NAT_MODES and str(sysctls.get("net.ipv4.ip_forward")) != "1":
        problems.append(("warning", "not privileged, so /proc/sys is read-only: set the pod sysctl "
                                    "net.ipv4.ip_forward=1 (allowed by kubelet --allowed-unsafe-sysctls) unless the "
                                    "pod's network already forwards"))
    if config is not None and 6 in config.versions and \
            str(sysctls.get("net.ipv6.conf.all.forwarding")) != "1":
        problems.append(("warning", "not privileged, so /proc/sys is read-only: an IPv6 EGRESS_SOURCE needs the pod "
                                    "sysctls net.ipv6.conf.all.forwarding=1 and, for the egress interface, accept_ra=0 "
                                    "and disable_ipv6=0 (or run it privileged)"))
    return problems


def _placement_problems(obj: KubeObject, spec: Mapping[str, Any], pod_metadata: Mapping[str, Any], env: _Environment,
                        config: RouterConfig | None, services: Sequence[KubeObject] = ()) -> list[tuple[Severity, str]]:
    """Mistakes of the object around the container: more than one pod claiming the source IP (unless high
    availability elects one), replicas of a high-availability router that fail together, or no macvlan."""
    source = (str(config.source.ip) if config is not None and config.source is not None
              else env.values.get("EGRESS_SOURCE", "").strip().partition("/")[0] or "EGRESS_SOURCE")
    claim = f"every pod claims {source} on the same LAN (an address conflict)"
    problems: list[tuple[Severity, str]] = []
    if spec.get("hostNetwork") is True:
        problems.append(("error", "hostNetwork: true: the router would reconfigure the node's own network; "
                                  "egress-router needs a pod network namespace with a macvlan interface"))
    body = _mapping(obj.body.get("spec"))
    # with EGRESS_HA_PEERS, keepalived lets exactly one replica hold the address: several pods are the point
    ha = (config is not None and config.ha is not None) or bool(env.values.get(v.HA_PEERS.name, "").strip()) \
        or v.HA_PEERS.name in env.unknown
    if ha:
        problems += _ha_problems(obj, spec, pod_metadata, env, config, services)
    elif obj.kind in REPLICATED:
        replicas = body.get("replicas", 1)
        if _count(replicas) > 1:
            problems.append(("error", f"replicas is {replicas}: {claim}; run one pod (replicas: 1), failover "
                                      "comes from rescheduling"))
        strategy = _mapping(body.get("strategy"))
        if obj.kind == "Deployment" and strategy.get("type", "RollingUpdate") != "Recreate":
            problems.append(("warning", "a RollingUpdate starts the new pod while the old one still holds "
                                        f"{source}: use strategy: {{type: Recreate}}"))
    elif obj.kind == "DaemonSet":
        problems.append(("warning", f"a DaemonSet runs a pod on every matching node and {claim}: make sure its "
                                    "nodeSelector matches a single node, or use a Deployment with replicas: 1"))
    elif obj.kind in ("Job", "CronJob"):
        job = body if obj.kind == "Job" else _nested(body, ("jobTemplate", "spec"))
        parallelism = job.get("parallelism", 1)
        if _count(parallelism) > 1:
            problems.append(("error", f"parallelism is {parallelism}: {claim}; set parallelism: 1"))
    annotations = _mapping(pod_metadata.get("annotations"))
    if (annotations.get(OPENSHIFT_MACVLAN) != "true" and MULTUS_NETWORKS not in annotations
            and not env.values.get("EGRESS_INTERFACE")):
        problems.append(("warning", f"the pod asks for no macvlan interface: add the annotation {OPENSHIFT_MACVLAN}: "
                                    f"\"true\" (OpenShift 3.x) or {MULTUS_NETWORKS} (Multus), or set EGRESS_INTERFACE"))
    return problems


def _ha_problems(obj: KubeObject, spec: Mapping[str, Any], pod_metadata: Mapping[str, Any], env: _Environment,
                 config: RouterConfig | None, services: Sequence[KubeObject]) -> list[tuple[Severity, str]]:
    """A high-availability router: replicas spread over nodes, and a headless Service of peers that lists standbys."""
    problems: list[tuple[Severity, str]] = []
    labels = _mapping(pod_metadata.get("labels"))
    anti = _mapping(_mapping(spec.get("affinity")).get("podAntiAffinity"))
    terms = [*_list(anti.get("requiredDuringSchedulingIgnoredDuringExecution")),
             *(_mapping(item).get("podAffinityTerm") for item in
               _list(anti.get("preferredDuringSchedulingIgnoredDuringExecution")))]
    if obj.kind != "DaemonSet" and not any(  # a DaemonSet has one pod per node by itself
            _mapping(term).get("topologyKey") == HOSTNAME and _selects(_mapping(term).get("labelSelector"), labels)
            for term in terms):
        problems.append(("warning", f"{v.HA_PEERS.name} is set but no pod anti-affinity on {HOSTNAME} selects "
                                    "these pods: two replicas on one node fail together (add affinity.podAntiAffinity"
                                    f".requiredDuringSchedulingIgnoredDuringExecution with topologyKey {HOSTNAME})"))
    strategy = _mapping(_mapping(obj.body.get("spec")).get("strategy"))
    if obj.kind == "Deployment" and strategy.get("type", "RollingUpdate") == "RollingUpdate":
        unavailable = _mapping(strategy.get("rollingUpdate")).get("maxUnavailable", "25%")
        replicas = _count(_mapping(obj.body.get("spec")).get("replicas", 1))
        percent = re.fullmatch(r"(\d+)%", unavailable) if isinstance(unavailable, str) else None
        if (replicas * int(percent[1]) // 100 if percent else _count(unavailable)) == 0:  # percentages round down
            problems.append(("warning", f"a RollingUpdate with maxUnavailable {unavailable} lets no replica go until "
                                        "a new one is ready, and only the active replica is ever ready: the rollout "
                                        "never replaces any; set maxUnavailable: 1"))
    by_name = config.ha.service is not None if config is not None and config.ha is not None else True
    for service in services if by_name else ():
        body = _mapping(service.body.get("spec"))
        selector = _mapping(body.get("selector"))
        if (body.get("clusterIP") != "None" or not selector or not selector.items() <= labels.items()
                or not (None in (service.namespace, obj.namespace) or service.namespace == obj.namespace)):
            continue
        env.used_files.add(service.file)  # a file of the peers' Service alone is checked with the router
        if body.get("publishNotReadyAddresses") is not True:
            problems.append(("warning", f"the headless {service.label} selects these pods without "
                                        "publishNotReadyAddresses: true: the standbys are never ready, so its name "
                                        "never lists them and a new replica is not found by its peers"))
    return problems


def _selects(selector: Any, labels: Mapping[str, Any]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels; a null one selects nothing."""
    if not isinstance(selector, dict):
        return False
    if not _mapping(selector.get("matchLabels")).items() <= labels.items():
        return False
    for expression in map(_mapping, _list(selector.get("matchExpressions"))):
        key, values = str(expression.get("key")), _list(expression.get("values"))
        present = key in labels
        matched = {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                   "Exists": present, "DoesNotExist": not present}
        if not matched.get(str(expression.get("operator"))):
            return False
    return True


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _capability(name: Any) -> str:
    text = str(name).upper()
    return text[4:] if text.startswith("CAP_") else text


def _nested(body: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    return _mapping(_nested_any(body, path))


def _nested_any(body: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = body
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
