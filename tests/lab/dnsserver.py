"""A tiny authoritative DNS server for the lab tests, built on dnspython (already a dependency of the proxy).

It answers A and AAAA over UDP from a table the test changes while it runs (addresses and TTL per
name); a name not in the table gets NXDOMAIN, a name without addresses of the asked type an empty
NOERROR answer (what dnspython calls NoAnswer). It can be stopped (its socket closed: queries get an
ICMP port unreachable) and started again with the same table, and it can be told to stay silent
(queries dropped, the resolver times out). Every query it receives is recorded.

The socket is made in the caller's network namespace (call `start` inside `lab.entered(role)`);
one thread, its waits bounded, ended by `stop`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


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
                if not selector.select(timeout=0.1):
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
        silent = self.silent
        with self._lock:
            self.queries.append(Query(time.monotonic(), name, rdtype, peer[0], not silent))
            record = self._records.get(name)
        if silent:
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
        sock.sendto(response.to_wire(), peer)


def _key(name: str) -> str:
    return name.lower().rstrip(".")
