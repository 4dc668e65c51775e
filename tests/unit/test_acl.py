"""The HTTP proxy allow list: every rule form and error, host normalization, first-match order, properties."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_router.core.allowlist import AccessList, Rule, parse_access_list
from egress_router.core.errors import ConfigError
from egress_router.core.hosts import HostError, normalize_host

Address = IPv4Address | IPv6Address
VARIABLE = "EGRESS_HTTP_PROXY_DESTINATION"
MODEST = settings(max_examples=200, deadline=None)


def addresses(*texts: str) -> list[Address]:
    return [ip_address(text) for text in texts]


# ---------------------------------------------------------------- accepted rule forms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("www.example.com", Rule(True, "host", "www.example.com")),
        ("WWW.Example.COM", Rule(True, "host", "www.example.com")),
        ("www.example.com.", Rule(True, "host", "www.example.com")),
        ("localhost", Rule(True, "host", "localhost")),
        ("_srv.under_score.example", Rule(True, "host", "_srv.under_score.example")),
        ("xn--bcher-kva.example", Rule(True, "host", "xn--bcher-kva.example")),
        ("a1-b2.example9", Rule(True, "host", "a1-b2.example9")),
        ("*.example.com", Rule(True, "domain", "example.com")),
        ("*.Example.COM.", Rule(True, "domain", "example.com")),
        ("*.com", Rule(True, "domain", "com")),
        ("192.0.2.10", Rule(True, "network", network=IPv4Network("192.0.2.10/32"))),
        ("192.0.2.0/24", Rule(True, "network", network=IPv4Network("192.0.2.0/24"))),
        ("0.0.0.0/0", Rule(True, "network", network=IPv4Network("0.0.0.0/0"))),
        ("192.0.2.10/32", Rule(True, "network", network=IPv4Network("192.0.2.10/32"))),
        ("2001:db8::/32", Rule(True, "network", network=IPv6Network("2001:db8::/32"))),
        ("2001:DB8::/32", Rule(True, "network", network=IPv6Network("2001:db8::/32"))),
        ("2001:db8::5", Rule(True, "network", network=IPv6Network("2001:db8::5/128"))),
        ("2001:0db8:0000:0000:0000:0000:0000:0005", Rule(True, "network", network=IPv6Network("2001:db8::5/128"))),
        ("::/0", Rule(True, "network", network=IPv6Network("::/0"))),
        ("!10.0.0.0/8", Rule(False, "network", network=IPv4Network("10.0.0.0/8"))),
        ("!2001:db8::5", Rule(False, "network", network=IPv6Network("2001:db8::5/128"))),
        ("!*.internal.example", Rule(False, "domain", "internal.example")),
        ("!secret.example.com", Rule(False, "host", "secret.example.com")),
        ("*", Rule(True, "any")),
    ],
)
def test_rule_forms(text: str, expected: Rule) -> None:
    assert parse_access_list(text).rules == (expected,)


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Rule(True, "host", "www.example.com"), "www.example.com"),
        (Rule(False, "domain", "example.com"), "!*.example.com"),
        (Rule(True, "network", network=IPv4Network("10.0.0.0/8")), "10.0.0.0/8"),
        (Rule(True, "network", network=IPv4Network("192.0.2.1/32")), "192.0.2.1"),
        (Rule(False, "network", network=IPv6Network("2001:db8::5/128")), "!2001:db8::5"),
        (Rule(True, "network", network=IPv6Network("2001:db8::/32")), "2001:db8::/32"),
        (Rule(True, "any"), "*"),
    ],
)
def test_rule_str_is_its_canonical_text(rule: Rule, text: str) -> None:
    assert str(rule) == text


RULES_TEXT = "www.example.com\n!*.internal.example\n10.0.0.0/8\n*"


@pytest.mark.parametrize(
    "text",
    [
        RULES_TEXT,
        RULES_TEXT + "\n",
        "\n\n" + RULES_TEXT.replace("\n", "\n\n") + "\n\n",
        "# header\n" + RULES_TEXT.replace("\n", "\n   # indented comment\n") + "\n# trailer",
        "www.example.com # the site\n!*.internal.example#no space\n10.0.0.0/8   # lab\n* # rest",
        "  www.example.com\t\n\t!*.internal.example  \n 10.0.0.0/8\n   *   ",
        RULES_TEXT.replace("\n", "\r\n"),
        "WWW.EXAMPLE.COM.\n!*.Internal.Example.\n10.0.0.0/8\n*",
        # duplicate identical rules are allowed (and change nothing)
        "www.example.com\nwww.example.com\n!*.internal.example\n10.0.0.0/8\n10.0.0.0/8\n*",
    ],
    ids=["plain", "trailing-newline", "blank-lines", "whole-line-comments", "trailing-comments", "whitespace",
         "crlf", "case-and-dots", "duplicates"],
)
def test_layout_does_not_matter(text: str) -> None:
    parsed = parse_access_list(text)
    assert [str(rule) for rule in dict.fromkeys(parsed.rules)] == RULES_TEXT.split("\n")


def test_line_numbers_count_every_physical_line() -> None:
    parsed = parse_access_list("# comment\n\nwww.example.com\n   \n10.0.0.0/8 # x\r\n*")
    assert [rule.line for rule in parsed.rules] == [3, 5, 6]


def test_an_access_list_built_from_rules_equals_the_parsed_one() -> None:
    built = AccessList((Rule(False, "network", network=IPv4Network("10.0.0.0/8")), Rule(True, "any")))
    assert built == parse_access_list("!10.0.0.0/8\n*")
    assert built.allowed_addresses("x.example", addresses("10.1.2.3", "203.0.113.5")) == addresses("203.0.113.5")


def test_line_is_not_part_of_equality() -> None:
    assert Rule(True, "host", "a.example", line=1) == Rule(True, "host", "a.example", line=9)


def test_everything_is_frozen() -> None:
    parsed = parse_access_list("www.example.com")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.rules = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.rules[0].allow = False  # type: ignore[misc]
    assert isinstance(parsed.rules, tuple)


def test_the_variable_name_is_passed_through() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_access_list("*.*", variable="OTHER_VARIABLE")
    assert caught.value.variable == "OTHER_VARIABLE"
    assert str(caught.value).startswith("OTHER_VARIABLE line 1: ")


# ---------------------------------------------------------------- rejected lines


@pytest.mark.parametrize(
    ("text", "line", "token", "reason"),
    [
        # wildcards anywhere but a leading '*.'
        ("*example.com", 1, "'*example.com'", "may only appear as a leading '*.'"),
        ("www.*.com", 1, "'www.*.com'", "may only appear as a leading '*.'"),
        ("*.*.com", 1, "'*.*.com'", "may only appear as a leading '*.'"),
        ("www.example.*", 1, "'www.example.*'", "may only appear as a leading '*.'"),
        ("**", 1, "'**'", "may only appear as a leading '*.'"),
        ("!*example.com", 1, "'*example.com'", "may only appear as a leading '*.'"),
        ("10.0.0.*", 1, "'10.0.0.*'", "may only appear as a leading '*.'"),
        ("*.", 1, "'*.'", "must be followed by a domain"),
        ("!*.", 1, "'*.'", "must be followed by a domain"),
        ("*..", 1, "'.'", "not a host name"),
        # '*' placement
        ("*\nwww.example.com", 2, "'*' (line 1)", "must be the last rule"),
        ("a.example\n*\n\n# fine\n10.0.0.0/8", 5, "'*' (line 2)", "must be the last rule"),
        ("*\n*", 2, "'*' (line 1)", "must be the last rule"),
        ("!*", 1, "'!*'", "denied already"),
        # '!' misuse
        ("!", 1, "'!'", "must be followed by"),
        ("!!www.example.com", 1, "'!!www.example.com'", "one '!' is enough"),
        ("! www.example.com", 1, "'! www.example.com'", "spaces inside"),
        # spaces inside a rule
        ("www.example.com 10.0.0.1", 1, "'www.example.com 10.0.0.1'", "spaces inside"),
        ("www.example.com\t*.example.org", 1, "'www.example.com\\t*.example.org'", "spaces inside"),
        ("10.0.0.0 /8", 1, "'10.0.0.0 /8'", "spaces inside"),
        ("a.example\nb.example c.example", 2, "'b.example c.example'", "spaces inside"),
        # invalid names
        ("-www.example.com", 1, "'-www'", "starts or ends with '-'"),
        ("www-.example.com", 1, "'www-'", "starts or ends with '-'"),
        ("www..example.com", 1, "'www..example.com'", "empty label"),
        (".example.com", 1, "'.example.com'", "empty label"),
        ("www.example.com..", 1, "'www.example.com..'", "empty label"),
        ("." , 1, "'.'", "not a host name"),
        ("x" * 64 + ".example", 1, "'" + "x" * 64 + "'", "longer than 63"),
        (".".join(["a" * 63] * 4), 1, "255", "too long"),
        ("www.exa$mple.com", 1, "'$'", "is not allowed"),
        ("bücher.example", 1, "'ü'", "is not allowed"),
        ("www.example.com:80", 1, "'www.example.com:80'", "rules have no port"),
        ("192.0.2.1:443", 1, "'192.0.2.1:443'", "rules have no port"),
        ("http://www.example.com", 1, "'http://www.example.com'", "is a URL"),
        ("https://10.0.0.0/8", 1, "'https://10.0.0.0/8'", "is a URL"),
        ("www.example.com/path", 1, "'www.example.com'", "not an IPv4 or IPv6 address"),
        # names that are numbers are not names
        ("10.0.0", 1, "'10.0.0'", "write all four parts"),
        ("010.0.0.1", 1, "'010.0.0.1'", "leading zeros"),
        ("10.0.0.01", 1, "'10.0.0.01'", "leading zeros"),
        ("3221225994", 1, "'3221225994'", "not a dotted-quad IPv4 address"),
        ("0xc0000201", 1, "'0xc0000201'", "hexadecimal"),
        ("0xC0.0.2.1", 1, "'0xC0.0.2.1'", "hexadecimal"),
        ("256.1.1.1", 1, "'256.1.1.1'", "0-255"),
        ("1.2.3.4.5", 1, "'1.2.3.4.5'", "not a dotted-quad IPv4 address"),
        ("192.0.2.1.", 1, "'192.0.2.1.'", "drop the trailing dot"),
        ("example.123", 1, "'example.123'", "last label is a number"),
        ("example.0x1f", 1, "'example.0x1f'", "last label is a number"),
        ("*.10.0.0", 1, "'10.0.0'", "not a dotted-quad IPv4 address"),
        # networks
        ("192.0.2.1/24", 1, "192.0.2.1/24", "has host bits set; did you mean 192.0.2.0/24?"),
        ("10.1.2.3/8", 1, "10.1.2.3/8", "did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", 1, "2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("10.0.0.0/33", 1, "/33", "out of range for IPv4 (0-32)"),
        ("2001:db8::/129", 1, "/129", "out of range for IPv6 (0-128)"),
        ("10.0.0.0/", 1, "''", "not a prefix length (0-32)"),
        ("10.0.0.0/08", 1, "'08'", "not a prefix length"),
        ("10.0.0.0/-1", 1, "'-1'", "not a prefix length"),
        ("10.0.0.0/8/8", 1, "'8/8'", "not a prefix length"),
        ("10.0.0.0/255.0.0.0", 1, "'255.0.0.0'", "not a prefix length"),
        ("10.0.0/8", 1, "'10.0.0'", "not an IPv4 or IPv6 address"),
        ("010.0.0.0/8", 1, "'010.0.0.0'", "leading zeros"),
        ("/8", 1, "''", "not an IPv4 or IPv6 address"),
        # IPv6 literals
        ("[2001:db8::1]", 1, "'[2001:db8::1]'", "without brackets"),
        ("2001:db8:::1", 1, "'2001:db8:::1'", "not an IPv6 address"),
        ("2001:db8::g", 1, "'2001:db8::g'", "not an IPv6 address"),
        ("fe80::1%eth0", 1, "'fe80::1%eth0'", "zone id"),
        ("fe80::%eth0/64", 1, "'fe80::%eth0'", "zone id"),
        # IPv4-mapped IPv6
        ("::ffff:0:0/96", 1, "'::ffff:0:0/96'", "write it as IPv4: 0.0.0.0/0"),
        ("::ffff:10.0.0.0/104", 1, "'::ffff:10.0.0.0/104'", "write it as IPv4: 10.0.0.0/8"),
        ("!::ffff:c000:200/120", 1, "'::ffff:c000:200/120'", "write it as IPv4: 192.0.2.0/24"),
        ("::ffff:192.0.2.1", 1, "::ffff:192.0.2.1", "write it as IPv4: 192.0.2.1"),
        ("::ffff:c000:201/128", 1, "'::ffff:c000:201/128'", "write it as IPv4: 192.0.2.1/32"),
        # the error is on the first bad line, counted physically
        ("# comment\n\nwww.example.com\n   *x.example.com  # bad", 4, "'*x.example.com'", "leading '*.'"),
    ],
)
def test_rejected_lines(text: str, line: int, token: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_access_list(text)
    err = caught.value
    assert err.variable == VARIABLE
    assert err.line == line
    assert err.text == text.split("\n")[line - 1].strip()
    assert token in err.reason
    assert reason in err.reason
    message = str(err)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{VARIABLE} line {line}: {err.text!r}: ")


@pytest.mark.parametrize("text", ["", "\n", "   \n\t\n", "# only a comment", "# one\n  # two\n\n", "#*"])
def test_empty_lists_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_access_list(text)
    assert caught.value.variable == VARIABLE
    assert caught.value.line is None
    assert "no rules" in caught.value.reason
    assert len(str(caught.value).splitlines()) == 1


def test_long_tokens_are_shortened_in_reasons() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_access_list("a$" * 1000)
    assert len(caught.value.reason) < 200


# ---------------------------------------------------------------- names: case, trailing dots, wildcards


@pytest.mark.parametrize("rule", ["www.example.com", "WWW.EXAMPLE.COM", "www.example.com.", "Www.Example.Com."])
@pytest.mark.parametrize("host", ["www.example.com", "WWW.Example.com", "www.example.com.", "WWW.EXAMPLE.COM."])
def test_names_compare_case_insensitively_without_trailing_dot(rule: str, host: str) -> None:
    acl = parse_access_list(rule)
    name = normalize_host(host)
    assert name == "www.example.com"
    assert isinstance(name, str)
    assert acl.name_verdict(name) is True
    assert acl.address_allowed(name, IPv4Address("203.0.113.5")) is True


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("example.com", True),
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("A.B.EXAMPLE.COM.", True),
        ("badexample.com", False),
        ("example.com.evil.net", False),
        ("example.co", False),
        ("com", False),
        ("xexample.com", False),
        ("a.example.community", False),
    ],
)
def test_domain_wildcard(host: str, allowed: bool) -> None:
    acl = parse_access_list("*.example.com")
    name = normalize_host(host)
    assert isinstance(name, str)
    assert acl.name_verdict(name) is allowed
    assert acl.address_allowed(name, IPv4Address("203.0.113.5")) is allowed


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("www.example.com", True), ("example.com", False), ("a.www.example.com", False), ("ww.example.com", False)],
)
def test_exact_host(host: str, allowed: bool) -> None:
    assert parse_access_list("www.example.com").name_verdict(host) is allowed


# ---------------------------------------------------------------- order: the first match decides


@pytest.mark.parametrize(
    ("rules", "name", "expected"),
    [
        # allow then deny: the allow wins for what it covers
        ("*.example.com\n!secret.example.com", "secret.example.com", True),
        ("www.example.com\n!*.example.com", "www.example.com", True),
        ("www.example.com\n!*.example.com", "mail.example.com", False),
        # deny then allow: the deny wins for what it covers
        ("!secret.example.com\n*.example.com", "secret.example.com", False),
        ("!secret.example.com\n*.example.com", "www.example.com", True),
        ("!*.internal.example.com\n*.example.com", "db.internal.example.com", False),
        ("!*.internal.example.com\n*.example.com", "internal.example.com", False),
        ("!*.internal.example.com\n*.example.com", "www.example.com", True),
        # a deeper domain listed after a shallower one never gets a say
        ("*.example.com\n!*.internal.example.com", "db.internal.example.com", True),
        ("!*.example.com\n*.internal.example.com", "db.internal.example.com", False),
        # contradictory duplicates: the first one counts
        ("www.example.com\n!www.example.com", "www.example.com", True),
        ("!www.example.com\nwww.example.com", "www.example.com", False),
        # '*' allows what nothing before it matched, and nothing else
        ("!*.internal.example\n*", "www.example.com", True),
        ("!*.internal.example\n*", "db.internal.example", False),
        ("www.example.com", "www.example.org", False),
    ],
)
def test_first_match_wins(rules: str, name: str, expected: bool) -> None:
    acl = parse_access_list(rules)
    assert acl.name_verdict(name) is expected
    for address in addresses("203.0.113.5", "10.1.2.3", "2001:db8::1"):
        assert acl.address_allowed(name, address) is expected


def test_deny_network_then_everything() -> None:
    acl = parse_access_list("!10.0.0.0/8\n*")
    assert acl.name_verdict("intranet.example.com") is None
    assert acl.allowed_addresses("intranet.example.com", addresses("10.1.2.3")) == []
    assert acl.allowed_addresses("mixed.example.com", addresses("10.1.2.3", "203.0.113.5")) == \
        addresses("203.0.113.5")
    assert acl.allowed_addresses("public.example.com", addresses("203.0.113.5", "198.51.100.7")) == \
        addresses("203.0.113.5", "198.51.100.7")
    # a resolver handing out an IPv4-mapped AAAA record does not get around the deny
    assert acl.allowed_addresses("sneaky.example.com", addresses("::ffff:10.1.2.3", "2001:db8::1")) == \
        addresses("2001:db8::1")
    assert acl.address_allowed(None, IPv4Address("10.255.255.255")) is False
    assert acl.address_allowed(None, IPv4Address("11.0.0.0")) is True


@pytest.mark.parametrize(
    ("rules", "name", "address", "expected"),
    [
        # a name rule before a network rule decides for every address
        ("www.example.com\n!10.0.0.0/8", "www.example.com", "10.1.2.3", True),
        ("!www.example.com\n10.0.0.0/8", "www.example.com", "10.1.2.3", False),
        # a network rule before a name rule decides for its addresses only
        ("!10.0.0.0/8\nwww.example.com", "www.example.com", "10.1.2.3", False),
        ("!10.0.0.0/8\nwww.example.com", "www.example.com", "203.0.113.5", True),
        ("10.0.0.0/8\n!www.example.com", "www.example.com", "10.1.2.3", True),
        ("10.0.0.0/8\n!www.example.com", "www.example.com", "203.0.113.5", False),
        # a narrower network listed first carves an exception out of a wider one
        ("!10.1.2.3\n10.0.0.0/8", None, "10.1.2.3", False),
        ("!10.1.2.3\n10.0.0.0/8", None, "10.1.2.4", True),
        ("10.1.2.0/24\n!10.0.0.0/8\n*", None, "10.1.2.200", True),
        ("10.1.2.0/24\n!10.0.0.0/8\n*", None, "10.1.3.1", False),
        # a wider network listed first hides the narrower one
        ("!10.0.0.0/8\n10.1.2.0/24", None, "10.1.2.3", False),
        # without a name, name rules never match
        ("*.example.com", None, "203.0.113.5", False),
        ("!*.example.com\n*", None, "203.0.113.5", True),
        # IPv6 networks and literals
        ("2001:db8::/32", None, "2001:db8:ffff::1", True),
        ("2001:db8::/32", None, "2001:db9::1", False),
        ("!2001:db8::5\n2001:db8::/32", None, "2001:db8::5", False),
        ("!2001:db8::5\n2001:db8::/32", None, "2001:db8::6", True),
        ("2001:db8::5", None, "2001:db8::5", True),
        ("::/0", None, "2001:db8::5", True),
        # families never cross: IPv4 rules do not match IPv6 addresses and vice versa
        ("0.0.0.0/0", None, "2001:db8::1", False),
        ("::/0", None, "192.0.2.1", False),
        ("!0.0.0.0/0\n*", None, "2001:db8::1", True),
        ("!::/0\n*", None, "192.0.2.1", True),
        # IPv4-compatible (::a.b.c.d) addresses are IPv6 addresses, not IPv4 ones
        ("!10.0.0.0/8\n*", None, "::10.1.2.3", True),
        # IPv4-mapped addresses are judged as the IPv4 host a dual-stack socket would reach
        ("192.0.2.0/24", None, "::ffff:192.0.2.1", True),
        ("!192.0.2.0/24\n*", None, "::ffff:192.0.2.1", False),
        ("::/0", None, "::ffff:192.0.2.1", False),
        ("!::/0\n*", None, "::ffff:192.0.2.1", True),
    ],
)
def test_address_rules(rules: str, name: str | None, address: str, expected: bool) -> None:
    acl = parse_access_list(rules)
    assert acl.address_allowed(name, ip_address(address)) is expected
    assert acl.allowed_addresses(name, [ip_address(address)]) == ([ip_address(address)] if expected else [])


def test_allowed_addresses_keeps_order_and_duplicates() -> None:
    acl = parse_access_list("!192.0.2.0/24\n*")
    given_addresses = addresses("2001:db8::2", "203.0.113.9", "192.0.2.7", "198.51.100.1", "203.0.113.9")
    assert acl.allowed_addresses("x.example", given_addresses) == \
        addresses("2001:db8::2", "203.0.113.9", "198.51.100.1", "203.0.113.9")
    assert acl.allowed_addresses("x.example", []) == []


@pytest.mark.parametrize(
    ("rules", "name", "expected"),
    [
        # a name rule decides before any address rule: the answer cannot depend on addresses
        ("www.example.com\n10.0.0.0/8", "www.example.com", True),
        ("!*.example.com\n10.0.0.0/8\n*", "www.example.com", False),
        # nothing matched and nothing left: denied
        ("www.example.com\n*.example.org", "www.example.net", False),
        # '*' reached with no address rule before it
        ("!*.internal.example\n*", "www.example.com", True),
        ("*", "anything.example", True),
        # an address rule comes first in the scan: resolve, then judge the addresses
        ("10.0.0.0/8\nwww.example.com", "www.example.com", None),
        ("!10.0.0.0/8\n*", "www.example.com", None),
        ("www.example.com\n10.0.0.0/8", "other.example.com", None),
        ("www.example.com\n2001:db8::/32\n*.example.org", "a.example.org", None),
        ("192.0.2.1", "www.example.com", None),
        # ... even when the name rule that would match comes later and denies
        ("10.0.0.0/8\n!www.example.com", "www.example.com", None),
    ],
)
def test_name_verdict(rules: str, name: str, expected: bool | None) -> None:
    assert parse_access_list(rules).name_verdict(name) is expected


def test_lists_do_not_share_their_name_caches() -> None:
    allow, deny = parse_access_list("www.example.com"), parse_access_list("!www.example.com\n*")
    for _ in range(3):
        assert allow.name_verdict("www.example.com") is True
        assert deny.name_verdict("www.example.com") is False
        assert allow.name_verdict("www.example.org") is False
        assert deny.name_verdict("www.example.org") is True


@pytest.mark.parametrize(
    ("rules", "name", "address", "line"),
    [
        ("*.example.com\n!10.0.0.0/8\n*", "www.example.com", "10.1.2.3", 1),
        ("!10.0.0.0/8\n*.example.com\n*", "www.example.com", "10.1.2.3", 1),
        ("!10.0.0.0/8\n*.example.com\n*", "www.example.com", "203.0.113.5", 2),
        ("!10.0.0.0/8\n*.example.com\n*", "www.example.org", "203.0.113.5", 3),
        ("!10.0.0.0/8\n*.example.com", "www.example.org", "203.0.113.5", None),
        ("!10.0.0.0/8\n*.example.com", None, "10.0.0.1", 1),
    ],
)
def test_matching_rule_names_the_deciding_line(rules: str, name: str | None, address: str, line: int | None) -> None:
    found = parse_access_list(rules).matching_rule(name, ip_address(address))
    assert (found.line if found is not None else None) == line


@pytest.mark.parametrize(
    ("rules", "summary"),
    [
        ("www.example.com", "1 allow rule, 0 deny rules, default deny"),
        ("a.example\nb.example\n10.0.0.0/8\n!*.c.example", "3 allow rules, 1 deny rule, default deny"),
        ("!10.0.0.0/8\n!192.168.0.0/16\n*", "0 allow rules, 2 deny rules, default allow"),
        ("*", "0 allow rules, 0 deny rules, default allow"),
    ],
)
def test_describe(rules: str, summary: str) -> None:
    assert parse_access_list(rules).describe() == summary


# ---------------------------------------------------------------- normalize_host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("www.example.com", "www.example.com"),
        ("WWW.Example.COM", "www.example.com"),
        ("www.example.com.", "www.example.com"),
        ("localhost", "localhost"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61])),  # 253 characters
        (".".join(["a" * 63] * 3 + ["a" * 61]) + ".", ".".join(["a" * 63] * 3 + ["a" * 61])),
        ("1password.com", "1password.com"),
        ("0x.example.com", "0x.example.com"),  # only the last label may not be a number
        ("192.0.2.1", IPv4Address("192.0.2.1")),
        ("0.0.0.0", IPv4Address("0.0.0.0")),
        ("255.255.255.255", IPv4Address("255.255.255.255")),
        ("[2001:db8::1]", IPv6Address("2001:db8::1")),
        ("[2001:DB8::1]", IPv6Address("2001:db8::1")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("[::1]", IPv6Address("::1")),
        ("[2001:0db8:0000:0000:0000:0000:0000:0001]", IPv6Address("2001:db8::1")),
        ("[::ffff:192.0.2.1]", IPv4Address("192.0.2.1")),
        ("[::FFFF:c000:0201]", IPv4Address("192.0.2.1")),
        ("::ffff:10.1.2.3", IPv4Address("10.1.2.3")),
        ("[::192.0.2.1]", IPv6Address("::c000:201")),  # IPv4-compatible: an IPv6 address, not mapped
    ],
)
def test_normalize_host_accepts(host: str, expected: str | Address) -> None:
    result = normalize_host(host)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        # other spellings of 192.0.2.1 that some parser somewhere would accept
        ("3221225985", "not a dotted-quad IPv4 address"),
        ("3221225994", "not a dotted-quad IPv4 address"),
        ("0xc0000201", "hexadecimal"),
        ("0XC0000201", "hexadecimal"),
        ("0xc0.0x00.0x02.0x01", "hexadecimal"),
        ("0300.0000.0002.0001", "leading zeros"),
        ("0300.0.2.1", "leading zeros"),
        ("192.0.2.010", "leading zeros"),
        ("192.0.2", "write all four parts"),
        ("192.0.513", "write all four parts"),
        ("192.11010049", "write all four parts"),
        ("192.0.2.1.", "drop the trailing dot"),
        ("192.0.2.256", "0-255"),
        ("1.2.3.4.5", "not a dotted-quad"),
        ("example.0x", "last label is a number"),
        ("example.123", "last label is a number"),
        # IPv6 zone ids and malformed literals
        ("[fe80::1%eth0]", "zone id"),
        ("[fe80::1%25eth0]", "zone id"),
        ("fe80::1%eth0", "zone id"),
        ("[2001:db8::1", "no closing ']'"),
        ("[2001:db8::1]]", "not an IPv6 address"),
        ("[]", "not an IPv6 address"),
        ("[192.0.2.1]", "not an IPv6 address"),
        ("[2001:db8:::1]", "not an IPv6 address"),
        ("[v1.fe80::a]", "not an IPv6 address"),
        ("[ 2001:db8::1]", "not an IPv6 address"),
        ("2001:db8::1]", "not an IPv6 address"),
        ("example.com:80", "not an IPv6 address"),
        # empty and malformed names
        ("", "empty host"),
        (".", "not a host name"),
        ("..", "empty label"),
        ("www..example.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("-www.example.com", "starts or ends with '-'"),
        ("www-.example.com", "starts or ends with '-'"),
        ("a" * 64 + ".example", "longer than 63"),
        (".".join(["a" * 63] * 4), "too long"),
        ("a" * 10_000, "too long"),
        (" www.example.com", "is not allowed"),
        ("www.example.com ", "is not allowed"),
        ("www.exa mple.com", "is not allowed"),
        ("www.example.com\n", "is not allowed"),
        ("www.example.com\x00.evil", "is not allowed"),
        ("www.example.com/", "is not allowed"),
        ("www.example.com@evil.net", "is not allowed"),
        ("exa%6dple.com", "is not allowed"),
        ("bücher.example", "is not allowed"),
        ("ｅxample.com", "is not allowed"),  # fullwidth letters would NFKC-fold into ASCII elsewhere
        ("*.example.com", "is not allowed"),
    ],
)
def test_normalize_host_refuses(host: str, reason: str) -> None:
    with pytest.raises(HostError) as caught:
        normalize_host(host)
    message = str(caught.value)
    assert reason in message
    assert len(message.splitlines()) == 1
    assert len(message) < 300
    assert isinstance(caught.value, ValueError)


def test_normalized_host_judged_end_to_end() -> None:
    acl = parse_access_list("!192.0.2.0/24\n*.example.com\n2001:db8::/32")
    for host, expected in [
        ("[::ffff:192.0.2.1]", False),  # mapped: judged as the IPv4 address it reaches
        ("[2001:db8::1]", True),
        ("2001:db8::1", True),
        ("198.51.100.1", False),
    ]:
        address = normalize_host(host)
        assert isinstance(address, IPv4Address | IPv6Address)
        assert acl.address_allowed(None, address) is expected


# ---------------------------------------------------------------- properties

HOST_ALPHABET = st.sampled_from(
    list("0123456789abcdefxX.:-_[]%/ ") + ["0x", "::", "ffff", "192.", "255", "010", "example", "com", "\n", "\x00",
                                          "é", "*", "."]
)
hostish = st.lists(HOST_ALPHABET, max_size=40).map("".join)
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)

RULE_ALPHABET = st.sampled_from(
    list("0123456789abcdef.:/!*# \t\n-_[]%") + ["\r\n", "/24", "/8", "/0", "/33", "/129", "::ffff:", "10.", "*.",
                                               "example.com", "0x"]
)
ruleish = st.lists(RULE_ALPHABET, max_size=60).map("".join)


@MODEST
@given(st.one_of(hostish, any_text))
def test_normalize_host_raises_only_host_error(host: str) -> None:
    try:
        result = normalize_host(host)
    except HostError as err:
        assert len(str(err).splitlines()) == 1
        return
    if isinstance(result, str):
        assert result == result.lower()
        assert not result.endswith(".")
        assert 1 <= len(result) <= 253
        assert normalize_host(result) == result
    elif isinstance(result, IPv4Address):
        assert normalize_host(str(result)) == result
    else:
        assert result.ipv4_mapped is None
        assert normalize_host(f"[{result}]") == result


@MODEST
@given(st.one_of(ruleish, any_text))
def test_parse_access_list_raises_only_config_error(text: str) -> None:
    try:
        parsed = parse_access_list(text)
    except ConfigError as err:
        assert err.variable == VARIABLE
        if err.line is not None:
            assert 1 <= err.line <= text.count("\n") + 1
            assert err.text == text.split("\n")[err.line - 1].strip()
        assert len(str(err).splitlines()) == 1
        return
    assert parsed.rules
    assert parse_access_list("\n".join(str(rule) for rule in parsed.rules)) == parsed


NAMES = ["example.com", "a.example.com", "b.a.example.com", "badexample.com", "example.net", "x.example.net", "com"]
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "203.0.113.0/24", "0.0.0.0/0", "192.0.2.0/24", "192.0.2.128/25",
            "2001:db8::/32", "2001:db8::5", "::/0", "2001:db8:1::/48"]
SAMPLE_ADDRESSES = ["10.1.2.3", "10.2.0.1", "10.1.255.255", "203.0.113.5", "192.0.2.1", "192.0.2.200", "8.8.8.8",
                    "2001:db8::5", "2001:db8::6", "2001:db8:1::1", "2001:db9::1", "::ffff:10.1.2.3",
                    "::ffff:8.8.8.8", "::10.1.2.3"]


@st.composite
def rule_texts(draw: st.DrawFn) -> list[str]:
    """Random rule lists over a few overlapping names and networks, in random spellings."""
    lines = []
    for _ in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["host", "domain", "network"]))
        if kind == "network":
            body = draw(st.sampled_from(NETWORKS))
        else:
            name = draw(st.sampled_from(NAMES))
            name = "".join(c.upper() if draw(st.booleans()) else c for c in name) if draw(st.booleans()) else name
            name += "." if draw(st.booleans()) else ""
            body = name if kind == "host" else "*." + name
        lines.append(("!" if draw(st.booleans()) else "") + body)
    if not lines or draw(st.booleans()):
        lines.append("*")
    return lines


request_names = st.none() | st.sampled_from(NAMES + ["other.org", "x.b.a.example.com"])
random_addresses: st.SearchStrategy[Address] = st.one_of(
    st.sampled_from(SAMPLE_ADDRESSES).map(ip_address),
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(0, 2**128 - 1).map(IPv6Address),
    st.integers(0, 2**32 - 1).map(lambda n: IPv6Address(0xFFFF_0000_0000 | n)),  # IPv4-mapped
)


def reference_allowed(lines: Sequence[str], name: str | None, address: Address) -> bool:
    """The rules read one by one, as a person would."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for line in lines:
        allow = not line.startswith("!")
        body = line.lstrip("!").lower().rstrip(".")
        if body == "*":
            return allow
        if body.startswith("*."):
            domain = body[2:]
            if name is not None and (name == domain or name.endswith("." + domain)):
                return allow
        elif body[0].isdigit() or ":" in body:
            network = ip_network(body)
            if network.version == address.version and address in network:
                return allow
        elif name == body:
            return allow
    return False


def reference_name_verdict(lines: Sequence[str], name: str) -> bool | None:
    for line in lines:
        allow = not line.startswith("!")
        body = line.lstrip("!").lower().rstrip(".")
        if body == "*":
            return allow
        if body.startswith("*."):
            domain = body[2:]
            if name == domain or name.endswith("." + domain):
                return allow
        elif body[0].isdigit() or ":" in body:
            return None
        elif name == body:
            return allow
    return False


@MODEST
@given(rule_texts(), request_names, st.lists(random_addresses, max_size=6))
def test_allowed_addresses_matches_the_reference(lines: list[str], name: str | None,
                                                 candidates: list[Address]) -> None:
    acl = parse_access_list("\n".join(lines))
    expected = [address for address in candidates if reference_allowed(lines, name, address)]
    assert acl.allowed_addresses(name, candidates) == expected
    for address in candidates:
        assert acl.address_allowed(name, address) is reference_allowed(lines, name, address)


@MODEST
@given(rule_texts(), st.sampled_from(NAMES + ["other.org", "x.b.a.example.com"]), st.lists(random_addresses,
                                                                                            max_size=6))
def test_name_verdict_agrees_with_every_address(lines: list[str], name: str, extra: list[Address]) -> None:
    acl = parse_access_list("\n".join(lines))
    verdict = acl.name_verdict(name)
    assert verdict is reference_name_verdict(lines, name)
    if verdict is not None:
        for address in [ip_address(text) for text in SAMPLE_ADDRESSES] + extra:
            assert acl.address_allowed(name, address) is verdict
