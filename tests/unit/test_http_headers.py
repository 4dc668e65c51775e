"""The HTTP proxy's header filtering (pure functions of egress_router.proxy.http): hop-by-hop
headers, those a Connection header names, Via, and the framing facts the proxy needs."""

from __future__ import annotations

import pytest

from egress_router.proxy.http_rules import drop_tokens, lists_tokens, request_fields, response_fields

H = list[tuple[bytes, bytes]]


def request_lines(headers: H, chunked: bool = False) -> list[bytes]:
    """What send_request writes: the fast pass, or the second pass when the first one asks for it."""
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
])
def test_lists_tokens(value: bytes, expected: bool) -> None:
    assert lists_tokens(value) is expected


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
