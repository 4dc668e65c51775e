"""The HTTP proxy's per-request Python work alone, in process: no sockets, no kernel, no event loop turns.

Run from the repository:  .venv/bin/python benchmarks/http_hotpath.py [--requests N] [--rounds R] [--baseline TREE]

A ClientConnection and a pooled Upstream of one Worker are given fake transports that keep what is
written; the benchmark feeds the client a keep-alive request as wrk sends it (absolute form, to an
address the allow list allows) and the upstream the response nginx sends (1 KiB body), and checks the
bytes that come out. That is the user-space path of one keep-alive request (parse, allow list, pool,
heads, counters, histogram), without the syscalls and the loop around it: what issue 16's profile
charges ~17 us of user time per request to, of which this measures the part in our code and the
parsers. us/request: the median over rounds of process CPU time / requests.

With --baseline TREE (another checkout with its own .venv), TREE's code is measured the same way in a
subprocess, alternating rounds, and ours/baseline is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

REQUEST = b"GET http://203.0.113.10/1k HTTP/1.1\r\nHost: 203.0.113.10\r\n\r\n"
BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 01:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Wed, 02 Dec 2026 00:00:00 GMT\r\nConnection: keep-alive\r\n"
            b"ETag: \"6932a400-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + BODY)


class FakeTransport:
    """What the proxy calls on a uvloop transport, keeping the bytes written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        raise AssertionError("the benchmark's flow never pauses")

    def resume_reading(self) -> None:
        raise AssertionError("the benchmark's flow never pauses")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 40000) if name == "peername" else default

    def close(self) -> None:
        raise AssertionError("a keep-alive connection is not closed")


def measure(requests: int) -> float:
    """CPU seconds per request of the path, after a warm-up (this process's own code)."""
    from ipaddress import IPv4Address

    from egress_router.core.config import load_http_proxy
    from egress_router.proxy.http import ClientConnection
    from egress_router.proxy.http_upstream import Upstream
    from egress_router.proxy.http_worker import Worker
    from egress_router.proxy.metrics import ALLOWED, SharedCounters

    loop = uvloop.new_event_loop()  # as the proxy runs (its loop.time() is C, asyncio's is Python)
    asyncio.set_event_loop(loop)
    settings = load_http_proxy({"EGRESS_HTTP_PROXY_DESTINATION": "203.0.113.0/24"})
    shared = SharedCounters(1)
    worker = Worker(settings, shared, 0, ClientConnection)
    client = ClientConnection(worker)
    client_out = FakeTransport()
    client.connection_made(client_out)  # type: ignore[arg-type]
    upstream = Upstream(worker)
    upstream_out = FakeTransport()
    upstream.connection_made(upstream_out)  # type: ignore[arg-type]
    upstream.key = (IPv4Address("203.0.113.10"), 80)
    worker.release(upstream)

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    check(client_out.written, upstream_out.written)
    client_out.written.clear()
    upstream_out.written.clear()
    before = shared.total(ALLOWED)
    started = time.process_time()
    for _ in range(requests):
        one()
    elapsed = time.process_time() - started
    assert shared.total(ALLOWED) - before == requests
    check(client_out.written, upstream_out.written)
    loop.close()
    return elapsed / requests


def check(to_client: list[bytes], to_upstream: list[bytes]) -> None:
    """Every request went upstream rewritten, every response came back with its body: the path was real."""
    assert to_upstream and all(data.startswith(b"GET /1k HTTP/1.1\r\nHost: 203.0.113.10\r\n") for data in to_upstream)
    assert to_client and all(data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(BODY) for data in to_client)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000, help="requests per round (default 50,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--baseline", type=Path, help="another checkout with its own .venv: A/B")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a baseline's subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.requests)))
        return 0
    sides = {"ours": [sys.executable]}
    if args.baseline is not None:
        sides["baseline"] = [str(args.baseline / ".venv" / "bin" / "python")]
    here = Path(__file__).resolve()
    figures: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:
            tree = here.parent.parent if side == "ours" else args.baseline
            out = subprocess.run([*sides[side], str(here), "--one", "--requests", str(args.requests)],
                                 cwd=tree, check=True, capture_output=True, text=True).stdout
            figures[side].append(json.loads(out) * 1e6)
    for side, values in figures.items():
        print(f"{side:9} us/request: median {statistics.median(values):.2f}, "
              f"min-max {min(values):.2f}-{max(values):.2f} ({len(values)} rounds: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")
    if "baseline" in figures:
        ratio = statistics.median(figures["ours"]) / statistics.median(figures["baseline"])
        apart = max(figures["ours"]) < min(figures["baseline"]) or min(figures["ours"]) > max(figures["baseline"])
        print(f"ours/baseline: {ratio:.3f} ({'outside' if apart else 'within'} the spread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
