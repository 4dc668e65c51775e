#!/usr/bin/env python3
"""Open many idle TCP connections to a proxy and hold them, for benchmarks/http_proxy.py.

Runs inside the lab's client namespace. It raises its own RLIMIT_NOFILE, connects --count
sockets without sending anything (at most --batch connects in flight at once), then prints
"connected N failed M" and waits for commands on stdin, one a line:
  check   print "alive N": connections with nothing to read (the proxy has not closed them)
  close   close them all and exit
It also closes everything and exits by itself after --hold seconds, or when stdin closes.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import select
import socket
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1000, help="connects in flight at most")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--hold", type=float, default=120.0, help="exit after this many seconds regardless")
    args = parser.parse_args()

    want = args.count + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))

    started = time.monotonic()
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    done: dict[int, socket.socket] = {}
    failed = 0
    todo = args.count
    deadline = started + args.connect_timeout
    while (todo or pending) and time.monotonic() < deadline:
        while todo and len(pending) < args.batch:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((args.host, args.port))
            todo -= 1
            if code not in (0, errno.EINPROGRESS):
                failed += 1
                sock.close()
                continue
            pending[sock.fileno()] = sock
            ep.register(sock.fileno(), select.EPOLLOUT)
        for fd, _ in ep.poll(0.5):
            sock = pending.pop(fd)
            ep.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
                sock.close()
            else:
                done[fd] = sock
    failed += len(pending) + todo
    for sock in pending.values():
        sock.close()
    pending.clear()
    print(f"connected {len(done)} failed {failed} seconds {time.monotonic() - started:.2f}", flush=True)

    for fd in done:
        ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
    hold_until = started + args.hold
    try:
        while time.monotonic() < hold_until:
            ready, _, _ = select.select([sys.stdin], [], [], max(0.0, min(1.0, hold_until - time.monotonic())))
            if not ready:
                continue
            line = sys.stdin.readline()
            if not line or line.strip() == "close":
                break
            if line.strip() == "check":
                closed = {fd for fd, _ in ep.poll(0)}
                print(f"alive {len(done) - len(closed)}", flush=True)
    finally:
        for sock in done.values():
            sock.close()
        ep.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
