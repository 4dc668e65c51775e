"""The HTTP proxy's protocol rules (egress_router.proxy.http_rules), values in and values out: request
targets and hosts, request and response heads and their framing, hop-by-hop headers, the proxy's own
answers. Every case tests/lab/test_http_proxy.py checks through a socket is here too (its tables are
named after the lab test they come from), plus edge cases; the lab tests still check the real proxy."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from egress_router.proxy import metrics
from egress_router.proxy.http_rules import (
    BODY,
    CHUNKED,
    HEALTHZ,
    METRICS,
    REASONS,
    TUNNEL_ESTABLISHED,
    UPGRADE,
    VIA,
    Host,
    ProxyError,
    drop_tokens,
    ends_connection,
    error_response,
    final_head,
    head_too_large,
    host_text,
    interim_head,
    keeps_connection,
    last_chunk,
    lists_tokens,
    local_page,
    may_retry,
    parse_absolute_form,
    parse_connect_target,
    request_fields,
    request_framing,
    request_head,
    response_ends_at_head,
    response_fields,
    simple_response,
    stand_in_head,
)

H = list[tuple[bytes, bytes]]
WWW, API, INTERNAL = "203.0.113.10", "203.0.113.11", "203.0.113.12"
V6 = "2001:db8:100::2"  # the lab's IPv6 origin (CLIENT_IP6)
NOT_HTTP = "only http:// URLs are proxied; use CONNECT for https"
NOT_A_URL = "the request target is not a valid URL"
USERINFO = "user information in the URL is not accepted"
BRACKETS = "only IPv6 addresses may be written in brackets"
NOT_A_PAGE = "this is a proxy: send absolute-form requests (http://host/path) or CONNECT"


def refusal(rule: Callable[..., Any], *args: Any) -> ProxyError:
    """The ProxyError a rule raises; every refusal of a request's form is a 400 counted as a bad request,
    with a one-line message (the answer's body is that line)."""
    with pytest.raises(ProxyError) as info:
        rule(*args)
    error = info.value
    assert (error.status, error.counter) == (400, metrics.BAD), error
    assert "\n" not in error.message and str(error) == error.message
    return error


# ------------------------------------------------------------------ absolute-form targets

# test_address_spellings_cannot_bypass_the_list: every other spelling of an address is refused
REFUSED_SPELLINGS = [
    "3221225994", "3405803788", "3405803786",  # decimal
    "0xcb007101", "0xcb00710c", "0xCB.0.0x71.0xc",  # hexadecimal
    "0313.0.0161.012", "0313.0.0161.014",  # octal
    "203.0.113", "203.0.28940", "203.7405580",  # short forms
    "203.000.113.012", "203.0.113.12.", f"{INTERNAL}..",
]

ABSOLUTE_FORM: list[tuple[bytes, Host, int, bytes]] = [
    # (target, host, port, target sent upstream)
    (b"http://www.example.com/hello", "www.example.com", 80, b"/hello"),
    (b"http://www.example.com:8081/hello", "www.example.com", 8081, b"/hello"),
    (b"http://WWW.Example.COM./hello", "www.example.com", 80, b"/hello"),
    (b"http://WWW.EXAMPLE.COM/hello", "www.example.com", 80, b"/hello"),
    (b"http://www.example.com./hello", "www.example.com", 80, b"/hello"),
    (b"http://Www.Example.Com./hello", "www.example.com", 80, b"/hello"),
    (b"http://INTERNAL.EXAMPLE.COM/hello", "internal.example.com", 80, b"/hello"),
    (b"http://internal.example.com./hello", "internal.example.com", 80, b"/hello"),
    (b"http://Internal.Example.Com./hello", "internal.example.com", 80, b"/hello"),
    (b"http://www.example.com/headers?a=1&b=2", "www.example.com", 80, b"/headers?a=1&b=2"),
    (b"http://api.example.com", "api.example.com", 80, b"/"),  # no path: '/'
    (b"http://www.example.com/slow?delay=0.3", "www.example.com", 80, b"/slow?delay=0.3"),
    (b"http://nowhere.example.org/hello", "nowhere.example.org", 80, b"/hello"),  # resolving is not a rule
    (b"http://api.example.com:9/hello", "api.example.com", 9, b"/hello"),
    (f"http://{WWW}/hello".encode(), IPv4Address(WWW), 80, b"/hello"),
    (f"http://{INTERNAL}/hello".encode(), IPv4Address(INTERNAL), 80, b"/hello"),
    # IPv6 literals; IPv4-mapped ones are the IPv4 address
    (f"http://[{V6}]:8000/hello".encode(), IPv6Address(V6), 8000, b"/hello"),
    (b"http://[2001:db8:100::3]/hello", IPv6Address("2001:db8:100::3"), 80, b"/hello"),
    (b"http://[2001:db8:100::3]:8000/hello", IPv6Address("2001:db8:100::3"), 8000, b"/hello"),
    (b"http://[2001:DB8:100::3]/hello", IPv6Address("2001:db8:100::3"), 80, b"/hello"),
    (b"http://[::ffff:203.0.113.12]/hello", IPv4Address(INTERNAL), 80, b"/hello"),
    (b"http://[::ffff:cb00:710c]/hello", IPv4Address(INTERNAL), 80, b"/hello"),
    (b"http://[0:0:0:0:0:ffff:cb00:710c]/hello", IPv4Address(INTERNAL), 80, b"/hello"),
    (b"http://[::ffff:203.0.113.11]/hello", IPv4Address(API), 80, b"/hello"),
    (f"http://[::ffff:{WWW}]/hello".encode(), IPv4Address(WWW), 80, b"/hello"),
    # edge cases
    (b"HTTP://A.Example/", "a.example", 80, b"/"),  # the scheme in any case
    (b"http://a.example?q=1", "a.example", 80, b"/?q=1"),
    (b"http://a.example/p?", "a.example", 80, b"/p"),  # an empty query goes
    (b"http://a.example/p#frag", "a.example", 80, b"/p"),  # a fragment is not sent
    (b"http://a.example/p;x?y=1&z", "a.example", 80, b"/p;x?y=1&z"),
    (b"http://a.example/%zz", "a.example", 80, b"/%zz"),  # the path is passed on as it is
    (b"http://a.example:00080/", "a.example", 80, b"/"),
    (b"http://a.example:1/", "a.example", 1, b"/"),
    (b"http://a.example:65535/", "a.example", 65535, b"/"),
    (b"http://@a.example/", "a.example", 80, b"/"),  # empty user information: nothing to refuse (today)
    # test_host_names_with_underscores: '_' as DNS names (and the allow list) may have it, httptools not
    (b"http://my_host.example.com/hello", "my_host.example.com", 80, b"/hello"),
    (b"http://under_score.test:8081/hello", "under_score.test", 8081, b"/hello"),
    (b"http://a_b.example/", "a_b.example", 80, b"/"),
    (b"http://A_B.Example./p?q=_#f", "a_b.example", 80, b"/p?q=_"),
    (b"http://_a.example", "_a.example", 80, b"/"),
    (b"http://a_b.example?x=1", "a_b.example", 80, b"/?x=1"),
    (b"http://a_b.example:00080/", "a_b.example", 80, b"/"),
    (b"http://a.example/_path_", "a.example", 80, b"/_path_"),  # in the path httptools takes it anyway
]


@pytest.mark.parametrize("target, host, port, path", ABSOLUTE_FORM)
def test_absolute_form(target: bytes, host: Host, port: int, path: bytes) -> None:
    assert parse_absolute_form(target) == (host, port, path)


ABSOLUTE_FORM_REFUSED: list[tuple[bytes, str]] = [
    # (target, message); test_malformed_requests_get_400_and_nothing_else_breaks
    (b"https://www.example.com/", NOT_HTTP),
    (b"ftp://www.example.com/", NOT_HTTP),
    (b"http:///hello", NOT_A_URL),  # empty host
    (b"http://user:pw@www.example.com/", USERINFO),
    (b"http://www.example.com:0/hello", "port 0 is not a port number (1-65535)"),  # not quietly port 80
    # test_ipv6_literals_names_and_clients
    (f"http://[{V6}%25eth0]:8000/hello".encode(),
     f"bad host '{V6}%25eth0': '{V6}%25eth0' has a zone id ('%...'); zone ids are not allowed"),
    (b"http://[2001:db8:100::2/hello", NOT_A_URL),
    (b"http://[198.51.100.2]/hello", BRACKETS),  # not read as the IPv4 address
    # edge cases
    (b"*", NOT_HTTP),  # OPTIONS *
    (b"Https://www.example.com/", NOT_HTTP),
    (b"www.example.com:80", NOT_A_URL),  # authority form is for CONNECT
    (b"http:www.example.com/", NOT_A_URL),
    (b"http://", NOT_A_URL),
    (b"http://a.example:/", NOT_A_URL),
    (b"http://a.example:65536/", NOT_A_URL),
    (b"http://a.example:99999/", NOT_A_URL),
    (b"http://a.example:-1/", NOT_A_URL),
    (b"http://a.example:80x/", NOT_A_URL),
    (b"http://a.example#frag", NOT_A_URL),
    (b"http://a example/", NOT_A_URL),
    (b"http://a%2eexample/", NOT_A_URL),
    (b"http://[v1.x]/", NOT_A_URL),  # IPvFuture
    (b"http://user@www.example.com/", USERINFO),
    (b"http://user:pw@[2001:db8::1]/", USERINFO),
    (b"http://[203.0.113.10]:8080/", BRACKETS),
    (b"http://a.example?x=[1]", BRACKETS),  # today: with no path, the query is looked at as part of the authority
    (b"http://[::1]:0/", "port 0 is not a port number (1-65535)"),
    (b"http://a..example/", "bad host 'a..example': 'a..example' is not a valid host name: it has an empty label "
                            "('..')"),
    (b"http://-a.example/", "bad host '-a.example': '-a.example' is not a valid host name: label '-a' starts or "
                            "ends with '-'"),
    (b"http://a.123/", "bad host 'a.123': 'a.123' is not a dotted-quad IPv4 address (nor a host name: its last "
                       "label is a number)"),
    # test_host_names_with_underscores: with a '_', the rest of the URL is judged as without it
    (b"http://a_b@www.example.com/", USERINFO),
    (b"http://u:p_w@a_b.example/", USERINFO),
    (b"http://my_host.example.com:x/", NOT_A_URL),
    (b"http://a_b.example:/", NOT_A_URL),
    (b"http://a_b.example:65536/", NOT_A_URL),
    (b"http://a_b.example#frag", NOT_A_URL),
    (b"http://a_b example/", NOT_A_URL),
    (b"http://[a_b]/", NOT_A_URL),
    (b"https://a_b.example/", NOT_HTTP),
    (b"a_b.example:80", NOT_A_URL),
    (b"http://a_b.example:0/", "port 0 is not a port number (1-65535)"),
    (b"http://a_b..example/", "bad host 'a_b..example': 'a_b..example' is not a valid host name: it has an empty "
                              "label ('..')"),
    (b"http://a_.123/", "bad host 'a_.123': 'a_.123' is not a dotted-quad IPv4 address (nor a host name: its last "
                        "label is a number)"),
]


@pytest.mark.parametrize("target, message", ABSOLUTE_FORM_REFUSED)
def test_absolute_form_refused(target: bytes, message: str) -> None:
    assert refusal(parse_absolute_form, target).message == message


@pytest.mark.parametrize("spelling", REFUSED_SPELLINGS)
def test_other_spellings_of_addresses_are_refused_in_both_forms(spelling: str) -> None:
    error = refusal(parse_absolute_form, f"http://{spelling}/hello".encode())
    assert error.message.startswith(f"bad host {spelling!r}: ") and spelling in error.message
    error = refusal(parse_connect_target, f"{spelling}:7000".encode())
    assert error.message.startswith(f"bad host {spelling!r}: ")


def test_host_is_checked_before_the_port_and_said_back_bounded() -> None:
    assert refusal(parse_absolute_form, b"http://0x1:0/").message.startswith("bad host '0x1': ")
    long = "a" * 300
    message = refusal(parse_absolute_form, f"http://{long}/".encode()).message
    assert message == f"bad host {long!r}: host is too long (300 characters; at most 253)"


# ------------------------------------------------------------------ CONNECT targets (authority form)

CONNECT_TARGETS: list[tuple[bytes, Host, int]] = [
    # test_connect_tunnels, test_connect_refusals_and_failures_are_answered, test_access_log_...
    (b"www.example.com:7000", "www.example.com", 7000),
    (f"{API}:7000".encode(), IPv4Address(API), 7000),
    (b"api.example.com:7000", "api.example.com", 7000),
    (b"api.example.com:9", "api.example.com", 9),
    (b"www.example.com:7001", "www.example.com", 7001),
    (f"{INTERNAL}:7000".encode(), IPv4Address(INTERNAL), 7000),  # denied by the list, not by a rule
    (b"internal.example.com:7000", "internal.example.com", 7000),
    (b"[2001:db8::7]:7000", IPv6Address("2001:db8::7"), 7000),
    (b"[2001:db8:100::3]:8000", IPv6Address("2001:db8:100::3"), 8000),
    (b"203.0.113.10:80", IPv4Address(WWW), 80),
    # edge cases
    (b"WWW.Example.Com.:443", "www.example.com", 443),
    (b"[::ffff:203.0.113.12]:7000", IPv4Address(INTERNAL), 7000),
    (b"www.example.com:0080", "www.example.com", 80),
    (b"www.example.com:65535", "www.example.com", 65535),
    (b"a_b.example:443", "a_b.example", 443),
    (b"::1:80", IPv6Address("::1"), 80),  # today: an unbracketed IPv6 host, the port after its last ':'
]


@pytest.mark.parametrize("target, host, port", CONNECT_TARGETS)
def test_connect_target(target: bytes, host: Host, port: int) -> None:
    assert parse_connect_target(target) == (host, port)


CONNECT_REFUSED: list[tuple[bytes, str]] = [
    (b"www.example.com", "CONNECT needs host:port, got 'www.example.com'"),
    (b"www.example.com:0", "CONNECT needs host:port, got 'www.example.com:0'"),
    (b"www.example.com:99999", "CONNECT needs host:port, got 'www.example.com:99999'"),
    (b":7000", "bad host '': empty host"),
    (f"{INTERNAL}.:7000".encode(), f"bad host '{INTERNAL}.': "),
    # edge cases
    (b"www.example.com:", "CONNECT needs host:port, got 'www.example.com:'"),
    (b"www.example.com:+80", "CONNECT needs host:port, got 'www.example.com:+80'"),
    (b"www.example.com:-1", "CONNECT needs host:port, got 'www.example.com:-1'"),
    (b"www.example.com:65536", "CONNECT needs host:port, got 'www.example.com:65536'"),
    (b"www.example.com: 80", "CONNECT needs host:port, got 'www.example.com: 80'"),
    (b"[2001:db8::7]", "CONNECT needs host:port, got '[2001:db8::7]'"),
    (b"http://www.example.com:80", "bad host 'http://www.example.com': "),
    (b"[2001:db8::7%eth0]:80", "bad host '[2001:db8::7%eth0]': '2001:db8::7%eth0' has a zone id"),
    (b"[2001:db8::7:80", "bad host '[2001:db8::7': '[2001:db8::7' has no closing ']'"),
    (b"user@www.example.com:80", "bad host 'user@www.example.com': "),
    (b"x" * 300, f"CONNECT needs host:port, got {'x' * 200!r}"),  # the target is said back shortened
]


@pytest.mark.parametrize("target, message", CONNECT_REFUSED)
def test_connect_target_refused(target: bytes, message: str) -> None:
    assert refusal(parse_connect_target, target).message.startswith(message)


# ------------------------------------------------------------------ origin form: the proxy's own pages

@pytest.mark.parametrize("method, target, page", [
    # test_healthz_metrics_and_other_origin_form_requests
    (b"GET", b"/healthz", HEALTHZ), (b"HEAD", b"/healthz", HEALTHZ), (b"GET", b"/metrics", METRICS),
    (b"HEAD", b"/metrics", METRICS), (b"GET", b"/healthz?probe=1", HEALTHZ), (b"GET", b"/metrics?", METRICS),
])
def test_origin_form_is_for_the_proxy_s_own_pages(method: bytes, target: bytes, page: bytes) -> None:
    assert local_page(method, target) == page


@pytest.mark.parametrize("method, target", [
    (b"GET", b"/other"), (b"GET", b"/"), (b"GET", b"/healthz/../metrics"), (b"GET", b"/index.html"),
    (b"GET", b"/nothing"), (b"POST", b"/healthz"),
    # edge cases
    (b"PUT", b"/metrics"), (b"OPTIONS", b"/healthz"), (b"GET", b"/HEALTHZ"), (b"GET", b"/healthz/"),
    (b"GET", b"/healthz#x"), (b"get", b"/healthz"), (b"GET", b"//healthz"), (b"GET", b"//www.example.com/"),
])
def test_other_origin_form_requests_are_refused(method: bytes, target: bytes) -> None:
    assert refusal(local_page, method, target).message == NOT_A_PAGE


@pytest.mark.parametrize("host, text", [
    ("www.example.com", "www.example.com"), (IPv4Address(WWW), WWW), (IPv6Address(V6), f"[{V6}]"),
    (IPv6Address("::1"), "[::1]"),
])
def test_host_text(host: Host, text: str) -> None:
    assert host_text(host) == text


# ------------------------------------------------------------------ requests sent upstream

@pytest.mark.parametrize("headers, framing", [
    ([(b"Transfer-Encoding", b"chunked")], CHUNKED | BODY), ([(b"transfer-encoding", b"CHUNKED")], CHUNKED | BODY),
    ([(b"Transfer-Encoding", b"gzip, chunked")], CHUNKED | BODY), ([(b"Content-Length", b"5")], BODY), ([], 0),
    ([(b"Transfer-Encoding", b"gzip")], 0), ([(b"X-Transfer-Encoding", b"chunked")], 0),
    # test_many_pipelined_requests_the_proxy_answers_itself: no body, the head is the whole request
    ([(b"Host", b"proxy")], 0), ([(b"Content-Length", b"0")], 0), ([(b"content-length", b" 000 ")], 0),
    ([(b"Content-Length", b"10")], BODY), ([(b"Content-Length", b"100")], BODY),
    # test_upgrade_requests_are_plain_requests_and_nothing_after_them_is_dropped
    ([(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"), (b"Content-Length", b"5")], UPGRADE | BODY),
    ([(b"upgrade", b"websocket")], UPGRADE), ([(b"Upgrade", b"h2c"), (b"Transfer-Encoding", b"chunked")],
                                              UPGRADE | CHUNKED | BODY),
    ([(b"X-Upgrade", b"h2c")], 0),
])
def test_request_framing(headers: H, framing: int) -> None:
    assert request_framing(headers) == framing


@pytest.mark.parametrize("headers, chunked, head", [
    # the stand-in after an Upgrade request carries its framing only
    ([(b"Upgrade", b"h2c"), (b"Content-Length", b"5")], False, b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
    ([(b"Upgrade", b"h2c"), (b"content-length", b" 12 ")], False, b"PUT / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
    ([(b"Upgrade", b"h2c")], False, b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
    ([(b"Upgrade", b"h2c"), (b"Transfer-Encoding", b"chunked")], True,
     b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
])
def test_stand_in_head(headers: H, chunked: bool, head: bytes) -> None:
    assert stand_in_head(headers, chunked) == head


@pytest.mark.parametrize("trailers, end", [
    # test_chunked_request_trailers_are_forwarded_as_trailers
    (None, b"0\r\n\r\n"), ([], b"0\r\n\r\n"),
    ([(b"X-Checksum", b"abc"), (b"X-Other", b"1")], b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"),
    # framing, routing and hop-by-hop fields belong to the head
    ([(b"Content-Length", b"5"), (b"Host", b"evil"), (b"Transfer-Encoding", b"chunked"), (b"Connection", b"close"),
      (b"X-Kept", b"y")], b"0\r\nX-Kept: y\r\n\r\n"),
])
def test_last_chunk(trailers: H | None, end: bytes) -> None:
    assert last_chunk(trailers) == end


HOPS = [(b"Connection", b"keep-alive, X-Conn-Token"), (b"X-Conn-Token", b"secret"), (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"), (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Via", b"1.0 corporate-proxy"), (b"X-Kept", b"yes")]

REQUEST_HEADS: list[tuple[tuple[bytes, bytes, str, int, H, bool], bytes]] = [
    # test_absolute_form_host_via_and_hop_by_hop_headers: the Host header is the URL's, never the client's
    ((b"GET", b"/headers?a=1&b=2", "www.example.com", 80, [(b"Host", b"evil.example.net"), *HOPS], False),
     b"GET /headers?a=1&b=2 HTTP/1.1\r\nHost: www.example.com\r\nX-Kept: yes\r\n"
     b"Via: 1.0 corporate-proxy, 1.1 egress-router\r\n\r\n"),
    ((b"GET", b"/headers", "www.example.com", 8081, [(b"Host", b"www.example.com")], False),
     b"GET /headers HTTP/1.1\r\nHost: www.example.com:8081\r\nVia: 1.1 egress-router\r\n\r\n"),
    ((b"GET", b"/headers", "api.example.com", 80, [(b"Host", b"")], False),
     b"GET /headers HTTP/1.1\r\nHost: api.example.com\r\nVia: 1.1 egress-router\r\n\r\n"),
    # test_ipv6_literals_names_and_clients
    ((b"GET", b"/hello", f"[{V6}]", 8000, [(b"Host", f"[{V6}]:8000".encode())], False),
     f"GET /hello HTTP/1.1\r\nHost: [{V6}]:8000\r\nVia: 1.1 egress-router\r\n\r\n".encode()),
    # test_request_and_response_bodies_both_ways: a length is passed on; a chunked body goes on chunked,
    # without a Content-Length
    ((b"POST", b"/echo", "www.example.com", 80, [(b"Host", b"www.example.com"), (b"Content-Length", b"5")], False),
     b"POST /echo HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 5\r\nVia: 1.1 egress-router\r\n\r\n"),
    ((b"POST", b"/echo", "www.example.com", 80, [(b"Transfer-Encoding", b"chunked")], True),
     b"POST /echo HTTP/1.1\r\nHost: www.example.com\r\nVia: 1.1 egress-router\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ((b"POST", b"/echo", "www.example.com", 80, [(b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")],
      True),
     b"POST /echo HTTP/1.1\r\nHost: www.example.com\r\nVia: 1.1 egress-router\r\nTransfer-Encoding: chunked\r\n\r\n"),
    # test_keep_alive_http10_and_pipelining: an HTTP/1.0 client without Host: upstream gets HTTP/1.1 and a Host
    ((b"GET", b"/hello", "www.example.com", 80, [(b"Connection", b"keep-alive")], False),
     b"GET /hello HTTP/1.1\r\nHost: www.example.com\r\nVia: 1.1 egress-router\r\n\r\n"),
    # edge cases
    ((b"HEAD", b"/", WWW, 80, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Accept", b"*/*")], False),
     f"HEAD / HTTP/1.1\r\nHost: {WWW}\r\nAccept: */*\r\nVia: 1.1 egress-router\r\n\r\n".encode()),
    ((b"GET", b"/", "a.example", 80, [(b"X-A", b"1"), (b"connection", b"x-a, close"), (b"X-B", b"2")], False),
     b"GET / HTTP/1.1\r\nHost: a.example\r\nX-B: 2\r\nVia: 1.1 egress-router\r\n\r\n"),
    ((b"GET", b"/", "a.example", 80, [(b"Trailer", b"X"), (b"Proxy-Authenticate", b"x")], False),
     b"GET / HTTP/1.1\r\nHost: a.example\r\nVia: 1.1 egress-router\r\n\r\n"),
]


@pytest.mark.parametrize("args, head", REQUEST_HEADS)
def test_request_head(args: tuple[bytes, bytes, str, int, H, bool], head: bytes) -> None:
    assert request_head(*args) == head


# ------------------------------------------------------------------ responses: heads and framing

CL27 = (b"Content-Length", b"27")
OCTETS = (b"Content-Type", b"application/octet-stream")
CHUNKED = (b"Transfer-Encoding", b"chunked")
CLOSE = (b"Connection", b"close")
VIA_LINE = b"Via: 1.1 egress-router\r\n"

FINAL_HEADS: list[tuple[str, tuple[int, bytes, H, str, bool, bool], tuple[bytes, bool, bool, bool]]] = [
    # (case, (status, reason, headers, client version, HEAD, keep-alive), (head, rechunk, until_close, keep-alive))
    # test_response_framing_head_204_304_chunked_and_close_delimited
    ("chunked", (200, b"OK", [CHUNKED, OCTETS], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE
      + b"Transfer-Encoding: chunked\r\n\r\n", True, False, True)),
    ("HEAD with a length", (200, b"OK", [CL27, OCTETS], "1.1", True, True),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"\r\n",
      False, False, True)),
    ("204", (204, b"No Content", [OCTETS], "1.1", False, True),
     (b"HTTP/1.1 204 No Content\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"\r\n",
      False, False, True)),
    ("304", (304, b"Not Modified", [(b"ETag", b'"v1"'), OCTETS], "1.1", False, True),
     (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Type: application/octet-stream\r\n' + VIA_LINE + b"\r\n",
      False, False, True)),
    ("HEAD, chunked", (200, b"OK", [CHUNKED, OCTETS], "1.1", True, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    ("HEAD, close-delimited", (200, b"OK", [CLOSE, OCTETS], "1.1", True, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    ("404", (404, b"Not Found", [(b"Content-Length", b"10")], "1.1", False, True),
     (b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    # test_close_delimited_response_bodies: re-chunked for HTTP/1.1, the end of the connection for HTTP/1.0
    ("close-delimited, 1.1", (200, b"OK", [CLOSE, OCTETS], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE
      + b"Transfer-Encoding: chunked\r\n\r\n", True, True, True)),
    ("close-delimited, 1.0", (200, b"OK", [CLOSE, OCTETS], "1.0", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"Connection: close\r\n\r\n",
      False, True, False)),
    # test_keep_alive_http10_and_pipelining
    ("chunked, 1.0", (200, b"OK", [CHUNKED, OCTETS], "1.0", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + VIA_LINE + b"Connection: close\r\n\r\n",
      False, False, False)),
    ("length, 1.0 keep-alive", (200, b"OK", [CL27], "1.0", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n" + VIA_LINE + b"Connection: keep-alive\r\n\r\n",
      False, False, True)),
    ("length, 1.0", (200, b"OK", [CL27], "1.0", False, False),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n" + VIA_LINE + b"Connection: close\r\n\r\n", False, False, False)),
    # test_sigterm_lets_the_request_in_flight_finish: draining (or Connection: close from the client)
    ("length, 1.1, closing", (200, b"OK", [CL27], "1.1", False, False),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n" + VIA_LINE + b"Connection: close\r\n\r\n", False, False, False)),
    # test_absolute_form_host_via_and_hop_by_hop_headers: the origin's hop-by-hop headers stay behind
    ("origin's hop-by-hop", (200, b"OK", [(b"Connection", b"X-Origin-Hop"), (b"X-Origin-Hop", b"origin-only"),
                                          (b"Keep-Alive", b"timeout=30"), CL27], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    # edge cases
    ("Via appended", (200, b"OK", [(b"Via", b"1.1 origin"), CL27], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\nVia: 1.1 origin, 1.1 egress-router\r\n\r\n", False, False, True)),
    ("reason as sent", (200, b"Fine Thanks", [CL27], "1.1", False, True),
     (b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 27\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    ("empty reason", (200, b"", [CL27], "1.1", False, True),
     (b"HTTP/1.1 200 \r\nContent-Length: 27\r\n" + VIA_LINE + b"\r\n", False, False, True)),
    ("gzip, chunked", (200, b"OK", [(b"Transfer-Encoding", b"gzip, chunked")], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\n" + VIA_LINE + b"Transfer-Encoding: chunked\r\n\r\n", True, False, True)),
    ("coding without chunked: close-delimited", (200, b"OK", [(b"Transfer-Encoding", b"gzip")], "1.1", False, True),
     (b"HTTP/1.1 200 OK\r\n" + VIA_LINE + b"Transfer-Encoding: chunked\r\n\r\n", True, True, True)),
    ("204, 1.0 keep-alive", (204, b"No Content", [], "1.0", False, True),
     (b"HTTP/1.1 204 No Content\r\n" + VIA_LINE + b"Connection: keep-alive\r\n\r\n", False, False, True)),
    ("HEAD, close-delimited, 1.0", (200, b"OK", [CLOSE], "1.0", True, True),
     (b"HTTP/1.1 200 OK\r\n" + VIA_LINE + b"Connection: keep-alive\r\n\r\n", False, False, True)),
    ("a named Content-Length is no length", (200, b"OK", [(b"Connection", b"Content-Length"), CL27], "1.1", False,
                                             True),
     (b"HTTP/1.1 200 OK\r\n" + VIA_LINE + b"Transfer-Encoding: chunked\r\n\r\n", True, True, True)),
    ("503 from upstream", (503, b"Service Unavailable", [CL27, CLOSE], "1.1", False, True),
     (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 27\r\n" + VIA_LINE + b"\r\n", False, False, True)),
]


@pytest.mark.parametrize("args, result", [case[1:] for case in FINAL_HEADS], ids=[case[0] for case in FINAL_HEADS])
def test_final_head(args: tuple[int, bytes, H, str, bool, bool], result: tuple[bytes, bool, bool, bool]) -> None:
    assert final_head(*args) == result


@pytest.mark.parametrize("status, head_only, ends", [
    (204, False, True), (304, False, True), (200, True, True), (404, True, True), (200, False, False),
    (404, False, False), (205, False, False), (500, False, False),
])
def test_response_ends_at_head(status: int, head_only: bool, ends: bool) -> None:
    assert response_ends_at_head(status, head_only) is ends


@pytest.mark.parametrize("status, reason, headers, version, head", [
    (100, b"Continue", [], "1.1", b"HTTP/1.1 100 Continue\r\nVia: 1.1 egress-router\r\n\r\n"),
    # test_informational_responses_keep_their_headers_and_skip_http10_clients
    (103, b"Early Hints", [(b"Link", b"</style.css>; rel=preload")], "1.1",
     b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nVia: 1.1 egress-router\r\n\r\n"),
    (103, b"Early Hints", [(b"Link", b"</style.css>; rel=preload")], "1.0", None),  # RFC 9110 section 15.2
    (100, b"Continue", [], "1.0", None),
    (102, b"Processing", [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"Keep-Alive", b"x")], "1.1",
     b"HTTP/1.1 102 Processing\r\nVia: 1.1 egress-router\r\n\r\n"),  # hop-by-hop fields stay behind
])
def test_interim_head(status: int, reason: bytes, headers: H, version: str, head: bytes | None) -> None:
    assert interim_head(status, reason, headers, version) == head


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_an_unasked_switch_of_protocols_is_an_invalid_response(version: str) -> None:
    # test_an_upstream_switching_protocols_unasked_gets_one_502
    with pytest.raises(ProxyError) as info:
        interim_head(101, b"Switching Protocols", [(b"Upgrade", b"other")], version)
    assert (info.value.status, info.value.counter) == (502, None)


# ------------------------------------------------------------------ the proxy's own answers

@pytest.mark.parametrize("status, reason", [
    (200, "OK"), (400, "Bad Request"), (403, "Forbidden"), (404, "Not Found"), (405, "Method Not Allowed"),
    (408, "Request Timeout"), (414, "URI Too Long"), (431, "Request Header Fields Too Large"), (502, "Bad Gateway"),
    (503, "Service Unavailable"), (504, "Gateway Timeout"), (418, "Error"), (500, "Error"),
])
def test_status_lines(status: int, reason: str) -> None:
    assert REASONS.get(status, "Error") == reason
    assert simple_response(status, "x\n", close=False).startswith(f"HTTP/1.1 {status} {reason}\r\n".encode())


ANSWERS: list[tuple[bytes, bytes]] = [
    # test_healthz_metrics_and_other_origin_form_requests
    (simple_response(200, "ok\n", close=False),
     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
     b"Via: 1.1 egress-router\r\n\r\nok\n"),
    (simple_response(200, "ok\n", close=False, head_only=True),  # HEAD: the head, with the body's length
     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
     b"Via: 1.1 egress-router\r\n\r\n"),
    (simple_response(200, "# m\n", close=True, content_type=b"text/plain; version=0.0.4"),
     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: 4\r\n"
     b"Via: 1.1 egress-router\r\nConnection: close\r\n\r\n# m\n"),
    # assert_denied: the one-line message is the body
    (error_response(403, "access to internal.example.com is denied by the egress policy", close=False),
     b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 62\r\n"
     b"Via: 1.1 egress-router\r\n\r\naccess to internal.example.com is denied by the egress policy\n"),
    # test_connection_limit
    (error_response(503, "too many connections", close=True),
     b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\n"
     b"Via: 1.1 egress-router\r\nConnection: close\r\n\r\ntoo many connections\n"),
    # test_malformed_requests_get_400_and_nothing_else_breaks: the huge head
    (error_response(431, "request head too large", close=True),
     b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
     b"Content-Length: 23\r\nVia: 1.1 egress-router\r\nConnection: close\r\n\r\nrequest head too large\n"),
    (error_response(502, "cannot resolve nowhere.example.org: Name or service not known", close=False),
     b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 62\r\n"
     b"Via: 1.1 egress-router\r\n\r\ncannot resolve nowhere.example.org: Name or service not known\n"),
    # edge case: the length counts bytes
    (error_response(400, "bad host 'caf\u00e9.example'", close=True),
     b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 25\r\n"
     b"Via: 1.1 egress-router\r\nConnection: close\r\n\r\nbad host 'caf\xc3\xa9.example'\n"),
]


@pytest.mark.parametrize("answer, expected", ANSWERS)
def test_answers(answer: bytes, expected: bytes) -> None:
    assert answer == expected


def test_tunnel_established_and_via() -> None:
    assert TUNNEL_ESTABLISHED == b"HTTP/1.1 200 Connection established\r\nVia: 1.1 egress-router\r\n\r\n"
    assert VIA == b"1.1 egress-router"


@pytest.mark.parametrize("status, ends", [
    (400, True), (431, True), (414, True), (403, False), (408, False), (502, False), (503, False), (504, False),
])
def test_which_errors_end_the_connection(status: int, ends: bool) -> None:
    assert ends_connection(status) is ends


@pytest.mark.parametrize("status, keep_alive, read_all, tunnel, keeps", [
    # test_many_pipelined_requests_the_proxy_answers_itself: a refused request without a body
    (403, True, True, False, True), (200, True, True, False, True), (502, True, True, False, True),
    (403, False, True, False, False),  # Connection: close, HTTP/1.0, draining
    (403, True, False, False, False),  # a body not read
    # test_upgrade_requests_are_plain_requests_and_nothing_after_them_is_dropped: after a refused CONNECT
    (403, True, True, True, False), (502, True, True, True, False), (504, True, True, True, False),
    # test_oversized_heads_get_431_and_414_and_every_parser_error_is_counted
    (400, True, True, False, False), (414, True, True, False, False), (431, True, True, False, False),
])
def test_which_answers_keep_the_connection(status: int, keep_alive: bool, read_all: bool, tunnel: bool,
                                          keeps: bool) -> None:
    assert keeps_connection(status, keep_alive, read_all, tunnel) is keeps


@pytest.mark.parametrize("in_target, status, message", [
    (True, 414, "request target too long"), (False, 431, "request head too large"),
])
def test_heads_too_large(in_target: bool, status: int, message: str) -> None:
    error = head_too_large(in_target)
    assert (error.status, error.message, error.counter) == (status, message, metrics.BAD)
    assert ends_connection(error.status)


@pytest.mark.parametrize("method, reused, answered, complete, body_sent, retry", [
    # test_a_reused_upstream_closed_by_the_server_is_retried_on_a_fresh_connection
    (b"GET", True, False, True, 0, True),
    # test_only_idempotent_requests_are_retried_on_a_fresh_connection: RFC 9110 section 9.2.2
    (b"PUT", True, False, True, 0, True), (b"HEAD", True, False, True, 0, True),
    (b"OPTIONS", True, False, True, 0, True), (b"TRACE", True, False, True, 0, True),
    (b"DELETE", True, False, True, 0, True),
    (b"POST", True, False, True, 0, False), (b"PATCH", True, False, True, 0, False),
    (b"LOCK", True, False, True, 0, False), (b"get", True, False, True, 0, False),
    # only the keep-alive race, only with nothing to send again
    (b"GET", False, False, True, 0, False), (b"GET", True, True, True, 0, False),
    (b"GET", True, False, False, 0, False), (b"PUT", True, False, True, 5, False),
])
def test_which_requests_are_retried(method: bytes, reused: bool, answered: bool, complete: bool, body_sent: int,
                                    retry: bool) -> None:
    assert may_retry(method, reused, answered, complete, body_sent) is retry


def test_proxy_error_carries_status_message_and_counter() -> None:
    error = ProxyError(504, "timed out", metrics.UPSTREAM_TIMEOUTS)
    assert (error.status, error.message, error.counter, str(error)) == (504, "timed out", metrics.UPSTREAM_TIMEOUTS,
                                                                        "timed out")
    assert ProxyError(502, "closed").counter is None


# ------------------------------------------------------------------ hop-by-hop header filtering (both passes)

def request_lines(headers: H, chunked: bool = False) -> list[bytes]:
    """What request_head writes: the fast pass, or the second pass when the first one asks for it."""
    fields = request_fields(headers, chunked, frozenset())
    if fields is None:
        fields = request_fields(headers, chunked, drop_tokens(headers))
    assert fields is not None
    return fields


def response_lines(headers: H) -> tuple[list[bytes], bool, bool]:
    fields = response_fields(headers, frozenset())
    if fields is None:
        fields = response_fields(headers, drop_tokens(headers))
    assert fields is not None
    return fields


@pytest.mark.parametrize("value, expected", [
    (b"keep-alive", False), (b"Close", False), (b"keep-alive, close", False), (b"keep-alive,", False),
    (b"X-Secret", True), (b"keep-alive, X-Secret", True), (b" close ,  x-other ", True),
    # edge cases
    (b"", False), (b",", False), (b"KEEP-ALIVE , CLOSE", False), (b"upgrade", True),
])
def test_lists_tokens(value: bytes, expected: bool) -> None:
    assert lists_tokens(value) is expected


@pytest.mark.parametrize("headers, tokens", [
    ([(b"Connection", b"keep-alive")], frozenset()), ([(b"Connection", b"close")], frozenset()),
    ([(b"Connection", b"X-A, keep-alive"), (b"connection", b" X-B ")], frozenset({b"x-a", b"x-b"})),
    ([(b"X-A", b"1")], frozenset()), ([(b"Connection", b"Keep-Alive, Close")], frozenset()),
])
def test_drop_tokens(headers: H, tokens: frozenset[bytes]) -> None:
    assert drop_tokens(headers) == tokens


def test_request_drops_hop_by_hop_and_host_and_adds_via() -> None:
    headers = [(b"Host", b"www.example.com"), (b"User-Agent", b"t"), (b"Proxy-Connection", b"keep-alive"),
               (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
               (b"Proxy-Authorization", b"Basic eA=="), (b"Accept", b"*/*")]
    assert request_lines(headers) == [b"User-Agent: t\r\n", b"Accept: */*\r\n", b"Via: 1.1 egress-router\r\n"]


def test_request_drops_the_headers_connection_names_even_before_it() -> None:
    headers = [(b"X-Secret", b"1"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Kept", b"2")]
    assert request_fields(headers, False, frozenset()) is None  # the fast pass hands over
    assert request_lines(headers) == [b"X-Kept: 2\r\n", b"Via: 1.1 egress-router\r\n"]


def test_request_via_is_appended_to_and_content_length_goes_with_chunked() -> None:
    headers = [(b"Via", b"1.0 other"), (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")]
    assert request_lines(headers, chunked=True) == [b"Via: 1.0 other, 1.1 egress-router\r\n"]
    assert request_lines(headers[:2]) == [b"Content-Length: 5\r\n", b"Via: 1.0 other, 1.1 egress-router\r\n"]


def test_response_framing_facts() -> None:
    lines, has_length, chunked = response_lines([(b"Content-Type", b"text/plain"), (b"Content-Length", b"3"),
                                                 (b"Connection", b"keep-alive")])
    assert (lines, has_length, chunked) == ([b"Content-Type: text/plain\r\n", b"Content-Length: 3\r\n",
                                             b"Via: 1.1 egress-router\r\n"], True, False)
    lines, has_length, chunked = response_lines([(b"Transfer-Encoding", b"Chunked"), (b"ETag", b"x")])
    assert (lines, has_length, chunked) == ([b"ETag: x\r\n", b"Via: 1.1 egress-router\r\n"], False, True)


def test_response_drops_named_headers_from_every_connection_header() -> None:
    headers = [(b"Connection", b"X-A"), (b"X-A", b"1"), (b"X-B", b"2"), (b"Connection", b"x-b"), (b"X-C", b"3"),
               (b"Via", b"1.1 origin")]
    lines, has_length, chunked = response_lines(headers)
    assert lines == [b"X-C: 3\r\n", b"Via: 1.1 origin, 1.1 egress-router\r\n"]
    assert not has_length and not chunked


def test_a_named_content_length_does_not_count_as_framing() -> None:
    lines, has_length, _ = response_lines([(b"Connection", b"Content-Length"), (b"Content-Length", b"3")])
    assert lines == [b"Via: 1.1 egress-router\r\n"] and not has_length


def test_header_names_keep_their_case_and_values_their_bytes() -> None:
    headers = [(b"x-LoWeR", b"  spaced  "), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-Bin", b"\xff")]
    assert request_lines(headers) == [b"x-LoWeR:   spaced  \r\n", b"Set-Cookie: a=1\r\n", b"Set-Cookie: b=2\r\n",
                                      b"X-Bin: \xff\r\n", b"Via: 1.1 egress-router\r\n"]
    assert response_lines(headers)[0] == request_lines(headers)
