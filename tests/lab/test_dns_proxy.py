"""DNS proxy mode for real: egress-router's TCP forwarder in the router namespace, clients in the client namespace,
backends behind the gateway (and one on the pod-side veth for IPv6), names answered by a test DNS server
(tests/lab/dnsserver.py) on 198.51.100.53 on the pod network (the client namespace, where a cluster DNS Service
would be reached), read through the router namespace's own resolv.conf."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from egress_router.lab import (
    CLIENT_IP,
    CLIENT_IP6,
    DEST_IPS,
    GATEWAY_LAN_IP,
    ROUTER_POD_IP,
    ROUTER_POD_IP6,
    SOURCE_IP,
    Lab,
)
from tests.lab.dnsserver import DNS_IP, DNS_ROLE, DnsServer, serving
from tests.lab.origin import Endpoints, endpoint, host_of
from tests.lab.proxyproc import (
    UNPRIVILEGED,
    ClientConnection,
    ProxyProcess,
    check_stopped,
    connection_refused,
    proxy_env,
    spawn_proxy,
    status_fields,
    unprivileged_program,
)

A, B, C = DEST_IPS  # 203.0.113.10, .11, .12 in the destination namespace
NAME = "svc.example.test"
POOL = "pool.example.test"
READY_PORT = 7999  # every proxy also forwards this port to A:READY_PORT; readiness is polled through it
IO_TIMEOUT = 5.0  # nothing the proxy owes may take longer: a hang fails the test instead of stalling it
BIG = 100 * 1024 * 1024
TAIL = b"[backend: end of input seen]\n"
GREETING = b"backend closes its sending side now\n"
RESOLV = f"nameserver {DNS_IP}\noptions timeout:1 attempts:1\n"
CONN_LINE = re.compile(r"\[(?P<level>info|warning)\] (?P<client>\S+) -> :(?P<port>\d+) (?P<target>\S+) -> "
                       r"(?P<backend>\S+) up=(?P<up>\d+) down=(?P<down>\d+) (?P<ms>\d+(?:\.\d+)?)ms (?P<how>.+)$")


# ------------------------------------------------------------------ backends (TCP services behind the proxy)

@dataclass(frozen=True, slots=True)
class Accepted(Endpoints):
    landed: str  # ip:port ([ip]:port for IPv6) the service was reached on
    peer: str  # the proxy's address as the service saw it


class Services:
    """TCP services in lab namespaces; one accept thread per listener, one thread per connection, waits bounded.

    kinds: whoami  '<landed> <peer>' line, then its sending side closed; reads until EOF
           echo    '<landed> <peer>' line, then echoes until EOF, then TAIL and closes its sending side
           early   GREETING, its sending side closed at once; keeps reading until EOF (kept in `received`)
           sink    reads until EOF, answers '<length> <sha256>'
           source  sends `payload`, closes its sending side, reads until EOF
           reset   '<landed> <peer>' line, then resets the connection (RST)
           watch   '<landed> <peer>' line, then reads until EOF or a reset; how it ended goes in `endings`
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.accepted: list[Accepted] = []
        self.received: dict[str, bytes] = {}  # peer -> what an 'early' service read after its own half-close
        self.payload = b""
        self.sink_delay = 0.0  # seconds a sink waits before it starts reading
        self.endings: list[str] = []  # 'eof' or 'reset', one per finished 'watch' connection
        self._open: Counter[str] = Counter()  # landed ip -> open connections
        self._lock = threading.Lock()
        self._listeners: dict[tuple[str, int], tuple[socket.socket, threading.Event, threading.Thread]] = {}
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    def listen(self, role: str, ip: str, port: int, kind: str) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with self.lab.entered(role):
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(128)
        sock.settimeout(0.1)  # the accept loop looks at its stop flag this often
        stop = threading.Event()
        thread = threading.Thread(target=self._accept_loop, args=(sock, kind, stop), daemon=True,
                                  name=f"service-{kind}-{ip}:{port}")
        self._listeners[(ip, port)] = (sock, stop, thread)
        thread.start()
        self._threads.append(thread)

    def close(self, ip: str, port: int) -> None:
        """Stop listening (new connections are refused); connections already open go on."""
        sock, stop, thread = self._listeners.pop((ip, port))
        stop.set()
        thread.join(timeout=2)  # closed only once no accept() holds it: it must not listen a moment longer
        sock.close()

    def stop(self) -> None:
        for ip, port in list(self._listeners):
            self.close(ip, port)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=3)

    def landed(self, ip: str) -> list[Accepted]:
        with self._lock:
            return [a for a in self.accepted if a.landed_ip == ip]

    def open_count(self, ip: str) -> int:
        with self._lock:
            return self._open[ip]

    def _accept_loop(self, sock: socket.socket, kind: str, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted = Accepted(endpoint(conn.getsockname()), endpoint(peer))
            with self._lock:
                self.accepted.append(accepted)
                self._open[accepted.landed_ip] += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, kind, accepted), daemon=True).start()

    def _serve(self, conn: socket.socket, kind: str, accepted: Accepted) -> None:
        conn.settimeout(20)
        try:
            with contextlib.suppress(OSError):
                getattr(self, f"_{kind}")(conn, accepted)
        finally:
            with self._lock:
                self._open[accepted.landed_ip] -= 1
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _drain(conn: socket.socket) -> bytes:
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
        return bytes(data)

    def _whoami(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(f"{accepted.landed} {accepted.peer}\n".encode())
        conn.shutdown(socket.SHUT_WR)
        self._drain(conn)

    def _echo(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(f"{accepted.landed} {accepted.peer}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.sendall(TAIL)  # only once the client's half-close has reached us
        conn.shutdown(socket.SHUT_WR)

    def _early(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(GREETING)
        conn.shutdown(socket.SHUT_WR)
        data = self._drain(conn)
        with self._lock:
            self.received[accepted.peer] = data

    def _reset(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(f"{accepted.landed} {accepted.peer}\n".encode())
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST

    def _watch(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(f"{accepted.landed} {accepted.peer}\n".encode())
        try:
            self._drain(conn)
            ending = "eof"
        except ConnectionResetError:
            ending = "reset"
        with self._lock:
            self.endings.append(ending)

    def _sink(self, conn: socket.socket, accepted: Accepted) -> None:
        time.sleep(self.sink_delay)
        digest = hashlib.sha256()
        length = 0
        buffer = bytearray(1 << 20)
        while size := conn.recv_into(buffer):
            digest.update(memoryview(buffer)[:size])
            length += size
        conn.sendall(f"{length} {digest.hexdigest()}\n".encode())
        conn.shutdown(socket.SHUT_WR)

    def _source(self, conn: socket.socket, accepted: Accepted) -> None:
        conn.sendall(self.payload)
        conn.shutdown(socket.SHUT_WR)
        self._drain(conn)


# ------------------------------------------------------------------ the proxy process

class Proxy(ProxyProcess):
    """egress-router running the DNS proxy in the router namespace; its stderr collected as it comes."""

    def __init__(self, lab: Lab, process: subprocess.Popen[str], grace: float, ready_port: int, debug: bool):
        super().__init__(lab, process, grace)
        self.ready_port = ready_port
        self.debug = debug  # every connection's end is logged, the readiness probes' too

    def connection_lines(self, port: int | None = None) -> list[re.Match[str]]:
        """The per-connection log lines (the readiness probes aside)."""
        matches = [m for line in self.lines() if (m := CONN_LINE.search(line))]
        return [m for m in matches if int(m["port"]) != self.ready_port and (port is None or int(m["port"]) == port)]

    def probe_ends(self) -> int:
        """How many readiness probes the proxy has logged as ended."""
        return sum(1 for line in self.lines() if (m := CONN_LINE.search(line)) and int(m["port"]) == self.ready_port)

    def wait_probe_ends(self, count: int) -> None:
        if not eventually(lambda: self.probe_ends() >= count, IO_TIMEOUT):
            pytest.fail(f"{count} readiness probe(s), {self.probe_ends()} ended:\n{self.stderr}")

    def wait_connection_lines(self, count: int, port: int | None = None, timeout: float = 3.0) -> list[re.Match[str]]:
        """The per-connection lines once there are at least `count` (a line may come just after the client saw
        its connection end); then a moment more, so that a surplus line would show too."""
        if not eventually(lambda: len(self.connection_lines(port)) >= count, timeout):
            pytest.fail(f"fewer than {count} connection lines (port {port}) within {timeout} s:\n{self.stderr}")
        time.sleep(0.1)
        return self.connection_lines(port)

    def wait_log(self, pattern: str, timeout: float = 8.0) -> str:
        """The first log line matching `pattern` (a regular expression), waiting for it up to `timeout`."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                if compiled.search(line):
                    return line
            if time.monotonic() > deadline:
                pytest.fail(f"no log line matching {pattern!r} within {timeout} s:\n{self.stderr}")
            time.sleep(0.02)

    def wait_resolved(self, port: int, name: str, timeout: float = 8.0) -> str:
        return self.wait_log(rf"Port {port}: {re.escape(name)} is now ", timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Polls a TCP connection through the readiness port until it is relayed (bounded). With the
        per-connection log on, it then waits until the proxy has seen every probe end: a probe the
        client closed still counts as open until then (against EGRESS_DNS_PROXY_MAX_CONNECTIONS too)."""
        deadline = time.monotonic() + timeout
        probes = 0  # probes the proxy accepted
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.1)  # let the readers collect the last words
                pytest.fail(f"the proxy exited with {self.process.returncode}:\n{self.stderr}")
            relayed = False
            try:
                with Conn(self.lab, self.ready_port, timeout=1) as conn:
                    probes += 1
                    relayed = conn.line().startswith(f"{A}:{self.ready_port} ")
            except OSError:
                pass
            if relayed:  # the probe is closed now: wait until the proxy saw it (and every earlier one) end
                self.remember_workers()
                if self.debug:
                    self.wait_probe_ends(probes)
                return
            time.sleep(0.03)
        pytest.fail(f"the proxy did not relay a connection within {timeout} s:\n{self.stderr}")




def configure_network(lab: Lab) -> None:
    """What the init container does for a proxy-only container: macvlan address and default route, no NAT."""
    env = lab.router_env(mode="dns-proxy")
    del env["EGRESS_DESTINATION"]
    result = lab.run_router(env)
    assert result.returncode == 0, result.stderr
    assert "no NAT" in result.stderr, result.stderr


StartProxy = Callable[..., Proxy]


@pytest.fixture
def dns(lab: Lab) -> Iterator[DnsServer]:
    """The test DNS server on the pod network (dnsserver.serving), named in the router's resolv.conf, as a
    cluster DNS Service is."""
    lab.etc_file("router", "resolv.conf", RESOLV)
    with serving(lab) as server:
        yield server


@pytest.fixture
def services(lab: Lab) -> Iterator[Services]:
    running = Services(lab)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def start_proxy(lab: Lab, dns: DnsServer, services: Services) -> Iterator[StartProxy]:
    """Starts proxies; at teardown each must stop with 0, without a traceback, and leave no worker behind."""
    started: list[Proxy] = []

    def start(destination: str, *, network: bool = True, ready_port: int = READY_PORT, prefix: Sequence[str] = (),
              program: Sequence[str] | None = None, wait: bool = True, **variables: str) -> Proxy:
        services.listen("dest", A, ready_port, "whoami")
        env = proxy_env({"EGRESS_DNS_PROXY_DESTINATION": f"{destination}\n{ready_port} {A}",
                         "EGRESS_DNS_PROXY_WORKERS": "1", "EGRESS_DNS_PROXY_DEBUG": "1",
                         "EGRESS_PROXY_GRACE_SECONDS": "3"}, network=network, variables=variables)
        proxy = Proxy(lab, spawn_proxy(lab, env, prefix, program), float(env["EGRESS_PROXY_GRACE_SECONDS"]),
                      ready_port, env["EGRESS_DNS_PROXY_DEBUG"] == "1")
        started.append(proxy)
        if wait:
            proxy.wait_ready()
        return proxy

    yield start
    check_stopped(started)


# ------------------------------------------------------------------ clients (in the client namespace)

class Conn(ClientConnection):
    """One client connection to the proxy."""

    def __init__(self, lab: Lab, port: int, *, host: str = ROUTER_POD_IP, timeout: float = IO_TIMEOUT):
        super().__init__(lab, port, host, timeout)

    def line(self) -> str:
        return self.reader.readline(4096).decode()

    def landed_ip(self) -> str:
        """The first line of a whoami/echo service: where the connection landed."""
        line = self.line()
        assert line, "closed before the backend's first line"
        return host_of(line.split()[0])

    def rest(self) -> bytes:
        """Everything up to EOF."""
        return self.reader.read()

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def finish(self) -> bytes:
        """Half-close, then everything the other side still sends, then EOF."""
        self.half_close()
        return self.rest()


def whoami(lab: Lab, port: int, host: str = ROUTER_POD_IP) -> tuple[str, str]:
    """One short connection to a whoami service through the proxy: (landed ip, peer ip the backend saw)."""
    with Conn(lab, port, host=host) as conn:
        line = conn.line()
        assert line, f"port {port}: the connection closed without an answer"
        assert conn.rest() == b""
    landed, peer = line.split()
    return host_of(landed), host_of(peer)


def refused_at_once(lab: Lab, port: int) -> float:
    """Connect, expect the proxy to close without a byte; how long it took."""
    started = time.monotonic()
    try:
        with Conn(lab, port) as conn:
            data = conn.sock.recv(100)
    except ConnectionResetError:  # a reset may even beat connect() back
        data = b""
    assert data == b"", data
    return time.monotonic() - started


def eventually(check: Callable[[], bool], timeout: float = 3.0, step: float = 0.03) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


# ------------------------------------------------------------------ re-resolution and TTLs

def test_a_changed_address_is_used_within_the_ttl(lab: Lab, dns: DnsServer, services: Services,
                                                   start_proxy: StartProxy) -> None:
    for ip in (A, B):
        services.listen("dest", ip, 7000, "whoami")
        services.listen("dest", ip, 7003, "echo")
    dns.set(NAME, A, ttl=1)  # honoured as it is
    dns.set("long.example.test", A, ttl=3600)  # capped at TTL_MAX
    dns.set("zero.example.test", A, ttl=0)  # raised to TTL_MIN
    proxy = start_proxy(f"7000 {NAME}\n7001 long.example.test 7000\n7002 zero.example.test 7000\n7003 {NAME}",
                        EGRESS_DNS_PROXY_TTL_MIN="1", EGRESS_DNS_PROXY_TTL_MAX="2")
    for port, name in ((7000, NAME), (7001, "long.example.test"), (7002, "zero.example.test")):
        proxy.wait_resolved(port, name)
        assert whoami(lab, port)[0] == A
    assert {q.rdtype for q in dns.asked(NAME)} == {"A", "AAAA"}
    proxy.wait_resolved(7003, NAME)
    old = Conn(lab, 7003)  # open across the change: it stays with the old address
    assert old.landed_ip() == A

    changed = window = time.monotonic()
    dns.set(NAME, B, ttl=1)
    dns.set("long.example.test", B, ttl=3600)
    seen: dict[int, float] = {}
    for _ in range(300):  # at most ~6 s
        for port in (7000, 7001):
            if port not in seen and whoami(lab, port)[0] == B:
                seen[port] = time.monotonic() - changed
        if len(seen) == 2:
            break
        time.sleep(0.02)
    assert 7000 in seen and seen[7000] < 1 + 1.5, (seen, proxy.stderr)  # TTL 1 s, plus a little
    assert 7001 in seen and seen[7001] < 2 + 1.5, (seen, proxy.stderr)  # TTL_MAX 2 s, plus a little
    for _ in range(5):  # and from then on only the new address
        assert whoami(lab, 7000)[0] == B
        assert whoami(lab, 7001)[0] == B
    proxy.wait_log(rf"Port 7000: {re.escape(NAME)} is now {B}:7000$")
    with old:
        old.sock.sendall(b"after the change\n")
        assert old.reader.readline() == b"after the change\n"
        assert old.finish() == TAIL
    with Conn(lab, 7003) as new:
        assert new.landed_ip() == B
        assert new.finish() == TAIL
    # TTL 0 is not a licence to ask in a loop: at most one A+AAAA round per TTL_MIN (1 s)
    time.sleep(max(0.0, window + 3.0 - time.monotonic()))
    asked = dns.asked("zero.example.test", since=window)
    assert 2 <= len(asked) <= 10, [(round(q.at - window, 2), q.rdtype) for q in asked]


# ------------------------------------------------------------------ balancing

def test_every_address_is_a_backend_and_load_is_balanced(lab: Lab, dns: DnsServer, services: Services,
                                                         start_proxy: StartProxy) -> None:
    for ip in DEST_IPS:
        services.listen("dest", ip, 7000, "whoami")
        services.listen("dest", ip, 7001, "echo")
    dns.set(POOL, A, B, C, ttl=300)
    proxy = start_proxy(f"7000 {POOL}\n7001 {POOL}")
    line = proxy.wait_resolved(7000, POOL)
    assert all(f"{ip}:7000" in line for ip in DEST_IPS), line
    proxy.wait_resolved(7001, POOL)

    # short sequential connections: round-robin, a fair share each
    counts = Counter(whoami(lab, 7000)[0] for _ in range(30))
    assert set(counts) == set(DEST_IPS) and all(8 <= n <= 12 for n in counts.values()), counts

    # long concurrent connections: least connections first
    held: dict[str, list[Conn]] = {ip: [] for ip in DEST_IPS}
    try:
        for _ in range(3):
            conn = Conn(lab, 7001)
            held[conn.landed_ip()].append(conn)
        assert [len(v) for v in held.values()] == [1, 1, 1], {k: len(v) for k, v in held.items()}
        for ended, gone in enumerate((B, C, B), 1):
            leaving = held[gone].pop()
            assert leaving.finish() == TAIL
            leaving.close()
            assert eventually(lambda: services.open_count(gone) == len(held[gone]))  # noqa: B023
            proxy.wait_connection_lines(ended, 7001)  # the proxy has seen both ends close too
            conn = Conn(lab, 7001)  # the emptier backend gets the next one
            landed = conn.landed_ip()
            held[landed].append(conn)
            assert landed == gone, {k: len(v) for k, v in held.items()}
            fresh = [Conn(lab, 7001) for _ in range(3)]  # all equal again: one more each
            for conn in fresh:
                held[conn.landed_ip()].append(conn)
            assert len({len(v) for v in held.values()}) == 1, {k: len(v) for k, v in held.items()}
        for conns in held.values():  # every held connection still carries data
            for conn in conns:
                conn.sock.sendall(b"ping\n")
                assert conn.reader.readline() == b"ping\n"
    finally:
        for conns in held.values():
            for conn in conns:
                conn.close()


# ------------------------------------------------------------------ a backend fails and comes back

def test_a_dead_backend_is_skipped_retried_elsewhere_and_restored(lab: Lab, dns: DnsServer, services: Services,
                                                                  start_proxy: StartProxy) -> None:
    for ip in DEST_IPS:
        services.listen("dest", ip, 7000, "whoami")
    services.listen("dest", B, 7001, "echo")
    for ip in (A, C):  # nothing listens on B:7002
        services.listen("dest", ip, 7002, "echo")
    dns.set(POOL, A, B, C, ttl=300)
    proxy = start_proxy(f"7000 {POOL}\n7001 {B}\n7002 {POOL}")
    proxy.wait_resolved(7000, POOL)
    proxy.wait_resolved(7002, POOL)
    # bytes and the half-close sent before any backend took the connection arrive, also after a retry
    for i in range(6):
        with Conn(lab, 7002) as conn:
            early = f"early bytes {i}\n".encode()
            conn.sock.sendall(early)
            conn.half_close()
            greeting, rest = conn.line(), conn.rest()
            assert greeting.split(":")[0] in (A, C) and rest == early + TAIL, (greeting, rest)
    proxy.wait_log(rf"Port 7002: backend {B}:7002 failed \(Connection refused\)")
    assert len(proxy.wait_connection_lines(6, 7002)) == 6, proxy.stderr
    assert set(Counter(whoami(lab, 7000)[0] for _ in range(6))) == set(DEST_IPS)

    in_flight = Conn(lab, 7001)  # open on B while B's other service goes away
    assert in_flight.landed_ip() == B
    services.close(B, 7000)  # B refuses port 7000 from now on
    down = len(services.landed(B))
    landed = [whoami(lab, 7000)[0] for _ in range(20)]  # no client sees a failure
    assert B not in landed and set(landed) == {A, C}, landed
    assert len(services.landed(B)) == down
    proxy.wait_log(rf"\[warning\] Port 7000: backend {B}:7000 failed \(Connection refused\); skipped until a check "
                   "succeeds")
    retried = [m for m in proxy.wait_connection_lines(26, 7000) if m["how"] == "closed by both sides"]
    assert len(retried) == 26 and all(m["backend"] != f"{B}:7000" for m in retried[6:]), retried
    in_flight.sock.sendall(b"still here\n")  # the other port of B is unaffected
    assert in_flight.reader.readline() == b"still here\n"
    assert in_flight.finish() == TAIL
    in_flight.close()

    back = time.monotonic()
    services.listen("dest", B, 7000, "whoami")
    proxy.wait_log(rf"\[info\] Port 7000: backend {B}:7000 is back", timeout=6)
    assert time.monotonic() - back < 2 + 1.5  # the active check runs every 2 s
    landed = [whoami(lab, 7000)[0] for _ in range(9)]
    assert landed.count(B) >= 2, landed


def test_a_backend_whose_connects_time_out_stays_out_until_a_check_succeeds(
        lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    """Regression: it used to return when its back-off (5 s) ran out, and then cost one client in a few
    the whole connect timeout again. Now only a successful check brings it back."""
    for ip in (A, B):
        services.listen("dest", ip, 7000, "whoami")
    lab.exec("dest", ["iptables", "-A", "INPUT", "-p", "tcp", "-d", B, "--dport", "7000", "-j", "DROP"], check=True)
    dns.set(POOL, A, B, ttl=300)
    proxy = start_proxy(f"7001 {POOL} 7000", EGRESS_DNS_PROXY_CONNECT_TIMEOUT="1")
    proxy.wait_resolved(7001, POOL)
    while "failed (connect timed out)" not in proxy.stderr:  # a few connections until one tried B
        assert whoami(lab, 7001)[0] == A
    proxy.wait_log(rf"Port 7001: backend {B}:7000 failed \(connect timed out\); skipped until a check succeeds")
    time.sleep(6.5)  # past the old 5 s back-off, with checks timing out meanwhile
    durations = []
    for _ in range(12):
        started = time.monotonic()
        assert whoami(lab, 7001)[0] == A
        durations.append(time.monotonic() - started)
    assert max(durations) < 0.5, durations
    # and once B answers again, a check brings it back and it gets clients
    lab.exec("dest", ["iptables", "-D", "INPUT", "-p", "tcp", "-d", B, "--dport", "7000", "-j", "DROP"], check=True)
    proxy.wait_log(rf"Port 7001: backend {B}:7000 is back", timeout=5)
    assert B in {whoami(lab, 7001)[0] for _ in range(8)}


def test_records_in_rotating_order_are_not_logged_as_a_change(lab: Lab, dns: DnsServer, services: Services,
                                                              start_proxy: StartProxy) -> None:
    """A server that rotates its answer (CoreDNS loadbalance) must not make a log line per refresh."""
    for ip in DEST_IPS:
        services.listen("dest", ip, 7000, "whoami")
    dns.set(POOL, A, B, C, ttl=1)
    proxy = start_proxy(f"7000 {POOL}", EGRESS_DNS_PROXY_TTL_MIN="0.2", EGRESS_DNS_PROXY_TTL_MAX="0.3")
    proxy.wait_resolved(7000, POOL)
    asked = len(dns.queries)
    for order in ((B, C, A), (C, A, B), (A, B, C), (B, C, A)):
        dns.set(POOL, *order, ttl=1)
        assert eventually(lambda seen=asked: len(dns.queries) >= seen + 2, timeout=3.0)  # a refresh saw it
        asked = len(dns.queries)
    assert sum(f"{POOL} is now" in line for line in proxy.lines()) == 1, proxy.stderr
    dns.set(POOL, A, C, ttl=1)  # a changed set is news
    changes = lambda: [line for line in proxy.lines() if f"{POOL} is now" in line]  # noqa: E731
    assert eventually(lambda: len(changes()) == 2, timeout=5.0), proxy.stderr
    assert sorted(changes()[1].split(" is now ")[1].split(", ")) == [f"{A}:7000", f"{C}:7000"], proxy.stderr


# ------------------------------------------------------------------ DNS failures

def test_stale_answer_is_kept_when_dns_stops(lab: Lab, dns: DnsServer, services: Services,
                                             start_proxy: StartProxy) -> None:
    for ip in (A, C):
        services.listen("dest", ip, 7000, "whoami")
    dns.set(NAME, A, ttl=1)
    proxy = start_proxy(f"7000 {NAME}")
    proxy.wait_resolved(7000, NAME)
    assert whoami(lab, 7000)[0] == A
    dns.stop()
    stopped = time.monotonic()
    proxy.wait_log(rf"\[warning\] Port 7000: cannot resolve {re.escape(NAME)} \(.+\); keeping the last answer "
                   rf"\({A}:7000\)", timeout=16)
    while time.monotonic() - stopped < 3:  # well past the 1 s TTL
        assert whoami(lab, 7000)[0] == A
        time.sleep(0.2)
    assert not [m for m in proxy.connection_lines() if m["how"] != "closed by both sides"]
    # DNS comes back with a new answer: it is used again
    dns.set(NAME, C, ttl=1)
    with lab.entered(DNS_ROLE):
        dns.start(DNS_IP, 53)
    proxy.wait_log(rf"Port 7000: {re.escape(NAME)} resolves again", timeout=25)
    assert eventually(lambda: whoami(lab, 7000)[0] == C, timeout=3)


def test_a_name_that_does_not_resolve_refuses_at_once_until_it_does(lab: Lab, dns: DnsServer, services: Services,
                                                                   start_proxy: StartProxy) -> None:
    services.listen("dest", B, 7000, "whoami")
    name = "later.example.test"  # NXDOMAIN for now
    proxy = start_proxy(f"7000 {name}", EGRESS_DNS_PROXY_DEBUG="0")
    proxy.wait_log(rf"\[warning\] Port 7000: cannot resolve {re.escape(name)} \(.+\); connections are refused "
                   r"until it resolves; retrying in 1 s")
    for _ in range(3):
        assert refused_at_once(lab, 7000) < 2.0  # at once: not after a connect timeout
    refusals = [m for m in proxy.wait_connection_lines(3, 7000) if m["how"] == f"refused: {name} has not resolved yet"]
    assert len(refusals) == 3 and all(m["level"] == "warning" for m in refusals), proxy.stderr
    assert services.landed(B) == []
    dns.set(name, B, ttl=30)
    added = time.monotonic()
    proxy.wait_log(rf"Port 7000: {re.escape(name)} resolves again", timeout=10)
    assert time.monotonic() - added < 8  # retried with a back-off of 1, 2, 4 s ...

    def works() -> bool:
        try:
            return whoami(lab, 7000)[0] == B
        except (OSError, AssertionError):
            return False

    assert eventually(works, timeout=2)
    assert len(dns.asked(name)) >= 4  # A and AAAA, asked again after the failures


# ------------------------------------------------------------------ addresses, ports, IPv6

def test_address_targets_remote_ports_and_ipv6(lab: Lab, dns: DnsServer, services: Services,
                                               start_proxy: StartProxy) -> None:
    """IPv6 backends sit on the pod-side veth (client namespace, 2001:db8:100::2), reached from the router directly."""
    lab.pod_ipv6()
    services.listen("dest", A, 7000, "whoami")
    services.listen("dest", C, 8000, "whoami")
    services.listen("dest", A, 7300, "whoami")
    services.listen("client", CLIENT_IP6, 7300, "whoami")
    dns.set("v6.example.test", CLIENT_IP6, ttl=300)  # AAAA only
    dns.set("dual.example.test", A, CLIENT_IP6, ttl=300)  # A and AAAA: both are backends
    proxy = start_proxy(f"7000 {A}\n7100 {C} 8000\n7200 [{CLIENT_IP6}] 7300\n7201 {CLIENT_IP6} 7300\n"
                        "7202 v6.example.test 7300\n7203 dual.example.test 7300")
    proxy.wait_resolved(7202, "v6.example.test")
    line = proxy.wait_resolved(7203, "dual.example.test")
    assert f"{A}:7300" in line and f"[{CLIENT_IP6}]:7300" in line, line

    assert whoami(lab, 7000) == (A, SOURCE_IP)
    assert whoami(lab, 7100) == (C, SOURCE_IP)
    assert services.landed(C)[-1].landed == f"{C}:8000"
    for port in (7200, 7201, 7202):
        assert whoami(lab, port) == (CLIENT_IP6, ROUTER_POD_IP6), port
    assert services.landed(CLIENT_IP6)[-1].landed == f"[{CLIENT_IP6}]:7300"
    assert {whoami(lab, 7203)[0] for _ in range(4)} == {A, CLIENT_IP6}
    # clients may come over IPv6 too
    assert whoami(lab, 7000, host=ROUTER_POD_IP6) == (A, SOURCE_IP)
    assert whoami(lab, 7200, host=ROUTER_POD_IP6) == (CLIENT_IP6, ROUTER_POD_IP6)
    targets = {int(m["port"]): m["target"] for m in proxy.wait_connection_lines(11)}
    assert targets == {7000: f"{A}:7000", 7100: f"{C}:8000", 7200: f"[{CLIENT_IP6}]:7300",
                       7201: f"[{CLIENT_IP6}]:7300", 7202: "v6.example.test:7300", 7203: "dual.example.test:7300"}
    # nothing listens on a port of the address: the client is closed, not left hanging
    services.close(A, 7000)
    assert refused_at_once(lab, 7000) < 2.0
    assert proxy.wait_connection_lines(3, 7000)[-1]["how"].startswith(f"failed: cannot connect to {A}:7000")


# ------------------------------------------------------------------ the byte stream: half-close, big transfers

def test_half_close_both_directions(lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "echo")
    services.listen("dest", A, 7001, "early")
    dns.set(NAME, A, ttl=300)
    proxy = start_proxy(f"7000 {NAME}\n7001 {NAME}")
    proxy.wait_resolved(7001, NAME)

    # the client stops sending: the backend sees EOF, still sends its tail, then the client sees EOF
    with Conn(lab, 7000) as conn:
        assert conn.landed_ip() == A
        conn.sock.sendall(b"one\n")
        assert conn.reader.readline() == b"one\n"
        conn.half_close()
        assert conn.rest() == TAIL  # read() returns only at EOF
    # the backend stops sending first: the client sees the greeting and EOF, and may still send
    with Conn(lab, 7001) as conn:
        assert conn.rest() == GREETING
        time.sleep(0.2)  # the connection stays up with one direction closed
        payload = os.urandom(300_000)
        conn.sock.sendall(payload)
        conn.half_close()
        with contextlib.suppress(ConnectionResetError):
            assert conn.sock.recv(1) == b""
    assert eventually(lambda: len(services.received) == 1)
    assert list(services.received.values()) == [payload]
    lines = {int(m["port"]): m for m in proxy.wait_connection_lines(2)}
    assert lines[7000]["how"] == lines[7001]["how"] == "closed by both sides"
    assert int(lines[7001]["up"]) == len(payload) and int(lines[7001]["down"]) == len(GREETING)


def test_a_reset_on_one_side_reaches_the_other(lab: Lab, dns: DnsServer, services: Services,
                                               start_proxy: StartProxy) -> None:
    """A connection that breaks must not look like one that ended well: a truncated transfer would pass unnoticed."""
    services.listen("dest", A, 7000, "reset")
    services.listen("dest", A, 7001, "watch")
    proxy = start_proxy(f"7000 {A}\n7001 {A}")
    with Conn(lab, 7000) as conn:  # the backend resets the connection after its first line
        assert conn.landed_ip() == A
        try:
            ending = "eof" if conn.sock.recv(100) == b"" else "data"
        except ConnectionResetError:
            ending = "reset"
    with Conn(lab, 7001) as conn:  # a clean close stays clean
        assert conn.landed_ip() == A
        assert conn.finish() == b""
    with Conn(lab, 7001) as conn:  # the client resets its connection
        assert conn.landed_ip() == A
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
    assert eventually(lambda: len(services.endings) == 2)
    hows = [m["how"] for m in proxy.wait_connection_lines(3)]
    assert hows[0].startswith("backend connection lost") and "reset" in hows[0], hows
    assert hows[2].startswith("client connection lost"), hows
    assert (ending, services.endings) == ("reset", ["eof", "reset"]), \
        f"a reset reached the other side as a clean end (client saw {ending!r}, backend saw {services.endings})"


def test_100_mb_each_way_byte_exact(lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "sink")
    services.listen("dest", A, 7001, "source")
    services.payload = down = random.Random(1).randbytes(BIG)
    up = random.Random(2).randbytes(BIG)
    dns.set(NAME, A, ttl=300)
    proxy = start_proxy(f"7000 {NAME}\n7001 {NAME}")
    proxy.wait_resolved(7001, NAME)
    [worker] = proxy.serving_pids()
    with Conn(lab, 7000, timeout=30) as conn:
        conn.sock.sendall(up)
        assert conn.finish().decode() == f"{BIG} {hashlib.sha256(up).hexdigest()}\n"
    before = rss_kib(worker)
    with Conn(lab, 7001, timeout=30) as conn:
        time.sleep(0.7)  # the client reads nothing for a while: the proxy must stop reading from the backend
        stalled = rss_kib(worker) - before
        digest = hashlib.sha256()
        length = 0
        buffer = bytearray(1 << 20)
        while size := conn.sock.recv_into(buffer):
            digest.update(memoryview(buffer)[:size])
            length += size
        assert (length, digest.hexdigest()) == (BIG, hashlib.sha256(down).hexdigest())
    lines = {int(m["port"]): m for m in proxy.wait_connection_lines(2)}
    assert (int(lines[7000]["up"]), int(lines[7001]["down"])) == (BIG, BIG)
    assert stalled < 32 * 1024, f"the worker grew by {stalled} KiB while the client read nothing"


def rss_kib(pid: int) -> int:
    return int(status_fields(pid)["VmRSS"].split()[0])


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """sendall in a thread whose socket the test closes under it."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def drop_syns(lab: Lab, ip: str, port: int, action: str = "-A") -> None:
    """SYNs to ip:port vanish in the destination namespace (action -A) or get through again (-D)."""
    lab.exec("dest", ["iptables", action, "INPUT", "-p", "tcp", "-d", ip, "--dport", str(port), "--syn", "-j", "DROP"],
             check=True)


def test_client_bytes_are_not_buffered_without_bound_while_connecting(lab: Lab, dns: DnsServer, services: Services,
                                                                      start_proxy: StartProxy) -> None:
    """While the backend connection is being made, the proxy must not read what the client sends into memory
    without limit (a client could fill the worker's memory while its backend does not answer)."""
    drop_syns(lab, B, 7000)
    proxy = start_proxy(f"7000 {B}", EGRESS_DNS_PROXY_CONNECT_TIMEOUT="2")
    [worker] = proxy.serving_pids()
    before = rss_kib(worker)
    conn = Conn(lab, 7000, timeout=5)
    sender = threading.Thread(target=send_quietly, args=(conn.sock, bytes(64 << 20)), daemon=True)
    sender.start()
    time.sleep(1.2)  # the proxy is still waiting for B's SYN-ACK (2 s connect timeout)
    grown = rss_kib(worker) - before
    conn.close()
    sender.join(timeout=10)
    assert grown < 16 * 1024, f"the worker grew by {grown} KiB while its backend connection was pending"


def test_flow_control_holds_after_a_slow_connect(lab: Lab, dns: DnsServer, services: Services,
                                                 start_proxy: StartProxy) -> None:
    """Bytes that arrived during the connect are flushed to the backend; from then on a backend that does not read
    must stop the proxy from reading the client (the flush must not switch flow control off)."""
    services.listen("dest", B, 7000, "sink")
    services.sink_delay = 2.0  # seconds from its accept before the backend reads anything
    drop_syns(lab, B, 7000)
    proxy = start_proxy(f"7000 {B}", EGRESS_DNS_PROXY_CONNECT_TIMEOUT="5")
    [worker] = proxy.serving_pids()
    first, rest = os.urandom(1 << 20), os.urandom(99 << 20)
    before = rss_kib(worker)
    with Conn(lab, 7000, timeout=30) as conn:
        conn.sock.sendall(first)  # while the SYN is being dropped
        time.sleep(0.5)
        drop_syns(lab, B, 7000, "-D")  # the kernel's SYN retry (after ~1 s) gets through
        assert eventually(lambda: bool(services.landed(B)), timeout=4)
        sender = threading.Thread(target=conn.sock.sendall, args=(rest,), daemon=True)
        sender.start()
        time.sleep(1.0)  # the backend reads nothing yet
        grown = rss_kib(worker) - before
        sender.join(timeout=30)
        assert not sender.is_alive()
        digest = hashlib.sha256(first + rest).hexdigest()
        assert conn.finish().decode() == f"{len(first) + len(rest)} {digest}\n"
    assert grown < 32 * 1024, f"the worker grew by {grown} KiB while the backend read nothing"


# ------------------------------------------------------------------ the reserved source address

def test_network_first_then_the_backend_sees_the_reserved_source(lab: Lab, dns: DnsServer, services: Services,
                                                                 start_proxy: StartProxy) -> None:
    services.listen("dest", B, 7000, "whoami")
    dns.set(NAME, B, ttl=300)
    proxy = start_proxy(f"7000 {NAME}")
    proxy.wait_resolved(7000, NAME)
    assert whoami(lab, 7000) == (B, SOURCE_IP)
    assert all(a.peer_ip == SOURCE_IP for a in services.accepted)
    # the lookups go to the cluster DNS through the pod interface, from the pod's own address
    assert {q.peer for q in dns.asked(NAME)} == {ROUTER_POD_IP}
    log = proxy.stderr
    assert log.index("Ready:") < log.index("Starting DNS proxy"), log
    assert f"default via {GATEWAY_LAN_IP} dev macvlan0" in lab.exec("router", ["ip", "route"], check=True).stdout
    nat = lab.exec("router", ["iptables-save", "-t", "nat"], check=True).stdout
    assert "EGRESS-ROUTER" not in nat, nat  # proxy mode: no NAT


# ------------------------------------------------------------------ timeouts and limits

def test_connect_timeout_closes_the_client_or_retries_elsewhere(lab: Lab, dns: DnsServer, services: Services,
                                                                start_proxy: StartProxy) -> None:
    for ip in (A, B):
        services.listen("dest", ip, 7000, "whoami")
    # SYNs to B:7000 vanish in the destination namespace
    lab.exec("dest", ["iptables", "-A", "INPUT", "-p", "tcp", "-d", B, "--dport", "7000", "-j", "DROP"], check=True)
    dns.set(POOL, A, B, ttl=300)
    proxy = start_proxy(f"7000 {B}\n7001 {POOL} 7000", EGRESS_DNS_PROXY_CONNECT_TIMEOUT="1")
    proxy.wait_resolved(7001, POOL)
    elapsed = refused_at_once(lab, 7000)
    assert 0.8 < elapsed < 2.5, elapsed
    failed = [m for m in proxy.wait_connection_lines(1, 7000) if m["how"].startswith("failed:")]
    assert [m["how"] for m in failed] == [f"failed: timed out connecting to {B}:7000"], proxy.stderr
    proxy.wait_log(rf"\[warning\] Port 7000: backend {B}:7000 failed \(connect timed out\)")
    # with another address to go to, the client only notices the wait
    durations = []
    for _ in range(4):
        started = time.monotonic()
        assert whoami(lab, 7001)[0] == A
        durations.append(time.monotonic() - started)
    assert max(durations) < 2.5, durations
    assert services.landed(B) == []
    proxy.wait_log(rf"Port 7001: backend {B}:7000 failed \(connect timed out\)")


def test_idle_connections_are_closed(lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "echo")
    proxy = start_proxy(f"7000 {A}", EGRESS_DNS_PROXY_IDLE_TIMEOUT="1")
    with Conn(lab, 7000) as idle, Conn(lab, 7000) as busy:
        assert idle.landed_ip() == busy.landed_ip() == A
        started = time.monotonic()
        for _ in range(8):  # 2.4 s of traffic on one, silence on the other
            busy.sock.sendall(b"tick\n")
            assert busy.reader.readline() == b"tick\n"
            time.sleep(0.3)
        with contextlib.suppress(ConnectionResetError):
            assert idle.sock.recv(10) == b""
        closed = time.monotonic() - started
        busy.sock.sendall(b"still\n")
        assert busy.reader.readline() == b"still\n"
        assert busy.finish() == TAIL
    assert closed > 1.0
    ends = [m for m in proxy.wait_connection_lines(2, 7000) if m["how"] == "idle for 1 s"]
    assert len(ends) == 1, proxy.stderr
    assert eventually(lambda: services.open_count(A) == 0)  # the backend side was closed too


def test_connection_limit_refuses_the_extra_one(lab: Lab, dns: DnsServer, services: Services,
                                                start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "echo")
    # two workers: the limit is over both of them
    proxy = start_proxy(f"7000 {A}", EGRESS_DNS_PROXY_MAX_CONNECTIONS="3", EGRESS_DNS_PROXY_WORKERS="2")
    held = [Conn(lab, 7000) for _ in range(3)]
    try:
        for conn in held:
            assert conn.landed_ip() == A
        assert refused_at_once(lab, 7000) < 2.0
        assert services.open_count(A) == 3  # the refused one never reached the backend
        assert [m["how"] for m in proxy.wait_connection_lines(1, 7000) if m["how"].startswith("refused")] == \
            ["refused: connection limit reached"]
        leaving = held.pop()
        assert leaving.finish() == TAIL
        leaving.close()

        def fourth_served() -> bool:
            try:
                with Conn(lab, 7000) as conn:
                    return conn.line().startswith(A)
            except OSError:
                return False

        assert eventually(fourth_served)
        for conn in held:  # the held ones were never disturbed
            conn.sock.sendall(b"ok\n")
            assert conn.reader.readline() == b"ok\n"
    finally:
        for conn in held:
            conn.close()


# ------------------------------------------------------------------ SIGTERM

def test_sigterm_drains_open_connections(lab: Lab, dns: DnsServer, services: Services,
                                         start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "echo")
    proxy = start_proxy(f"7000 {A}", EGRESS_PROXY_GRACE_SECONDS="5")
    with Conn(lab, 7000) as conn:
        assert conn.landed_ip() == A
        sent = time.monotonic()
        proxy.terminate()

        assert eventually(lambda: connection_refused(lambda: Conn(lab, 7000, timeout=0.5)), timeout=1.0)
        assert proxy.process.poll() is None  # still serving the open connection
        for _ in range(5):
            conn.sock.sendall(b"during the drain\n")
            assert conn.reader.readline() == b"during the drain\n"
            time.sleep(0.2)
        assert conn.finish() == TAIL
        ended = time.monotonic()
    assert proxy.process.wait(timeout=5) == 0
    assert time.monotonic() - ended < 1.5  # it left once the last connection had ended, not at the grace's end
    assert time.monotonic() - sent < 5
    assert "Received SIGTERM" in proxy.stderr


def test_sigterm_cuts_what_outlasts_the_grace_period(lab: Lab, dns: DnsServer, services: Services,
                                                     start_proxy: StartProxy) -> None:
    services.listen("dest", A, 7000, "echo")
    proxy = start_proxy(f"7000 {A}", EGRESS_PROXY_GRACE_SECONDS="1")
    with Conn(lab, 7000) as conn:
        assert conn.landed_ip() == A
        sent = time.monotonic()
        proxy.terminate()
        assert proxy.process.wait(timeout=5) == 0
        elapsed = time.monotonic() - sent
        assert 0.9 < elapsed < 2.5, elapsed
        with contextlib.suppress(ConnectionResetError):
            assert conn.rest() == b""
    assert [m["how"] for m in proxy.wait_connection_lines(1, 7000)] == ["the grace period ended"]


# ------------------------------------------------------------------ privileges

def test_runs_unprivileged(lab: Lab, dns: DnsServer, services: Services, start_proxy: StartProxy) -> None:
    configure_network(lab)  # the init container's part; the proxy container has no privileges at all
    services.listen("dest", C, 7000, "whoami")
    dns.set(NAME, C, ttl=300)
    program, env = unprivileged_program(lab, "egress_router.proxy.dns, dns.asyncresolver, uvloop")
    proxy = start_proxy(f"7000 {NAME}\n7001 {A} 7999", network=False, prefix=UNPRIVILEGED, program=program,
                        EGRESS_DNS_PROXY_WORKERS="2", **env)
    pids = [proxy.process.pid, *proxy.children()]
    assert len(pids) == 3
    for pid in pids:
        fields = status_fields(pid)
        assert fields["Uid"].split() == ["65534"] * 4, fields["Uid"]
        assert fields["Gid"].split() == ["65534"] * 4, fields["Gid"]
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[caps], 16) == 0, (caps, fields[caps])
    proxy.wait_resolved(7000, NAME)
    for _ in range(4):  # both workers (the kernel spreads connections over them)
        assert whoami(lab, 7000) == (C, SOURCE_IP)
        assert whoami(lab, 7001) == (A, SOURCE_IP)
    assert proxy.stop() == 0


# ------------------------------------------------------------------ the debug log

def test_debug_log_one_line_per_connection_and_none_without_it(lab: Lab, dns: DnsServer, services: Services,
                                                                start_proxy: StartProxy) -> None:
    configure_network(lab)
    services.listen("dest", A, 7000, "echo")
    dns.set(NAME, A, ttl=300)
    logged = start_proxy(f"7000 {NAME}", network=False)
    quiet = start_proxy(f"7100 {NAME} 7000", network=False, ready_port=7998, EGRESS_DNS_PROXY_DEBUG="0")
    logged.wait_resolved(7000, NAME)
    quiet.wait_resolved(7100, NAME)
    clients = []
    for port in (7000, 7100):
        for i in range(3):
            with Conn(lab, port) as conn:
                greeting = conn.line()
                assert greeting.startswith(f"{A}:7000 {SOURCE_IP}:")
                clients.append((f"{CLIENT_IP}:{conn.sock.getsockname()[1]}", len(greeting)))
                conn.sock.sendall(b"x" * (i + 1))
                assert conn.finish() == b"x" * (i + 1) + TAIL
    lines = logged.wait_connection_lines(3)
    assert len(lines) == 3, logged.stderr
    for i, match in enumerate(lines):
        assert match["level"] == "info"
        client, first_line = clients[i]
        assert match["client"] == client
        assert (match["port"], match["target"], match["backend"]) == ("7000", f"{NAME}:7000", f"{A}:7000")
        assert (int(match["up"]), int(match["down"])) == (i + 1, first_line + i + 1 + len(TAIL))
        assert 0 <= float(match["ms"]) < 5000
        assert match["how"] == "closed by both sides"
    assert not quiet.connection_lines(), quiet.stderr
    assert not [line for line in quiet.lines() if CLIENT_IP in line], quiet.stderr
    # failures are worth a line even without debug
    services.close(A, 7000)
    assert refused_at_once(lab, 7100) < 2.0
    failed = quiet.wait_connection_lines(1, 7100)
    assert len(failed) == 1 and failed[0]["level"] == "warning", quiet.stderr
    assert failed[0]["how"].startswith(f"failed: cannot connect to {A}:7000"), failed[0]["how"]
