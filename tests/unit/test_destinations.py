"""The EGRESS_DESTINATION grammar: every accepted form, every rejected one, and the canonical format."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from egress_router.core.errors import ConfigError
from egress_router.core.redirect import (
    Destinations,
    PortRule,
    format_destinations,
    parse_destinations,
    parse_port,
)

A = IPv4Address


def rule(port: int, proto: str, ip: str, remote: int | None = None) -> PortRule:
    return PortRule(port, proto, A(ip), remote)


# ---------------------------------------------------------------- accepted forms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80 tcp 10.4.5.6", Destinations((rule(80, "tcp", "10.4.5.6"),))),
        ("8080 tcp 10.7.8.9 80", Destinations((rule(8080, "tcp", "10.7.8.9", 80),))),
        ("10.1.2.3", Destinations((), A("10.1.2.3"))),
        (
            "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
            Destinations((rule(80, "tcp", "10.4.5.6"), rule(8080, "tcp", "10.7.8.9", 80)), A("10.1.2.3")),
        ),
        ("1 udp 192.0.2.1 65535", Destinations((rule(1, "udp", "192.0.2.1", 65535),))),
        ("65535 sctp 192.0.2.1 1", Destinations((rule(65535, "sctp", "192.0.2.1", 1),))),
        # 53 over tcp and over udp are different rules
        (
            "53 tcp 192.0.2.53\n53 udp 192.0.2.53",
            Destinations((rule(53, "tcp", "192.0.2.53"), rule(53, "udp", "192.0.2.53"))),
        ),
        # the same port may go to different protocols and a port may be the remote port of another rule
        (
            "80 tcp 192.0.2.1 8080\n8080 tcp 192.0.2.2 80",
            Destinations((rule(80, "tcp", "192.0.2.1", 8080), rule(8080, "tcp", "192.0.2.2", 80))),
        ),
        # the remote port may equal the local port
        ("443 tcp 192.0.2.1 443", Destinations((rule(443, "tcp", "192.0.2.1", 443),))),
        # reserved and private ranges are still unicast hosts
        ("10.0.0.1", Destinations((), A("10.0.0.1"))),
        ("22 tcp 240.0.0.1", Destinations((rule(22, "tcp", "240.0.0.1"),))),
    ],
    ids=[
        "port-proto-ip", "remote-port", "fallback-only", "legacy-example", "min-port-max-remote",
        "max-port-min-remote", "same-port-two-protos", "crossed-ports", "remote-equals-local",
        "private-fallback", "reserved-range",
    ],
)
def test_accepted_forms(text: str, expected: Destinations) -> None:
    assert parse_destinations(text) == expected


@pytest.mark.parametrize(
    ("spelling", "proto"),
    [("tcp", "tcp"), ("TCP", "tcp"), ("Tcp", "tcp"), ("udp", "udp"), ("UDP", "udp"), ("uDp", "udp"),
     ("sctp", "sctp"), ("SCTP", "sctp"), ("ScTp", "sctp")],
)
def test_protocol_is_case_insensitive_and_normalised(spelling: str, proto: str) -> None:
    parsed = parse_destinations(f"80 {spelling} 10.0.0.1")
    assert parsed.rules[0].proto == proto


def test_same_port_in_different_case_is_a_duplicate() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("80 tcp 10.0.0.1\n80 TCP 10.0.0.2")
    assert caught.value.line == 2
    assert "already redirected on line 1" in caught.value.reason


LEGACY = Destinations((rule(80, "tcp", "10.4.5.6"), rule(8080, "tcp", "10.7.8.9", 80)), A("10.1.2.3"))


@pytest.mark.parametrize(
    "text",
    [
        "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3",
        "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3\n",
        "\n\n80 tcp 10.4.5.6\n\n8080 tcp 10.7.8.9 80\n\n10.1.2.3\n\n",
        "# header comment\n80 tcp 10.4.5.6\n   # indented comment\n8080 tcp 10.7.8.9 80\n10.1.2.3\n# trailer",
        "80 tcp 10.4.5.6 # web\n8080 tcp 10.7.8.9 80   # alt web\n10.1.2.3# everything else",
        "80\ttcp\t10.4.5.6\n8080\t\ttcp \t 10.7.8.9\t80\n\t10.1.2.3\t",
        "80    tcp   10.4.5.6\n8080  tcp  10.7.8.9     80\n10.1.2.3",
        "   80 tcp 10.4.5.6   \n  8080 tcp 10.7.8.9 80  \n   10.1.2.3   ",
        "80 tcp 10.4.5.6\r\n8080 tcp 10.7.8.9 80\r\n10.1.2.3\r\n",
        "80 tcp 10.4.5.6 #\n8080 tcp 10.7.8.9 80 ## two hashes # and more\n10.1.2.3 #10.9.9.9",
        "   \t \n80 TCP 10.4.5.6\n \t\n8080 Tcp 10.7.8.9 80\r\n10.1.2.3",
    ],
    ids=[
        "plain", "trailing-newline", "blank-lines", "whole-line-comments", "trailing-comments", "tabs",
        "runs-of-spaces", "leading-trailing-whitespace", "crlf", "hashes-in-comments", "mixed",
    ],
)
def test_layout_does_not_matter(text: str) -> None:
    assert parse_destinations(text) == LEGACY


def test_line_numbers_count_every_physical_line() -> None:
    text = "# comment\n\n80 tcp 10.4.5.6\n   \n8080 tcp 10.7.8.9 80 # x\r\n53 udp 10.0.0.53\n10.1.2.3"
    parsed = parse_destinations(text)
    assert [r.line for r in parsed.rules] == [3, 5, 6]


def test_line_is_not_part_of_equality() -> None:
    assert PortRule(80, "tcp", A("10.0.0.1"), line=1) == PortRule(80, "tcp", A("10.0.0.1"), line=7)


def test_port_rule_target_port() -> None:
    assert rule(80, "tcp", "10.0.0.1").target_port == 80
    assert rule(8080, "tcp", "10.0.0.1", 80).target_port == 80


@pytest.mark.parametrize(
    ("destinations", "length"),
    [
        (Destinations((), A("10.0.0.1")), 1),
        (Destinations((rule(80, "tcp", "10.0.0.1"),)), 1),
        (LEGACY, 3),
    ],
)
def test_len_counts_rules_and_fallback(destinations: Destinations, length: int) -> None:
    assert len(destinations) == length


def test_leading_zeros_in_a_port_are_its_decimal_value() -> None:
    assert parse_destinations("0080 tcp 10.0.0.1 08080").rules[0] == rule(80, "tcp", "10.0.0.1", 8080)


# ---------------------------------------------------------------- rejected lines


def lines_of(text: str) -> list[str]:
    return text.split("\n")


@pytest.mark.parametrize(
    ("text", "line", "token", "reason"),
    [
        # bad local port
        ("0 tcp 10.0.0.1", 1, "'0'", "not a port number"),
        ("65536 tcp 10.0.0.1", 1, "'65536'", "not a port number"),
        ("-1 tcp 10.0.0.1", 1, "'-1'", "not a port number"),
        ("http tcp 10.0.0.1", 1, "'http'", "not a port number"),
        ("0x50 tcp 10.0.0.1", 1, "'0x50'", "not a port number"),
        ("+80 tcp 10.0.0.1", 1, "'+80'", "not a port number"),
        ("80.0 tcp 10.0.0.1", 1, "'80.0'", "not a port number"),
        ("٨٠ tcp 10.0.0.1", 1, "'٨٠'", "not a port number"),  # Arabic-Indic digits are not ASCII digits
        ("99999999999999999999 tcp 10.0.0.1", 1, "99999999999999999999", "not a port number"),
        # bad remote port
        ("80 tcp 10.0.0.1 0", 1, "'0'", "remote port"),
        ("80 tcp 10.0.0.1 65536", 1, "'65536'", "remote port"),
        ("80 tcp 10.0.0.1 -1", 1, "'-1'", "remote port"),
        ("80 tcp 10.0.0.1 http", 1, "'http'", "remote port"),
        ("80 tcp 10.0.0.1 0x50", 1, "'0x50'", "remote port"),
        # bad protocol
        ("80 icmp 10.0.0.1", 1, "'icmp'", "not one of tcp, udp, sctp"),
        ("80 tcp6 10.0.0.1", 1, "'tcp6'", "not one of tcp, udp, sctp"),
        ("80 TCPX 10.0.0.1", 1, "'TCPX'", "not one of tcp, udp, sctp"),
        ("80 6 10.0.0.1", 1, "'6'", "not one of tcp, udp, sctp"),
        # bad address in a rule
        ("80 tcp 10.0.0", 1, "'10.0.0'", "not an IPv4 address"),
        ("80 tcp 256.1.1.1", 1, "'256.1.1.1'", "not an IPv4 address"),
        ("80 tcp 010.1.1.1", 1, "'010.1.1.1'", "not an IPv4 address"),
        ("80 tcp ::1", 1, "::1", "the loopback address"),
        ("80 tcp 2001:db8::g", 1, "'2001:db8::g'", "not an IPv6 address"),
        ("80 tcp fe80::1", 1, "fe80::1", "link-local"),
        ("80 tcp fe80::1%eth0", 1, "'fe80::1%eth0'", "zone index"),
        ("80 tcp ::ffff:192.0.2.1", 1, "::ffff:192.0.2.1", "IPv4-mapped address: write it as 192.0.2.1"),
        ("80 tcp ff02::1", 1, "ff02::1", "multicast"),
        ("80 tcp ::", 1, "::", "unspecified"),
        ("80 tcp example.com", 1, "'example.com'", "not an IPv4 address"),
        ("80 tcp localhost", 1, "'localhost'", "not an IPv4 address"),
        ("80 tcp 10.0.0.1/32", 1, "'10.0.0.1/32'", "not an IPv4 address"),
        ("80 tcp 10.0.0.1:80", 1, "'10.0.0.1:80'", "not an IPv4 address"),
        # unusable address in a rule
        ("80 tcp 0.0.0.0", 1, "0.0.0.0", "unspecified"),
        ("80 tcp 255.255.255.255", 1, "255.255.255.255", "broadcast"),
        ("80 tcp 127.0.0.1", 1, "127.0.0.1", "loopback"),
        ("80 tcp 127.255.0.9", 1, "127.255.0.9", "loopback"),
        ("80 tcp 224.0.0.1", 1, "224.0.0.1", "multicast"),
        ("80 tcp 239.255.255.250", 1, "239.255.255.250", "multicast"),
        # bad or unusable fallback
        ("10.0.0", 1, "'10.0.0'", "fallback"),
        ("256.1.1.1", 1, "'256.1.1.1'", "fallback"),
        ("010.1.1.1", 1, "'010.1.1.1'", "fallback"),
        ("::1", 1, "::1", "loopback"),
        ("2001:db8::zz", 1, "'2001:db8::zz'", "fallback"),
        ("egress.example.com", 1, "'egress.example.com'", "fallback"),
        ("80", 1, "'80'", "fallback"),
        ("tcp", 1, "'tcp'", "fallback"),
        ("0.0.0.0", 1, "0.0.0.0", "unspecified"),
        ("255.255.255.255", 1, "255.255.255.255", "broadcast"),
        ("127.0.0.1", 1, "127.0.0.1", "loopback"),
        ("224.0.0.1", 1, "224.0.0.1", "multicast"),
        # wrong number of fields
        ("80 tcp", 1, "80 tcp", "got 2 fields"),
        ("80 tcp 10.0.0.1 8080 extra", 1, "extra", "got 5 fields"),
        ("80 tcp 10.0.0.1 8080 1 2", 1, "8080 1 2", "got 6 fields"),
        # order and uniqueness
        ("10.1.2.3\n80 tcp 10.0.0.1", 2, "80 tcp 10.0.0.1", "may follow the fallback address on line 1"),
        ("10.1.2.3\n10.1.2.4", 2, "10.1.2.4", "a second IPv4 fallback: the one on line 1 is the fallback"),
        ("10.1.2.3\n\n# c\nbogus", 4, "bogus", "may follow the fallback address on line 1"),
        ("2001:db8::1\n2001:db8::2", 2, "2001:db8::2", "a second IPv6 fallback"),
        ("2001:db8::1\n80 tcp 10.0.0.1", 2, "80 tcp 10.0.0.1", "port rules come first"),
        ("80 tcp 2001:db8::1\n80 tcp 2001:db8::2", 2, "80 tcp 2001:db8::2",
         "IPv6 tcp port 80 is already redirected on line 1"),
        ("80 tcp 10.0.0.1\n80 tcp 10.0.0.2", 2, "10.0.0.2", "tcp port 80 is already redirected on line 1"),
        (
            "53 udp 10.0.0.1\n53 tcp 10.0.0.1\n\n53 udp 10.0.0.2 5353",
            4, "53 udp 10.0.0.2 5353", "udp port 53 is already redirected on line 1",
        ),
        # the error is reported on the right physical line
        ("# c\n\n80 tcp 10.0.0.1\n  81 tcp 10.0.0.300  # oops", 4, "10.0.0.300", "not an IPv4 address"),
        ("80 tcp 10.0.0.1\r\n81 tcp 10.0.0.1\r\n82 xyz 10.0.0.1\r\n", 3, "'xyz'", "not one of"),
    ],
)
def test_rejected_lines(text: str, line: int, token: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations(text)
    err = caught.value
    assert err.variable == "EGRESS_DESTINATION"
    assert err.line == line
    assert err.text == lines_of(text)[line - 1].strip()
    assert reason in err.reason
    message = str(err)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"EGRESS_DESTINATION line {line}: ")
    assert repr(err.text) in message
    assert token in message


def test_fallback_error_reports_the_second_fallback_and_first_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("80 tcp 10.0.0.1\n10.0.0.2\n\n10.0.0.3")
    assert (caught.value.line, caught.value.text) == (4, "10.0.0.3")
    assert "line 2" in caught.value.reason


def test_first_bad_line_wins() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("80 tcp 10.0.0.1\n0 tcp 10.0.0.1\n80 bogus 10.0.0.1")
    assert caught.value.line == 2


@pytest.mark.parametrize("text", ["", "\n", "   ", "\n\n\t\n", "# only a comment", "# one\n  # two\n\n", "\r\n"])
def test_no_rules_at_all(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations(text)
    err = caught.value
    assert err.variable == "EGRESS_DESTINATION"
    assert err.line is None
    assert str(err).startswith("EGRESS_DESTINATION: no rules")
    assert len(str(err).splitlines()) == 1


def test_control_characters_stay_on_one_line_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("80\x0btcp 10.0.0.1")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "\\x0b" in message


def test_variable_name_is_configurable() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("0 tcp 10.0.0.1", variable="OTHER")
    assert caught.value.variable == "OTHER"
    assert str(caught.value).startswith("OTHER line 1: ")


@pytest.mark.parametrize("digits", [4301, 5000])
def test_absurdly_long_port_is_a_config_error(digits: int) -> None:
    """Python refuses int() of more than 4300 digits with ValueError; that must still be a ConfigError."""
    with pytest.raises(ConfigError) as caught:
        parse_destinations("9" * digits + " tcp 10.0.0.1")
    assert caught.value.line == 1


def test_absurdly_long_remote_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_destinations("80 tcp 10.0.0.1 " + "1" * 5000)
    assert caught.value.line == 1


@pytest.mark.parametrize("value", ["", "0", "65536", "-1", "http", "0x50", " 80", "80 "])
def test_parse_port_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_port(value, "EGRESS_DESTINATION", line=3, text="t", what="port")
    assert caught.value.line == 3
    assert repr(value) in caught.value.reason


@pytest.mark.parametrize(("value", "port"), [("1", 1), ("80", 80), ("65535", 65535), ("00443", 443)])
def test_parse_port_accepts(value: str, port: int) -> None:
    assert parse_port(value, "EGRESS_DESTINATION", line=1, text="t", what="port") == port


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("destinations", "text"),
    [
        (LEGACY, "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3"),
        (Destinations((), A("192.0.2.1")), "192.0.2.1"),
        (Destinations((rule(53, "udp", "192.0.2.53"), rule(53, "tcp", "192.0.2.53", 5353))),
         "53 udp 192.0.2.53\n53 tcp 192.0.2.53 5353"),
        (Destinations((rule(9, "sctp", "198.51.100.7"),)), "9 sctp 198.51.100.7"),
    ],
)
def test_format_is_canonical_and_parses_back(destinations: Destinations, text: str) -> None:
    assert format_destinations(destinations) == text
    assert parse_destinations(text) == destinations


def test_format_of_messy_input_is_the_canonical_text() -> None:
    messy = "# c\n  80\tTCP  10.4.5.6 # x\r\n\n8080 tcp 10.7.8.9   80\n10.1.2.3  "
    assert format_destinations(parse_destinations(messy)) == "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3"
