"""Pod-network layouts for the lab: Calico-, Cilium- and OpenShift-SDN-style router pods, two nodes, a cluster DNS.

    router pod ─eth0─┐                    ┌─lan0─ node2 ─── remote pod (a client on another node)
    client pod ─eth0─┴─ node ─lan0─ [lan: br0] ─lan0─ gateway 192.0.2.1 ─wan0─ dest 203.0.113.10-12
    router pod ─macvlan0: a macvlan on the node's lan0, so on the LAN too (but never to lan0 itself)

Addresses (documentation ranges only): the cluster network 198.51.100.0/25, a /26 per node (router
pod .2, same-node client .3; the other node's client .66; cilium_host / tun0 at .1 and .65); the
service network 198.51.100.128/26 with the cluster DNS at .138; the nodes at 198.51.100.225/.226 on
the node network .224/28 (its router .238 is outside the lab); Calico's gateway stand-in .254; the
LAN 192.0.2.0/24 with EGRESS_SOURCE 192.0.2.99 and the gateway .1, the destinations behind it as in lab.py.

Every layout is the router pod's eth0 and routes as the CNI plugin leaves them, the node side of the
veth, and the node's routes to local and remote pods:

- calico: eth0 a /32 and only `default via 198.51.100.254 dev eth0 onlink`; the address stands in for
  Calico's 169.254.1.1 (documentation addresses only) and exists nowhere: the node's cali* veth
  (MAC ee:ee:ee:ee:ee:ee) answers for it by proxy ARP (proxy_delay 0), as Calico configures it; the
  node routes each pod /32 to its veth, blackholes its own block and reaches the other node's block
  via that node's IP (what BIRD installs); felix's strict rp_filter on cali*. Simplified: the real
  CNI plugin writes `169.254.1.1 dev eth0 scope link` plus `default via 169.254.1.1` (the Cilium shape);
  the onlink form here is the one the issue measured.
- cilium: eth0 a /32, `198.51.100.1 dev eth0 scope link` and `default via 198.51.100.1`, where .1 is
  the node's cilium_host address (a cilium_host/cilium_net veth pair, as Cilium makes it; the pod's ARP
  is answered because the address is the node's own). Simplified: Cilium's BPF programs are not
  modelled; native routing (autoDirectNodeRoutes) to the other node, and per-endpoint routes
  `<pod> dev lxc* src <cilium_host>` stand in for the BPF redirect from cilium_host, keeping Cilium's
  choice of the cilium_host address as the node's source towards pods.
- openshift-sdn: eth0 in the node's /26 of the cluster network, `default via` the node's tun0 (.1),
  the cluster network and 224.0.0.0/4 on-link (openshift-sdn's IPAM routes) and, for the router pod
  only, the service network via tun0 (what the platform gives the egress router pod). Simplified: OVS
  br0 + tun0 are one Linux bridge named tun0 holding the gateway address; the VXLAN overlay is plain
  routing between the nodes over the LAN, with proxy ARP on tun0 for the pods of the other node; the
  macvlan is made in private mode, as openshift-sdn does (bridge mode elsewhere, the Multus default).

Common to all: the nodes reach each other over the LAN (a bridge in a namespace of its own); the node
IPs are 198.51.100.225/.226 on a node network the egress gateway neither has nor routes, or, with
`node_in_egress_subnet`, 192.0.2.11/.12 inside EGRESS_SOURCE's subnet. No node masquerades pod traffic,
so anything that reaches a destination came through the macvlan. The cluster DNS Service IP is a local
address of the router's node (as kube-proxy's IPVS mode binds it; on lo, since this kernel may lack the
dummy driver) answered by dnsmasq; the router pod's /etc/resolv.conf (processes run with etc=True)
names it, with Kubernetes' search path and ndots:5, plus short timeouts so that every lookup is bounded.

`ipv6=True` (calico and openshift-sdn) makes the pod networks dual-stack as the CNI plugins do, in
2001:db8::/32 only; the IPv4 part stays exactly as above. The cluster network 2001:db8:c::/56, a /64 per
node (router pod ::2, same-node client ::3, the other node's client 2001:db8:c:1::66), the service
network 2001:db8:5::/112 with the cluster DNS at 2001:db8:5::a (also a local address of the router's
node, answered by the same dnsmasq, AAAA records for the same names), the nodes at 2001:db8:e::225/::226
(or 2001:db8:2::11/::12 inside EGRESS_SOURCE's IPv6 subnet), the LAN 2001:db8:2::/64 with the gateway
2001:db8:2::1 (and fe80::1) and the destinations 2001:db8:203::10-12 as in lab.py. IPv6 forwarding on nodes and gateway.

- calico: eth0 a /128 and `default via fe80::ecee:eeff:feee:eeee dev eth0`, Calico's real IPv6 next hop:
  the EUI-64 link-local address of the cali* veth's MAC ee:ee:ee:ee:ee:ee, so the node's veth itself has
  it (added explicitly, without DAD, before the link comes up) and answers the pod's neighbour
  solicitations; the node routes each pod /128 to its veth, blackholes its block, BIRD-style routes.
- openshift-sdn: a global next hop, as OVN-Kubernetes gives IPv6 pods (openshift-sdn is IPv4-only):
  eth0 in the node's /64, `default via` tun0's 2001:db8:c::1 (2001:db8:c:1::1 on the other node) and,
  for the router pod, the service network via it; the nodes route each other's /64 over the LAN.
The router pod's resolv.conf then names the IPv6 cluster DNS first and the IPv4 one after it
(write_resolv_conf changes that).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence

from .lab import (
    DEST_IPS,
    DEST_IPS6,
    GATEWAY_LAN_IP,
    GATEWAY_LAN_IP6,
    GATEWAY_LINK_LOCAL,
    GATEWAY_WAN_IP,
    GATEWAY_WAN_IP6,
    LAN_PREFIX,
    LAN_PREFIX6,
    SOURCE_IP,
    SOURCE_IP6,
    WAN_PREFIX,
    WAN_PREFIX6,
    Lab,
    router_command,
)
from .labtraffic import family_of

LAYOUTS = ("calico", "cilium", "openshift-sdn")
ROLES = ("router", "client", "remote", "node", "node2", "lan", "gateway", "dest")

CLUSTER_CIDR = "198.51.100.0/25"  # the pod network: a /26 per node
NODE_POD_CIDRS = ("198.51.100.0/26", "198.51.100.64/26")
NODE_POD_GATEWAYS = ("198.51.100.1", "198.51.100.65")  # cilium_host / tun0 of each node
ROUTER_IP = "198.51.100.2"
CLIENT_IP = "198.51.100.3"  # a client pod on the router's node
REMOTE_IP = "198.51.100.66"  # a client pod on the other node
SERVICE_CIDR = "198.51.100.128/26"
DNS_SERVICE_IP = "198.51.100.138"
NODE_NETWORK = "198.51.100.224/28"
NODE_IPS = ("198.51.100.225", "198.51.100.226")
NODE_ROUTER = "198.51.100.238"  # the node network's router: outside the lab, nothing answers there
NODE_IPS_IN_EGRESS_SUBNET = ("192.0.2.11", "192.0.2.12")
CALICO_GATEWAY = "198.51.100.254"  # stands in for Calico's 169.254.1.1: no interface has it
CALICO_MAC = "ee:ee:ee:ee:ee:ee"
MULTICAST = "224.0.0.0/4"
DNS_NAMES = {"www.example.test": DEST_IPS[0], "api.example.test": DEST_IPS[1], "db.example.test": DEST_IPS[2]}
RESOLV_CONF = f"""\
search default.svc.cluster.local svc.cluster.local cluster.local
nameserver {DNS_SERVICE_IP}
options ndots:5 timeout:1 attempts:2
"""
# IPv6 (PodLab(ipv6=True)): documentation space only
LAYOUTS6 = ("calico", "openshift-sdn")
CLUSTER_CIDR6 = "2001:db8:c::/56"  # a /64 per node
NODE_POD_CIDRS6 = ("2001:db8:c::/64", "2001:db8:c:1::/64")
NODE_POD_GATEWAYS6 = ("2001:db8:c::1", "2001:db8:c:1::1")  # tun0 of each node
ROUTER_IP6, CLIENT_IP6, REMOTE_IP6 = "2001:db8:c::2", "2001:db8:c::3", "2001:db8:c:1::66"
SERVICE_CIDR6 = "2001:db8:5::/112"
DNS_SERVICE_IP6 = "2001:db8:5::a"
NODE_NETWORK6 = "2001:db8:e::/64"
NODE_IPS6 = ("2001:db8:e::225", "2001:db8:e::226")
NODE_ROUTER6 = "2001:db8:e::238"  # outside the lab, as NODE_ROUTER
NODE_IPS6_IN_EGRESS_SUBNET = ("2001:db8:2::11", "2001:db8:2::12")
CALICO_GATEWAY6 = "fe80::ecee:eeff:feee:eeee"  # the EUI-64 link-local address of CALICO_MAC
DNS_NAMES6 = dict(zip(DNS_NAMES, DEST_IPS6, strict=True))
PODS6 = {"router": ROUTER_IP6, "client": CLIENT_IP6, "remote": REMOTE_IP6}
PODS = (("router", "node", ROUTER_IP), ("client", "node", CLIENT_IP), ("remote", "node2", REMOTE_IP))  # role, node, IP
VETH_PREFIX = {"calico": "cali", "cilium": "lxc", "openshift-sdn": "veth"}


class PodLab(Lab):
    """A pod-network layout: built on enter, torn down on exit (namespaces, dnsmasq, /etc/netns files)."""

    roles = ROLES

    def __init__(self, layout: str = "calico", *, node_in_egress_subnet: bool = False, rp_filter: int = 0,
                 ip_forward: bool = False, tag: str | None = None, ipv6: bool = False):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
        if ipv6 and layout not in LAYOUTS6:
            raise ValueError(f"no IPv6 model of layout {layout!r}: one of {', '.join(LAYOUTS6)}")
        super().__init__(ip_forward=ip_forward, tag=tag, dual_stack=ipv6)
        self.ipv6 = ipv6
        self.layout = layout
        self.node_in_egress_subnet = node_in_egress_subnet
        self.initial_rp_filter = rp_filter
        self.router_ip, self.client_ip, self.remote_ip = ROUTER_IP, CLIENT_IP, REMOTE_IP
        self.dns_ip, self.source_ip, self.gateway_ip = DNS_SERVICE_IP, SOURCE_IP, GATEWAY_LAN_IP
        self.dest_ips = DEST_IPS
        if node_in_egress_subnet:
            self.node_ip, self.node2_ip = NODE_IPS_IN_EGRESS_SUBNET
            self.node_prefix, self.node_router = LAN_PREFIX, GATEWAY_LAN_IP
        else:
            self.node_ip, self.node2_ip = NODE_IPS
            self.node_prefix, self.node_router = int(NODE_NETWORK.split("/")[1]), NODE_ROUTER
        # the router pod's next hop through eth0, as the CNI plugin set it
        self.pod_gateway = CALICO_GATEWAY if layout == "calico" else NODE_POD_GATEWAYS[0]
        self.node_veth = {role: VETH_PREFIX[layout] + role for role, _, _ in PODS}  # the node side of each pod's veth
        # the IPv6 part (ipv6=True)
        self.router_ip6, self.client_ip6, self.remote_ip6 = ROUTER_IP6, CLIENT_IP6, REMOTE_IP6
        self.dns_ip6, self.source_ip6, self.gateway_ip6, self.dest_ips6 = \
            DNS_SERVICE_IP6, SOURCE_IP6, GATEWAY_LAN_IP6, DEST_IPS6
        if node_in_egress_subnet:
            self.node_ip6, self.node2_ip6 = NODE_IPS6_IN_EGRESS_SUBNET
            self.node_prefix6, self.node_router6 = LAN_PREFIX6, GATEWAY_LAN_IP6
        else:
            self.node_ip6, self.node2_ip6 = NODE_IPS6
            self.node_prefix6, self.node_router6 = int(NODE_NETWORK6.split("/")[1]), NODE_ROUTER6
        self.pod_gateway6 = CALICO_GATEWAY6 if layout == "calico" else NODE_POD_GATEWAYS6[0]
        self.dns: subprocess.Popen[str] | None = None
        self._tmp: str | None = None

    # ------------------------------------------------------------ life cycle
    def build(self) -> None:
        self.create_namespaces()
        self._lan()
        for role, node, ip in PODS:
            self._pod(role, node, ip)
        for index, node in enumerate(("node", "node2")):
            self._node(index, node)
        mode = "private" if self.layout == "openshift-sdn" else "bridge"
        self.ip("node", [f"link add link lan0 name macvlan0 netns {self.ns['router']} type macvlan mode {mode}"])
        for role in self.roles:
            forwarding = "1" if role in ("node", "node2", "gateway") or (role == "router" and self.ip_forward) else "0"
            self.sysctl(role, "net.ipv4.ip_forward", forwarding)
            # explicit, not inherited from the machine (a new namespace copies the host's IPv4 settings)
            self.set_rp_filter(self.initial_rp_filter if role == "router" else 0, role)
            if self.ipv6:
                self.sysctl(role, "net.ipv6.conf.all.forwarding", forwarding)
        self._node_sysctls()
        self.settle()
        if self.ipv6:
            self.write_resolv_conf(DNS_SERVICE_IP6, DNS_SERVICE_IP)
        else:
            self.etc_file("router", "resolv.conf", RESOLV_CONF)
        self.start_dns()

    def write_resolv_conf(self, *nameservers: str) -> None:
        """The router pod's /etc/resolv.conf as kubelet writes it, naming these nameservers in this order."""
        listed = "".join(f"nameserver {ns}\n" for ns in nameservers)
        text = RESOLV_CONF.replace(f"nameserver {DNS_SERVICE_IP}\n", listed)
        self.etc_file("router", "resolv.conf", text)

    def destroy(self) -> None:
        super().destroy()  # ends dnsmasq (by pid) with the other processes
        self.dns = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def ip(self, role: str, commands: Sequence[str]) -> None:
        """Run iproute2 commands in a lab namespace (one `ip -batch`), failing with ip's own message."""
        result = self.exec(role, ["ip", "-batch", "-"], stdin="\n".join(commands) + "\n", timeout=10)
        if result.returncode != 0:
            raise RuntimeError(f"ip -batch in {self.ns[role]} failed: {result.stderr.strip()}")

    # ------------------------------------------------------------ the topology
    def _lan(self) -> None:
        ports = {"gateway": "p-gateway", "node": "p-node", "node2": "p-node2"}
        commands = ["link set lo up", "link add br0 type bridge forward_delay 0 stp_state 0", "link set br0 up"]
        for role, port in ports.items():
            commands += [f"link add {port} type veth peer name lan0 netns {self.ns[role]}",
                         f"link set {port} master br0", f"link set {port} up"]
        self.ip("lan", commands)
        self.ip("gateway", ["link set lo up", f"link add wan0 type veth peer name wan0 netns {self.ns['dest']}",
                            f"addr add {GATEWAY_LAN_IP}/{LAN_PREFIX} dev lan0", "link set lan0 up",
                            f"addr add {GATEWAY_WAN_IP}/{WAN_PREFIX} dev wan0", "link set wan0 up"])
        self.ip("dest", ["link set lo up", *(f"addr add {ip}/{WAN_PREFIX} dev wan0" for ip in DEST_IPS),
                         "link set wan0 up", f"route add default via {GATEWAY_WAN_IP}"])
        if self.ipv6:
            self.ip("gateway", [f"addr add {GATEWAY_LAN_IP6}/{LAN_PREFIX6} dev lan0 nodad",
                                f"addr add {GATEWAY_LINK_LOCAL}/64 dev lan0 nodad",
                                f"addr add {GATEWAY_WAN_IP6}/{WAN_PREFIX6} dev wan0 nodad"])
            self.ip("dest", [*(f"addr add {ip}/{WAN_PREFIX6} dev wan0 nodad" for ip in DEST_IPS6),
                             f"route add default via {GATEWAY_WAN_IP6}"])

    def _pod(self, role: str, node: str, ip: str) -> None:
        veth = self.node_veth[role]
        gateway = NODE_POD_GATEWAYS[0 if node == "node" else 1]
        commands = ["link set lo up", f"link add eth0 type veth peer name {veth} netns {self.ns[node]}"]
        if self.layout == "calico":
            commands += [f"addr add {ip}/32 dev eth0", "link set eth0 up",
                         f"route add default via {CALICO_GATEWAY} dev eth0 onlink"]
        elif self.layout == "cilium":
            commands += [f"addr add {ip}/32 dev eth0", "link set eth0 up",
                         f"route add {gateway} dev eth0 scope link", f"route add default via {gateway} dev eth0"]
        else:
            commands += [f"addr add {ip}/26 dev eth0", "link set eth0 up", f"route add default via {gateway} dev eth0",
                         f"route add {CLUSTER_CIDR} dev eth0", f"route add {MULTICAST} dev eth0"]
            if role == "router":
                commands.append(f"route add {SERVICE_CIDR} via {gateway} dev eth0")
        self.ip(role, commands)
        if self.ipv6:
            self.ip(role, self._pod6(role, node))

    def _pod6(self, role: str, node: str) -> list[str]:
        ip6 = PODS6[role]
        if self.layout == "calico":
            return [f"addr add {ip6}/128 dev eth0 nodad", f"route add default via {CALICO_GATEWAY6} dev eth0"]
        gateway6 = NODE_POD_GATEWAYS6[0 if node == "node" else 1]
        commands = [f"addr add {ip6}/64 dev eth0 nodad", f"route add default via {gateway6} dev eth0"]
        if role == "router":
            commands.append(f"route add {SERVICE_CIDR6} via {gateway6} dev eth0")
        return commands

    def _node(self, index: int, node: str) -> None:
        own_ip, other_ip = (self.node_ip, self.node2_ip) if index == 0 else (self.node2_ip, self.node_ip)
        own_block, other_block = NODE_POD_CIDRS[index], NODE_POD_CIDRS[1 - index]
        gateway = NODE_POD_GATEWAYS[index]
        commands = ["link set lo up", f"addr add {own_ip}/{self.node_prefix} dev lan0", "link set lan0 up",
                    f"route add default via {self.node_router} dev lan0"]
        pods = [(role, ip) for role, pod_node, ip in PODS if pod_node == node]
        if self.layout == "calico":
            commands += [f"route add blackhole {own_block} proto bird",
                         f"route add {other_block} via {other_ip} dev lan0 proto bird"]
            for role, ip in pods:
                veth = self.node_veth[role]
                commands += [f"link set {veth} address {CALICO_MAC}", f"link set {veth} up",
                             f"route add {ip} dev {veth} scope link"]
        elif self.layout == "cilium":
            commands += ["link add cilium_host type veth peer name cilium_net", "link set cilium_net up",
                         f"addr add {gateway}/32 dev cilium_host", "link set cilium_host up",
                         f"route add {own_block} via {gateway} dev cilium_host src {gateway}",
                         f"route add {other_block} via {other_ip} dev lan0"]
            for role, ip in pods:
                veth = self.node_veth[role]
                commands += [f"link set {veth} up", f"route add {ip} dev {veth} scope link src {gateway}"]
        else:
            commands += ["link add tun0 type bridge forward_delay 0 stp_state 0",
                         f"addr add {gateway}/26 dev tun0", "link set tun0 up",
                         f"route add {other_block} via {other_ip} dev lan0"]
            for role, _ in pods:
                commands += [f"link set {self.node_veth[role]} master tun0", f"link set {self.node_veth[role]} up"]
        if index == 0:
            commands.append(f"addr add {DNS_SERVICE_IP}/32 dev lo")
        if self.ipv6:
            commands = self._node6(index, node, commands)
        self.ip(node, commands)

    def _node6(self, index: int, node: str, commands: list[str]) -> list[str]:
        """The IPv4 commands of a node with the IPv6 ones woven in (a calico veth's link-local before it is up)."""
        own_ip6, other_ip6 = (self.node_ip6, self.node2_ip6) if index == 0 else (self.node2_ip6, self.node_ip6)
        own_block6, other_block6 = NODE_POD_CIDRS6[index], NODE_POD_CIDRS6[1 - index]
        pods = [role for role, pod_node, _ in PODS if pod_node == node]
        woven: list[str] = []
        for command in commands:
            up = next((role for role in pods if command == f"link set {self.node_veth[role]} up"), None)
            if self.layout == "calico" and up is not None:
                # Calico's IPv6 next hop is this address: the kernel would derive it from the MAC as the link
                # comes up (EUI-64); added first and without DAD, it is usable at once
                woven.append(f"addr add {CALICO_GATEWAY6}/64 dev {self.node_veth[up]} nodad")
            woven.append(command)
        bird = " proto bird" if self.layout == "calico" else ""
        woven += [f"addr add {own_ip6}/{self.node_prefix6} dev lan0 nodad",
                  f"route add default via {self.node_router6} dev lan0",
                  f"route add {other_block6} via {other_ip6} dev lan0{bird}"]
        if self.layout == "calico":
            woven.append(f"route add blackhole {own_block6} proto bird")
            woven += [f"route add {PODS6[role]} dev {self.node_veth[role]}" for role in pods]
        else:
            woven.append(f"addr add {NODE_POD_GATEWAYS6[index]}/64 dev tun0 nodad")
        if index == 0:
            woven.append(f"addr add {DNS_SERVICE_IP6}/128 dev lo nodad")
        return woven

    def _node_sysctls(self) -> None:
        for role, node, _ in PODS:
            veth = self.node_veth[role]
            if self.layout == "calico":  # what Calico's CNI plugin and felix set on every cali* interface
                self.sysctl(node, f"net.ipv4.conf.{veth}.proxy_arp", "1")
                self.sysctl(node, f"net.ipv4.neigh.{veth}.proxy_delay", "0")
                self.sysctl(node, f"net.ipv4.conf.{veth}.rp_filter", "1")
        if self.layout == "openshift-sdn":  # OVS carries ARP over the overlay; proxy ARP on tun0 plays that part
            for node in ("node", "node2"):
                self.sysctl(node, "net.ipv4.conf.tun0.proxy_arp", "1")
                self.sysctl(node, "net.ipv4.neigh.tun0.proxy_delay", "0")

    # ------------------------------------------------------------ knobs
    def set_rp_filter(self, value: int, role: str = "router") -> None:
        """Reverse-path filtering in a pod: 0 off, 1 strict, 2 loose, on all, default and every interface."""
        if value not in (0, 1, 2):
            raise ValueError(f"rp_filter is 0, 1 or 2, not {value!r}")
        for name in ("all", "default", *self._interfaces(role)):
            self.sysctl(role, f"net.ipv4.conf.{name}.rp_filter", str(value))

    def rp_filter(self, interface: str = "eth0", role: str = "router") -> int:
        """The effective reverse-path filtering on an interface: the higher of all and the interface's own."""
        return max(int(self.read_sysctl(role, f"net.ipv4.conf.{name}.rp_filter")) for name in ("all", interface))

    def _interfaces(self, role: str) -> list[str]:
        with self.entered(role):
            return sorted(name for name in os.listdir("/proc/sys/net/ipv4/conf") if name not in ("all", "default"))

    def replace_default_route_by_hand(self) -> None:
        """What a router does in essence: EGRESS_SOURCE on macvlan0 and the default route via the LAN gateway."""
        self.ip("router", [f"addr add {SOURCE_IP}/{LAN_PREFIX} dev macvlan0", "link set macvlan0 up",
                           f"route replace default via {GATEWAY_LAN_IP} dev macvlan0"])

    def run_router(self, env: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """egress-router in the router pod, seeing the pod's /etc/resolv.conf (etc=True)."""
        return self.exec("router", router_command(), env=env, timeout=timeout, etc=True)

    # ------------------------------------------------------------ cluster DNS
    def start_dns(self, timeout: float = 5.0) -> subprocess.Popen[str]:
        """dnsmasq on the DNS Service IP in the router's node: DNS_NAMES only, no upstream, no DHCP."""
        self._tmp = tempfile.mkdtemp(prefix=f"egr-{self.suffix}-dns-")
        argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--no-poll", "--bind-interfaces", f"--listen-address={DNS_SERVICE_IP}", "--port=53",
                f"--pid-file={self._tmp}/dnsmasq.pid", f"--dhcp-leasefile={self._tmp}/dnsmasq.leases",
                f"--log-facility={self._tmp}/dnsmasq.log", "--user=root", "--group=root",
                "--local=/example.test/", "--local=/cluster.local/",
                *(f"--host-record={name},{ip}" for name, ip in DNS_NAMES.items())]
        if self.ipv6:  # the IPv6 Service IP too, AAAA records, and each query logged with its client's address
            argv = [arg for arg in argv if not arg.startswith("--host-record=")]
            argv += [f"--listen-address={DNS_SERVICE_IP6}", "--log-queries",
                     *(f"--host-record={name},{ip},{DNS_NAMES6[name]}" for name, ip in DNS_NAMES.items())]
        self.dns = self.spawn("node", argv)
        deadline = time.monotonic() + timeout
        while True:
            if self.dns.poll() is not None:
                _, err = self.dns.communicate(timeout=5)
                raise RuntimeError(f"dnsmasq exited with {self.dns.returncode}: {err.strip()}")
            try:
                if self.query_dns(next(iter(DNS_NAMES)), timeout=0.2) and \
                        (not self.ipv6 or self.query_dns(next(iter(DNS_NAMES)), server=DNS_SERVICE_IP6, timeout=0.2)):
                    return self.dns
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq did not answer on {DNS_SERVICE_IP} within {timeout} s")
            time.sleep(0.05)

    def query_dns(self, name: str, *, role: str = "node", server: str = DNS_SERVICE_IP,
                  timeout: float = 1.0) -> list[str]:
        """The A records of `name`, asked straight from `role` (no resolv.conf); raises OSError/timeout."""
        import dns.exception
        import dns.message
        import dns.query
        import dns.rdatatype

        query = dns.message.make_query(name, dns.rdatatype.A)
        with self.entered(role):
            try:
                answer = dns.query.udp(query, server, timeout=timeout)
            except dns.exception.Timeout as exc:
                raise TimeoutError(f"no answer from {server} for {name} within {timeout} s") from exc
        return [item.address for rrset in answer.answer for item in rrset if rrset.rdtype == dns.rdatatype.A]

    def lookup(self, name: str, *, role: str = "router", timeout: float = 15.0) -> list[str]:
        """`getent ahostsv4 name` in a pod, through its /etc/resolv.conf: the addresses, [] when it fails."""
        try:
            result = self.exec(role, ["getent", "ahostsv4", name], timeout=timeout, etc=True)
        except subprocess.TimeoutExpired:
            return []
        return list(dict.fromkeys(line.split()[0] for line in result.stdout.splitlines() if line.strip()))

    def dns_log(self) -> str:
        if self._tmp is None:
            return ""
        try:
            with open(os.path.join(self._tmp, "dnsmasq.log"), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------ traffic
    def connect(self, ip: str, port: int, *, role: str, source: str | None = None,
                timeout: float = 3.0) -> socket.socket:
        """A TCP connection from `role` (bound to `source` when given; family of `ip`); the caller closes it."""
        with self.entered(role):
            sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def probe_tcp(self, port: int, *, source: str | None = None, role: str = "node", timeout: float = 2.0,
                  version: int = 4) -> None:
        """A kubelet tcpSocket probe of the router pod: raises OSError (or TimeoutError) when it fails.

        From the node's own IP unless `source` says otherwise; "0.0.0.0" lets the kernel choose, as
        kubelet does (the node IP for calico, the cilium_host or tun0 address for cilium and openshift-sdn).
        `version=6`: to the pod's IPv6 address from the node's IPv6 address ("::" lets the kernel choose).
        """
        router, node = (self.router_ip6, self.node_ip6) if version == 6 else (self.router_ip, self.node_ip)
        self.connect(router, port, role=role, source=source or node, timeout=timeout).close()

    def probe_http(self, port: int, path: str = "/healthz", *, source: str | None = None, role: str = "node",
                   timeout: float = 2.0, version: int = 4) -> int:
        """A kubelet httpGet probe of the router pod: the status code (kubelet counts 200-399 as success)."""
        router, node = (self.router_ip6, self.node_ip6) if version == 6 else (self.router_ip, self.node_ip)
        host = f"[{router}]" if version == 6 else router
        with self.connect(router, port, role=role, source=source or node, timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.30\r\n"
                         "Accept: */*\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        status = data.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[1].isdigit():
            raise ConnectionError(f"not an HTTP response: {data[:80]!r}")
        return int(status[1])
