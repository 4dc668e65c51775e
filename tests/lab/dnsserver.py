"""A tiny authoritative DNS server for the lab tests, built on dnspython (already a dependency of the proxy).

It answers A and AAAA over UDP from a table the test changes while it runs (addresses and TTL per
name); a name not in the table gets NXDOMAIN, a name without addresses of the asked type an empty
NOERROR answer (what dnspython calls NoAnswer). It can be stopped (its socket closed: queries get an
ICMP port unreachable) and started again with the same table, and it can be told to stay silent
(queries dropped, the resolver times out), for every name or per name and the names under it, or to
answer some names only after a delay (the other names are answered meanwhile). Every query it
receives is recorded.

The socket is made in the caller's network namespace (call `start` inside `lab.entered(role)`, or use
`serving`); one thread, its waits bounded, ended by `stop`.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from egress_router.lab import Lab

# Where `serving` puts the server: on the pod network (the client namespace's side of the pod veth), where a
# cluster DNS Service is reached; the router routes its nameservers through the pod interface.
DNS_IP = "198.51.100.53"
DNS_ROLE = "client"


@dataclass(frozen=True, slots=True)
class Query:
    at: float  # time.monotonic() when it arrived
    name: str  # lower case, no trailing dot
    rdtype: str  # "A", "AAAA", ...
    peer: str  # ip of the resolver that asked
    answered: bool


class DnsServer:
    """Answers from `records`: name -> (addresses, ttl)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[tuple[IPv4Address | IPv6Address, ...], int]] = {}
        self._delays: dict[str, float] = {}  # name -> seconds before its answers leave (inf: never)
        self._due: list[tuple[float, int, bytes, tuple[str, int]]] = []  # (when, seq, wire, peer): delayed answers
        self._sent = 0
        self._lock = threading.Lock()
        self.queries: list[Query] = []
        self.silent = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.address: tuple[str, int] | None = None

    # ------------------------------------------------------------ the table
    def set(self, name: str, *addresses: str, ttl: int = 30) -> None:
        """Answer `name` with these addresses (IPv4 for A, IPv6 for AAAA) and this TTL from now on."""
        parsed = tuple(ip_address(a) for a in addresses)
        with self._lock:
            self._records[_key(name)] = (parsed, ttl)

    def remove(self, name: str) -> None:
        """`name` gets NXDOMAIN from now on."""
        with self._lock:
            self._records.pop(_key(name), None)

    def delay(self, name: str, seconds: float) -> None:
        """Answer `name` and every name under it `seconds` late (math.inf: never; 0: at once again)."""
        with self._lock:
            if seconds > 0:
                self._delays[_key(name)] = seconds
            else:
                self._delays.pop(_key(name), None)

    def asked(self, name: str, since: float = 0.0) -> list[Query]:
        with self._lock:
            return [q for q in self.queries if q.name == _key(name) and q.at >= since]

    # ------------------------------------------------------------ life cycle
    def start(self, ip: str, port: int = 53) -> None:
        """Bind in the current thread's network namespace and serve until `stop`."""
        if self._thread is not None:
            raise RuntimeError("already running")
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.setblocking(False)
        self._sock = sock
        self.address = (ip, port)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, args=(sock,), name=f"dns-{ip}:{port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the socket: from now on queries are answered with ICMP port unreachable by the kernel."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------ serving
    def _loop(self, sock: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                self._send_due(sock)
                with self._lock:
                    wait = min(0.1, max(0.0, self._due[0][0] - time.monotonic())) if self._due else 0.1
                if not selector.select(timeout=wait):
                    continue
                for _ in range(100):  # bounded burst per wake-up
                    try:
                        wire, peer = sock.recvfrom(4096)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        return
                    with contextlib.suppress(Exception):  # a malformed query is ignored, as servers do
                        self._answer(sock, wire, peer)

    def _answer(self, sock: socket.socket, wire: bytes, peer: tuple[str, int]) -> None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        now = time.monotonic()
        with self._lock:
            delay = math.inf if self.silent else self._delay(name)
            self.queries.append(Query(now, name, rdtype, peer[0], delay < math.inf))
            record = self._records.get(name)
        if delay == math.inf:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if record is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            addresses, ttl = record
            wanted = IPv4Address if question.rdtype == dns.rdatatype.A else IPv6Address
            matching = [str(a) for a in addresses if isinstance(a, wanted)]
            if matching and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                response.answer.append(dns.rrset.from_text_list(question.name, ttl, dns.rdataclass.IN,
                                                                question.rdtype, matching))
        if delay > 0:
            with self._lock:
                self._sent += 1
                heapq.heappush(self._due, (now + delay, self._sent, response.to_wire(), peer))
            return
        sock.sendto(response.to_wire(), peer)

    def _delay(self, name: str) -> float:
        """The delay of the name or of the nearest enclosing name that has one (the lock is held)."""
        labels = name.split(".")
        for start in range(len(labels)):
            delay = self._delays.get(".".join(labels[start:]))
            if delay is not None:
                return delay
        return 0.0

    def _send_due(self, sock: socket.socket) -> None:
        now = time.monotonic()
        with self._lock:
            due = []
            while self._due and self._due[0][0] <= now:
                due.append(heapq.heappop(self._due))
        for _, _, wire, peer in due:
            with contextlib.suppress(OSError):
                sock.sendto(wire, peer)


@contextlib.contextmanager
def serving(lab: Lab, ip: str = DNS_IP) -> Iterator[DnsServer]:
    """A DnsServer on ip:53 on the pod network (the address added to the client namespace's eth0 first),
    stopped after."""
    lab.exec(DNS_ROLE, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], check=True)
    server = DnsServer()
    with lab.entered(DNS_ROLE):
        server.start(ip, 53)
    try:
        yield server
    finally:
        server.stop()


def _key(name: str) -> str:
    return name.lower().rstrip(".")
