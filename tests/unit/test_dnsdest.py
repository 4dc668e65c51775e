"""The EGRESS_DNS_PROXY_DESTINATION grammar (every form, every error, the canonical format) and how the
DNS proxy variables steer config.load."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_router.core.config import load, load_dns_proxy
from egress_router.core.errors import ConfigError
from egress_router.core.forwards import VARIABLE, Forward, format_dns_destinations, parse_dns_destinations
from egress_router.core.variables import VARIABLES

V4 = IPv4Address
V6 = IPv6Address


# ---------------------------------------------------------------- accepted forms

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("53 203.0.113.53", (Forward(53, V4("203.0.113.53"), 53),)),
        ("8053 203.0.113.53 53", (Forward(8053, V4("203.0.113.53"), 53),)),
        ("53 2001:db8::53", (Forward(53, V6("2001:db8::53"), 53),)),
        ("53 [2001:db8::53]", (Forward(53, V6("2001:db8::53"), 53),)),
        ("8053 [2001:db8::53] 5353", (Forward(8053, V6("2001:db8::53"), 5353),)),
        ("8053 2001:db8::53 5353", (Forward(8053, V6("2001:db8::53"), 5353),)),
        ("443 www.example.com", (Forward(443, "www.example.com", 443),)),
        ("443 WWW.Example.COM.", (Forward(443, "www.example.com", 443),)),  # lower case, no trailing dot
        ("8443 db-1.internal.example.com 443", (Forward(8443, "db-1.internal.example.com", 443),)),
        ("5432 localhost", (Forward(5432, "localhost", 5432),)),  # a single label is a name too
        ("1 203.0.113.1 65535", (Forward(1, V4("203.0.113.1"), 65535),)),
        ("65535 203.0.113.1 1", (Forward(65535, V4("203.0.113.1"), 1),)),
        ("53 [::ffff:203.0.113.5]", (Forward(53, V4("203.0.113.5"), 53),)),  # mapped: the IPv4 address
        (
            "53 203.0.113.53\n443 www.example.com 8443\n80 [2001:db8::80]",
            (Forward(53, V4("203.0.113.53"), 53), Forward(443, "www.example.com", 8443),
             Forward(80, V6("2001:db8::80"), 80)),
        ),
        # whitespace, comments, blank lines and CRLF line ends
        ("  53\t\t203.0.113.53   5353  # dns\r\n\r\n# a comment\n   \n",
         (Forward(53, V4("203.0.113.53"), 5353),)),
        # a port may be another rule's remote port, and two ports may go to the same place
        ("80 203.0.113.1 8080\n8080 203.0.113.1 80\n81 203.0.113.1 8080",
         (Forward(80, V4("203.0.113.1"), 8080), Forward(8080, V4("203.0.113.1"), 80),
          Forward(81, V4("203.0.113.1"), 8080))),
    ],
    ids=["ipv4", "ipv4-remote-port", "ipv6-bare", "ipv6-brackets", "ipv6-brackets-remote-port",
         "ipv6-bare-remote-port", "name", "name-case-and-dot", "name-remote-port", "single-label",
         "min-port-max-remote", "max-port-min-remote", "ipv4-mapped", "several", "whitespace-comments-crlf",
         "crossed-ports"],
)
def test_accepted_forms(text: str, expected: tuple[Forward, ...]) -> None:
    assert parse_dns_destinations(text) == expected


def test_forwards_remember_their_line_and_kind() -> None:
    forwards = parse_dns_destinations("# header\n\n53 203.0.113.53\n443 www.example.com\n80 2001:db8::80 8080")
    assert [f.line for f in forwards] == [3, 4, 5]
    assert [f.is_name for f in forwards] == [False, True, False]
    assert [f.target() for f in forwards] == ["203.0.113.53:53", "www.example.com:443", "[2001:db8::80]:8080"]


# ---------------------------------------------------------------- rejected forms

@pytest.mark.parametrize(
    ("text", "line", "shown", "fragment"),
    [
        # ports
        ("0 203.0.113.1", 1, "0 203.0.113.1", "port '0' is not a port number (1-65535)"),
        ("65536 203.0.113.1", 1, "65536 203.0.113.1", "port '65536' is not a port number"),
        ("http 203.0.113.1", 1, "http 203.0.113.1", "port 'http' is not a port number"),
        ("-1 203.0.113.1", 1, "-1 203.0.113.1", "port '-1' is not a port number"),
        ("+53 203.0.113.1", 1, "+53 203.0.113.1", "port '+53' is not a port number"),
        ("053053 203.0.113.1", 1, "053053 203.0.113.1", "port '053053' is not a port number"),
        ("53 203.0.113.1 0", 1, "53 203.0.113.1 0", "remote port '0' is not a port number"),
        ("53 203.0.113.1 99999", 1, "53 203.0.113.1 99999", "remote port '99999' is not a port number"),
        ("53 203.0.113.1 dns", 1, "53 203.0.113.1 dns", "remote port 'dns' is not a port number"),
        # hosts
        ("53 -bad-.example.com", 1, "53 -bad-.example.com", "'-bad-.example.com' is not an IP address or host name"),
        ("53 203.0.113", 1, "53 203.0.113", "'203.0.113' is not an IP address or host name"),
        ("53 300.1.2.3", 1, "53 300.1.2.3", "'300.1.2.3' is not an IP address or host name"),
        ("53 3405803786", 1, "53 3405803786", "is not an IP address or host name"),
        ("53 0xcb007101", 1, "53 0xcb007101", "is not an IP address or host name"),
        ("53 [2001:db8::1", 1, "53 [2001:db8::1", "is not an IP address or host name"),
        ("53 2001:db8::zz", 1, "53 2001:db8::zz", "is not an IP address or host name"),
        ("53 fe80::1%eth0", 1, "53 fe80::1%eth0", "zone id"),
        ("53 example..com", 1, "53 example..com", "is not an IP address or host name"),
        ("53 0.0.0.0", 1, "53 0.0.0.0", "0.0.0.0 cannot be connected to"),
        ("53 ::", 1, "53 ::", ":: cannot be connected to"),
        ("53 224.0.0.1", 1, "53 224.0.0.1", "224.0.0.1 cannot be connected to"),
        ("53 ff02::1", 1, "53 ff02::1", "ff02::1 cannot be connected to"),
        # duplicates: the later line is named, with the earlier one
        ("53 203.0.113.1\n# c\n53 www.example.com", 3, "53 www.example.com", "port 53 is already forwarded on line 1"),
        ("53 203.0.113.1\n053 203.0.113.2", 2, "053 203.0.113.2", "port 53 is already forwarded on line 1"),
        # field counts
        ("53", 1, "53", "expected '<port> <host> [<remote_port>]', got 1 field(s)"),
        ("53 203.0.113.1 53 tcp", 1, "53 203.0.113.1 53 tcp", "got 4 field(s)"),
        ("53 tcp 203.0.113.1 5353", 1, "53 tcp 203.0.113.1 5353", "got 4 field(s)"),  # the NAT grammar: not this
        ("203.0.113.1", 1, "203.0.113.1", "got 1 field(s)"),  # no fallback form here
        ("53 203.0.113.1\n\n54", 3, "54", "got 1 field(s)"),
        ("53 203.0.113.1 # fine\n  54 x y z  # not fine", 2, "54 x y z  # not fine", "got 4 field(s)"),
    ],
)
def test_errors_name_the_variable_line_and_text(text: str, line: int, shown: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dns_destinations(text)
    error = caught.value
    assert (error.variable, error.line, error.text) == (VARIABLE, line, shown)
    assert fragment in error.reason, error.reason
    assert str(error).startswith(f"EGRESS_DNS_PROXY_DESTINATION line {line}: {shown!r}: ")


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "# only a comment", " # one\n\t# two\r\n"])
def test_no_rules_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dns_destinations(text)
    assert caught.value.variable == VARIABLE and caught.value.line is None
    assert "no rules" in caught.value.reason


def test_the_first_bad_line_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dns_destinations("53 203.0.113.1\n0 203.0.113.2\n54")
    assert caught.value.line == 2


def test_another_variable_name_can_be_given() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dns_destinations("53", variable="X_RULES")
    assert str(caught.value).startswith("X_RULES line 1: '53': ")


def test_control_characters_stay_on_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dns_destinations("53 bad\x1bname")
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


# ---------------------------------------------------------------- format and round trip

@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("53 203.0.113.53", "53 203.0.113.53"),
        ("53 203.0.113.53 53", "53 203.0.113.53"),  # a remote port equal to the port is left out
        ("8053 203.0.113.53 53", "8053 203.0.113.53 53"),
        ("53 [2001:db8:0::53]", "53 2001:db8::53"),
        ("53 [2001:db8::53] 5353", "53 2001:db8::53 5353"),
        ("443   WWW.Example.Com.  # c\n\n80\t203.0.113.1", "443 www.example.com\n80 203.0.113.1"),
    ],
)
def test_format_is_canonical(text: str, canonical: str) -> None:
    forwards = parse_dns_destinations(text)
    assert format_dns_destinations(forwards) == canonical
    assert parse_dns_destinations(canonical) == forwards


_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)
_v4 = st.integers(min_value=0x01000000, max_value=0xDFFFFFFF).map(V4).filter(lambda a: not a.is_unspecified)
_v6 = st.integers(min_value=1, max_value=2**128 - 1).map(V6).filter(
    lambda a: not a.is_multicast and not a.is_unspecified and a.ipv4_mapped is None)
_hosts = st.one_of(_names, _v4, _v6)
_ports = st.integers(min_value=1, max_value=65535)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ports, _hosts, _ports), min_size=1, max_size=8, unique_by=lambda t: t[0]))
def test_parse_format_round_trip(rules: list[tuple[int, str | V4 | V6, int]]) -> None:
    forwards = tuple(Forward(port, host, remote) for port, host, remote in rules)
    text = format_dns_destinations(forwards)
    assert parse_dns_destinations(text) == forwards
    assert format_dns_destinations(parse_dns_destinations(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789 .:[]#\n\t-abz%") + ["\r"]), max_size=40))
def test_the_parser_fails_only_with_config_error(text: str) -> None:
    try:
        forwards = parse_dns_destinations(text)
    except ConfigError as error:
        assert error.variable == VARIABLE
        return
    assert forwards and len({f.port for f in forwards}) == len(forwards)


# ---------------------------------------------------------------- settings and config.load dispatch

SOURCE = {"EGRESS_SOURCE": "192.0.2.99/24", "EGRESS_GATEWAY": "192.0.2.1"}
DNS = {"EGRESS_DNS_PROXY_DESTINATION": "53 203.0.113.53\n443 www.example.com"}


def test_dns_destination_alone_runs_the_proxy_without_touching_the_network() -> None:
    config = load(DNS)
    assert config.mode == "dns-proxy"
    assert config.source is None and config.gateway is None
    assert not config.configures_network and not config.configures_nat
    assert config.destinations is None and config.http_proxy is None
    assert config.dns_proxy is not None
    assert config.dns_proxy.forwards == parse_dns_destinations(DNS["EGRESS_DNS_PROXY_DESTINATION"])
    assert config.warnings == ()


def test_with_source_and_gateway_the_network_is_configured_first() -> None:
    config = load({**DNS, **SOURCE})
    assert config.mode == "dns-proxy"
    assert config.configures_network and not config.configures_nat
    assert config.source == IPv4Interface("192.0.2.99/24") and config.gateway == V4("192.0.2.1")
    assert config.dns_proxy is not None


def test_explicit_dns_proxy_mode_is_accepted() -> None:
    assert load({**DNS, "EGRESS_ROUTER_MODE": "dns-proxy"}).mode == "dns-proxy"
    assert load({**DNS, "EGRESS_ROUTER_MODE": " dns-proxy "}).mode == "dns-proxy"


def test_dns_proxy_mode_without_a_destination_configures_the_network_only() -> None:
    config = load({"EGRESS_ROUTER_MODE": "dns-proxy", **SOURCE})
    assert config.dns_proxy is None and config.configures_network and not config.configures_nat
    with pytest.raises(ConfigError) as caught:
        load({"EGRESS_ROUTER_MODE": "dns-proxy"})
    assert caught.value.variable == "EGRESS_SOURCE"


@pytest.mark.parametrize("destination", ["", "   ", "\n"])
def test_a_blank_destination_does_not_request_the_proxy(destination: str) -> None:
    config = load({"EGRESS_DNS_PROXY_DESTINATION": destination, "EGRESS_ROUTER_MODE": "dns-proxy", **SOURCE})
    assert config.dns_proxy is None


@pytest.mark.parametrize("mode", ["init", "legacy", "unit-test", "http-proxy"])
def test_another_mode_with_the_dns_destination_is_an_error(mode: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**DNS, **SOURCE, "EGRESS_ROUTER_MODE": mode, "EGRESS_DESTINATION": "80 tcp 203.0.113.10"})
    assert caught.value.variable == "EGRESS_DNS_PROXY_DESTINATION"
    assert repr(mode) in caught.value.reason and "dns-proxy" in caught.value.reason


def test_http_and_dns_destinations_together_are_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load({**DNS, **SOURCE, "EGRESS_HTTP_PROXY_DESTINATION": "*.example.com"})
    assert caught.value.variable == "EGRESS_DNS_PROXY_DESTINATION"
    assert "EGRESS_HTTP_PROXY_DESTINATION" in caught.value.reason


def test_gateway_without_source_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load({**DNS, "EGRESS_GATEWAY": "192.0.2.1"})
    assert caught.value.variable == "EGRESS_GATEWAY"


def test_grammar_errors_pass_through_load() -> None:
    with pytest.raises(ConfigError) as caught:
        load({"EGRESS_DNS_PROXY_DESTINATION": "53 203.0.113.53\n53 203.0.113.54"})
    assert (caught.value.variable, caught.value.line) == ("EGRESS_DNS_PROXY_DESTINATION", 2)


def test_settings_defaults() -> None:
    settings_ = load_dns_proxy(DNS)
    defaults = {variable.name: variable.default for variable in VARIABLES.values()}
    assert settings_.debug == defaults["EGRESS_DNS_PROXY_DEBUG"] and settings_.workers == defaults[
        "EGRESS_DNS_PROXY_WORKERS"] and settings_.ttl_max == defaults["EGRESS_DNS_PROXY_TTL_MAX"]
    assert (settings_.debug, settings_.workers, settings_.connect_timeout, settings_.idle_timeout,
            settings_.max_connections, settings_.ttl_min, settings_.ttl_max, settings_.grace_seconds) == \
        (False, None, 10.0, 60.0, 10_000, 1.0, 30.0, 10.0)


def test_settings_from_the_environment() -> None:
    settings_ = load_dns_proxy({**DNS, "EGRESS_DNS_PROXY_DEBUG": "1", "EGRESS_DNS_PROXY_WORKERS": "3",
                                "EGRESS_DNS_PROXY_CONNECT_TIMEOUT": "2.5", "EGRESS_DNS_PROXY_IDLE_TIMEOUT": "7",
                                "EGRESS_DNS_PROXY_MAX_CONNECTIONS": "12", "EGRESS_DNS_PROXY_TTL_MIN": "0",
                                "EGRESS_DNS_PROXY_TTL_MAX": "0", "EGRESS_PROXY_GRACE_SECONDS": "0"})
    assert (settings_.debug, settings_.workers, settings_.connect_timeout, settings_.idle_timeout,
            settings_.max_connections, settings_.ttl_min, settings_.ttl_max, settings_.grace_seconds) == \
        (True, 3, 2.5, 7.0, 12, 0.0, 0.0, 0.0)


def test_ttl_max_below_ttl_min_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load({**DNS, "EGRESS_DNS_PROXY_TTL_MIN": "10", "EGRESS_DNS_PROXY_TTL_MAX": "5"})
    assert caught.value.variable == "EGRESS_DNS_PROXY_TTL_MAX"
    assert "5" in caught.value.reason and "10" in caught.value.reason
    # equal is fine, and TTL_MAX alone is checked against the default TTL_MIN (1)
    assert load({**DNS, "EGRESS_DNS_PROXY_TTL_MIN": "5", "EGRESS_DNS_PROXY_TTL_MAX": "5"}).dns_proxy is not None
    with pytest.raises(ConfigError):
        load({**DNS, "EGRESS_DNS_PROXY_TTL_MAX": "0.5"})


@pytest.mark.parametrize(
    ("name", "value"),
    [("EGRESS_DNS_PROXY_DEBUG", "maybe"), ("EGRESS_DNS_PROXY_WORKERS", "0"), ("EGRESS_DNS_PROXY_WORKERS", "two"),
     ("EGRESS_DNS_PROXY_CONNECT_TIMEOUT", "0"), ("EGRESS_DNS_PROXY_CONNECT_TIMEOUT", "-1"),
     ("EGRESS_DNS_PROXY_IDLE_TIMEOUT", "1m"), ("EGRESS_DNS_PROXY_MAX_CONNECTIONS", "0"),
     ("EGRESS_DNS_PROXY_TTL_MIN", "-1"), ("EGRESS_DNS_PROXY_TTL_MAX", "forever"),
     ("EGRESS_PROXY_GRACE_SECONDS", "soon")],
)
def test_bad_values_name_their_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load({**DNS, name: value})
    assert caught.value.variable == name
    assert repr(value) in caught.value.reason


def test_dns_proxy_variables_are_known() -> None:
    env = {**DNS, "EGRESS_DNS_PROXY_DEBUG": "1", "EGRESS_DNS_PROXY_WORKERS": "1",
           "EGRESS_DNS_PROXY_CONNECT_TIMEOUT": "1", "EGRESS_DNS_PROXY_IDLE_TIMEOUT": "1",
           "EGRESS_DNS_PROXY_MAX_CONNECTIONS": "1", "EGRESS_DNS_PROXY_TTL_MIN": "1", "EGRESS_DNS_PROXY_TTL_MAX": "1"}
    assert load(env).warnings == ()
    typo = load({**DNS, "EGRESS_DNS_PROXY_DESTINATIONS": "53 203.0.113.53"}).warnings
    assert len(typo) == 1 and "did you mean EGRESS_DNS_PROXY_DESTINATION?" in typo[0]
