"""The EgressRouter resource <-> our variables: the documented example, field-path errors, round trips (property
tests), EGRESS_ROUTER_CONFIG_FILE as the configuration source (and its reload), `egress-router convert`."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_router.cli import main
from egress_router.core.config import RouterConfig, load
from egress_router.core.egressrouter import FALLBACK_NOTE, EgressRouter, from_env, from_object, with_config_document
from egress_router.core.errors import ConfigError
from egress_router.core.plan import build_plan
from egress_router.core.redirect import Destinations, PortRule, parse_destinations
from egress_router.sources import FileWatch, load_config, watched_paths

# The example of the OpenShift 4 documentation ("Deploying an egress router pod in redirect mode"), written out
# with documentation addresses: two rules, one with a targetPort, and a fallback.
DOCUMENTED = """\
apiVersion: network.operator.openshift.io/v1
kind: EgressRouter
metadata:
  name: egress-router-redirect
spec:
  networkInterface: {
    macvlan: {
      mode: "Bridge"
    }
  }
  addresses: [
    {
      ip: "192.0.2.99/24",
      gateway: "192.0.2.1"
    }
  ]
  mode: Redirect
  redirect: {
    redirectRules: [
      {
        destinationIP: "203.0.113.10",
        port: 80,
        protocol: UDP
      },
      {
        destinationIP: "203.0.113.11",
        port: 8080,
        targetPort: 80,
        protocol: TCP
      },
      {
        destinationIP: "203.0.113.12",
        port: 8443,
        targetPort: 443,
        protocol: TCP
      }
    ],
    fallbackIP: "203.0.113.13"
  }
"""
DOCUMENTED_ENV = {
    "EGRESS_SOURCE": "192.0.2.99/24",
    "EGRESS_GATEWAY": "192.0.2.1",
    "EGRESS_DESTINATION": "80 udp 203.0.113.10\n8080 tcp 203.0.113.11 80\n8443 tcp 203.0.113.12 443\n203.0.113.13\n",
}


def documented() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DOCUMENTED)
    return document


def error_of(obj: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        from_object(obj)
    return str(caught.value)


def test_the_documented_example_gives_the_variables_the_legacy_image_took() -> None:
    router = from_object(documented())
    assert router.env() == DOCUMENTED_ENV
    assert (router.name, router.namespace, router.macvlan_mode, router.master) == \
        ("egress-router-redirect", None, "Bridge", None)
    config = load({**router.env(), "EGRESS_ROUTER_MODE": "init"})
    assert config.destinations is not None and config.destinations.fallback == IPv4Address("203.0.113.13")
    assert [(r.port, r.proto, str(r.ip), r.target_port) for r in config.destinations.rules] == [
        (80, "udp", "203.0.113.10", 80), (8080, "tcp", "203.0.113.11", 80), (8443, "tcp", "203.0.113.12", 443)]
    # and back: the same object, the defaults the API fills in spelled out
    again = router.to_object()
    assert from_object(again) == router
    assert again["spec"]["redirect"] == documented()["spec"]["redirect"]
    assert again["spec"]["addresses"] == documented()["spec"]["addresses"]


def set_at(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `obj` with the dotted `path` (list indexes as numbers) set to `value`; '<del>' deletes it."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node: Any = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key_or_index: Any = int(last) if isinstance(node, list) else last
    if value == "<del>":
        del node[key_or_index]
    else:
        node[key_or_index] = value
    return obj


RULES = "spec.redirect.redirectRules"
ERRORS = [
    (f"{RULES}.2.protocol", "ICMP", "spec.redirect.redirectRules[2].protocol: 'ICMP' is not TCP, UDP or SCTP"),
    (f"{RULES}.0.protocol", "tcp", "spec.redirect.redirectRules[0].protocol: 'tcp' is not TCP, UDP or SCTP"),
    (f"{RULES}.1.port", "<del>", "spec.redirect.redirectRules[1].port: is required (1-65535): a destination for "
                                 "every port without a rule is spec.redirect.fallbackIP"),
    (f"{RULES}.1.port", "8080", "spec.redirect.redirectRules[1].port: '8080' is a string, not a port number"),
    (f"{RULES}.1.targetPort", 0, "spec.redirect.redirectRules[1].targetPort: 0 is not a port number (1-65535)"),
    (f"{RULES}.2.port", 8080, "spec.redirect.redirectRules[2]: TCP port 8080 is already redirected by "
                              "redirectRules[1]"),
    (f"{RULES}.1.destinationIP", "2001:db8::1", "spec.redirect.redirectRules[1].destinationIP: '2001:db8::1' is IPv6"),
    (f"{RULES}.1.destinationIP", "203.0.113.300", "spec.redirect.redirectRules[1].destinationIP: '203.0.113.300' is "
                                                  "not an IPv4 address"),
    (f"{RULES}.0.destinationIP", "<del>", "spec.redirect.redirectRules[0].destinationIP: is required"),
    (f"{RULES}.0.destinationPort", 80, "spec.redirect.redirectRules[0].destinationPort: is not a field of "
                                       "EgressRouter"),
    ("spec.redirect.fallbackIP", "2001:db8::2", "spec.redirect.fallbackIP: '2001:db8::2' is IPv6"),
    ("spec.redirect.fallbackIP", 7, "spec.redirect.fallbackIP: 7 is not a string"),
    ("spec.redirect", "<del>", "spec.redirect: is required in mode Redirect"),
    ("spec.redirect", {}, "spec.redirect: has no redirectRules and no fallbackIP: nothing to redirect"),
    ("spec.mode", "HTTPProxy", "spec.mode: 'HTTPProxy' is not Redirect"),
    ("spec.addresses", [{"ip": "192.0.2.99/24", "gateway": "192.0.2.1"}, {"ip": "192.0.2.98/24"}],
     "spec.addresses: has 2 addresses: egress-router configures one (EGRESS_SOURCE)"),
    ("spec.addresses", [], "spec.addresses: is required"),
    ("spec.addresses.0.gateway", "<del>", "spec.addresses[0].gateway: is required here"),
    ("spec.addresses.0.gateway", "192.0.2.99", "spec.addresses[0].gateway: 192.0.2.99 is the same address as "
                                               "spec.addresses[0].ip"),
    ("spec.addresses.0.ip", "192.0.2.99", "spec.addresses[0].ip: '192.0.2.99' has no prefix length"),
    ("spec.addresses.0.ip", "192.0.2.255/24", "spec.addresses[0].ip: 192.0.2.255/24 is the broadcast address"),
    ("spec.addresses.0.ip", "2001:db8::99/64", "spec.addresses[0].ip: '2001:db8::99' is IPv6"),
    ("spec.networkInterface.macvlan.mode", "bridge", "spec.networkInterface.macvlan.mode: 'bridge' is not one of "
                                                     "Bridge, Private, VEPA, Passthru"),
    ("spec.networkInterface.ipvlan", {}, "spec.networkInterface.ipvlan: is not a field of EgressRouter"),
    ("spec.adresses", [], "spec.adresses: is not a field of EgressRouter"),
    ("spec", "<del>", "spec: is required"),
    ("apiVersion", "network.operator.openshift.io/v2", "apiVersion: 'network.operator.openshift.io/v2' is not"),
    ("metadata.name", "<del>", "metadata.name: is required"),
]


@pytest.mark.parametrize(("path", "value", "message"), ERRORS, ids=[f"{p}={v!r}" for p, v, _ in ERRORS])
def test_what_egress_router_cannot_express_is_one_line_naming_the_field(path: str, value: Any, message: str) -> None:
    text = error_of(set_at(documented(), path, value))
    assert text.startswith(message)
    assert "\n" not in text


def test_sctp_and_the_api_defaults() -> None:
    obj = documented()
    del obj["spec"]["mode"], obj["spec"]["networkInterface"]
    obj["spec"]["redirect"] = {"redirectRules": [{"destinationIP": "203.0.113.10", "port": 9, "protocol": "SCTP"}]}
    router = from_object(obj)
    assert router.env()["EGRESS_DESTINATION"] == "9 sctp 203.0.113.10\n"
    assert router.macvlan_mode == "Bridge"
    only_fallback = set_at(documented(), "spec.redirect", {"fallbackIP": "203.0.113.13"})
    assert from_object(only_fallback).env()["EGRESS_DESTINATION"] == "203.0.113.13\n"


# ---------------------------------------------------------------- ours -> EgressRouter


def test_from_env_errors_for_what_the_api_cannot_say() -> None:
    base = {**DOCUMENTED_ENV, "EGRESS_ROUTER_MODE": "init"}
    for env, start in (
        ({**base, "EGRESS_ROUTER_MODE": "http-proxy"}, "EGRESS_ROUTER_MODE: 'http-proxy' has no EgressRouter"),
        ({**base, "EGRESS_ROUTER_MODE": "unit-test"}, "EGRESS_ROUTER_MODE: 'unit-test' has no EgressRouter"),
        ({"EGRESS_HTTP_PROXY_DESTINATION": "*.example.com"}, "EGRESS_HTTP_PROXY_DESTINATION: has no EgressRouter"),
        ({"EGRESS_DNS_PROXY_DESTINATION_FILE": "/f"}, "EGRESS_DNS_PROXY_DESTINATION_FILE: has no EgressRouter"),
        ({**base, "EGRESS_GATEWAY": "192.0.2.300"}, "EGRESS_GATEWAY: '192.0.2.300' is not an IPv4 address"),
    ):
        with pytest.raises(ConfigError) as caught:
            from_env(env, name="r")
        assert str(caught.value).startswith(start), str(caught.value)


def test_from_env_warns_of_what_it_drops() -> None:
    env = {**DOCUMENTED_ENV, "EGRESS_IPTABLES": "legacy", "EGRESS_PROXY_GRACE_SECONDS": "3", "EGRESS_DESTINATOIN": "x"}
    router, warnings = from_env(env, name="r")
    assert router == replace(from_object(documented()), name="r")
    assert warnings == (
        "EGRESS_DESTINATOIN is not a variable egress-router knows; it is ignored; did you mean EGRESS_DESTINATION?",
        "EGRESS_IPTABLES has no EgressRouter field; dropped (the operator's pod decides it)",
        "EGRESS_PROXY_GRACE_SECONDS only matters to the proxies; dropped",
        f"spec.redirect.fallbackIP: {FALLBACK_NOTE}")
    assert "OpenShift's egress router drops it" in FALLBACK_NOTE and "egress-router honours it" in FALLBACK_NOTE
    no_fallback = {**DOCUMENTED_ENV, "EGRESS_DESTINATION": "80 tcp 203.0.113.10"}
    assert from_env(no_fallback, name="r")[1] == ()


# ---------------------------------------------------------------- round trips (property tests)

DESTINATION_IPS = st.builds(lambda net, host: IPv4Address(f"{net}.{host}"),
                            st.sampled_from(["203.0.113", "198.51.100"]), st.integers(1, 254))
PORTS = st.integers(1, 65535)


@st.composite
def routers(draw: st.DrawFn) -> EgressRouter:
    prefix = draw(st.integers(24, 32))
    source = IPv4Interface(f"192.0.2.{draw(st.integers(1, 254))}/{prefix}")
    gateway = draw(st.integers(1, 254).map(lambda h: IPv4Address(f"192.0.2.{h}")).filter(lambda g: g != source.ip))
    if prefix <= 30:
        host_range = (source.network.network_address, source.network.broadcast_address)
        source = draw(st.just(source).filter(lambda s: s.ip not in host_range))
        gateway = draw(st.just(gateway).filter(lambda g: g not in host_range))
    keys = draw(st.lists(st.tuples(PORTS, st.sampled_from(["tcp", "udp", "sctp"])), unique=True, max_size=8))
    rules = tuple(PortRule(port, proto, draw(DESTINATION_IPS), draw(st.none() | PORTS), line=index + 1)
                  for index, (port, proto) in enumerate(keys))
    fallback = draw(st.none() | DESTINATION_IPS if rules else DESTINATION_IPS)
    return EgressRouter(draw(st.sampled_from(["egress-router", "r1", "partners"])),
                        draw(st.sampled_from([None, "egress"])), source, gateway, Destinations(rules, fallback),
                        draw(st.sampled_from(["Bridge", "Private", "VEPA", "Passthru"])),
                        draw(st.sampled_from([None, "eth1"])))


@settings(max_examples=300, deadline=None)
@given(routers())
def test_cr_to_env_to_cr_gives_the_same_rules(router: EgressRouter) -> None:
    obj = json.loads(json.dumps(router.to_object()))  # as it would come from a file
    assert from_object(obj) == router
    env = {**router.env(), "EGRESS_ROUTER_MODE": "init"}
    back, _ = from_env(env, name=router.name, namespace=router.namespace, macvlan_mode=router.macvlan_mode,
                       master=router.master)
    assert back == router
    assert back.to_object() == obj


def normal(config: RouterConfig) -> RouterConfig:
    """An address without a prefix is its /32: the same plan, only the summary line shows it differently."""
    return replace(config, egress=tuple(replace(egress, has_prefix=True) for egress in config.egress))


@settings(max_examples=300, deadline=None)
@given(routers(), st.booleans(), st.sampled_from(["init", "legacy"]))
def test_env_to_cr_to_env_gives_the_same_config(router: EgressRouter, bare: bool, mode: str) -> None:
    env = {**router.env(), "EGRESS_ROUTER_MODE": mode}
    if bare and router.source.network.prefixlen == 32:
        env["EGRESS_SOURCE"] = str(router.source.ip)
    before = load(env)
    cr, _ = from_env(env, name="r")
    after = load({**from_object(json.loads(json.dumps(cr.to_object()))).env(), "EGRESS_ROUTER_MODE": mode})
    assert normal(after) == normal(before)
    assert build_plan(after, "macvlan0").render() == build_plan(before, "macvlan0").render()


@settings(max_examples=200, deadline=None)
@given(routers())
def test_the_destination_text_parses_to_the_same_rules(router: EgressRouter) -> None:
    assert parse_destinations(router.env()["EGRESS_DESTINATION"]) == router.destinations


# ---------------------------------------------------------------- EGRESS_ROUTER_CONFIG_FILE


def configmap_volume(directory: Path, version: str, files: dict[str, str]) -> None:
    """The kubelet's ConfigMap update: a new directory, then `..data` swapped to it in one rename."""
    (directory / version).mkdir()
    for name, text in files.items():
        (directory / version / name).write_text(text, encoding="utf-8")
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(version)
    os.rename(directory / "..data_tmp", directory / "..data")


def test_a_config_file_gives_the_very_config_the_variables_give(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(DOCUMENTED, encoding="utf-8")
    for mode in ("init", "legacy", "unit-test"):
        from_file = load_config({"EGRESS_ROUTER_CONFIG_FILE": str(path), "EGRESS_ROUTER_MODE": mode})
        assert from_file == load({**DOCUMENTED_ENV, "EGRESS_ROUTER_MODE": mode})
    as_json = tmp_path / "router.json"
    as_json.write_text(json.dumps(documented(), indent="\t"), encoding="utf-8")  # tabs: not YAML, still JSON
    assert load_config({"EGRESS_ROUTER_CONFIG_FILE": str(as_json)}) == load(DOCUMENTED_ENV)
    assert watched_paths({"EGRESS_ROUTER_CONFIG_FILE": str(path)}) == (str(path),)


def test_a_variable_in_both_is_one_line_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(DOCUMENTED, encoding="utf-8")
    where = f"EGRESS_ROUTER_CONFIG_FILE={path}"
    rules = tmp_path / "rules"
    rules.write_text("80 tcp 203.0.113.10\n", encoding="utf-8")
    for extra, message in (
        ({"EGRESS_GATEWAY": "192.0.2.1"}, f"EGRESS_GATEWAY: is set in the environment and also by {where} "
                                          "(spec.addresses[0].gateway): set it in one of them"),
        ({"EGRESS_SOURCE": "192.0.2.98"}, f"EGRESS_SOURCE: is set in the environment and also by {where} "
                                          "(spec.addresses[0].ip)"),
        ({"EGRESS_DESTINATION_FILE": str(rules)}, f"EGRESS_DESTINATION_FILE: is set in the environment and also by "
                                                  f"{where} (spec.redirect)"),
        ({"EGRESS_ROUTER_MODE": "http-proxy"}, f"EGRESS_ROUTER_MODE: is 'http-proxy', but {where} supplies"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config({"EGRESS_ROUTER_CONFIG_FILE": str(path), **extra})
        assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    (DOCUMENTED.replace("protocol: UDP", "protocol: ICMP"),
     "spec.redirect.redirectRules[0].protocol: 'ICMP' is not TCP, UDP or SCTP"),
    (DOCUMENTED.replace("  mode: Redirect", "  mode: Redirect\n\tmore: 1"), "line 18: YAML syntax error at column 1: "
                                                                      "found character '\\t'"),
    (DOCUMENTED + "---\n" + DOCUMENTED, "holds 2 documents, not one EgressRouter"),
    ("", "holds 0 documents"),
    ("- 1\n", "the document: is not an EgressRouter object"),
])
def test_a_bad_config_file_names_the_file_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config({"EGRESS_ROUTER_CONFIG_FILE": str(path)})
    where = f"EGRESS_ROUTER_CONFIG_FILE={path}"
    assert str(caught.value).startswith(where)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"EGRESS_ROUTER_CONFIG_FILE": str(tmp_path / "none.yaml")})
    assert str(caught.value) == f"EGRESS_ROUTER_CONFIG_FILE={tmp_path / 'none.yaml'}: cannot read it: " \
                                "No such file or directory"


def test_a_configmap_swap_of_the_config_file_is_seen_and_reloads(tmp_path: Path) -> None:
    configmap_volume(tmp_path, "..1", {"router.yaml": DOCUMENTED})
    env = {"EGRESS_ROUTER_CONFIG_FILE": str(tmp_path / "router.yaml"), "EGRESS_ROUTER_MODE": "legacy"}
    watch = FileWatch(watched_paths(env))
    assert load_config(env) == load({**DOCUMENTED_ENV, "EGRESS_ROUTER_MODE": "legacy"})
    assert not watch.changed()
    configmap_volume(tmp_path, "..2", {"router.yaml": DOCUMENTED.replace("port: 80,", "port: 81,")})
    assert watch.changed()
    reloaded = load_config(env).destinations
    assert reloaded is not None and reloaded.rules[0].port == 81


def test_with_config_document_keeps_the_other_variables() -> None:
    env = {"EGRESS_ROUTER_MODE": "legacy", "EGRESS_IPTABLES": "legacy", "EGRESS_ROUTER_CONFIG_FILE": "/r"}
    assert with_config_document(env, documented(), "here") == {**env, **DOCUMENTED_ENV}


# ---------------------------------------------------------------- egress-router convert


def invoke(args: list[str], stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, args, input=stdin,
                              env={name: None for name in os.environ if name.startswith("EGRESS_")})


def test_convert_to_env_prints_a_pastable_env_list(tmp_path: Path) -> None:
    result = invoke(["convert", "-", "--to", "env"], stdin=DOCUMENTED)
    assert result.exit_code == 0, result.output
    env = yaml.safe_load(result.stdout)
    assert env == [{"name": "EGRESS_ROUTER_MODE", "value": "init"},
                   *({"name": name, "value": value} for name, value in DOCUMENTED_ENV.items())]
    assert "value: |\n    80 udp 203.0.113.10\n" in result.stdout  # one rule a line, as people write them


@pytest.mark.parametrize("kind", ["pod", "deployment"])
def test_convert_to_a_workload_passes_validate_and_converts_back(tmp_path: Path, kind: str) -> None:
    obj = set_at(set_at(documented(), "spec.networkInterface.macvlan", {"mode": "VEPA", "master": "eth1"}),
                 "metadata.namespace", "egress")
    source = tmp_path / "router.json"
    source.write_text(json.dumps(obj), encoding="utf-8")
    result = invoke(["convert", str(source), "--to", kind, "--image", "registry.example/egress-router:1"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    manifest = tmp_path / f"{kind}.yaml"
    manifest.write_text(result.stdout, encoding="utf-8")
    documents = list(yaml.safe_load_all(result.stdout))
    assert [doc["kind"] for doc in documents] == ["NetworkAttachmentDefinition", "ServiceAccount", kind.capitalize()]
    nad = json.loads(documents[0]["spec"]["config"])
    assert (nad["type"], nad["mode"], nad["master"], nad["ipam"]) == ("macvlan", "vepa", "eth1", {})
    checked = invoke(["validate", "-f", str(manifest)])
    assert checked.exit_code == 0, checked.output
    assert checked.stderr == ""
    assert checked.stdout.count(": valid: init mode; source 192.0.2.99/24; gateway 192.0.2.1; 3 port rule(s), "
                                "fallback 203.0.113.13") == 1
    back = invoke(["convert", str(manifest), "--to", "egressrouter"])
    assert back.exit_code == 0, back.output
    assert back.stderr == f"warning: spec.redirect.fallbackIP: {FALLBACK_NOTE}\n"
    assert back.stdout.startswith(f"# spec.redirect.fallbackIP: {FALLBACK_NOTE}\n---\n")
    assert from_object(yaml.safe_load(back.stdout)) == from_object(obj)


def test_convert_a_legacy_example_to_an_egress_router() -> None:
    root = Path(__file__).resolve().parents[2] / "examples"
    result = invoke(["convert", str(root / "redirect-configmap.yaml"), "--to", "egressrouter"])
    assert result.exit_code == 0, result.output
    router = from_object(yaml.safe_load(result.stdout))
    assert router.name == "egress-router-partners" and str(router.source) == "192.0.2.98/24"
    assert [(r.port, r.proto) for r in router.destinations.rules] == [(443, "tcp"), (8443, "tcp"), (514, "udp")]
    multus = invoke(["convert", str(root / "multus-redirect-deployment.yaml"), "--to", "egressrouter"])
    assert multus.exit_code == 0, multus.output
    spec = yaml.safe_load(multus.stdout)["spec"]
    assert spec["networkInterface"] == {"macvlan": {"mode": "Bridge", "master": "eth0"}}  # from its NAD
    assert "warning: EGRESS_INTERFACE has no EgressRouter field; dropped" in multus.stderr


@pytest.mark.parametrize(("example", "to", "message"), [
    ("http-proxy.yaml", "egressrouter", "Deployment/egress-http-proxy: initContainer egress-router-setup: "
                                        "EGRESS_ROUTER_MODE: 'http-proxy' has no EgressRouter counterpart"),
    ("dns-proxy.yaml", "egressrouter", "EGRESS_ROUTER_MODE: 'dns-proxy' has no EgressRouter counterpart"),
    ("redirect-pod.yaml", "pod", "--to pod converts one EgressRouter object; found ServiceAccount/egress-router, "
                                 "Pod/egress-router, "
                                 "Service/egress-router (from a Pod or Deployment: --to egressrouter)"),
])
def test_convert_errors_are_one_line_and_exit_1(example: str, to: str, message: str) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / example
    result = invoke(["convert", str(path), "--to", to])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_convert_names_the_field_and_the_object(tmp_path: Path) -> None:
    source = tmp_path / "router.yaml"
    source.write_text(DOCUMENTED.replace("protocol: TCP", "protocol: ICMP", 1), encoding="utf-8")
    result = invoke(["convert", str(source), "--to", "env"])
    assert result.exit_code == 1
    assert result.stderr == (f"error: {source}: EgressRouter/egress-router-redirect: "
                             "spec.redirect.redirectRules[1].protocol: 'ICMP' is not TCP, UDP or SCTP\n")
    missing = invoke(["convert", str(tmp_path / "none.yaml"), "--to", "env"])
    assert missing.exit_code == 1 and missing.stderr.endswith("cannot read it: No such file or directory\n")


def test_the_container_path_takes_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The console script with no arguments (the image's entrypoint): unit-test mode prints the legacy NAT
    rules, the same from the EgressRouter file as from the variables; a bad file is one line and exit 1."""
    from egress_router.container import run_container

    path = tmp_path / "router.yaml"
    path.write_text(DOCUMENTED, encoding="utf-8")
    assert run_container({"EGRESS_ROUTER_MODE": "unit-test", "EGRESS_ROUTER_CONFIG_FILE": str(path)}) == 0
    from_file = capsys.readouterr().out
    assert run_container({"EGRESS_ROUTER_MODE": "unit-test", **DOCUMENTED_ENV}) == 0
    assert capsys.readouterr().out == from_file
    assert "--to-destination 203.0.113.11:80" in from_file and "203.0.113.13" in from_file
    path.write_text(DOCUMENTED.replace("port: 8080", "port: 0"), encoding="utf-8")
    with pytest.raises(SystemExit) as exited:
        run_container({"EGRESS_ROUTER_MODE": "unit-test", "EGRESS_ROUTER_CONFIG_FILE": str(path)})
    assert exited.value.code == 1
    assert capsys.readouterr().err == (f"error: EGRESS_ROUTER_CONFIG_FILE={path}: spec.redirect.redirectRules[1].port: "
                                       "0 is not a port number (1-65535)\n")


def test_render_and_validate_take_the_config_file_option(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(DOCUMENTED, encoding="utf-8")
    result = invoke(["validate", "--config-file", str(path), "--mode", "init"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ("valid: init mode; source 192.0.2.99/24; gateway 192.0.2.1; 3 port rule(s), "
                             "fallback 203.0.113.13\n")
    rendered = invoke(["render", "--config-file", str(path), "--mode", "init"])
    by_env = invoke(["render", "--mode", "init", "--source", DOCUMENTED_ENV["EGRESS_SOURCE"], "--gateway",
                     DOCUMENTED_ENV["EGRESS_GATEWAY"], "--destination", DOCUMENTED_ENV["EGRESS_DESTINATION"]])
    assert rendered.exit_code == 0 and rendered.stdout == by_env.stdout


def test_convert_for_openshift_sdn_uses_the_assign_macvlan_annotation(tmp_path: Path) -> None:
    source = tmp_path / "router.yaml"
    source.write_text(DOCUMENTED, encoding="utf-8")
    result = invoke(["convert", str(source), "--to", "deployment", "--macvlan", "openshift-sdn"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # Bridge without a master: what the annotation gives anyway, nothing dropped
    documents = list(yaml.safe_load_all(result.stdout))
    assert [doc["kind"] for doc in documents] == ["ServiceAccount", "Deployment"]
    annotations = documents[1]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"pod.network.openshift.io/assign-macvlan": "true"}
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(result.stdout, encoding="utf-8")
    checked = invoke(["validate", "-f", str(manifest)])
    assert checked.exit_code == 0 and checked.stderr == "", checked.output
    source.write_text(DOCUMENTED.replace('mode: "Bridge"', 'mode: "Private"'), encoding="utf-8")
    private = invoke(["convert", str(source), "--to", "pod", "--macvlan", "openshift-sdn"])
    assert private.exit_code == 0
    assert private.stderr == ("warning: spec.networkInterface.macvlan: dropped: OpenShift SDN's assign-macvlan "
                              "annotation takes no mode or master (use --macvlan multus to keep them)\n")


@settings(max_examples=60, deadline=None)
@given(routers(), st.sampled_from(["pod", "deployment"]))
def test_cr_to_a_workload_and_back_is_the_same_cr(router: EgressRouter, kind: str) -> None:
    """Through the YAML people apply: the macvlan mode and master travel in the NetworkAttachmentDefinition."""
    from egress_router.convert import convert

    workload = convert("router.json", json.dumps(router.to_object()), kind)
    back = convert("workload.yaml", workload.text, "egressrouter")
    assert from_object(yaml.safe_load(back.text)) == router
    assert (f"spec.redirect.fallbackIP: {FALLBACK_NOTE}" in back.warnings) == (router.destinations.fallback is not None)


def test_convert_reads_tab_indented_json_from_stdin() -> None:
    result = invoke(["convert", "-", "--to", "env"], stdin=json.dumps(documented(), indent="\t"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)[1] == {"name": "EGRESS_SOURCE", "value": "192.0.2.99/24"}


def test_convert_an_egress_router_to_one_checks_it_and_spells_out_the_defaults() -> None:
    obj = documented()
    del obj["spec"]["networkInterface"], obj["spec"]["mode"]
    result = invoke(["convert", "-", "--to", "egressrouter"], stdin=json.dumps(obj))
    assert result.exit_code == 0, result.output
    spelled = yaml.safe_load(result.stdout)
    assert spelled["spec"]["mode"] == "Redirect"
    assert spelled["spec"]["networkInterface"] == {"macvlan": {"mode": "Bridge"}}
    assert from_object(spelled) == from_object(obj)
