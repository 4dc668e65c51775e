#!/usr/bin/env python3
"""CONNECT through a proxy, GET one object inside the tunnel, read its body as fast as possible.

With --direct it skips the proxy and GETs from the target itself (the ceiling without a tunnel).
With --plain it sends no CONNECT: a plain GET in absolute form (http://target/path) to the proxy,
which the proxy forwards as an HTTP request (its HTTP path, not its tunnel).

Used by benchmarks/http_proxy.py (run inside the lab's client namespace). Prints one JSON line:
the CONNECT status, body bytes read, seconds from sending CONNECT to the last byte, and this
process's own CPU time during the transfer (so the benchmark can tell whether the client was the bottleneck).
Bounded: it gives up after --timeout seconds and reports what it had read by then.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import socket
import struct
import sys
import time

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (named in Python 3.10+ on Linux only)


def read_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """Read up to the end of an HTTP head; return (head, bytes already read past it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed in the middle of a response head: {data[:200]!r}")
        data += chunk
        if len(data) > 65536:
            raise ConnectionError("response head too long")
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy", help="host:port of the proxy")
    parser.add_argument("--direct", action="store_true", help="no proxy: connect to the target itself")
    parser.add_argument("--plain", action="store_true",
                        help="no CONNECT: a plain GET in absolute form through the proxy")
    parser.add_argument("--target", required=True, help="host:port to CONNECT to")
    parser.add_argument("--path", default="/big", help="what to GET inside the tunnel")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument("--buffer", type=int, default=1 << 20, help="recv_into buffer size")
    parser.add_argument("--splice", action="store_true", help="splice the body into /dev/null (no copy to us)")
    args = parser.parse_args()

    if not args.direct and not args.proxy:
        parser.error("--proxy is needed unless --direct")
    host, port = (args.target if args.direct else args.proxy).rsplit(":", 1)
    result: dict[str, object] = {"status": None, "bytes": 0, "expected": None, "seconds": None, "error": None}
    usage0 = resource.getrusage(resource.RUSAGE_SELF)  # after the interpreter's start-up
    start = time.perf_counter()
    deadline = time.monotonic() + args.timeout
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            target_host = args.target.rsplit(":", 1)[0]
            target = args.path
            if args.plain and not args.direct:
                port_part = "" if args.target.endswith(":80") else ":" + args.target.rsplit(":", 1)[1]
                target = f"http://{target_host}{port_part}{args.path}"
            elif not args.direct:
                sock.sendall(f"CONNECT {args.target} HTTP/1.1\r\nHost: {args.target}\r\n\r\n".encode())
                head, rest = read_head(sock, deadline)
                status = int(head.split(b" ", 2)[1])
                result["status"] = status
                if status != 200:
                    raise ConnectionError(f"CONNECT answered {head.splitlines()[0]!r}")
                if rest:
                    raise ConnectionError("bytes arrived in the tunnel before the request was sent")
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {target_host}\r\nConnection: close\r\n\r\n".encode())
            head, rest = read_head(sock, deadline)
            lines = head.decode("latin-1").split("\r\n")
            if args.plain:
                result["status"] = int(lines[0].split(" ", 2)[1])
            if lines[0].split(" ", 2)[1] != "200":
                raise ConnectionError(f"the GET was answered {lines[0]!r}")
            length = next(int(line.split(":", 1)[1]) for line in lines[1:]
                          if line.lower().startswith("content-length:"))
            result["expected"] = length
            got = len(rest)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if args.splice:
                sink = os.open(os.devnull, os.O_WRONLY)
                pipe_r, pipe_w = os.pipe()
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe_w, F_SETPIPE_SZ, 1 << 20)
                # splice needs a blocking socket; SO_RCVTIMEO still bounds each wait
                sock.setblocking(True)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
                try:
                    fd = sock.fileno()
                    while got < length:
                        moved = os.splice(fd, pipe_w, min(1 << 20, length - got))
                        if moved == 0:
                            break
                        got += moved
                        while moved:
                            moved -= os.splice(pipe_r, sink, moved)
                        if time.monotonic() > deadline:
                            raise TimeoutError("time bound reached")
                finally:
                    for fd_ in (sink, pipe_r, pipe_w):
                        os.close(fd_)
            else:
                view = memoryview(bytearray(args.buffer))
                while got < length:
                    n = sock.recv_into(view)
                    if n == 0:
                        break
                    got += n
                    if time.monotonic() > deadline:
                        raise TimeoutError("time bound reached")
            result["bytes"] = got
    except (OSError, ValueError, StopIteration) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_user"] = usage.ru_utime - usage0.ru_utime
    result["cpu_system"] = usage.ru_stime - usage0.ru_stime
    print(json.dumps(result), flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
