"""The EgressRouter resource (network.operator.openshift.io/v1) <-> our variables, both ways (pure: parsed dicts in).

An EgressRouter in Redirect mode says what EGRESS_SOURCE, EGRESS_GATEWAY and EGRESS_DESTINATION say; what one side
can say and the other cannot is an error naming the field (or the variable), never a silent loss of traffic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv6Address, NetmaskValueError
from typing import Any

from . import variables as v
from .config import NO_FILES, given, load, parse_source
from .errors import ConfigError
from .redirect import Destinations, PortRule, format_destinations
from .values import parse_ipv4

API_VERSION = "network.operator.openshift.io/v1"
KIND = "EgressRouter"
MACVLAN_MODES = ("Bridge", "Private", "VEPA", "Passthru")
DEFAULT_MACVLAN_MODE = "Bridge"  # the CRD's default
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
# Why OpenShift and we differ on fallbackIP: the cluster-network-operator writes it into the NetworkAttachmentDefinition
# it renders (since 2021; at first it did not), but the egress-router CNI plugin that reads that configuration knows
# only addresses, gateway and destinations, so the value goes nowhere and other ports are not redirected.
FALLBACK_NOTE = ("OpenShift's egress router drops it (the egress-router CNI plugin has no such setting: connections "
                 "to ports without a rule are not redirected there); egress-router honours it")
# Variables about how our router does its work, not what it redirects: no EgressRouter field, and nothing lost
# for the traffic when they are dropped (the operator's pod makes these choices itself).
IMPLEMENTATION = (v.DEBUG, v.INTERFACE, v.POD_INTERFACE, v.IPTABLES, v.CLUSTER_CIDRS)
SUPPLIED = {v.SOURCE.name: "spec.addresses[0].ip", v.GATEWAY.name: "spec.addresses[0].gateway",
            v.DESTINATION.name: "spec.redirect"}

_TOP = ("apiVersion", "kind", "metadata", "spec", "status")
_SPEC = ("mode", "redirect", "networkInterface", "addresses")
_ADDRESS = ("ip", "gateway")
_REDIRECT = ("redirectRules", "fallbackIP")
_RULE = ("destinationIP", "port", "protocol", "targetPort")
_MACVLAN = ("mode", "master")


@dataclass(frozen=True, slots=True)
class EgressRouter:
    """What an EgressRouter in Redirect mode asks for, validated, in our terms."""

    name: str
    namespace: str | None
    source: IPv4Interface  # spec.addresses[0].ip, always with its prefix
    gateway: IPv4Address
    destinations: Destinations
    macvlan_mode: str = DEFAULT_MACVLAN_MODE
    master: str | None = None  # the node's interface the macvlan hangs off (None: the operator infers it)

    def env(self) -> dict[str, str]:
        """The variables it supplies (EGRESS_SOURCE, EGRESS_GATEWAY, EGRESS_DESTINATION)."""
        return {v.SOURCE.name: str(self.source), v.GATEWAY.name: str(self.gateway),
                v.DESTINATION.name: format_destinations(self.destinations) + "\n"}

    def to_object(self) -> dict[str, Any]:
        """The EgressRouter object (as a dict ready to dump as YAML or JSON)."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        macvlan: dict[str, Any] = {"mode": self.macvlan_mode}
        if self.master:
            macvlan["master"] = self.master
        redirect: dict[str, Any] = {}
        if self.destinations.rules:
            redirect["redirectRules"] = [_rule_object(rule) for rule in self.destinations.rules]
        if self.destinations.fallback is not None:
            redirect["fallbackIP"] = str(self.destinations.fallback)
        spec = {"addresses": [{"ip": str(self.source), "gateway": str(self.gateway)}], "mode": "Redirect",
                "networkInterface": {"macvlan": macvlan}, "redirect": redirect}
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def _rule_object(rule: PortRule) -> dict[str, Any]:
    item: dict[str, Any] = {"destinationIP": str(rule.ip), "port": rule.port, "protocol": rule.proto.upper()}
    if rule.remote_port is not None:
        item["targetPort"] = rule.remote_port
    return item


def is_egress_router(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == KIND and str(obj.get("apiVersion", "")).startswith(
        "network.operator.openshift.io/")


# ---------------------------------------------------------------- EgressRouter -> ours


def from_object(obj: Any) -> EgressRouter:
    """Validate an EgressRouter object (a parsed YAML or JSON document); ConfigError names the field path."""
    body = _object(obj, "the document", "an EgressRouter object (a mapping)")
    if body.get("kind") != KIND:
        raise ConfigError("kind", f"{body.get('kind')!r} is not {KIND!r}")
    if body.get("apiVersion") != API_VERSION:
        raise ConfigError("apiVersion", f"{body.get('apiVersion')!r} is not {API_VERSION!r}")
    _known(body, _TOP, "")
    metadata = _object(body.get("metadata", {}), "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("metadata.name", "is required")
    namespace = metadata.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise ConfigError("metadata.namespace", f"{namespace!r} is not a string")
    if "spec" not in body:
        raise ConfigError("spec", "is required")
    spec = _object(body["spec"], "spec")
    _known(spec, _SPEC, "spec")
    mode = spec.get("mode", "Redirect")
    if mode != "Redirect":
        raise ConfigError("spec.mode", f"{mode!r} is not Redirect, the only mode egress-router (and the API) has")
    macvlan_mode, master = _interface(spec.get("networkInterface", {}))
    source, gateway = _address(spec.get("addresses"))
    if "redirect" not in spec:
        raise ConfigError("spec.redirect", "is required in mode Redirect")
    destinations = _redirect(spec["redirect"])
    return EgressRouter(name, namespace or None, source, gateway, destinations, macvlan_mode, master)


def _interface(value: Any) -> tuple[str, str | None]:
    interface = _object(value, "spec.networkInterface")
    _known(interface, ("macvlan",), "spec.networkInterface")
    macvlan = _object(interface.get("macvlan", {}), "spec.networkInterface.macvlan")
    _known(macvlan, _MACVLAN, "spec.networkInterface.macvlan")
    mode = macvlan.get("mode", DEFAULT_MACVLAN_MODE)
    if mode not in MACVLAN_MODES:
        raise ConfigError("spec.networkInterface.macvlan.mode", f"{mode!r} is not one of {', '.join(MACVLAN_MODES)}")
    master = macvlan.get("master")
    if master is not None and (not isinstance(master, str) or not master.strip()):
        raise ConfigError("spec.networkInterface.macvlan.master", f"{master!r} is not an interface name")
    return mode, master or None


def _address(value: Any) -> tuple[IPv4Interface, IPv4Address]:
    addresses = _array(value, "spec.addresses")
    if not addresses:
        raise ConfigError("spec.addresses", "is required: one address, the reserved source IP")
    if len(addresses) > 1:
        raise ConfigError("spec.addresses", f"has {len(addresses)} addresses: egress-router configures one "
                          "(EGRESS_SOURCE); run one router per reserved address")
    address = _object(addresses[0], "spec.addresses[0]")
    _known(address, _ADDRESS, "spec.addresses[0]")
    where = "spec.addresses[0].ip"
    text = _string(address.get("ip"), where)
    address_text, slash, _ = text.strip().partition("/")
    _not_ipv6(address_text, where)
    if not slash:
        raise ConfigError(where, f"{text!r} has no prefix length: the API takes CIDR notation, e.g. "
                          f"{address_text}/24 (or /32 for the address alone)")
    try:
        source, _ = parse_source(text)
    except ConfigError as exc:
        raise ConfigError(where, exc.reason) from None
    assert isinstance(source, IPv4Interface), "IPv6 was refused above"
    where = "spec.addresses[0].gateway"
    if "gateway" not in address:
        raise ConfigError(where, "is required here: egress-router does not guess the LAN gateway (EGRESS_GATEWAY)")
    gateway_text = _string(address["gateway"], where).strip()
    _not_ipv6(gateway_text, where)
    gateway = parse_ipv4(gateway_text, where)
    net = source.network
    if gateway == source.ip:
        raise ConfigError(where, f"{gateway_text} is the same address as spec.addresses[0].ip")
    if net.prefixlen <= 30 and gateway in (net.network_address, net.broadcast_address):
        raise ConfigError(where, f"{gateway_text} is the network or broadcast address of {net}")
    return source, gateway


def _redirect(value: Any) -> Destinations:
    redirect = _object(value, "spec.redirect")
    _known(redirect, _REDIRECT, "spec.redirect")
    rules: list[PortRule] = []
    seen: dict[tuple[int, str], int] = {}
    for index, item in enumerate(_array(redirect.get("redirectRules", []), "spec.redirect.redirectRules")):
        where = f"spec.redirect.redirectRules[{index}]"
        rule = _object(item, where)
        _known(rule, _RULE, where)
        if "destinationIP" not in rule:
            raise ConfigError(f"{where}.destinationIP", "is required")
        ip = _ipv4(rule["destinationIP"], f"{where}.destinationIP")
        if "port" not in rule:
            raise ConfigError(f"{where}.port", "is required (1-65535): a destination for every port without a rule "
                              "is spec.redirect.fallbackIP")
        port = _port(rule["port"], f"{where}.port")
        if "protocol" not in rule:
            raise ConfigError(f"{where}.protocol", "is required: TCP, UDP or SCTP")
        protocol = rule["protocol"]
        if not isinstance(protocol, str) or protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol", f"{protocol!r} is not TCP, UDP or SCTP")
        target = _port(rule["targetPort"], f"{where}.targetPort") if "targetPort" in rule else None
        proto = PROTOCOLS[protocol]
        earlier = seen.get((port, proto))
        if earlier is not None:
            raise ConfigError(where, f"{protocol} port {port} is already redirected by redirectRules[{earlier}]")
        seen[(port, proto)] = index
        rules.append(PortRule(port, proto, ip, target, line=index + 1))
    fallback = None
    if redirect.get("fallbackIP") not in (None, ""):
        fallback = _ipv4(redirect["fallbackIP"], "spec.redirect.fallbackIP")
    if not rules and fallback is None:
        raise ConfigError("spec.redirect", "has no redirectRules and no fallbackIP: nothing to redirect")
    return Destinations(tuple(rules), fallback)


def _ipv4(value: Any, where: str) -> IPv4Address:
    text = _string(value, where).strip()
    _not_ipv6(text, where)
    return parse_ipv4(text, where)


def _not_ipv6(text: str, where: str) -> None:
    try:
        IPv6Address(text.partition("/")[0])
    except (AddressValueError, NetmaskValueError, ValueError):
        return
    raise ConfigError(where, f"{text!r} is IPv6: conversion to and from the EgressRouter "
                      "resource is IPv4 only (give an IPv6 egress in the EGRESS_* variables)")


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise ConfigError(where, f"{value!r} is {kind}, not a port number (1-65535)")
    if not 1 <= value <= 65535:
        raise ConfigError(where, f"{value} is not a port number (1-65535)")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"{value!r} is not a string")
    return value


def _object(value: Any, where: str, what: str = "a mapping") -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"is not {what}")
    return value


def _array(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ConfigError(where, "is not a list")
    return value


def _known(body: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Unknown fields are typos the API server would prune or refuse: a rule lost without a word."""
    for key in body:
        if key not in fields:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(path, f"is not a field of {KIND} (known here: {', '.join(fields)})")


# ---------------------------------------------------------------- ours -> EgressRouter


def from_env(env: Mapping[str, str], files: Mapping[str, str] = NO_FILES, *, name: str,
             namespace: str | None = None, macvlan_mode: str = DEFAULT_MACVLAN_MODE,
             master: str | None = None) -> tuple[EgressRouter, tuple[str, ...]]:
    """The EgressRouter for a redirect-mode router's environment, and warnings about what it drops.

    Validated as the router would (core.config.load) first; proxy modes and anything else the API cannot say
    is a ConfigError naming the variable."""
    for grammar in (v.HTTP_DESTINATION, v.DNS_DESTINATION):
        if given(env, grammar):
            named = grammar if grammar.is_set(env) else v.RULE_FILES[grammar.name]
            raise ConfigError(named.name, "has no EgressRouter counterpart: the API has only mode Redirect (no HTTP "
                              "or DNS proxy)")
    if v.MODE.is_set(env) and v.MODE.read(env) not in ("init", "legacy"):
        raise ConfigError(v.MODE.name, f"{v.MODE.read(env)!r} has no EgressRouter counterpart: the API has only "
                          "mode Redirect (egress-router's init and legacy)")
    config = load(env, files)
    if config.family(6) is not None:
        raise ConfigError(v.SOURCE.name, f"has the IPv6 address {config.source6}: the EgressRouter API configures "
                          "IPv4 only; keep the IPv6 egress in the variables")
    assert config.source is not None and config.gateway is not None and config.destinations is not None
    dropped = [f"{variable.name} has no EgressRouter field; dropped (the operator's pod decides it)"
               for variable in IMPLEMENTATION if variable.is_set(env)]
    dropped += [f"{name} only matters to the proxies; dropped" for name, variable in v.VARIABLES.items()
                if variable.is_set(env) and not set(variable.modes) & set(v.NAT_MODES)]
    if config.destinations.fallback is not None:
        dropped.append(f"spec.redirect.fallbackIP: {FALLBACK_NOTE}")
    router = EgressRouter(name, namespace, config.source, config.gateway, config.destinations, macvlan_mode, master)
    return router, (*config.warnings, *dropped)


# ---------------------------------------------------------------- EGRESS_ROUTER_CONFIG_FILE


def with_config_document(env: Mapping[str, str], document: Any, where: str) -> dict[str, str]:
    """`env` plus the variables the EgressRouter `document` supplies (read from `where`, e.g.
    EGRESS_ROUTER_CONFIG_FILE=/etc/egress-router/router.yaml). A variable also set in `env` is an error naming both."""
    try:
        router = from_object(document)
    except ConfigError as exc:
        raise ConfigError(where, str(exc)) from None
    for grammar in (v.HTTP_DESTINATION, v.DNS_DESTINATION):
        if given(env, grammar):
            raise ConfigError(where, f"supplies redirect rules, but {grammar.name} (or its file) asks for a proxy: "
                              "an EgressRouter configures the redirect modes only")
    mode = v.MODE.read(env)
    if mode not in v.NAT_MODES:
        raise ConfigError(v.MODE.name, f"is {mode!r}, but {where} supplies redirect rules: use init or legacy")
    supplied = router.env()
    for name, field in SUPPLIED.items():
        for variable in (v.VARIABLES[name], v.RULE_FILES.get(name)):
            if variable is not None and variable.is_set(env):
                raise ConfigError(variable.name, f"is set in the environment and also by {where} ({field}): "
                                  "set it in one of them")
    return {**env, **supplied}
