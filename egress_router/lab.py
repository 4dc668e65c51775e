"""The namespace lab: a small pod network built from network namespaces, for the demo and the tests.

    client ──veth── router (pod) ──macvlan0 on the "node NIC"── gateway ──veth── destination
    198.51.100.2    198.51.100.1     (EGRESS_SOURCE, 192.0.2.0/24)  192.0.2.1   203.0.113.1  203.0.113.10-12

Only documentation addresses, only namespaces this module creates (named with a per-run suffix),
nothing attached to the machine's own interfaces. `Lab` is a context manager that always tears
everything down, and ends the processes it started (by pid).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .net.pyroute import iproute_class

log = logging.getLogger(__name__)

CLIENT_IP = "198.51.100.2"
ROUTER_POD_IP = "198.51.100.1"
POD_PREFIX = 24
GATEWAY_LAN_IP = "192.0.2.1"
LAN_PREFIX = 24
SOURCE_IP = "192.0.2.99"
GATEWAY_WAN_IP = "203.0.113.1"
# optional (Lab.pod_ipv6): an IPv6 pair on the client<->router veth
CLIENT_IP6 = "2001:db8:100::2"
ROUTER_POD_IP6 = "2001:db8:100::1"
POD_PREFIX6 = 64
ETC_NETNS = "/etc/netns"
# what the kernel adds by itself as a link comes up (carrier, IPv6 link-local addresses and routes), on
# its own schedule: a snapshot leaves it out, so it compares what the router did
KERNEL_LINK_LOCAL = re.compile(r"\bfe80::|\bff00::/8\b")
DEST_IPS = ("203.0.113.10", "203.0.113.11", "203.0.113.12")
WAN_PREFIX = 24
ROLES = ("client", "router", "node", "gateway", "dest")
IFF_UP = 0x1
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40

DEMO_DESTINATION = """\
# port proto destination [remote port]
80   tcp 203.0.113.10
8080 tcp 203.0.113.11 80
53   udp 203.0.113.10 5353
203.0.113.12            # fallback: every other port
"""
# (proto, router port, what it should reach)
DEMO_TRAFFIC = (("tcp", 80), ("tcp", 8080), ("udp", 53), ("tcp", 7000), ("udp", 7001))
DEMO_SERVERS = (("tcp", "203.0.113.10", 80), ("tcp", "203.0.113.11", 80), ("udp", "203.0.113.10", 5353),
                ("tcp", "203.0.113.12", 7000), ("udp", "203.0.113.12", 7001))


def router_command() -> list[str]:
    """How to start egress-router: the console script beside this interpreter, else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "egress-router")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "egress_router"]


@dataclass(frozen=True, slots=True)
class Reply:
    """What a lab server reported: where the connection landed and the peer it saw."""

    landed: str  # ip:port the server was reached on
    peer: str  # ip:port of the client as the server saw it

    @property
    def peer_ip(self) -> str:
        return self.peer.rsplit(":", 1)[0]


def unsettled(ipr: Any) -> str | None:
    """What the kernel is still doing by itself in a namespace (None: nothing)."""
    for link in ipr.get_links():
        if link["flags"] & IFF_UP and link.get("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            return f"{link.get('IFLA_IFNAME')} is {link.get('IFLA_OPERSTATE')}"
    for addr in ipr.get_addr(family=socket.AF_INET6):
        flags = addr.get("IFA_FLAGS") or addr["flags"]
        if flags & IFA_F_TENTATIVE and not flags & IFA_F_DADFAILED:
            return f"{addr.get('IFA_ADDRESS')} is tentative"
    return None


class Lab:
    """Builds the topology on enter, tears it down on exit (also when the body raises)."""

    roles: tuple[str, ...] = ROLES  # one namespace each; a subclass with another topology names its own

    def __init__(self, *, ip_forward: bool = False, tag: str | None = None):
        self.suffix = tag or f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.ns = {role: f"egr-{self.suffix}-{role}" for role in self.roles}
        self.ip_forward = ip_forward
        self._processes: list[subprocess.Popen[Any]] = []
        self._servers: list[Servers] = []
        self._created: list[str] = []
        self._etc_files: list[str] = []  # files written under /etc/netns (see etc_file)
        self._etc_root_created = False  # whether this lab made /etc/netns itself

    # ------------------------------------------------------------ life cycle
    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def build(self) -> None:
        self.create_namespaces()
        IPRoute = iproute_class()
        path = self.path
        with IPRoute(netns=self.ns["client"]) as ipr:
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": path("router")})
            self._up(ipr, "lo")
            self._address(ipr, "eth0", CLIENT_IP, POD_PREFIX)
            ipr.route("add", dst="0.0.0.0/0", gateway=ROUTER_POD_IP)
        with IPRoute(netns=self.ns["node"]) as ipr:
            ipr.link("add", ifname="lan0", kind="veth", peer={"ifname": "lan0", "net_ns_fd": path("gateway")})
            parent = self._up(ipr, "lan0")
            ipr.link("add", ifname="mvtmp", kind="macvlan", link=parent, macvlan_mode="bridge")
            mv = ipr.link_lookup(ifname="mvtmp")[0]
            ipr.link("set", index=mv, net_ns_fd=path("router"), ifname="macvlan0")
        with IPRoute(netns=self.ns["router"]) as ipr:
            self._up(ipr, "lo")
            self._address(ipr, "eth0", ROUTER_POD_IP, POD_PREFIX)
            # the pod's own default route, through the cluster network: egress-router replaces it
            ipr.route("add", dst="0.0.0.0/0", gateway=CLIENT_IP)
        with IPRoute(netns=self.ns["gateway"]) as ipr:
            ipr.link("add", ifname="wan0", kind="veth", peer={"ifname": "wan0", "net_ns_fd": path("dest")})
            self._up(ipr, "lo")
            self._address(ipr, "lan0", GATEWAY_LAN_IP, LAN_PREFIX)
            self._address(ipr, "wan0", GATEWAY_WAN_IP, WAN_PREFIX)
        with IPRoute(netns=self.ns["dest"]) as ipr:
            self._up(ipr, "lo")
            for ip in DEST_IPS:
                self._address(ipr, "wan0", ip, WAN_PREFIX)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_WAN_IP)
        self.sysctl("gateway", "net.ipv4.ip_forward", "1")
        self.sysctl("router", "net.ipv4.ip_forward", "1" if self.ip_forward else "0")
        self.settle()

    def create_namespaces(self) -> None:
        """One namespace per role, each remembered at once (so that a failure half-way still tears down)."""
        from pyroute2 import netns

        for role in self.roles:
            netns.create(self.ns[role])
            self._created.append(self.ns[role])
            # No IPv6 duplicate address detection in the lab: the kernel's link-local addresses (and
            # their local routes) then exist as soon as a link is up, instead of about a second later,
            # so a snapshot taken after settle() cannot change by itself. Nothing here uses IPv6 DAD.
            for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
                with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
                    self.sysctl(role, key, "0")

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the kernel has finished what it does by itself after a change: every link that is
        up is operational (linkwatch runs asynchronously) and no IPv6 address is still tentative."""
        deadline = time.monotonic() + timeout
        for role in self.roles:
            with self.iproute(role) as ipr:
                while (why := unsettled(ipr)) is not None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.ns[role]} did not settle within {timeout} s: {why}")
                    time.sleep(0.01)

    def destroy(self) -> None:
        from pyroute2 import netns

        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()
        for servers in self._servers:
            servers.stop()
        self._servers.clear()
        for name in reversed(self._created):
            with contextlib.suppress(OSError):
                netns.remove(name)
        self._created.clear()
        self._remove_etc_files()

    # ------------------------------------------------------------ helpers
    def path(self, role: str) -> str:
        return f"/run/netns/{self.ns[role]}"

    @staticmethod
    def _up(ipr: Any, name: str) -> int:
        index: int = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, state="up")
        return index

    def _address(self, ipr: Any, name: str, ip: str, prefix: int) -> None:
        index = self._up(ipr, name)
        ipr.addr("add", index=index, address=ip, prefixlen=prefix)

    def iproute(self, role: str) -> Any:
        return iproute_class()(netns=self.ns[role])

    def enter_argv(self, role: str, *, etc: bool = False) -> list[str]:
        """The command prefix that runs a program in a lab namespace.

        `etc=True` goes through `ip netns exec`, which also bind-mounts the files written with
        etc_file (e.g. a hosts file) over their /etc counterparts; plain nsenter does not.
        """
        if etc:
            return ["ip", "netns", "exec", self.ns[role]]
        return ["nsenter", f"--net={self.path(role)}", "--"]

    def exec(self, role: str, argv: list[str], *, env: Mapping[str, str] | None = None, check: bool = False,
             timeout: float = 30, stdin: str | None = None, etc: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside a lab namespace (nsenter; `etc=True`: ip netns exec), wait for it, return its output."""
        return subprocess.run([*self.enter_argv(role, etc=etc), *argv], env=env, input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def spawn(self, role: str, argv: list[str], *, env: Mapping[str, str] | None = None,
              etc: bool = False) -> subprocess.Popen[str]:
        """Start a long-running command in a lab namespace; it is killed on teardown if still alive."""
        process = subprocess.Popen([*self.enter_argv(role, etc=etc), *argv], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._processes.append(process)
        return process

    def etc_file(self, role: str, name: str, text: str) -> str:
        """Write /etc/netns/<namespace>/<name>, which commands run with etc=True see as /etc/<name>.

        Removed again on teardown (with the directories, when empty).
        """
        directory = os.path.join(ETC_NETNS, self.ns[role])
        if not os.path.isdir(ETC_NETNS):
            os.mkdir(ETC_NETNS, 0o755)
            self._etc_root_created = True
        os.makedirs(directory, mode=0o755, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(path, 0o644)
        if path not in self._etc_files:
            self._etc_files.append(path)
        return path

    def _remove_etc_files(self) -> None:
        directories = {os.path.dirname(path) for path in self._etc_files}
        for path in self._etc_files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self._etc_files.clear()
        for directory in sorted(directories):
            with contextlib.suppress(OSError):  # not empty: someone else's files are there too
                os.rmdir(directory)
        if self._etc_root_created:
            self._etc_root_created = False
            with contextlib.suppress(OSError):  # not empty: another lab or tool uses it now
                os.rmdir(ETC_NETNS)

    def pod_ipv6(self) -> None:
        """Add an IPv6 pair on the client<->router veth (no duplicate address detection: usable at once)."""
        for role, ip in (("client", CLIENT_IP6), ("router", ROUTER_POD_IP6)):
            self.exec(role, ["ip", "-6", "addr", "add", f"{ip}/{POD_PREFIX6}", "dev", "eth0", "nodad"], check=True)

    def sysctl(self, role: str, key: str, value: str) -> None:
        with self.entered(role), open("/proc/sys/" + key.replace(".", "/"), "w", encoding="ascii") as handle:
            handle.write(value)

    def read_sysctl(self, role: str, key: str) -> str:
        with self.entered(role), open("/proc/sys/" + key.replace(".", "/"), encoding="ascii") as handle:
            return handle.read().strip()

    @contextlib.contextmanager
    def entered(self, role: str) -> Iterator[None]:
        """Switch this thread into a lab namespace (sockets made here stay in it)."""
        from pyroute2 import netns

        netns.pushns(self.ns[role])
        try:
            yield
        finally:
            netns.popns()

    def router_env(self, destination: str = DEMO_DESTINATION, *, mode: str = "init", source: str = f"{SOURCE_IP}/24",
                   **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
        env.update(EGRESS_SOURCE=source, EGRESS_GATEWAY=GATEWAY_LAN_IP, EGRESS_DESTINATION=destination,
                   EGRESS_ROUTER_MODE=mode)
        env.update(extra)
        return env

    def run_router(self, env: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.exec("router", router_command(), env=env, timeout=timeout)

    def snapshot(self, role: str) -> str:
        """The namespace's network state as text: rules, links, addresses, routes, forwarding."""
        parts = []
        for argv in (["iptables-save"], ["ip", "-d", "link", "show"], ["ip", "-4", "addr", "show"],
                     ["ip", "route", "show", "table", "all"], ["ip", "rule", "show"]):
            result = self.exec(role, argv, check=True)
            lines = [strip_counters(line) for line in result.stdout.splitlines() if not line.startswith("#")]
            if argv == ["iptables-save"]:
                lines = without_unused_tables(lines)
            elif argv[0] == "ip":  # a link's operational state follows the kernel's linkwatch, not our steps
                lines = [re.sub(r" state \S+ ", " ", line).replace("NO-CARRIER,", "") for line in lines
                         if not KERNEL_LINK_LOCAL.search(line)]
            parts.append(f"$ {' '.join(argv)}\n" + "\n".join(lines))
        parts.append(f"ip_forward={self.read_sysctl(role, 'net.ipv4.ip_forward')}")
        for scope in ("all", "eth0"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"{scope}.rp_filter={self.read_sysctl(role, f'net.ipv4.conf.{scope}.rp_filter')}")
        return "\n".join(parts)

    # ------------------------------------------------------------ traffic
    def serve(self, specs: Iterable[tuple[str, str, int]], role: str = "dest") -> Servers:
        servers = Servers()
        self._servers.append(servers)
        with self.entered(role):
            for proto, ip, port in specs:
                servers.listen(proto, ip, port)
        servers.start()
        return servers

    def request(self, proto: str, ip: str, port: int, *, role: str = "client", timeout: float = 3.0) -> Reply:
        """Send one TCP or UDP request from `role` and return what the server reported."""
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with self.entered(role):
            sock = socket.socket(socket.AF_INET, kind)
        with sock:
            sock.settimeout(timeout)
            sock.connect((ip, port))
            if proto == "tcp":
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            else:
                sock.send(b"hello\n")
                data = sock.recv(4096)
        landed, peer = data.decode().split()
        return Reply(landed, peer)


def without_unused_tables(lines: list[str]) -> list[str]:
    """iptables-save output without tables that hold nothing: only built-in chains, policy ACCEPT, no
    rules. Such a table is what any program that merely read it leaves behind with the nft backend
    (iptables-nft-save -t TABLE creates it); it filters and changes nothing."""
    kept: list[str] = []
    table: list[str] = []
    for line in lines:
        if line.startswith("*"):
            table = [line]
        elif table:
            table.append(line)
            if line == "COMMIT":
                body = table[1:-1]
                if not all(entry.startswith(":") and entry.split()[1] == "ACCEPT" for entry in body):
                    kept += table
                table = []
        else:
            kept.append(line)
    return kept


def strip_counters(line: str) -> str:
    """iptables-save chain lines carry packet counters, which change with any traffic."""
    if line.startswith(":") and line.endswith("]"):
        return line.rsplit(" ", 1)[0]
    return line


class Servers:
    """TCP/UDP servers (one thread, bounded) that answer '<landed ip:port> <peer ip:port>'."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="lab-servers", daemon=True)
        self._sockets: list[socket.socket] = [self._wake_r, self._wake_w]
        self.seen: list[Reply] = []

    def listen(self, proto: str, ip: str, port: int) -> None:
        if proto == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(64)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ip, port))
        sock.setblocking(False)
        self._sockets.append(sock)
        self.selector.register(sock, selectors.EVENT_READ, proto)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()
        self.selector.close()

    def _loop(self) -> None:
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    return
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    self._answer(sock, key.data)

    def _answer(self, sock: socket.socket, proto: str) -> None:
        here = "{}:{}".format(*sock.getsockname())
        if proto == "tcp":
            conn, peer = sock.accept()
            with conn:
                reply = Reply(here, "{}:{}".format(*peer))
                conn.settimeout(2)
                conn.sendall(f"{reply.landed} {reply.peer}\n".encode())
        else:
            _, peer = sock.recvfrom(2048)
            reply = Reply(here, "{}:{}".format(*peer))
            sock.sendto(f"{reply.landed} {reply.peer}\n".encode(), peer)
        self.seen.append(reply)


def check_tools() -> None:
    from .core.errors import SetupError

    missing = [tool for tool in ("nsenter", "iptables-save", "iptables-restore", "ip") if not shutil.which(tool)]
    if missing:
        raise SetupError(f"the lab needs {', '.join(missing)}: apt-get install iptables iproute2 util-linux")


def run_demo(*, keep: bool = False) -> None:
    """Build the lab, run init mode in it, send traffic from the client, print where it landed."""
    check_tools()
    lab = Lab()
    print(f"Building the lab: namespaces {', '.join(lab.ns.values())}")
    with contextlib.ExitStack() as stack:
        if keep:
            lab.build()
        else:
            stack.enter_context(lab)
        lab.serve(DEMO_SERVERS)
        env = lab.router_env()
        print(f"\nRunning egress-router (EGRESS_ROUTER_MODE=init) in {lab.ns['router']} with")
        print(f"  EGRESS_SOURCE={env['EGRESS_SOURCE']}  EGRESS_GATEWAY={env['EGRESS_GATEWAY']}")
        print("  EGRESS_DESTINATION=\n" + "".join(f"    {line}\n" for line in DEMO_DESTINATION.splitlines()))
        result = lab.run_router(env)
        sys.stdout.write("".join(f"  | {line}\n" for line in result.stderr.splitlines()))
        if result.returncode != 0:
            print(f"egress-router exited with {result.returncode}")
            raise SystemExit(1)
        print(f"\n  {'client -> router':<28} {'landed on (server)':<22} {'source seen by server':<22}")
        failures = 0
        for proto, port in DEMO_TRAFFIC:
            sent = f"{proto} {CLIENT_IP} -> :{port}"
            try:
                reply = lab.request(proto, ROUTER_POD_IP, port)
                landed, source = reply.landed, reply.peer_ip
                mark = "" if source == SOURCE_IP else "   <- not the reserved IP!"
            except OSError as exc:
                landed, source, mark = "-", "-", f"   <- failed: {exc.strerror or exc}"
            failures += bool(mark)
            print(f"  {sent:<28} {landed:<22} {source:<22}{mark}")
        print(f"\nEvery server saw the reserved source IP {SOURCE_IP}." if not failures
              else f"\n{failures} request(s) did not arrive from {SOURCE_IP}.")
        if keep:
            print(f"Lab left up; remove it with: for n in {' '.join(lab.ns.values())}; do ip netns del $n; done")
        else:
            print("Lab torn down.")
        if failures:
            raise SystemExit(1)
