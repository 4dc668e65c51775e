"""What a pod spec's volumes and network annotations hold, offline: a file path -> its ConfigMap key, a Multus
network -> its macvlan settings (pure: parsed manifests in, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
NAD_KIND = "NetworkAttachmentDefinition"
# the CNI macvlan plugin's modes and the EgressRouter API's spelling of them
MACVLAN_MODES = {"bridge": "Bridge", "private": "Private", "vepa": "VEPA", "passthru": "Passthru"}


@dataclass(frozen=True, slots=True)
class FileContent:
    """A file a container would see: its text, or why it is not known (`unknown`) or cannot exist (`error`)."""

    text: str | None = None
    unknown: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Macvlan:
    """A macvlan network attachment: its mode as the EgressRouter API spells it and the node's interface."""

    mode: str
    master: str | None


Lookup = Callable[[Any], Mapping[str, Any] | None]  # a ConfigMap's name -> its data (None: not in the files)


def file_content(path: str, container: Mapping[str, Any], spec: Mapping[str, Any], configmap: Lookup) -> FileContent:
    """The content of `path` in `container` through its volumeMounts, as far as ConfigMap volumes in the same
    files tell; other volumes (Secrets, PVCs, ...) are unknown offline."""
    mounts = [m for m in _list(container.get("volumeMounts")) if isinstance(m, dict)
              and isinstance(m.get("mountPath"), str) and _under(path, m["mountPath"])]
    if not mounts:
        return FileContent(unknown="no volumeMount of the container holds it")
    mount = max(mounts, key=lambda m: len(m["mountPath"].rstrip("/")))
    volume_name = mount.get("name")
    volume = next((vol for vol in _list(spec.get("volumes")) if isinstance(vol, dict)
                   and vol.get("name") == volume_name), None)
    if volume is None:
        return FileContent(error=f"its volumeMount names volume {volume_name!r}, which the pod does not define")
    source = volume.get("configMap")
    if not isinstance(source, dict):
        kind = next((key for key in volume if key != "name"), "an unknown kind")
        return FileContent(unknown=f"volume {volume_name!r} is a {kind}")
    relative = path[len(mount["mountPath"].rstrip("/")):].strip("/")
    sub_path = str(mount.get("subPath") or "").strip("/")
    if sub_path:
        relative = f"{sub_path}/{relative}" if relative else sub_path
    relative = relative.removeprefix("..data/")
    if not relative:
        return FileContent(error=f"is the mount point of volume {volume_name!r}: a directory, not a file")
    name = source.get("name")
    data = configmap(name)
    if data is None:
        return FileContent(unknown=f"ConfigMap {name!r} (volume {volume_name!r}) is not in the files checked")
    items = _list(source.get("items"))
    if items:
        keys = {item.get("path"): item.get("key") for item in items if isinstance(item, dict)}
        key = keys.get(relative)
    else:
        key = relative if "/" not in relative else None
    if key is None or key not in data:
        return FileContent(error=f"ConfigMap {name!r} (volume {volume_name!r}) has no key for {relative!r}, so the "
                                 "file will not exist")
    value = data[key]
    if not isinstance(value, str):
        return FileContent(error=f"ConfigMap {name!r} key {key!r} is {value!r}, not a string")
    return FileContent(text=value)


def _under(path: str, mount_path: str) -> bool:
    base = mount_path.rstrip("/")
    return path == base or path.startswith(base + "/")


def pod_networks(annotations: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """The (namespace, name) of every network the Multus annotation asks for: 'a, ns/b@net2' or a JSON list."""
    value = annotations.get(MULTUS_NETWORKS)
    if not isinstance(value, str) or not value.strip():
        return []
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError:
            return []
        return [(item.get("namespace"), str(item["name"])) for item in _list(items)
                if isinstance(item, dict) and "name" in item]
    networks = []
    for part in value.split(","):
        namespace, _, name = part.strip().split("@", 1)[0].rpartition("/")
        if name:
            networks.append((namespace or None, name))
    return networks


def macvlan_of(definitions: Sequence[Mapping[str, Any]], networks: Sequence[tuple[str | None, str]],
               namespace: str | None) -> Macvlan | None:
    """The macvlan settings of the one macvlan NetworkAttachmentDefinition among `networks` (None: not found)."""
    found = []
    for body in definitions:
        metadata, spec = _mapping(body.get("metadata")), _mapping(body.get("spec"))
        for wanted_namespace, name in networks:
            where, theirs = wanted_namespace or namespace, metadata.get("namespace")
            if metadata.get("name") != name or (None not in (where, theirs) and theirs != where):
                continue
            try:
                config = json.loads(spec.get("config") or "")
            except (json.JSONDecodeError, TypeError):
                continue
            if isinstance(config, dict) and config.get("type") == "macvlan":
                mode = MACVLAN_MODES.get(str(config.get("mode", "bridge")).lower(), "Bridge")
                master = config.get("master")
                found.append(Macvlan(mode, master if isinstance(master, str) and master else None))
    return found[0] if len(found) == 1 else None


def nad_object(name: str, namespace: str | None, mode: str, master: str | None) -> dict[str, Any]:
    """A NetworkAttachmentDefinition for a macvlan interface without IPAM (the router configures the address)."""
    config: dict[str, Any] = {"cniVersion": "0.4.0", "name": name, "type": "macvlan"}
    if master:
        config["master"] = master
    config["mode"] = {spelled: cni for cni, spelled in MACVLAN_MODES.items()}[mode]
    config["ipam"] = {}
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "k8s.cni.cncf.io/v1", "kind": NAD_KIND, "metadata": metadata,
            "spec": {"config": json.dumps(config, indent=2) + "\n"}}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}
