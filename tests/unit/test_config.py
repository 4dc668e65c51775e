"""config.load: the EGRESS_* environment contract."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from egress_router.core.config import MODES, load
from egress_router.core.errors import ConfigError
from egress_router.core.redirect import Destinations, PortRule
from egress_router.core.variables import VARIABLES

BASE = {
    "EGRESS_SOURCE": "192.0.2.99",
    "EGRESS_GATEWAY": "192.0.2.1",
    "EGRESS_DESTINATION": "80 tcp 203.0.113.10",
}


def env(**changes: str | None) -> dict[str, str]:
    """BASE with some variables changed (a None value removes the variable)."""
    result = dict(BASE)
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def load_error(environment: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(environment)
    assert len(str(caught.value).splitlines()) == 1
    return caught.value


# ---------------------------------------------------------------- defaults and modes


def test_defaults() -> None:
    config = load(BASE)
    assert config.mode == "legacy"
    assert config.interface is None
    assert config.pod_interface == "eth0"
    assert config.debug is False
    assert config.warnings == ()
    assert config.source == IPv4Interface("192.0.2.99/32")
    assert config.source_has_prefix is False
    assert config.gateway == IPv4Address("192.0.2.1")
    assert config.destinations == Destinations((PortRule(80, "tcp", IPv4Address("203.0.113.10")),))
    assert config.configures_nat is True


@pytest.mark.parametrize(
    ("mode", "nat"),
    [("init", True), ("legacy", True), ("unit-test", True), ("http-proxy", False), ("dns-proxy", False)],
)
def test_every_mode(mode: str, nat: bool) -> None:
    config = load(env(EGRESS_ROUTER_MODE=mode))
    assert config.mode == mode
    assert config.configures_nat is nat
    assert (config.destinations is not None) is nat


def test_modes_table_is_complete() -> None:
    assert set(MODES) == {"init", "legacy", "unit-test", "http-proxy", "dns-proxy"}


@pytest.mark.parametrize("mode", ["", "   ", "\t"])
def test_blank_mode_is_the_default(mode: str) -> None:
    assert load(env(EGRESS_ROUTER_MODE=mode)).mode == "legacy"


def test_mode_is_stripped() -> None:
    assert load(env(EGRESS_ROUTER_MODE="  init \n")).mode == "init"


@pytest.mark.parametrize("mode", ["INIT", "Legacy", "unit_test", "unittest", "proxy", "http", "dns", "redirect", "x"])
def test_invalid_mode(mode: str) -> None:
    err = load_error(env(EGRESS_ROUTER_MODE=mode))
    assert err.variable == "EGRESS_ROUTER_MODE"
    assert repr(mode) in str(err)
    assert "init, legacy, unit-test, http-proxy, dns-proxy" in str(err)
    assert str(err).startswith("EGRESS_ROUTER_MODE: ")


def test_mode_is_checked_before_everything_else() -> None:
    err = load_error({"EGRESS_ROUTER_MODE": "bogus"})
    assert err.variable == "EGRESS_ROUTER_MODE"


@pytest.mark.parametrize("mode", ["http-proxy", "dns-proxy"])
def test_destination_not_required_for_proxies(mode: str) -> None:
    config = load(env(EGRESS_ROUTER_MODE=mode, EGRESS_DESTINATION=None))
    assert config.destinations is None


@pytest.mark.parametrize("mode", ["http-proxy", "dns-proxy"])
def test_proxies_ignore_the_destination(mode: str) -> None:
    config = load(env(EGRESS_ROUTER_MODE=mode, EGRESS_DESTINATION="not a rule at all"))
    assert config.destinations is None


@pytest.mark.parametrize("mode", ["init", "legacy", "unit-test"])
def test_destination_required_for_nat_modes(mode: str) -> None:
    err = load_error(env(EGRESS_ROUTER_MODE=mode, EGRESS_DESTINATION=None))
    assert err.variable == "EGRESS_DESTINATION"
    assert str(err) == "EGRESS_DESTINATION: is not set"


# ---------------------------------------------------------------- source and gateway


@pytest.mark.parametrize(
    ("value", "interface", "has_prefix"),
    [
        ("192.0.2.99", "192.0.2.99/32", False),
        ("  192.0.2.99  ", "192.0.2.99/32", False),
        ("192.0.2.99/24", "192.0.2.99/24", True),
        ("192.0.2.99/32", "192.0.2.99/32", True),
        ("192.0.2.99/31", "192.0.2.99/31", True),
        ("192.0.2.98/31", "192.0.2.98/31", True),
        ("192.0.2.99/0", "192.0.2.99/0", True),
        ("192.0.2.99/08", "192.0.2.99/8", True),
        ("10.1.2.3/8", "10.1.2.3/8", True),
    ],
)
def test_source(value: str, interface: str, has_prefix: bool) -> None:
    config = load(env(EGRESS_SOURCE=value, EGRESS_GATEWAY="198.51.100.1"))
    assert config.source == IPv4Interface(interface)
    assert config.source_has_prefix is has_prefix


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("192.0.2.99/33", "'33'"),
        ("192.0.2.99/abc", "'abc'"),
        ("192.0.2.99/", "''"),
        ("192.0.2.99/-1", "'-1'"),
        ("192.0.2.99/100", "'100'"),
        ("192.0.2.99/24/24", "'24/24'"),
        ("192.0.2.99/ 24", "' 24'"),
        ("192.0.2.99/255.255.255.0", "'255.255.255.0'"),
        ("192.0.2.0/24", "network address of 192.0.2.0/24"),
        ("192.0.2.255/24", "broadcast address of 192.0.2.0/24"),
        ("10.0.0.0/8", "network address of 10.0.0.0/8"),
        ("192.0.2.4/30", "network address of 192.0.2.4/30"),
        ("192.0.2.7/30", "broadcast address of 192.0.2.4/30"),
        ("192.0.2", "'192.0.2'"),
        ("192.0.2.099", "'192.0.2.099'"),
        ("::1", "::1 is the loopback address"),
        ("host.example.com", "'host.example.com'"),
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1/8", "loopback"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_bad_source(value: str, fragment: str) -> None:
    err = load_error(env(EGRESS_SOURCE=value, EGRESS_GATEWAY="198.51.100.1"))
    assert err.variable == "EGRESS_SOURCE"
    assert str(err).startswith("EGRESS_SOURCE: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("source", "gateway", "fragment"),
    [
        ("192.0.2.99", "192.0.2.99", "same address as EGRESS_SOURCE"),
        ("192.0.2.99/24", "192.0.2.99", "same address as EGRESS_SOURCE"),
        ("192.0.2.99/24", " 192.0.2.99 ", "same address as EGRESS_SOURCE"),
        ("192.0.2.99/24", "192.0.2.0", "network or broadcast address of 192.0.2.0/24"),
        ("192.0.2.99/24", "192.0.2.255", "network or broadcast address of 192.0.2.0/24"),
        ("192.0.2.99", "192.0.2", "'192.0.2'"),
        ("192.0.2.99", "192.0.2.1/24", "'192.0.2.1/24'"),
        ("192.0.2.99", "gateway.local", "'gateway.local'"),
        ("192.0.2.99", "0.0.0.0", "unspecified"),
        ("192.0.2.99", "127.0.0.1", "loopback"),
        ("192.0.2.99", "224.0.0.1", "multicast"),
        ("192.0.2.99", "255.255.255.255", "broadcast"),
    ],
)
def test_bad_gateway(source: str, gateway: str, fragment: str) -> None:
    err = load_error(env(EGRESS_SOURCE=source, EGRESS_GATEWAY=gateway))
    assert err.variable == "EGRESS_GATEWAY"
    assert str(err).startswith("EGRESS_GATEWAY: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("source", "gateway"),
    [
        ("192.0.2.99/24", "192.0.2.1"),
        ("192.0.2.99", "198.51.100.1"),  # a gateway outside the source subnet is reachable by its /32 route
        ("192.0.2.99", "192.0.2.0"),  # without a prefix there is no subnet to compare with
        ("192.0.2.98/31", "192.0.2.99"),  # /31: both addresses are hosts (RFC 3021)
    ],
)
def test_good_gateway(source: str, gateway: str) -> None:
    assert load(env(EGRESS_SOURCE=source, EGRESS_GATEWAY=gateway)).gateway == IPv4Address(gateway)


# ---------------------------------------------------------------- required variables


@pytest.mark.parametrize("name", ["EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_DESTINATION"])
def test_missing_required(name: str) -> None:
    err = load_error(env(**{name: None}))
    assert err.variable == name
    assert str(err) == f"{name}: is not set"


@pytest.mark.parametrize("name", ["EGRESS_SOURCE", "EGRESS_GATEWAY", "EGRESS_DESTINATION"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t\n"])
def test_empty_required(name: str, value: str) -> None:
    err = load_error(env(**{name: value}))
    assert err.variable == name
    assert str(err) == f"{name}: is empty"


def test_empty_environment_names_the_source_first() -> None:
    assert str(load_error({})) == "EGRESS_SOURCE: is not set"


def test_destination_errors_pass_through() -> None:
    err = load_error(env(EGRESS_DESTINATION="80 tcp 10.0.0.1\n8080 tcp 10.0.0.300"))
    assert (err.variable, err.line, err.text) == ("EGRESS_DESTINATION", 2, "8080 tcp 10.0.0.300")


def test_comment_only_destination_is_rejected() -> None:
    err = load_error(env(EGRESS_DESTINATION="# nothing here"))
    assert err.variable == "EGRESS_DESTINATION"
    assert "no rules" in str(err)


# ---------------------------------------------------------------- interfaces


@pytest.mark.parametrize("name", ["macvlan0", "net1", "eth0.100", "a", "x" * 15, "br-lan_2", "  net1  "])
def test_good_interface(name: str) -> None:
    assert load(env(EGRESS_INTERFACE=name)).interface == name.strip()


@pytest.mark.parametrize("name", ["", "   "])
def test_blank_interface_means_automatic(name: str) -> None:
    assert load(env(EGRESS_INTERFACE=name)).interface is None


@pytest.mark.parametrize(
    "name",
    ["x" * 16, "macvlan0/1", "/", "mac vlan", "mac\tvlan", "eth0:1", ".", "..", "net+", "+", "ne+t"],
)
def test_bad_interface(name: str) -> None:
    err = load_error(env(EGRESS_INTERFACE=name))
    assert err.variable == "EGRESS_INTERFACE"
    assert repr(name) in str(err)
    assert "not a valid interface name" in str(err)


@pytest.mark.parametrize("name", ["eth0", "veth+", "cali+", "x" * 15, "x" * 14 + "+", "  eth1  "])
def test_good_pod_interface(name: str) -> None:
    assert load(env(EGRESS_POD_INTERFACE=name)).pod_interface == name.strip()


@pytest.mark.parametrize("name", ["", "  "])
def test_blank_pod_interface_is_eth0(name: str) -> None:
    assert load(env(EGRESS_POD_INTERFACE=name)).pod_interface == "eth0"


@pytest.mark.parametrize("name", ["x" * 16, "x" * 15 + "+", "+", "++", "a+b", "a++", "eth/0", "eth 0", "eth0:1", "."])
def test_bad_pod_interface(name: str) -> None:
    err = load_error(env(EGRESS_POD_INTERFACE=name))
    assert err.variable == "EGRESS_POD_INTERFACE"
    assert "not a valid interface name" in str(err)


def test_pod_interface_must_differ_from_egress_interface() -> None:
    err = load_error(env(EGRESS_INTERFACE="net1", EGRESS_POD_INTERFACE="net1"))
    assert err.variable == "EGRESS_POD_INTERFACE"
    assert "'net1'" in str(err)


def test_default_pod_interface_clashes_with_egress_eth0() -> None:
    err = load_error(env(EGRESS_INTERFACE="eth0"))
    assert err.variable == "EGRESS_POD_INTERFACE"


# ---------------------------------------------------------------- debug and warnings


@pytest.mark.parametrize(("value", "debug"), [(None, False), ("", False), ("1", True), ("yes", True), ("true", True)])
def test_debug(value: str | None, debug: bool) -> None:
    assert load(env(EGRESS_ROUTER_DEBUG=value)).debug is debug


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("EGRESS_DESTINATIONS", "EGRESS_DESTINATION"),
        ("EGRESS_SORCE", "EGRESS_SOURCE"),
        ("EGRESS_GATWAY", "EGRESS_GATEWAY"),
        ("EGRESS_ROUTER_MOD", "EGRESS_ROUTER_MODE"),
        ("EGRESS_MODE", "EGRESS_ROUTER_MODE"),
        ("EGRESS_POD_IFACE", "EGRESS_POD_INTERFACE"),
    ],
)
def test_unknown_variable_warning_with_hint(name: str, hint: str) -> None:
    config = load(env(**{name: "x"}))
    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert warning.startswith(f"{name} ")
    assert "ignored" in warning
    assert warning.endswith(f"did you mean {hint}?")


def test_unknown_variable_without_a_close_match_has_no_hint() -> None:
    (warning,) = load(env(EGRESS_XYZZY_PLUGH_QUUX="1")).warnings
    assert warning.startswith("EGRESS_XYZZY_PLUGH_QUUX ")
    assert "did you mean" not in warning


def test_warnings_are_sorted_and_other_variables_ignored() -> None:
    config = load(env(EGRESS_ZZZ_ZZZ_ZZZ_ZZZ="1", EGRESS_DESTINATIONS="1", PATH="/bin", HOME="/root",
                      egress_source="x"))
    assert [w.split(" ", 1)[0] for w in config.warnings] == ["EGRESS_DESTINATIONS", "EGRESS_ZZZ_ZZZ_ZZZ_ZZZ"]


def test_known_variables_never_warn() -> None:
    full = {name: "" for name in VARIABLES}
    full.update(BASE)
    assert load(full).warnings == ()


def test_config_is_frozen() -> None:
    config = load(BASE)
    with pytest.raises(AttributeError):
        config.mode = "init"  # type: ignore[misc]
