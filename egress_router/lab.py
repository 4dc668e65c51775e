"""The namespace lab: a small pod network built from network namespaces, for the demo and the tests.

    client ──veth── router (pod) ──macvlan0 on the "node NIC"── gateway ──veth── destination
    198.51.100.2    198.51.100.1     (EGRESS_SOURCE, 192.0.2.0/24)  192.0.2.1   203.0.113.1  203.0.113.10-12
    dual_stack=True adds IPv6 (all without duplicate address detection):
    2001:db8:100::2 2001:db8:100::1  (2001:db8:2::99, 2001:db8:2::/64) 2001:db8:2::1, fe80::1
                                                                     2001:db8:203::1  2001:db8:203::10-12

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
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import labtraffic
from .labtraffic import Reply as Reply  # the traffic helpers, still importable from here
from .labtraffic import Servers as Servers
from .labtraffic import endpoint as endpoint
from .net.pyroute import iproute_class

log = logging.getLogger(__name__)

CLIENT_IP = "198.51.100.2"
ROUTER_POD_IP = "198.51.100.1"
POD_PREFIX = 24
GATEWAY_LAN_IP = "192.0.2.1"
LAN_PREFIX = 24
SOURCE_IP = "192.0.2.99"
GATEWAY_WAN_IP = "203.0.113.1"
# IPv6 (Lab(dual_stack=True); the pod pair alone: Lab.pod_ipv6)
CLIENT_IP6 = "2001:db8:100::2"
ROUTER_POD_IP6 = "2001:db8:100::1"
POD_PREFIX6 = 64
SOURCE_IP6 = "2001:db8:2::99"
LAN_PREFIX6 = 64
GATEWAY_LAN_IP6 = "2001:db8:2::1"
GATEWAY_LINK_LOCAL = "fe80::1"  # also on the gateway's lan0: an IPv6 gateway may be given link-local
GATEWAY_WAN_IP6 = "2001:db8:203::1"
DEST_IPS6 = ("2001:db8:203::10", "2001:db8:203::11", "2001:db8:203::12")
WAN_PREFIX6 = 64
ETC_NETNS = "/etc/netns"
# what the kernel adds by itself as a link comes up (carrier, IPv6 link-local addresses and routes), on
# its own schedule: a snapshot leaves it out, so it compares what the router did
KERNEL_LINK_LOCAL = re.compile(r"\bfe80::|\bff00::/8\b")
# the same for the IPv6 part, finer: link-local as an address or a destination only, so that a route
# `via fe80::1` (a link-local gateway, the router's doing) stays in
KERNEL_LINK_LOCAL6 = re.compile(r"^(?:(?:local|anycast|multicast) )?(?:fe80:|ff00::/8)|\binet6 fe80:")
DEST_IPS = ("203.0.113.10", "203.0.113.11", "203.0.113.12")
WAN_PREFIX = 24
ROLES = ("client", "router", "node", "gateway", "dest")
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTN_LOCAL = 2
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
# where each of DEMO_TRAFFIC lands (server ip:port)
DEMO_LANDING = {("tcp", 80): "203.0.113.10:80", ("tcp", 8080): "203.0.113.11:80", ("udp", 53): "203.0.113.10:5353",
                ("tcp", 7000): "203.0.113.12:7000", ("udp", 7001): "203.0.113.12:7001"}
# dual stack: the IPv4 port rules, the same for IPv6, then one fallback per family (the grammar wants them last)
DEMO_DESTINATION6 = """\
# port proto destination [remote port]
80   tcp 203.0.113.10
8080 tcp 203.0.113.11 80
53   udp 203.0.113.10 5353
80   tcp 2001:db8:203::10
8080 tcp 2001:db8:203::11 80
53   udp 2001:db8:203::10 5353
203.0.113.12            # IPv4 fallback: every other port
2001:db8:203::12        # IPv6 fallback: every other port
"""
DEMO_TRAFFIC6 = DEMO_TRAFFIC  # the same ports, sent to ROUTER_POD_IP6
DEMO_SERVERS6 = (("tcp", "2001:db8:203::10", 80), ("tcp", "2001:db8:203::11", 80),
                 ("udp", "2001:db8:203::10", 5353), ("tcp", "2001:db8:203::12", 7000),
                 ("udp", "2001:db8:203::12", 7001))
DEMO_LANDING6 = {("tcp", 80): "[2001:db8:203::10]:80", ("tcp", 8080): "[2001:db8:203::11]:80",
                 ("udp", 53): "[2001:db8:203::10]:5353", ("tcp", 7000): "[2001:db8:203::12]:7000",
                 ("udp", 7001): "[2001:db8:203::12]:7001"}


def router_command() -> list[str]:
    """How to start egress-router: the console script beside this interpreter, else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "egress-router")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "egress_router"]


def unsettled(ipr: Any) -> str | None:
    """What the kernel is still doing by itself in a namespace (None: nothing)."""
    up: set[int] = set()
    for link in ipr.get_links():
        if link["flags"] & IFF_UP and link.get("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            return f"{link.get('IFLA_IFNAME')} is {link.get('IFLA_OPERSTATE')}"
        if link["flags"] & IFF_UP:
            up.add(link["index"])
    local: set[str] | None = None
    for addr in ipr.get_addr(family=socket.AF_INET6):
        flags = addr.get("IFA_FLAGS") or addr["flags"]
        if flags & IFA_F_DADFAILED:
            continue
        if flags & IFA_F_TENTATIVE:
            return f"{addr.get('IFA_ADDRESS')} is tentative"
        if addr["index"] in up:
            # a nodad address is never tentative, but its local route comes from the kernel's DAD work
            # queue a moment after the address itself
            if local is None:
                routes = ipr.get_routes(family=socket.AF_INET6, table=255)
                local = {r.get("RTA_DST") for r in routes if r["type"] == RTN_LOCAL}
            if addr.get("IFA_ADDRESS") not in local:
                return f"{addr.get('IFA_ADDRESS')} has no local route yet"
    return None


class Lab:
    """Builds the topology on enter, tears it down on exit (also when the body raises)."""

    roles: tuple[str, ...] = ROLES  # one namespace each; a subclass with another topology names its own

    def __init__(self, *, ip_forward: bool = False, tag: str | None = None, dual_stack: bool = False):
        self.suffix = tag or f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.ns = {role: f"egr-{self.suffix}-{role}" for role in self.roles}
        self.ip_forward = ip_forward
        self.dual_stack = dual_stack
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
            if self.dual_stack:
                self._address6(ipr, "eth0", CLIENT_IP6, POD_PREFIX6)
                ipr.route("add", dst="::/0", gateway=ROUTER_POD_IP6)
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
            if self.dual_stack:
                self._address6(ipr, "eth0", ROUTER_POD_IP6, POD_PREFIX6)
                ipr.route("add", dst="::/0", gateway=CLIENT_IP6)
        with IPRoute(netns=self.ns["gateway"]) as ipr:
            ipr.link("add", ifname="wan0", kind="veth", peer={"ifname": "wan0", "net_ns_fd": path("dest")})
            self._up(ipr, "lo")
            self._address(ipr, "lan0", GATEWAY_LAN_IP, LAN_PREFIX)
            self._address(ipr, "wan0", GATEWAY_WAN_IP, WAN_PREFIX)
            if self.dual_stack:
                self._address6(ipr, "lan0", GATEWAY_LAN_IP6, LAN_PREFIX6)
                self._address6(ipr, "lan0", GATEWAY_LINK_LOCAL, 64)
                self._address6(ipr, "wan0", GATEWAY_WAN_IP6, WAN_PREFIX6)
        with IPRoute(netns=self.ns["dest"]) as ipr:
            self._up(ipr, "lo")
            for ip in DEST_IPS:
                self._address(ipr, "wan0", ip, WAN_PREFIX)
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_WAN_IP)
            if self.dual_stack:
                for ip in DEST_IPS6:
                    self._address6(ipr, "wan0", ip, WAN_PREFIX6)
                ipr.route("add", dst="::/0", gateway=GATEWAY_WAN_IP6)
        self.sysctl("gateway", "net.ipv4.ip_forward", "1")
        self.sysctl("router", "net.ipv4.ip_forward", "1" if self.ip_forward else "0")
        if self.dual_stack:
            self.sysctl("gateway", "net.ipv6.conf.all.forwarding", "1")
            self.sysctl("router", "net.ipv6.conf.all.forwarding", "1" if self.ip_forward else "0")
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

    def _address6(self, ipr: Any, name: str, ip: str, prefix: int) -> None:
        """An IPv6 address without duplicate address detection (usable at once); none if it is there."""
        index = self._up(ipr, name)
        if not ipr.get_addr(family=socket.AF_INET6, index=index, address=ip):
            ipr.addr("add", index=index, address=ip, prefixlen=prefix, flags=IFA_F_NODAD)

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
        """Add an IPv6 pair on the client<->router veth (no duplicate address detection: usable at once);
        what is there already (dual_stack, an earlier call) stays as it is."""
        for role, ip in (("client", CLIENT_IP6), ("router", ROUTER_POD_IP6)):
            with self.iproute(role) as ipr:
                self._address6(ipr, "eth0", ip, POD_PREFIX6)
        self.settle()

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

    def router_env6(self, destination: str = DEMO_DESTINATION6, *, mode: str = "init",
                    source: str = f"{SOURCE_IP}/{LAN_PREFIX},{SOURCE_IP6}/{LAN_PREFIX6}",
                    gateway: str = f"{GATEWAY_LAN_IP},{GATEWAY_LAN_IP6}", **extra: str) -> dict[str, str]:
        """router_env for a dual-stack router: one source and one gateway per family."""
        return self.router_env(destination, mode=mode, source=source, EGRESS_GATEWAY=gateway, **extra)

    def run_router(self, env: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.exec("router", router_command(), env=env, timeout=timeout)

    def snapshot(self, role: str) -> str:
        """The namespace's network state as text: rules, links, addresses, routes, forwarding."""
        parts = [self._commands(role, KERNEL_LINK_LOCAL, ["iptables-save"], ["ip", "-d", "link", "show"],
                                ["ip", "-4", "addr", "show"], ["ip", "route", "show", "table", "all"],
                                ["ip", "rule", "show"])]
        parts.append(f"ip_forward={self.read_sysctl(role, 'net.ipv4.ip_forward')}")
        for scope in ("all", "eth0"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"{scope}.rp_filter={self.read_sysctl(role, f'net.ipv4.conf.{scope}.rp_filter')}")
        if not os.path.isdir("/proc/sys/net/ipv6"):  # a kernel without IPv6
            return "\n".join(parts)
        # one line per address (-o): the kernel's link-local lines drop out without leaving their
        # interface header or lifetime line behind
        parts.append(self._commands(role, KERNEL_LINK_LOCAL6, ["ip6tables-save"], ["ip", "-6", "-o", "addr", "show"],
                                    ["ip", "-6", "route", "show", "table", "all"], ["ip", "-6", "rule", "show"]))
        parts.append(f"ipv6.all.forwarding={self.read_sysctl(role, 'net.ipv6.conf.all.forwarding')}")
        for key in ("accept_ra", "disable_ipv6"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"ipv6.macvlan0.{key}={self.read_sysctl(role, f'net.ipv6.conf.macvlan0.{key}')}")
        return "\n".join(parts)

    def _commands(self, role: str, kernel: re.Pattern[str], *commands: list[str]) -> str:
        """The output of snapshot commands, without what changes by itself (counters, kernel link-local)."""
        parts = []
        for argv in commands:
            result = self.exec(role, argv, check=True)
            lines = [strip_counters(line) for line in result.stdout.splitlines() if not line.startswith("#")]
            if argv[0].endswith("tables-save"):
                lines = without_unused_tables(lines)
            elif argv[0] == "ip":  # a link's operational state follows the kernel's linkwatch, not our steps
                lines = [re.sub(r" state \S+ ", " ", line).replace("NO-CARRIER,", "") for line in lines
                         if not kernel.search(line)]
            parts.append(f"$ {' '.join(argv)}\n" + "\n".join(lines))
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
        """Send one TCP or UDP request from `role` to ip:port (either family); what the server reported."""
        return labtraffic.request(self.entered(role), proto, ip, port, timeout=timeout)


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


def check_tools() -> None:
    from .core.errors import SetupError

    tools = ("nsenter", "iptables-save", "iptables-restore", "ip6tables-save", "ip")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SetupError(f"the lab needs {', '.join(missing)}: apt-get install iptables iproute2 util-linux")


def run_demo(*, keep: bool = False, ipv6: bool = True) -> None:
    """Build the lab, run init mode in it, send traffic from the client, print where it landed.

    ipv6: a dual-stack lab and router (one source and gateway per family), IPv4 rows then IPv6 rows;
    False: IPv4 only, as before the router knew IPv6."""
    check_tools()
    lab = Lab(dual_stack=ipv6)
    print(f"Building the lab: namespaces {', '.join(lab.ns.values())}")
    with contextlib.ExitStack() as stack:
        if keep:
            lab.build()
        else:
            stack.enter_context(lab)
        lab.serve(DEMO_SERVERS + DEMO_SERVERS6 if ipv6 else DEMO_SERVERS)
        env, destination = (lab.router_env6(), DEMO_DESTINATION6) if ipv6 else (lab.router_env(), DEMO_DESTINATION)
        print(f"\nRunning egress-router (EGRESS_ROUTER_MODE=init) in {lab.ns['router']} with")
        print(f"  EGRESS_SOURCE={env['EGRESS_SOURCE']}  EGRESS_GATEWAY={env['EGRESS_GATEWAY']}")
        print("  EGRESS_DESTINATION=\n" + "".join(f"    {line}\n" for line in destination.splitlines()))
        result = lab.run_router(env)
        sys.stdout.write("".join(f"  | {line}\n" for line in result.stderr.splitlines()))
        if result.returncode != 0:
            print(f"egress-router exited with {result.returncode}")
            raise SystemExit(1)
        families = [(CLIENT_IP, ROUTER_POD_IP, SOURCE_IP), (CLIENT_IP6, ROUTER_POD_IP6, SOURCE_IP6)][:1 + ipv6]
        rows = [("client -> router", "landed on (server)", "source seen by server", "")]
        for client, router, source_ip in families:
            for proto, port in DEMO_TRAFFIC:
                try:
                    reply = lab.request(proto, router, port)
                    landed, source = reply.landed, reply.peer_ip
                    mark = "" if source == source_ip else "   <- not the reserved IP!"
                except OSError as exc:
                    landed, source, mark = "-", "-", f"   <- failed: {exc.strerror or exc}"
                rows.append((f"{proto} {client} -> {endpoint((router, port))}" if ":" in router
                             else f"{proto} {client} -> :{port}", landed, source, mark))
        widths = [max(minimum, *(len(row[i]) for row in rows)) for i, minimum in enumerate((28, 22, 22))]
        print()
        for first, landed, source, mark in rows:
            print(f"  {first:<{widths[0]}} {landed:<{widths[1]}} {source:<{widths[2]}}{mark}")
        failures = sum(bool(row[3]) for row in rows)
        reserved = f"{SOURCE_IP} (IPv4) and {SOURCE_IP6} (IPv6)" if ipv6 else SOURCE_IP
        print(f"\nEvery server saw the reserved source IP {reserved}." if not failures
              else f"\n{failures} request(s) did not arrive from {reserved}.")
        if keep:
            print(f"Lab left up; remove it with: for n in {' '.join(lab.ns.values())}; do ip netns del $n; done")
        else:
            print("Lab torn down.")
        if failures:
            raise SystemExit(1)
