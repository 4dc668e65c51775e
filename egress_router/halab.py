"""The HA lab: 2 or 3 egress-router replicas on one LAN, each pod's macvlan made on its node and moved in (as CNI does).

    out 203.0.113.10, .11 ─wan0── gw: br0 192.0.2.1 (the LAN bridge), wan0 203.0.113.1, forwarding
                                        │ lan<i> (one veth per node)
    host<i>: lan0 (the node NIC, no address) ── macvlan0 (bridge mode, made here, moved into pod<i>)
    pod<i>: eth0 198.51.100.1<i>/24, default via 198.51.100.1; macvlan0 up, no address
    node: br0 198.51.100.1 (the pod gateway) + 198.51.100.2 (the clients), pod<i> veths; no forwarding
    dual_stack=True: LAN 2001:db8:2::/64 (gw ::1), pods 2001:db8:100::1<i>/64 (node ::1, client ::2),
                     outside 2001:db8:203::/64 (gw ::1, out ::10 and ::11); no duplicate address detection.

The macvlan's parent stays in host<i>, outside the pod: with the parent inside the pod namespace the pod
would answer ARP twice (weak host model), which no cluster does. The node does not forward and nothing
masquerades, so whatever reaches `out` came through a macvlan. The outside servers run in `out`
(serve_outside). Namespaces carry a per-run suffix; teardown always runs and kills only the processes
this lab started, with their descendants (keepalived's children), by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

from .admin import children
from .lab import Lab, Servers, router_command
from .net.pyroute import iproute_class

LAN_GATEWAY = "192.0.2.1"
SOURCE = "192.0.2.99"
SOURCE6 = "2001:db8:2::99"
LAN_GATEWAY6 = "2001:db8:2::1"
POD_GATEWAY = "198.51.100.1"
CLIENT = "198.51.100.2"
POD_GATEWAY6 = "2001:db8:100::1"
CLIENT6 = "2001:db8:100::2"
OUT_GATEWAY = "203.0.113.1"
OUT_IPS = ("203.0.113.10", "203.0.113.11")
OUT_GATEWAY6 = "2001:db8:203::1"
OUT_IPS6 = ("2001:db8:203::10", "2001:db8:203::11")
OUT_PORTS = (80, 7000)
METRICS_PORT = 9253
PEERS_NAME = "egress-router-ha"  # in every pod's hosts file, one line per replica (set_peers changes them)
VRRP = 112  # the IP protocol of VRRP, keepalived's heartbeat
DESTINATION = f"80 tcp {OUT_IPS[0]}\n7000 tcp {OUT_IPS[0]}\n"
DESTINATION6 = f"80 tcp {OUT_IPS6[0]}\n7000 tcp {OUT_IPS6[0]}\n"
ETH_P_ARP = 0x0806
NUD_INCOMPLETE, NUD_FAILED = 0x01, 0x20


def pod_ip(i: int) -> str:
    return f"198.51.100.1{i}"


def pod_ip6(i: int) -> str:
    return f"2001:db8:100::1{i}"


def macvlan_mac(i: int) -> str:
    """Fixed, locally administered, ascending with i (the ARP guard's 'lower MAC yields' rule goes by index)."""
    return f"02:00:00:00:00:{i + 1:02x}"


class HaLab(Lab):
    """Builds the topology on enter, tears it down on exit (also when the body raises).

    Roles (self.ns[role] is the namespace): gw, out, node, host<i>, pod<i> (pod(i) names it). Lab's
    exec/spawn/entered/etc_file/sysctl/serve/request work on them; spawned processes have their output
    collected (output). run_router(i, env) starts egress-router in pod i; router_env(i, **variables).
    Faults: kill_pod, cut_heartbeat/heal_heartbeat, egress_link. Observations: holders, gateway_neighbour,
    arp_replies, connect, http_status; set_peers changes what PEERS_NAME resolves to in the pods.
    """

    def __init__(self, replicas: int = 2, *, dual_stack: bool = False, ip_forward: bool = False,
                 tag: str | None = None):
        if not 2 <= replicas <= 9:
            raise ValueError(f"replicas must be 2-9, not {replicas}")
        self.replicas = replicas
        self.roles = ("gw", "out", "node", *(f"{kind}{i}" for i in range(replicas) for kind in ("host", "pod")))
        super().__init__(ip_forward=ip_forward, tag=tag, dual_stack=dual_stack)
        self._where: dict[int, str] = {}  # pid of each spawned process -> its role
        self._output: dict[int, list[str]] = {}  # pid -> lines collected from its stdout and stderr
        self._lock = threading.Lock()
        # per thread, role -> an IPRoute made in that thread in that namespace (netlink); every one, to close
        self._netlink_local = threading.local()
        self._netlinks: list[Any] = []

    # ------------------------------------------------------------ the topology
    def build(self) -> None:
        self.create_namespaces()
        v6 = self.dual_stack
        n = self.ns
        self.ip("gw", ["link set lo up", "link add br0 type bridge", "link set br0 up",
                       f"addr add {LAN_GATEWAY}/24 dev br0",
                       f"link add wan0 type veth peer name wan0 netns {n['out']}", "link set wan0 up",
                       f"addr add {OUT_GATEWAY}/24 dev wan0",
                       *([f"addr add {LAN_GATEWAY6}/64 dev br0 nodad",
                          f"addr add {OUT_GATEWAY6}/64 dev wan0 nodad"] if v6 else [])])
        self.ip("out", ["link set lo up", "link set wan0 up", *(f"addr add {ip}/24 dev wan0" for ip in OUT_IPS),
                        f"route add default via {OUT_GATEWAY}",
                        *([f"addr add {ip}/64 dev wan0 nodad" for ip in OUT_IPS6] if v6 else []),
                        *([f"route add ::/0 via {OUT_GATEWAY6}"] if v6 else [])])
        self.ip("node", ["link set lo up", "link add br0 type bridge", "link set br0 up",
                         f"addr add {POD_GATEWAY}/24 dev br0", f"addr add {CLIENT}/24 dev br0",
                         *([f"addr add {POD_GATEWAY6}/64 dev br0 nodad",
                            f"addr add {CLIENT6}/64 dev br0 nodad"] if v6 else [])])
        for i in range(self.replicas):
            host, pod = n[f"host{i}"], n[f"pod{i}"]
            self.ip("gw", [f"link add lan{i} type veth peer name lan0 netns {host}",
                           f"link set lan{i} master br0", f"link set lan{i} up"])
            self.ip("node", [f"link add pod{i} type veth peer name eth0 netns {pod}",
                             f"link set pod{i} master br0", f"link set pod{i} up"])
            # made on the node's NIC and moved into the pod, as the CNI macvlan plugin does
            self.ip(f"host{i}", ["link set lo up", "link set lan0 up",
                                 f"link add link lan0 name mvtmp address {macvlan_mac(i)} type macvlan mode bridge",
                                 f"link set mvtmp netns {pod} name macvlan0"])
            self.sysctl(f"pod{i}", "net.ipv4.ip_forward", "1" if self.ip_forward else "0")
            if v6:
                self.sysctl(f"pod{i}", "net.ipv6.conf.macvlan0.accept_dad", "0")
                self.sysctl(f"pod{i}", "net.ipv6.conf.all.forwarding", "1" if self.ip_forward else "0")
            self.ip(f"pod{i}", ["link set lo up", "link set macvlan0 up", "link set eth0 up",
                                f"addr add {pod_ip(i)}/24 dev eth0", f"route add default via {POD_GATEWAY}",
                                *([f"addr add {pod_ip6(i)}/64 dev eth0 nodad",
                                   f"route add ::/0 via {POD_GATEWAY6}"] if v6 else [])])
            self.etc_file(f"pod{i}", "resolv.conf", f"nameserver {POD_GATEWAY}\noptions timeout:1 attempts:1\n")
        self.set_peers(range(self.replicas))
        self.sysctl("gw", "net.ipv4.ip_forward", "1")
        # a new namespace inherits IPv4 forwarding from the machine's own: the node must not forward, so
        # that nothing reaches the outside but through a macvlan
        self.sysctl("node", "net.ipv4.ip_forward", "0")
        if v6:
            self.sysctl("gw", "net.ipv6.conf.all.forwarding", "1")
        self.settle()

    def ip(self, role: str, commands: list[str]) -> None:
        """iproute2 commands in a lab namespace (one `ip -batch`), failing with ip's own message."""
        result = self.exec(role, ["ip", "-batch", "-"], stdin="\n".join(commands) + "\n", timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"ip -batch in {self.ns[role]} failed: {result.stderr.strip()}")

    def set_peers(self, replicas: Any) -> None:
        """Make PEERS_NAME resolve, in every pod (processes run with etc=True), to these replicas' pod IPs.

        The hosts files are rewritten in place: `ip netns exec` bind-mounts them, so a running process
        sees the new set at its next lookup (a headless Service's pods coming and going)."""
        lines = "".join(f"{pod_ip(i)}\t{PEERS_NAME}\n" for i in replicas)
        for i in range(self.replicas):
            self.etc_file(f"pod{i}", "hosts", f"127.0.0.1\tlocalhost\n{pod_ip(i)}\tpod{i}\n{lines}")

    # ------------------------------------------------------------ names and environment
    def pod(self, i: int) -> str:
        """The role of replica i's pod namespace (self.ns[role] is its name)."""
        return f"pod{i}"

    def pod_ip(self, i: int) -> str:
        return pod_ip(i)

    def macvlan_mac(self, i: int) -> str:
        return macvlan_mac(i)

    def peers(self) -> str:
        """EGRESS_HA_PEERS for all replicas: their pod IPs, space-separated."""
        return " ".join(pod_ip(i) for i in range(self.replicas))

    def router_env(self, i: int = 0, **variables: str) -> dict[str, str]:  # type: ignore[override]
        """The environment of a legacy-mode HA router in pod i; `variables` override or add (EGRESS_X="...")."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
        env.update(EGRESS_SOURCE=f"{SOURCE}/24", EGRESS_GATEWAY=LAN_GATEWAY, EGRESS_INTERFACE="macvlan0",
                   EGRESS_POD_INTERFACE="eth0", EGRESS_DESTINATION=DESTINATION, EGRESS_ROUTER_MODE="legacy",
                   EGRESS_HA_PEERS=self.peers(), EGRESS_METRICS_PORT=str(METRICS_PORT))
        if self.dual_stack:
            env.update(EGRESS_SOURCE=f"{SOURCE}/24,{SOURCE6}/64", EGRESS_GATEWAY=f"{LAN_GATEWAY},{LAN_GATEWAY6}",
                       EGRESS_DESTINATION=DESTINATION + DESTINATION6)
        env.update(variables)
        return env

    # ------------------------------------------------------------ processes
    def spawn(self, role: str, argv: list[str], *, env: Mapping[str, str] | None = None,
              etc: bool = False) -> subprocess.Popen[str]:
        """Lab.spawn, with its output collected as it comes (output(process)) and its role remembered (kill_pod)."""
        process = super().spawn(role, argv, env=env, etc=etc)
        self._where[process.pid] = role
        lines: list[str] = []
        self._output[process.pid] = lines
        for stream in (process.stdout, process.stderr):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()
        return process

    def _collect(self, stream: IO[str] | None, lines: list[str]) -> None:
        if stream is None:
            return
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))

    def output(self, process: subprocess.Popen[str]) -> str:
        """What a spawned process wrote so far (stdout and stderr, interleaved by line)."""
        with self._lock:
            return "\n".join(self._output.get(process.pid, []))

    def run_router(self, i: int, env: Mapping[str, str]) -> subprocess.Popen[str]:  # type: ignore[override]
        """egress-router in pod i (ip netns exec: the pod's hosts and resolv.conf); output(process) has its log."""
        return self.spawn(self.pod(i), router_command(), env=env, etc=True)

    def kill_pod(self, i: int) -> list[int]:
        """A container crash: SIGKILL every process the lab started in pod i and their descendants, all at
        once (frozen first, so none respawns or notices another die); the namespace, its links and
        addresses stay, as the pause container keeps them. Returns the pids killed."""
        roots = [p for p in self._processes if self._where.get(p.pid) == self.pod(i) and p.poll() is None]
        pids = kill_trees([p.pid for p in roots])
        for process in roots:
            process.wait(timeout=10)
        return pids

    def destroy(self) -> None:
        # the descendants first (keepalived's children would keep a removed namespace alive)
        kill_trees([p.pid for p in self._processes if p.poll() is None])
        with self._lock:
            for ipr in self._netlinks:
                ipr.close()
            self._netlinks.clear()
        super().destroy()

    # ------------------------------------------------------------ faults
    def cut_heartbeat(self, i: int) -> None:
        """Drop VRRP (IP protocol 112) in and out on pod i's eth0 (both families with dual_stack)."""
        for rule in self._heartbeat_rules():
            self._iptables(i, ["-I", *rule])

    def heal_heartbeat(self, i: int) -> None:
        for rule in self._heartbeat_rules():
            self._iptables(i, ["-D", *rule])

    def _heartbeat_rules(self) -> list[list[str]]:
        rules = [["INPUT", "-i", "eth0", "-p", str(VRRP), "-j", "DROP"],
                 ["OUTPUT", "-o", "eth0", "-p", str(VRRP), "-j", "DROP"]]
        return [[binary, *rule] for binary in ("iptables", "ip6tables")[:1 + self.dual_stack] for rule in rules]

    def _iptables(self, i: int, argv: list[str]) -> None:
        action, binary, *rule = argv
        result = self.exec(self.pod(i), [binary, "-w", action, *rule], timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"{binary} {action} {' '.join(rule)} in pod{i}: {result.stderr.strip()}")

    def egress_link(self, i: int, up: bool) -> None:
        """Pod i's macvlan0 up or down (its egress link)."""
        self.ip(self.pod(i), [f"link set macvlan0 {'up' if up else 'down'}"])

    # ------------------------------------------------------------ observations
    @contextlib.contextmanager
    def netlink(self, role: str) -> Iterator[Any]:
        """An IPRoute kept open in a namespace for the calling thread: about 1 ms a query instead of 6 for a
        fresh IPRoute(netns=...), for pollers.

        One per thread: pyroute2 (0.9) keeps an IPRoute's socket per thread and makes it on a thread's first
        query, in the namespace that thread is in then; used from a thread other than its maker's, an IPRoute
        made in a lab namespace would quietly query the machine's own. (Closed at teardown from another thread,
        an IPRoute leaves its thread's asyncio loop open: three descriptors per thread and namespace.)"""
        mine: dict[str, Any] = self._netlink_local.__dict__.setdefault("by_role", {})
        if role not in mine:
            with self.entered(role):
                ipr = iproute_class()()
                ipr.get_links()  # its socket made now, while this thread is in the namespace
            mine[role] = ipr
            with self._lock:
                self._netlinks.append(ipr)
        yield mine[role]

    def holders(self, ip: str = SOURCE) -> list[int]:
        """The replicas whose macvlan0 holds `ip` now (EGRESS_SOURCE by default)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        held = []
        for i in range(self.replicas):
            with self.netlink(self.pod(i)) as ipr:
                links = ipr.link_lookup(ifname="macvlan0")
                if links and ipr.get_addr(family=family, index=links[0], address=ip):
                    held.append(i)
        return held

    def gateway_neighbour(self, ip: str) -> str | None:
        """The MAC the gateway's neighbour table has for `ip` (None: no entry, or one still unresolved/failed)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with self.netlink("gw") as ipr:
            for entry in ipr.get_neighbours(family=family, dst=ip):
                mac = entry.get("NDA_LLADDR")
                if entry.get("NDA_DST") == ip and mac and not entry["state"] & (NUD_INCOMPLETE | NUD_FAILED):
                    return str(mac)
        return None

    def arp_replies(self, ip: str = SOURCE, window: float = 0.3) -> list[str]:
        """Send one ARP request for `ip` from the gateway (br0) and return the sender MAC of every reply
        heard within `window` seconds (a MAC twice if it answered twice)."""
        with self.entered("gw"):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        with sock:
            sock.bind(("br0", ETH_P_ARP))
            mac = sock.getsockname()[4]
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(LAN_GATEWAY),
                              b"\0" * 6, socket.inet_aton(ip))
            sock.send(b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp)
            frames = []
            deadline = time.monotonic() + window
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    frames.append(sock.recv(2048))
                except TimeoutError:
                    break
            sock.setblocking(False)  # and what the kernel queued while this thread waited for a CPU
            with contextlib.suppress(BlockingIOError):
                while True:
                    frames.append(sock.recv(2048))
        replies = []
        for frame in frames:
            if len(frame) >= 42:
                op, sender, sender_ip = struct.unpack_from("!6xH6s4s", frame, 14)
                if op == 2 and sender_ip == socket.inet_aton(ip):
                    replies.append(sender.hex(":"))
        return replies

    # ------------------------------------------------------------ traffic
    def serve_outside(self) -> Servers:
        """TCP servers on 203.0.113.10 and .11 (and their IPv6 twins), ports 80 and 7000, in `out`: each
        answers '<landed ip:port> <peer ip:port>' and closes; `.seen` records every connection."""
        ips = OUT_IPS + (OUT_IPS6 if self.dual_stack else ())
        return self.serve([("tcp", ip, port) for ip in ips for port in OUT_PORTS], role="out")

    def connect(self, i: int, port: int = 80, *, timeout: float = 1.0, ipv6: bool = False) -> str:
        """A connection from the client (198.51.100.2 in `node`) to pod i's pod IP: the source address the
        outside server saw. Raises OSError on refusal, reset or timeout (each step bounded by `timeout`)."""
        family, client, server = ((socket.AF_INET6, CLIENT6, pod_ip6(i)) if ipv6
                                  else (socket.AF_INET, CLIENT, pod_ip(i)))
        with self.entered("node"):
            sock = socket.socket(family, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.bind((client, 0))
            sock.connect((server, port))
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        fields = data.decode(errors="replace").split()
        if len(fields) != 2:
            raise ConnectionError(f"pod{i}:{port}: not an outside server's answer: {data[:100]!r}")
        peer = fields[1]
        return peer[1:peer.index("]")] if peer.startswith("[") else peer.rsplit(":", 1)[0]

    def http_status(self, i: int, path: str = "/ready", port: int = METRICS_PORT, *,
                    timeout: float = 1.0) -> int | None:
        """The status of GET path on pod i's pod IP from the client (the admin port's /ready by default);
        None when nothing answers."""
        with self.entered("node"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            try:
                sock.connect((pod_ip(i), port))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {pod_ip(i)}\r\nConnection: close\r\n\r\n".encode())
                head = sock.recv(64).split(b" ", 2)
                return int(head[1]) if len(head) > 1 and head[0].startswith(b"HTTP/") else None
            except (OSError, ValueError):
                return None


# ------------------------------------------------------------ process trees
def kill_trees(roots: list[int]) -> list[int]:
    """SIGKILL these processes and all their descendants; returns every pid killed.

    Each process is stopped (SIGSTOP) before its children are read, so none forks, respawns (keepalived's
    parent restarts a dead VRRP child) or reaps one meanwhile: a pid found here cannot be reused before
    the SIGKILL. The roots are the lab's own unreaped children; a second pass catches a fork in flight.
    A process that double-forks away (a daemon) is no descendant any more, and is not found."""
    frozen: list[int] = []
    for _ in range(2):
        todo = [pid for pid in roots if pid not in frozen] + [c for pid in frozen for c in children(pid)]
        while todo:
            pid = todo.pop()
            if pid in frozen:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                stopped(pid)
                todo += children(pid)
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    for pid in frozen:  # gone, or a zombie (which holds no namespace any more)
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
    return frozen


def state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z, ...); '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stopped(pid: int, timeout: float = 1.0) -> None:
    """Wait (bounded) until a SIGSTOP has taken effect: kill() returns before the target stops."""
    deadline = time.monotonic() + timeout
    while state(pid) not in ("T", "t", "Z", "X", "") and time.monotonic() < deadline:
        time.sleep(0.001)


def alive(pid: int) -> bool:
    return state(pid) not in ("Z", "X", "")
