"""The DNS proxy (a TCP forwarder) used as its users would use it: real clients and awkward ones, through a real
proxy process in the namespace lab (the fixtures and helpers of tests/lab/test_dns_proxy.py).

- curl downloads a file through a forward named in DNS, over keep-alive and over fresh connections: every
  download byte-exact, and the proxy's per-connection log counts exactly the bytes curl sent and received;
- git clones a repository over dumb HTTP (loose objects and a pack) through the forward: the same commits;
- a client that trickles its request one byte at a time, and one that types into an echo service byte by byte;
- a slow reader of a large download: byte-exact, and the worker's memory stays bounded (flow control);
- 100 pipelined HTTP/1.1 requests in one write: 100 responses, in order, each exact;
- a client that half-closes right after its request still gets the whole response.

The HTTP origin is Python's http.server (HTTP/1.1, keep-alive) on 203.0.113.10:8000 in the destination namespace,
serving a directory made by the test; it is started, and ended, by its pid.
"""

# ruff: noqa: F811 (the tests take the imported fixtures by their names)

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from egress_router.lab import CLIENT_IP, ROUTER_POD_IP, Lab
from tests.lab.dnsserver import DnsServer
from tests.lab.httpserver import serving
from tests.lab.origin import field, parse_fields, read_exact, read_head, sha256
from tests.lab.proxyproc import PeakRss, read_slowly
from tests.lab.test_dns_proxy import (  # noqa: F401 (dns, services, start_proxy: the fixtures)
    TAIL,
    A,
    Conn,
    Proxy,
    Services,
    StartProxy,
    dns,
    eventually,
    services,
    start_proxy,
)

WEB_NAME = "web.example.test"  # answered by the test DNS server with A
WEB_PORT = 8000  # http.server on A
FORWARD = 8080  # the proxy's port for it: "8080 web.example.test 8000"
ECHO_PORT = 7000  # an echo service on A, forwarded as is
SOURCE_PORT = 7001  # a source service on A, forwarded as is
FILE_SIZE = 3 * 1024 * 1024
PAGES = 100  # small files /p/000.txt ... /p/099.txt, each of its own size and content
BIG_DOWNLOAD = 64 * 1024 * 1024
CURL_OUT = "%{local_port} %{num_connects} %{size_request} %{size_header} %{size_download} %{http_code}\n"


def clean_env(home: Path) -> dict[str, str]:
    """A child's environment without any *_proxy variable (curl and git would honour them) and with its own
    HOME (no user configuration of git or curl)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@example.test",
            "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@example.test"}


# ------------------------------------------------------------------ the HTTP origin: http.server by pid

@dataclass
class Web:
    """http.server in the destination namespace serving `root`; `pages[i]` is the content of /p/<i>.txt."""

    root: Path
    log: Path
    home: Path
    blob: bytes
    pages: list[bytes]
    process: subprocess.Popen[bytes]

    def server_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def web(lab: Lab, tmp_path: Path) -> Iterator[Web]:
    root = tmp_path / "www"
    (root / "p").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    blob = random.Random(11).randbytes(FILE_SIZE)
    (root / "blob.bin").write_bytes(blob)
    pages = [random.Random(1000 + i).randbytes(300 + 53 * i) for i in range(PAGES)]
    for i, page in enumerate(pages):
        (root / "p" / f"{i:03d}.txt").write_bytes(page)
    log = tmp_path / "http.server.log"
    with serving(lab, "dest", A, WEB_PORT, root, log, env=clean_env(home)) as process:
        yield Web(root, log, home, blob, pages, process)


def web_forward(dns: DnsServer, start_proxy: StartProxy) -> Proxy:
    """A proxy forwarding FORWARD to WEB_NAME:WEB_PORT, once it has resolved the name."""
    dns.set(WEB_NAME, A, ttl=300)
    proxy = start_proxy(f"{FORWARD} {WEB_NAME} {WEB_PORT}")
    proxy.wait_resolved(FORWARD, WEB_NAME)
    return proxy


def by_client(proxy: Proxy, count: int, port: int) -> dict[int, Mapping[str, str]]:
    """The proxy's connection lines for `port` (at least `count`), by the client's port."""
    lines = proxy.wait_connection_lines(count, port)
    assert all(m["client"].startswith(f"{CLIENT_IP}:") for m in lines), proxy.stderr
    return {int(m["client"].rsplit(":", 1)[1]): m.groupdict() for m in lines}


def read_response(reader: BinaryIO) -> tuple[str, list[tuple[str, str]], bytes, int]:
    """One HTTP/1.1 response with a Content-Length body: (status line, fields, body, bytes on the wire)."""
    head = read_head(reader)
    assert head is not None, "the connection closed before a response"
    status, fields = parse_fields(head)
    length = field(fields, "Content-Length")
    assert length is not None, head
    body = read_exact(reader, int(length))
    return status, fields, body, len(head) + len(body)


# ------------------------------------------------------------------ curl

def curl(lab: Lab, web: Web, *args: str) -> list[list[str]]:
    """curl in the client namespace; one row of CURL_OUT fields per transfer."""
    # --max-time is per transfer: at most three transfers per invocation here
    result = lab.exec("client", ["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-w", CURL_OUT, *args],
                      env=clean_env(web.home), timeout=20)
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.splitlines()]


def test_curl_downloads_byte_exact_over_keep_alive_and_fresh_connections(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy, web: Web, tmp_path: Path) -> None:
    proxy = web_forward(dns, start_proxy)
    url = f"http://{ROUTER_POD_IP}:{FORWARD}/blob.bin"
    keep = [tmp_path / f"keep-{i}.bin" for i in range(3)]
    rows = curl(lab, web, *[arg for path in keep for arg in ("-o", str(path))], url, url, url)  # one connection
    fresh = [tmp_path / f"fresh-{i}.bin" for i in range(2)]
    for path in fresh:  # a new curl each: a new connection each
        rows += curl(lab, web, "-o", str(path), url)
    assert len(rows) == 5, rows
    assert [row[5] for row in rows] == ["200"] * 5, rows
    assert [row[1] for row in rows] == ["1", "0", "0", "1", "1"], rows  # num_connects: reused, then fresh ones
    for path in keep + fresh:
        assert path.stat().st_size == FILE_SIZE, path
        assert sha256(path.read_bytes()) == sha256(web.blob), path
    # what curl sent and received on each of its connections, against the proxy's own count for it
    expected: dict[int, list[int]] = {}
    for local_port, _, request, header, body, _ in rows:
        counts = expected.setdefault(int(local_port), [0, 0, 0])
        counts[0] += int(request)
        counts[1] += int(header) + int(body)
        counts[2] += 1
    assert [c[2] for c in expected.values()] == [3, 1, 1], expected
    lines = by_client(proxy, 3, FORWARD)
    assert set(lines) == set(expected), (expected, proxy.stderr)
    for client_port, (up, down, downloads) in expected.items():
        line = lines[client_port]
        assert (int(line["up"]), int(line["down"])) == (up, down), (client_port, line, expected)
        assert int(line["down"]) >= downloads * FILE_SIZE
        assert line["how"] == "closed by both sides", line
        assert (line["target"], line["backend"]) == (f"{WEB_NAME}:{WEB_PORT}", f"{A}:{WEB_PORT}"), line


# ------------------------------------------------------------------ git over dumb HTTP

def git(env: Mapping[str, str], *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout.strip()


def test_git_clones_over_dumb_http_through_the_forward(lab: Lab, dns: DnsServer, services: Services,
                                                       start_proxy: StartProxy, web: Web, tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.fail("git is not installed: this test needs it (apt-get install git); it must not be skipped")
    env = clean_env(web.home)
    source = tmp_path / "source"
    source.mkdir()
    git(env, "init", "-q", "-b", "main", cwd=source)
    for i in range(3):
        (source / "notes.txt").write_text("".join(f"line {n} of commit {i}\n" for n in range(50 * (i + 1))))
        (source / f"data-{i}.bin").write_bytes(random.Random(200 + i).randbytes(200_000))
        git(env, "add", "-A", cwd=source)
        git(env, "commit", "-q", "-m", f"commit {i}", cwd=source)
    bare = web.root / "repo.git"
    git(env, "clone", "-q", "--bare", str(source), str(bare))
    git(env, "repack", "-a", "-d", "-q", cwd=bare)  # the first three commits in a pack
    (source / "late.txt").write_text("a commit after the repack: loose objects\n")
    git(env, "add", "-A", cwd=source)
    git(env, "commit", "-q", "-m", "commit 3", cwd=source)
    git(env, "push", "-q", str(bare), "main", cwd=source)
    git(env, "update-server-info", cwd=bare)
    head = git(env, "rev-parse", "HEAD", cwd=source)
    history = git(env, "log", "--format=%H", cwd=source).split()
    assert len(history) == 4
    packs = list((bare / "objects" / "pack").glob("*.pack"))
    assert len(packs) == 1 and any((bare / "objects").glob("[0-9a-f][0-9a-f]/*")), "a pack and loose objects"

    proxy = web_forward(dns, start_proxy)
    clone = tmp_path / "clone"
    stalls = ["-c", "http.lowSpeedLimit=1000", "-c", "http.lowSpeedTime=5"]  # a stalled transfer fails soon
    result = lab.exec("client", ["git", *stalls, "clone", "-q", f"http://{ROUTER_POD_IP}:{FORWARD}/repo.git",
                                 str(clone)], env=env, timeout=40)
    assert result.returncode == 0, (result.stderr, web.server_log())
    assert git(env, "rev-parse", "HEAD", cwd=clone) == head
    assert git(env, "log", "--format=%H", cwd=clone).split() == history
    git(env, "fsck", "--strict", "--no-progress", cwd=clone)
    for i in range(3):
        assert (clone / f"data-{i}.bin").read_bytes() == (source / f"data-{i}.bin").read_bytes()
    served = web.server_log()
    assert "GET /repo.git/objects/pack/" in served, served  # the dumb protocol fetched the pack ...
    assert f"GET /repo.git/objects/{head[:2]}/{head[2:]}" in served, served  # ... and the loose commit
    # the dumb protocol asks for loose objects that are in the pack: 404s, which http.server answers with
    # "Connection: close"; libcurl (git's CURLOPT_FAILONERROR) may close such a connection before it read the
    # body, with a reset then, which the proxy must pass on as such. Every other connection ends cleanly.
    not_found = served.count('HTTP/1.1" 404 ')
    assert not_found >= 1, served
    lines = proxy.wait_connection_lines(1, FORWARD)
    hows = Counter("reset by the client" if m["how"] == "client connection lost ([Errno 104] Connection reset by peer)"
                   else m["how"] for m in lines)
    assert set(hows) <= {"closed by both sides", "reset by the client"}, proxy.stderr
    assert hows["reset by the client"] <= not_found, (hows, served)
    assert sum(int(m["down"]) for m in lines) >= packs[0].stat().st_size, proxy.stderr


# ------------------------------------------------------------------ clients that trickle

def test_a_request_trickled_one_byte_at_a_time_gets_the_full_response(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy, web: Web) -> None:
    proxy = web_forward(dns, start_proxy)
    request = (f"GET /p/042.txt HTTP/1.1\r\nHost: {WEB_NAME}\r\nUser-Agent: trickle\r\n"
               "Connection: close\r\n\r\n").encode()
    assert len(request) < 150  # 10 ms a byte: well under 2 s
    with Conn(lab, FORWARD) as conn:
        for i in range(len(request)):
            conn.sock.sendall(request[i:i + 1])
            time.sleep(0.01)
        status, fields, body, wire = read_response(conn.reader)
        assert conn.rest() == b""  # Connection: close, and nothing after the body
        client_port = conn.sock.getsockname()[1]
    assert status == "HTTP/1.1 200 OK", (status, fields)
    assert body == web.pages[42]
    line = by_client(proxy, 1, FORWARD)[client_port]
    assert (int(line["up"]), int(line["down"])) == (len(request), wire), line
    assert line["how"] == "closed by both sides", line


def test_a_typing_client_gets_each_byte_echoed_before_the_next(lab: Lab, dns: DnsServer, services: Services,
                                                                start_proxy: StartProxy) -> None:
    """An interactive client (a terminal session): each byte comes back on its own, nothing waits for more."""
    services.listen("dest", A, ECHO_PORT, "echo")
    proxy = start_proxy(f"{ECHO_PORT} {A}")
    typed = b"ls -l /tmp\r\nexit\r\n" * 4
    started = time.monotonic()
    with Conn(lab, ECHO_PORT, timeout=2) as conn:
        greeting = conn.line()
        assert greeting.startswith(f"{A}:{ECHO_PORT} "), greeting
        for i in range(len(typed)):
            conn.sock.sendall(typed[i:i + 1])
            assert conn.sock.recv(16) == typed[i:i + 1], i  # that byte, alone, before the next one is typed
            time.sleep(0.01)
        assert conn.finish() == TAIL
    assert time.monotonic() - started < 5
    [line] = proxy.wait_connection_lines(1, ECHO_PORT)
    assert (int(line["up"]), int(line["down"])) == (len(typed), len(greeting) + len(typed) + len(TAIL))


# ------------------------------------------------------------------ a slow reader

def test_a_slow_reader_of_a_large_download_is_byte_exact_and_memory_stays_bounded(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    """The client reads 4 KiB every 20 ms for 2 s, then as fast as it can. The relay reads a side only when
    nothing of the other direction waits to be sent: per worker one 256 KiB receive buffer, per direction at
    most one copy of a short send (< 256 KiB), so the worker needs well under a MiB more. 16 MiB leaves room
    for the allocator and interpreter noise, while a relay that read the backend regardless would hold most of
    the 64 MiB (the kernel's socket buffers on the way take ~10-20 MiB at most) within the slow phase."""
    services.listen("dest", A, SOURCE_PORT, "source")
    services.payload = payload = random.Random(5).randbytes(BIG_DOWNLOAD)
    proxy = start_proxy(f"{SOURCE_PORT} {A}")
    [worker] = proxy.serving_pids()
    digest = hashlib.sha256()
    length = 0
    with PeakRss(worker) as peak, Conn(lab, SOURCE_PORT, timeout=30) as conn:
        slow_until = time.monotonic() + 2.0
        while time.monotonic() < slow_until:
            chunk = conn.sock.recv(4096)
            assert chunk, "EOF during the slow phase"
            digest.update(chunk)
            length += len(chunk)
            time.sleep(0.02)
        slow = length
        buffer = bytearray(1 << 20)
        while size := conn.sock.recv_into(buffer):
            digest.update(memoryview(buffer)[:size])
            length += size
        client_port = conn.sock.getsockname()[1]
    assert slow < 4 * 1024 * 1024, slow  # the slow phase really was slow
    assert (length, digest.hexdigest()) == (BIG_DOWNLOAD, sha256(payload))
    assert peak.growth < 16 * 1024 * 1024, f"the worker grew by {peak.growth // 1024} KiB for a slow reader"
    line = by_client(proxy, 1, SOURCE_PORT)[client_port]
    assert (int(line["up"]), int(line["down"])) == (0, BIG_DOWNLOAD), line
    assert line["how"] == "closed by both sides", line


# ------------------------------------------------------------------ pipelining and half-close

def test_one_hundred_pipelined_requests_get_their_responses_in_order(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy, web: Web) -> None:
    proxy = web_forward(dns, start_proxy)
    last = "Connection: close\r\n"  # on the last request only: the server closes after answering it
    requests = b"".join(f"GET /p/{i:03d}.txt HTTP/1.1\r\nHost: {WEB_NAME}\r\n{last if i == PAGES - 1 else ''}\r\n"
                        .encode() for i in range(PAGES))
    wire = 0
    with Conn(lab, FORWARD, timeout=10) as conn:
        conn.sock.sendall(requests)  # all of them before reading anything
        for i in range(PAGES):
            status, fields, body, size = read_response(conn.reader)
            assert status == "HTTP/1.1 200 OK", (i, status, fields)
            assert body == web.pages[i], f"response {i} is not /p/{i:03d}.txt ({len(body)} bytes)"
            wire += size
        assert conn.rest() == b""  # the last one asked for the close
        client_port = conn.sock.getsockname()[1]
    served = [line.split('"')[1] for line in web.server_log().splitlines() if '"GET /p/' in line]
    assert served == [f"GET /p/{i:03d}.txt HTTP/1.1" for i in range(PAGES)], served
    line = by_client(proxy, 1, FORWARD)[client_port]
    assert (int(line["up"]), int(line["down"])) == (len(requests), wire), line
    assert line["how"] == "closed by both sides", line


def test_a_client_that_half_closes_after_its_request_gets_the_whole_response(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy, web: Web) -> None:
    proxy = web_forward(dns, start_proxy)
    request = f"GET /blob.bin HTTP/1.1\r\nHost: {WEB_NAME}\r\n\r\n".encode()  # keep-alive: the EOF ends it
    with Conn(lab, FORWARD, timeout=10) as conn:
        conn.sock.sendall(request)
        conn.half_close()  # at once: the server sees the request, then EOF
        status, fields, body, wire = read_response(conn.reader)
        assert conn.rest() == b""  # then the server closes: EOF (not a reset), nothing more
        client_port = conn.sock.getsockname()[1]
    assert status == "HTTP/1.1 200 OK", (status, fields)
    assert (len(body), sha256(body)) == (FILE_SIZE, sha256(web.blob))
    line = by_client(proxy, 1, FORWARD)[client_port]
    assert (int(line["up"]), int(line["down"])) == (len(request), wire), line
    assert line["how"] == "closed by both sides", line



def test_a_slow_steady_reader_outlasts_the_idle_timeout_and_a_stopped_one_does_not(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    """EGRESS_DNS_PROXY_IDLE_TIMEOUT: "seconds a connection may carry no data". A client reading 80 KB/s carries
    data all along, though the proxy may not see its socket turn writable for longer than the timeout (a large
    send queue drains slowly): it must get the whole 8 MiB (it was reset after ~0.5 MB with a 2 s timeout). A
    client that stops reading with bytes on the way carries nothing: it is let go, with a reset (bytes are cut),
    after at most twice the timeout (the first timeout's end finds bytes still queued, the second that none left
    meanwhile)."""
    services.listen("dest", A, SOURCE_PORT, "source")
    services.payload = payload = random.Random(6).randbytes(8 * 1024 * 1024)
    proxy = start_proxy(f"{SOURCE_PORT} {A}", EGRESS_DNS_PROXY_IDLE_TIMEOUT="2")
    digest = hashlib.sha256()
    with Conn(lab, SOURCE_PORT, timeout=30) as steady:
        got = read_slowly(steady.sock.recv, 6.0, 8192, 0.1, digest)  # about 80 KB/s
        assert got < len(payload) // 4, got  # the slow phase was slow: most of the payload was still to come
        buffer = bytearray(1 << 20)
        while size := steady.sock.recv_into(buffer):
            digest.update(memoryview(buffer)[:size])
            got += size
        steady_port = steady.sock.getsockname()[1]
    assert (got, digest.hexdigest()) == (len(payload), sha256(payload))

    with Conn(lab, SOURCE_PORT, timeout=30) as stopped:
        assert stopped.sock.recv(8192)  # then it reads no more, with megabytes on the way
        stopped_at = time.monotonic()
        # the proxy's line for it, waited for without reading (a read would be activity): twice the timeout (2 s)
        # and the sweeps' 1 s steps, with margin
        lines = proxy.wait_connection_lines(2, SOURCE_PORT, timeout=15.0)
        waited = time.monotonic() - stopped_at
        stopped.sock.setblocking(False)
        ending = ""
        while not ending:  # what is on the way, then how it ended
            try:
                ending = "" if stopped.sock.recv(1 << 20) else "eof"
            except BlockingIOError:
                ending = "still open"
            except ConnectionResetError:
                ending = "reset"
        stopped_port = stopped.sock.getsockname()[1]
    found = {int(m["client"].rsplit(":", 1)[1]): m for m in lines}
    assert found[steady_port]["how"] == "closed by both sides", found[steady_port].group(0)
    assert int(found[steady_port]["down"]) == len(payload)
    assert found[stopped_port]["how"] == "idle for 2 s", found[stopped_port].group(0)
    assert 3.5 < waited < 8.0, waited  # not at the first timeout (bytes were queued), by the second
    assert ending == "reset", ending
