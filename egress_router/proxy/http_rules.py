"""The HTTP proxy's protocol decisions, sans-IO: request targets and hosts, header filtering, framing, answers."""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

import httptools

from ..core.hosts import Address, HostError, normalize_host
from .metrics import BAD

if TYPE_CHECKING:
    from httptools.parser.url_parser import URL

Host = str | Address  # a normalized destination host: a lower-case name or an address

VIA = b"1.1 egress-router"
# The proxy does no protocol upgrades for plain HTTP: an Upgrade request is forwarded as a plain request.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
                        b"proxy-authenticate", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                        b"http2-settings"})
NOT_IN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host"}  # framing and routing belong to the head
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})  # RFC 9110 section 9.2.2
NO_BODY_STATUS = frozenset({204, 304})
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}
TUNNEL_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\nVia: " + VIA + b"\r\n\r\n"
HEALTHZ, METRICS = b"/healthz", b"/metrics"  # the proxy's own pages (origin-form requests)

_NO_TOKENS: frozenset[bytes] = frozenset()

# What a header name is to the proxy (header_kind), by its lower-case spelling; PLAIN: anything else (end-to-end).
PLAIN, HOP, CONNECTION, TRANSFER_ENCODING, UPGRADE_FIELD, HOST, VIA_FIELD, CONTENT_LENGTH = range(8)
_KINDS = {name: HOP for name in HOP_BY_HOP} | {b"connection": CONNECTION, b"transfer-encoding": TRANSFER_ENCODING,
                                               b"upgrade": UPGRADE_FIELD, b"host": HOST, b"via": VIA_FIELD,
                                               b"content-length": CONTENT_LENGTH}
# The kinds of names as they were received (case kept): clients and servers repeat a few spellings, and a dict
# probe on the name is cheaper than lowering it and probing sets per header. Bounded: names past the bound are
# lowered each time.
_KIND_OF: dict[bytes, int] = {}
_KIND_OF_MAX = 2048


def header_kind(name: bytes) -> int:
    """PLAIN, HOP (hop-by-hop, none of the following), CONNECTION, TRANSFER_ENCODING, UPGRADE_FIELD, HOST,
    VIA_FIELD or CONTENT_LENGTH, whatever the name's case."""
    kind = _KIND_OF.get(name)
    if kind is None:
        kind = _KINDS.get(name.lower(), PLAIN)
        if len(_KIND_OF) < _KIND_OF_MAX:
            _KIND_OF[name] = kind
    return kind


# request_framing's answer: bits
CHUNKED = 1  # the body is chunked
BODY = 2  # there is a body (chunked, or a Content-Length above 0)
UPGRADE = 4  # an Upgrade header (the parser may take the request for a protocol switch)


class ProxyError(Exception):
    """Answer the client with `status` and a one-line `message`; `counter`: the metrics counter to add one to."""

    def __init__(self, status: int, message: str, counter: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.counter = counter


# ------------------------------------------------------------ answers of the proxy itself

def simple_response(status: int, body: str, *, close: bool, content_type: bytes = b"text/plain",
                    head_only: bool = False) -> bytes:
    """A complete response with a text body (only its head for a HEAD request: the length stays the body's)."""
    payload = body.encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: ".encode() + content_type
            + f"; charset=utf-8\r\nContent-Length: {len(payload)}\r\nVia: ".encode() + VIA
            + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n")
    return head if head_only else head + payload


def error_response(status: int, message: str, *, close: bool) -> bytes:
    """The answer to a refused or failed request: its one-line message as the body."""
    return simple_response(status, message + "\n", close=close)


def ends_connection(status: int) -> bool:
    """Whether an error answer ends the connection whatever the request asked: after a 400, 414 or 431 the
    request could not be read, so nothing after it on the connection can be either."""
    return status == 400 or status == 431 or status == 414


def keeps_connection(status: int, keep_alive: bool, read_all: bool, tunnel: bool) -> bool:
    """Whether the connection goes on after the proxy answered a request itself with `status`: only if
    it may stay open (`keep_alive`), the request was read to its end (`read_all`: a body not read makes
    the connection unusable), the status does not end it, and the request was not a CONNECT (the bytes
    after a CONNECT were meant for the tunnel: parsing them as requests would be a guess)."""
    return keep_alive and read_all and not tunnel and not ends_connection(status)


def head_too_large(in_target: bool) -> ProxyError:
    """The answer to a request head over the limit: 414 while the request target is read, else 431."""
    if in_target:
        return ProxyError(414, "request target too long", BAD)
    return ProxyError(431, "request head too large", BAD)


def may_retry(method: bytes, reused: bool, answered: bool, complete: bool, body_sent: int) -> bool:
    """Whether a request may go again on a fresh upstream connection after the one it went on closed: only
    the keep-alive race (a reused connection the server closed without answering anything), only an
    idempotent method (RFC 9110 section 9.2.2: the server may have acted on it), only if it was read
    whole and had no body (there is nothing kept to send again)."""
    return reused and not answered and complete and body_sent == 0 and method in IDEMPOTENT


# ------------------------------------------------------------ request targets and hosts

def checked_host(text: str) -> Host:
    """The host of a request target, normalized (acl.normalize_host); 400 for anything else."""
    try:
        return normalize_host(text)
    except HostError as exc:
        raise ProxyError(400, f"bad host {text!r}: {exc}", BAD) from None


# The hosts of request targets as written (bytes) -> (normalized host, host_text of it): a request to a host
# seen before skips the decoding, the normalization and host_text (whose cache hashes an address, which
# ipaddress does in Python). Refused hosts are not kept; cleared when full.
_HOSTS: dict[bytes, tuple[Host, str]] = {}
_HOSTS_MAX = 4096


def parse_absolute_form(target: bytes) -> tuple[Host, int, bytes]:
    """An absolute-form target (http://host[:port][/path][?query]): the host, the port and the target
    to send upstream in origin form (the path, '/' if none, and the query; a fragment is dropped)."""
    host, _, port, path = parse_target(target)
    return host, port, path


def parse_target(target: bytes) -> tuple[Host, str, int, bytes]:
    """parse_absolute_form's answer with the host as host_text writes it: (host, text, port, path)."""
    try:
        parsed = httptools.parse_url(target)
        raw_host = parsed.host or b""
    except httptools.HttpParserInvalidURLError:
        parsed, raw_host = parse_url_with_underscores(target)
    schema = parsed.schema
    if schema is None or (schema != b"http" and schema.lower() != b"http"):
        raise ProxyError(400, "only http:// URLs are proxied; use CONNECT for https", BAD)
    if parsed.userinfo:
        raise ProxyError(400, "user information in the URL is not accepted", BAD)
    # (the first `in` is only a quicker way to the same answer: no '[' in the target, none in its authority)
    if b":" not in raw_host and b"[" in target and b"[" in target.split(b"/", 3)[2]:
        raise ProxyError(400, "only IPv6 addresses may be written in brackets", BAD)
    known = _HOSTS.get(raw_host)
    if known is None:
        normalized = checked_host(raw_host.decode("latin-1"))
        known = normalized, host_text(normalized)
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        _HOSTS[raw_host] = known
    host, text = known
    port = 80 if parsed.port is None else parsed.port
    if not 1 <= port <= 65535:
        raise ProxyError(400, f"port {port} is not a port number (1-65535)", BAD)
    path = parsed.path or b"/"
    if parsed.query is not None:
        path += b"?" + parsed.query
    return host, text, port, path


def parse_url_with_underscores(target: bytes) -> tuple[URL, bytes]:
    """httptools refuses '_' in a URL's host, which DNS names (and the allow list) may have: the URL is
    parsed again with each '_' of its authority read as a letter, so that everything else is judged as
    httptools judges it, and the host is taken from the target as written; 400 if it is still refused."""
    start = target.find(b"://") + 3
    end = len(target)
    for mark in b"/?#":
        found = target.find(bytes((mark,)), start)
        if 0 <= found < end:
            end = found
    authority = target[start:end]
    if start < 3 or b"_" not in authority:
        raise ProxyError(400, "the request target is not a valid URL", BAD)
    try:
        parsed = httptools.parse_url(target[:start] + authority.replace(b"_", b"u") + target[end:])
    except httptools.HttpParserInvalidURLError:
        raise ProxyError(400, "the request target is not a valid URL", BAD) from None
    host = authority.rpartition(b"@")[2]
    if parsed.port is not None:
        host = host.rpartition(b":")[0]
    return parsed, host


def parse_connect_target(target: bytes) -> tuple[Host, int]:
    """A CONNECT request's authority-form target (host:port, IPv6 in brackets): the host and the port."""
    text = target.decode("latin-1")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ProxyError(400, f"CONNECT needs host:port, got {text[:200]!r}", BAD)
    return checked_host(host), int(port_text)


def local_page(method: bytes, target: bytes) -> bytes:
    """Which of the proxy's own pages an origin-form request asks for (HEALTHZ or METRICS; GET or HEAD
    only, any query ignored); 400 for anything else: a proxy is sent absolute-form requests."""
    path = target.split(b"?", 1)[0]
    if path in (HEALTHZ, METRICS) and method in (b"GET", b"HEAD"):
        return path
    raise ProxyError(400, "this is a proxy: send absolute-form requests (http://host/path) or CONNECT", BAD)


@lru_cache(maxsize=4096)
def host_text(host: Host) -> str:
    """How the host is written in a Host header: names as they are, IPv6 in brackets."""
    if isinstance(host, str):
        return host
    return f"[{host}]" if isinstance(host, IPv6Address) else str(host)


# ------------------------------------------------------------ requests: head and framing

def request_framing(headers: list[tuple[bytes, bytes]]) -> int:
    """What the request head says of its body, as bits: CHUNKED (sent chunked, and the proxy sends it on
    chunked too), BODY (there is one: chunked, or a Content-Length above 0; without it the request is
    complete with its head), UPGRADE (it has an Upgrade header)."""
    framing = 0
    for name, value in headers:
        kind = _KIND_OF.get(name)
        if kind is None:
            kind = header_kind(name)
        if kind == TRANSFER_ENCODING:
            if b"chunked" in value.lower():
                framing |= CHUNKED | BODY
        elif kind == CONTENT_LENGTH:
            if value.strip(b" \t0"):  # the parser has checked that it is a number
                framing |= BODY
        elif kind == UPGRADE_FIELD:
            framing |= UPGRADE
    return framing


def stand_in_head(headers: list[tuple[bytes, bytes]], chunked: bool) -> bytes:
    """A head with only the framing of an Upgrade request's `headers`. The parser takes what follows such
    a request for another protocol; the proxy does no upgrades, so it parses that as the body this head
    announces (then the next requests) and gives it to the Upgrade request."""
    if chunked:
        return b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    length = b"0"
    for name, value in headers:
        if name.lower() == b"content-length":
            length = value.strip()
    return b"PUT / HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n"


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    """The end of a chunked body sent upstream, with the client's trailer fields (framing, routing and
    hop-by-hop fields left out: they belong to the head)."""
    if not trailers:
        return b"0\r\n\r\n"
    lines = [b"0\r\n"]
    lines += [name + b": " + value + b"\r\n" for name, value in trailers if name.lower() not in NOT_IN_TRAILERS]
    lines.append(b"\r\n")
    return b"".join(lines)


def request_head(method: bytes, target: bytes, host: str, port: int, headers: list[tuple[bytes, bytes]],
                 chunked: bool) -> bytes:
    """The request head for the upstream server: origin-form `target`, HTTP/1.1, a Host header made from
    the request target's `host` (as host_text writes it) and `port` (the client's Host header is not
    used), the end-to-end headers, Via, and Transfer-Encoding when the body is chunked."""
    first = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host.encode(),
             b"\r\n" if port == 80 else b":%d\r\n" % port]
    pieces = first.copy()
    if not request_pieces(headers, chunked, _NO_TOKENS, pieces):
        # Connection: names more hop-by-hop headers (rare): a second pass drops them
        pieces = first
        request_pieces(headers, chunked, drop_tokens(headers), pieces)
    if chunked:
        pieces.append(b"Transfer-Encoding: chunked\r\n")
    pieces.append(b"\r\n")
    return b"".join(pieces)


# ------------------------------------------------------------ responses: head and framing

def response_ends_at_head(status: int, head_only: bool) -> bool:
    """A response to HEAD, a 204 and a 304 have no body, whatever their headers say."""
    return head_only or status in NO_BODY_STATUS


def interim_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], version: str) -> bytes | None:
    """An informational (1xx) response for the client, with its end-to-end headers (103's Link) and Via;
    None for an HTTP/1.0 client, which must not get one (RFC 9110 section 15.2). A 101 (the proxy asked
    for no upgrade) makes the response invalid: 502."""
    if status == 101:
        raise ProxyError(502, "the upstream server switched protocols, which the proxy did not ask for")
    if version == "1.0":
        return None
    pieces = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    if response_pieces(headers, _NO_TOKENS, pieces) is None:
        del pieces[1:]
        response_pieces(headers, drop_tokens(headers), pieces)
    pieces.append(b"\r\n")
    return b"".join(pieces)


def final_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], version: str,
               head_only: bool, keep_alive: bool) -> tuple[bytes, bool, bool, bool]:
    """The head of a final response for the client, and how its body goes on:
    (head, rechunk, until_close, keep_alive).

    `version` is the client's HTTP version ("1.1" or "1.0"), `head_only` whether it asked with HEAD,
    `keep_alive` whether the connection may stay open as far as the client and the proxy are
    concerned. A body the upstream server sends chunked or delimited by closing its connection
    (`until_close`) is re-chunked for an HTTP/1.1 client (`rechunk`); an HTTP/1.0 client gets it as
    it comes and the end of its connection ends it (so `keep_alive` comes back False).
    """
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    facts = response_pieces(headers, _NO_TOKENS, lines)
    if facts is None:  # Connection: names more hop-by-hop headers (rare): a second pass drops them
        del lines[1:]
        facts = response_pieces(headers, drop_tokens(headers), lines)
        assert facts is not None
    has_length, chunked_upstream = facts
    no_body = head_only or status in NO_BODY_STATUS  # response_ends_at_head, without a call on the hot path
    rechunk = False
    until_close = not no_body and not chunked_upstream and not has_length
    if not no_body and (chunked_upstream or not has_length):
        if version == "1.1":
            rechunk = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False  # HTTP/1.0 client: the end of the body is the end of the connection
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif version == "1.0":
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), rechunk, until_close, keep_alive


# ------------------------------------------------------------ hop-by-hop header filtering

def lists_tokens(value: bytes) -> bool:
    """Whether a Connection header names headers to drop (anything beyond keep-alive and close)."""
    value = value.lower()
    if value == b"keep-alive" or value == b"close":
        return False
    return bool({token.strip() for token in value.split(b",")} - {b"keep-alive", b"close", b""})


def request_fields(headers: list[tuple[bytes, bytes]], chunked: bool,
                   tokens: frozenset[bytes]) -> list[bytes] | None:
    """The request's end-to-end header lines (Host is written apart) and Via; None when the first pass
    (`tokens` empty) meets a Connection header that names more headers to drop."""
    pieces: list[bytes] = []
    return _lines(pieces) if request_pieces(headers, chunked, tokens, pieces) else None


def _lines(pieces: list[bytes]) -> list[bytes]:
    """request_pieces' or response_pieces' output as one item per header line."""
    return [b"".join(pieces[i:i + 4]) for i in range(0, len(pieces), 4)]


def request_pieces(headers: list[tuple[bytes, bytes]], chunked: bool, tokens: frozenset[bytes],
                   pieces: list[bytes]) -> bool:
    """request_fields' lines appended to `pieces`, four pieces a line (name, ': ', value, CRLF: one join
    for the whole head is cheaper than one per line); False where request_fields answers None."""
    via = VIA
    for name, value in headers:
        kind = _KIND_OF.get(name)
        if kind is None:
            kind = header_kind(name)
        if kind:  # one of the names the proxy acts on
            if kind <= UPGRADE_FIELD:  # hop-by-hop
                if kind == CONNECTION and not tokens and lists_tokens(value):
                    return False
                continue
            if kind == HOST or (tokens and name.lower() in tokens):
                continue
            if kind == VIA_FIELD:
                via = value + b", " + VIA
                continue
            if chunked:  # CONTENT_LENGTH
                continue
        elif tokens and name.lower() in tokens:
            continue
        pieces += (name, b": ", value, b"\r\n")
    pieces += (b"Via", b": ", via, b"\r\n")
    return True


def response_fields(headers: list[tuple[bytes, bytes]],
                    tokens: frozenset[bytes]) -> tuple[list[bytes], bool, bool] | None:
    """The response's end-to-end header lines and Via, whether it has a Content-Length, whether the
    upstream sent it chunked; None as for request_fields."""
    pieces: list[bytes] = []
    facts = response_pieces(headers, tokens, pieces)
    return None if facts is None else (_lines(pieces), *facts)


def response_pieces(headers: list[tuple[bytes, bytes]], tokens: frozenset[bytes],
                    pieces: list[bytes]) -> tuple[bool, bool] | None:
    """response_fields' lines appended to `pieces` as request_pieces does, and its two facts: (has a
    Content-Length, sent chunked); None where response_fields answers None."""
    has_length = chunked = False
    via = VIA
    for name, value in headers:
        kind = _KIND_OF.get(name)
        if kind is None:
            kind = header_kind(name)
        if kind:  # one of the names the proxy acts on
            if kind <= UPGRADE_FIELD:  # hop-by-hop
                if kind == TRANSFER_ENCODING:
                    chunked = b"chunked" in value.lower()
                elif kind == CONNECTION and not tokens and lists_tokens(value):
                    return None
                continue
            if tokens and name.lower() in tokens:
                continue
            if kind == VIA_FIELD:
                via = value + b", " + VIA
                continue
            if kind == CONTENT_LENGTH:
                has_length = True
        elif tokens and name.lower() in tokens:
            continue
        pieces += (name, b": ", value, b"\r\n")
    pieces += (b"Via", b": ", via, b"\r\n")
    return has_length, chunked


def drop_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection: are hop-by-hop too (beyond keep-alive/close, rare)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"keep-alive")
    tokens.discard(b"close")
    return frozenset(tokens) if tokens else _NO_TOKENS
