"""The image for real, through the Docker engine: what it contains, each mode in a container, the pod network
checked from inside with testinfra's docker backend, the proxies as an unprivileged user."""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from typing import Any

import pytest

from egress_router import __version__
from egress_router.core.nat import DNAT_CHAIN, SNAT_CHAIN
from egress_router.testinfra_plugin import EgressRouter
from tests.container.conftest import (
    LAN_GATEWAY,
    POD_GATEWAY,
    TOOLS_IMAGE,
    Docker,
    OnlineBuild,
    PodNetwork,
    Services,
    container_ip,
    wait_for_log,
)
from tests.demo_rules import demo_dnat_rules, demo_snat_rules

SOURCE = "192.0.2.99"
DESTINATION = "80 tcp 203.0.113.10\n8080 tcp 203.0.113.11 80\n53 udp 203.0.113.10 5353\n203.0.113.12\n"
ROUTER_ENV = {"EGRESS_SOURCE": f"{SOURCE}/24", "EGRESS_GATEWAY": LAN_GATEWAY, "EGRESS_DESTINATION": DESTINATION}
NET_CAPS = ["NET_ADMIN", "NET_RAW"]
UNPRIVILEGED: dict[str, Any] = {"user": "65534", "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"]}


# ------------------------------------------------------------------ what is in the image

INSPECT = r"""
import importlib.metadata, importlib.util, json, os, shutil, subprocess
tools = ("pip", "pip3", "gcc", "cc", "c++", "ld", "make", "strip")
out = {
    "on_path": [t for t in tools if shutil.which(t)],
    "modules": [m for m in ("pip", "setuptools", "wheel", "ensurepip") if importlib.util.find_spec(m)],
    "iptables": subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip(),
    "backends": [t for t in ("iptables-nft-save", "iptables-nft-restore", "iptables-legacy-save",
                             "iptables-legacy-restore") if shutil.which(t)],
    "uid": os.getuid(),
    "keepalived": subprocess.run(["keepalived", "--version"], capture_output=True, text=True).stderr.split("\n")[0],
    "packages": sorted(d.split("-")[0].lower() for d in os.listdir(next(p for p in __import__("sys").path
                                                                        if p.endswith("site-packages")))
                       if d.endswith(".dist-info")),
    "license": [f.read_text()[:300] for f in importlib.metadata.distribution("egress-router").files or ()
                if f.name == "LICENSE"],
}
print(json.dumps(out))
"""


def test_image_has_no_pip_or_compilers_and_both_iptables_backends(docker_env: Docker, image: str) -> None:
    status, out, err = docker_env.run(image, "inspect", entrypoint=["python3", "-c", INSPECT], network_mode="none")
    assert status == 0, err
    found = json.loads(out)
    assert found["on_path"] == [] and found["modules"] == []
    assert "nf_tables" in found["iptables"]  # nft is the default backend
    assert len(found["backends"]) == 4
    assert found["uid"] == 0  # root by default: the redirect modes change the pod's network
    assert found["keepalived"].startswith("Keepalived v2."), found  # high availability runs it; it loads
    assert {"egress_router", "pyroute2", "click", "httptools", "uvloop", "dnspython", "pyyaml"} <= set(
        found["packages"])
    config = docker_env.client.images.get(image).attrs["Config"]
    assert config["Entrypoint"] == ["egress-router"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9253/tcp"}  # the HTTP proxy's and the admin port
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "egress-router"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert len(found["license"]) == 1 and found["license"][0].split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert {"org.opencontainers.image.description", "org.opencontainers.image.source"} <= set(labels)
    size = docker_env.client.images.get(image).attrs["Size"]
    # 158 MB: ~20 of them keepalived's (high availability) with what it links (net-snmp, libperl's library,
    # glib) and iproute2, which it needs; Perl's modules and the SNMP MIBs are left out
    assert size < 165_000_000, f"{size / 1e6:.0f} MB"


UNIT_TEST_ENV = {"EGRESS_ROUTER_MODE": "unit-test", "EGRESS_SOURCE": "1.2.3.4", "EGRESS_GATEWAY": "1.1.1.1",
                 "EGRESS_DESTINATION": "80 tcp 10.4.5.6\n8080 tcp 10.7.8.9 80\n10.1.2.3"}
UNIT_TEST_RULES = [
    "-A PREROUTING -i eth0 -p tcp --dport 80 -j DNAT --to-destination 10.4.5.6",
    "-A PREROUTING -i eth0 -p tcp --dport 8080 -j DNAT --to-destination 10.7.8.9:80",
    "-A PREROUTING -i eth0 -j DNAT --to-destination 10.1.2.3",
    "-A POSTROUTING -j SNAT --to-source 1.2.3.4",
]


def test_unit_test_mode_prints_the_legacy_rules_unprivileged(docker_env: Docker, image: str) -> None:
    status, out, err = docker_env.run(image, "unit-test", environment=UNIT_TEST_ENV, network_mode="none",
                                      **UNPRIVILEGED)
    assert (status, err) == (0, "")
    assert out.splitlines() == UNIT_TEST_RULES


# ------------------------------------------------------------------ the usual build: online, without a wheelhouse

FIND_FILE = r"""
import hashlib, os, sys
size, digest = int(sys.argv[1]), sys.argv[2]
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(top, name)
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == size:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    print(path)
"""


def test_the_usual_docker_build_works_online_without_a_wheelhouse(docker_env: Docker,
                                                                  online_image: OnlineBuild) -> None:
    """`docker build -t TAG .` of a checkout (no build/wheelhouse, no build argument): the public Debian base,
    python3 and iptables from apt, the Python packages from the index; an image like the offline one."""
    tag = online_image.tag
    assert "builder: online, from the package index" in online_image.log
    status, out, err = docker_env.run(tag, "online-version", command=["--version"], network_mode="none")
    assert (status, out, err) == (0, f"egress-router, version {__version__}\n", "")
    status, out, err = docker_env.run(tag, "online-unit-test", environment=UNIT_TEST_ENV, network_mode="none",
                                      **UNPRIVILEGED)
    assert (status, err) == (0, "")
    assert out.splitlines() == UNIT_TEST_RULES
    status, out, err = docker_env.run(tag, "online-inspect", entrypoint=["python3", "-c", INSPECT],
                                      network_mode="none")
    assert status == 0, err
    found = json.loads(out)
    assert found["on_path"] == [] and found["modules"] == []
    assert "nf_tables" in found["iptables"] and len(found["backends"]) == 4
    assert {"egress_router", "pyroute2", "click", "httptools", "uvloop", "dnspython", "pyyaml"} <= set(
        found["packages"])
    config = docker_env.client.images.get(tag).attrs["Config"]
    assert config["Entrypoint"] == ["egress-router"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9253/tcp"}  # the HTTP proxy's and the admin port
    # The host's CA bundle stayed in the builder: no file of the image has its content. The probe copy,
    # mounted for this run only, shows that the search finds it where it is.
    bundle = online_image.ca_bundle.read_bytes()
    probe = "/run/probe/index-ca.crt"
    status, out, err = docker_env.run(tag, "online-ca", entrypoint=["python3", "-c", FIND_FILE, str(len(bundle)),
                                                                    hashlib.sha256(bundle).hexdigest()],
                                      network_mode="none",
                                      volumes={str(online_image.ca_bundle): {"bind": probe, "mode": "ro"}})
    assert (status, out.splitlines(), err) == (0, [probe], "")
    # The offline image is 158 MB; the public base's glibc charset modules (9 MB), which the local base leaves
    # out, make most of the difference.
    size = docker_env.client.images.get(tag).attrs["Size"]
    assert size < 175_000_000, f"{size / 1e6:.0f} MB"


def test_invalid_configuration_exits_1_with_one_line_and_no_traceback(docker_env: Docker, image: str) -> None:
    env = {**ROUTER_ENV, "EGRESS_DESTINATION": "80 tcp 203.0.113.10\n8080 tcp 10.0.0\n", "EGRESS_ROUTER_MODE": "init"}
    status, out, err = docker_env.run(image, "invalid", environment=env, network_mode="none", cap_add=NET_CAPS)
    assert status == 1
    assert out == ""
    assert err.splitlines() == ["error: EGRESS_DESTINATION line 2: '8080 tcp 10.0.0': '10.0.0' is not an IPv4 address"]


# ------------------------------------------------------------------ the redirect modes in a pod network namespace

def test_init_configures_the_pod_and_testinfra_sees_it(docker_env: Docker, image: str, pod: PodNetwork,
                                                       egress_router: EgressRouter) -> None:
    import testinfra

    env = {**ROUTER_ENV, "EGRESS_ROUTER_MODE": "init"}
    status, _, err = docker_env.run(image, "init", environment=env, network_mode=pod.network_mode, cap_add=NET_CAPS)
    assert status == 0, err
    assert "using eth1, the only macvlan interface" in err
    assert "Ready: 192.0.2.99/24 on eth1 via 192.0.2.1, 5 NAT rules" in err
    assert "Traceback" not in err
    host = testinfra.get_host(f"docker://{pod.pause.id}")
    assert host.iptables.rules("nat", DNAT_CHAIN) == demo_dnat_rules()
    assert host.iptables.rules("nat", SNAT_CHAIN) == demo_snat_rules("eth1", SOURCE)
    assert f"-A PREROUTING -j {DNAT_CHAIN}" in host.iptables.rules("nat", "PREROUTING")
    assert f"-A POSTROUTING -j {SNAT_CHAIN}" in host.iptables.rules("nat", "POSTROUTING")
    egress_router.assert_nat_rules(env, interface="eth1", host=host)  # the plugin's check, from the plan
    # the pod side keeps its cluster address; the macvlan interface has the reserved one
    assert container_ip(pod.pause, pod.pod_net) in host.interface("eth0").addresses
    macvlan = host.interface("eth1")
    assert SOURCE in macvlan.addresses
    assert container_ip(pod.pause, pod.lan_net) in macvlan.addresses  # what docker assigned stays
    routes = {(r["dst"], r.get("gateway")) for r in macvlan.routes()}
    assert ("default", LAN_GATEWAY) in routes
    assert (LAN_GATEWAY, None) in routes
    defaults = [r for r in host.interface("eth0").routes() if r["dst"] == "default"]
    assert defaults == []  # the cluster default route via POD_GATEWAY was replaced
    assert POD_GATEWAY not in host.run("ip route show default").stdout
    assert host.run("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def debug_container(docker_env: Docker, image: str, pod: PodNetwork, role: str, **options: Any) -> Any:
    """Our image beside a pod whose router has exited, sharing its network namespace: what `kubectl debug` adds
    to a redirect pod (an init container and a pause container) as an ephemeral container."""
    return docker_env.start(image, role, entrypoint=["sleep", "infinity"], network_mode=pod.network_mode, **options)


def test_verify_through_the_plugin_in_a_debug_container_after_init(docker_env: Docker, image: str, pod: PodNetwork,
                                                                  egress_router: EgressRouter) -> None:
    """The redirect pod's router ran as an init container; a debug container with our image asserts its state
    (the docker:// host), fails readably once the state drifts, and passes again once init has run again."""
    import testinfra

    env = {**ROUTER_ENV, "EGRESS_ROUTER_MODE": "init"}
    status, _, err = docker_env.run(image, "init-verify", environment=env, network_mode=pod.network_mode,
                                    cap_add=NET_CAPS)
    assert status == 0, err
    debug = testinfra.get_host(f"docker://{debug_container(docker_env, image, pod, 'debug', cap_add=NET_CAPS).id}")
    state = egress_router.assert_converged(env, host=debug)
    assert state.summary == "converged: all 10 steps hold (init mode: 192.0.2.99/24 on eth1 via 192.0.2.1, 5 NAT rules)"
    pause = testinfra.get_host(f"docker://{pod.pause.id}")  # the tools image: ip and iptables
    assert pause.run(f"iptables -t nat -D PREROUTING -j {DNAT_CHAIN} && ip route del default").rc == 0
    try:
        with pytest.raises(AssertionError) as failed:
            egress_router.assert_converged(env, host=debug)
        assert str(failed.value).splitlines() == [
            f"egress router on docker://{debug.backend.name} is not as configured: not converged: 2 of 10 steps do "
            "not hold (init mode: 192.0.2.99/24 on eth1 via 192.0.2.1, 5 NAT rules)",
            f"  missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}",
            f"  missing: ip route replace default via {LAN_GATEWAY} dev eth1",
        ]
        # the text form, as a person runs it in the debug container: exit 1, one line per difference
        text = debug.run("egress-router verify " + " ".join(
            f"--{flag}={shlex.quote(env[name])}" for flag, name in (("source", "EGRESS_SOURCE"),
                                                                     ("gateway", "EGRESS_GATEWAY"),
                                                                     ("destination", "EGRESS_DESTINATION"),
                                                                     ("mode", "EGRESS_ROUTER_MODE"))))
        assert text.rc == 1 and text.stdout.splitlines()[:2] == [
            f"missing: iptables -t nat -A PREROUTING -j {DNAT_CHAIN}", f"missing: ip route replace default via "
            f"{LAN_GATEWAY} dev eth1"], text.stdout + text.stderr
    finally:
        status, _, err = docker_env.run(image, "init-again", environment=env, network_mode=pod.network_mode,
                                        cap_add=NET_CAPS)
        assert status == 0, err
    egress_router.assert_converged(env, host=debug)


def test_verify_without_net_admin_cannot_tell(docker_env: Docker, image: str, pod: PodNetwork) -> None:
    env = {**ROUTER_ENV, "EGRESS_ROUTER_MODE": "init"}
    status, out, err = docker_env.run(image, "verify-nocaps", command=["verify"], environment=env,
                                      network_mode=pod.network_mode, cap_drop=["NET_ADMIN"])
    assert (status, out) == (2, "")
    assert err.startswith("error: cannot read the iptables rules without the NET_ADMIN capability"), err


def test_legacy_mode_stays_up_and_stops_promptly_on_docker_stop(docker_env: Docker, image: str,
                                                                 pod: PodNetwork, egress_router: EgressRouter) -> None:
    import testinfra

    router = docker_env.start(image, "legacy", environment={**ROUTER_ENV, "EGRESS_ROUTER_MODE": "legacy"},
                              network_mode=pod.network_mode, cap_add=NET_CAPS)
    wait_for_log(router, "Ready:")
    # the long-running router container answers for itself, with its own environment (as an exec probe does);
    # 10 steps: Docker's nameserver is on loopback (127.0.0.11), so there is no route to a nameserver
    state = egress_router.assert_converged(host=testinfra.get_host(f"docker://{router.id}"))
    assert state.summary.startswith("converged: all 10 steps hold (legacy mode: ")
    probe = router.exec_run(["egress-router", "verify"])
    assert probe.exit_code == 0 and probe.output.decode().startswith("converged: "), probe.output
    router.reload()
    assert router.status == "running"
    started = time.monotonic()
    router.stop(timeout=10)
    took = time.monotonic() - started
    assert router.wait(timeout=10)["StatusCode"] == 0
    assert took < 2.0, f"docker stop took {took:.2f} s"
    log = router.logs().decode()
    assert "Received SIGTERM; exiting" in log and "Traceback" not in log


# ------------------------------------------------------------------ the proxies, unprivileged

CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
proxy, urls = sys.argv[1], sys.argv[2:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy} if proxy else {}))
results, deadline = [], time.monotonic() + 20
for url in urls:
    while True:
        try:
            with opener.open(url, timeout=5) as response:
                results.append([response.status, response.read().decode()])
            break
        except urllib.error.HTTPError as exc:
            results.append([exc.code, exc.read().decode()])
            break
        except OSError:  # the proxy is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
print(json.dumps(results))
"""
def fetch(docker_env: Docker, net: Any, proxy: str, *urls: str) -> list[list[Any]]:
    status, out, err = docker_env.run(TOOLS_IMAGE, "client", command=["python3", "-c", CLIENT, proxy, *urls],
                                      network=net.name)
    assert status == 0, err
    return list(json.loads(out))


def assert_unprivileged(container: Any) -> None:
    """Every process of the container runs as uid 65534 with no capabilities (read on the host, by pid)."""
    top = container.top(ps_args="-o pid")
    pids = [int(row[0]) for row in top["Processes"]]
    assert pids
    for pid in pids:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        assert fields["Uid"].split() == ["65534"] * 4
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0


def stop_cleanly(container: Any) -> str:
    container.stop(timeout=10)
    assert container.wait(timeout=10)["StatusCode"] == 0
    log = str(container.logs().decode())
    assert "Traceback" not in log
    return log


def test_http_proxy_as_nobody_without_capabilities(docker_env: Docker, image: str, services: Services) -> None:
    net, origin = services.net, services.origin
    env = {"EGRESS_HTTP_PROXY_DESTINATION": f"{origin}\n", "EGRESS_HTTP_PROXY_WORKERS": "1",
           "EGRESS_HTTP_PROXY_ACCESS_LOG": "1"}
    proxy = docker_env.start(image, "http-proxy", environment=env, network=net.name, **UNPRIVILEGED)
    proxy_url = f"http://{container_ip(proxy, net)}:8080"
    results = fetch(docker_env, net, proxy_url, f"http://{origin}:8000/hello.txt", "http://203.0.113.77:8000/x")
    assert results[0] == [200, "hello from the origin\n"]
    assert results[1][0] == 403
    admin = fetch(docker_env, net, "", f"http://{container_ip(proxy, net)}:9253/metrics",
                  f"http://{container_ip(proxy, net)}:9253/ready")
    assert admin[0][0] == 200 and 'mode="http-proxy"} 1\n' in admin[0][1], admin
    assert 'egress_router_http_requests_total{verdict="denied"} 1\n' in admin[0][1], admin
    assert admin[1] == [200, "ok\n"]
    assert_unprivileged(proxy)
    log = stop_cleanly(proxy)
    assert " allowed 200 " in log and " denied 403 " in log, log


def test_dns_proxy_as_nobody_without_capabilities(docker_env: Docker, image: str, services: Services) -> None:
    net, origin = services.net, services.origin
    env = {"EGRESS_DNS_PROXY_DESTINATION": f"8000 {origin}\n9000 {origin} 8000\n", "EGRESS_DNS_PROXY_WORKERS": "1"}
    proxy = docker_env.start(image, "dns-proxy", environment=env, network=net.name, **UNPRIVILEGED)
    address = container_ip(proxy, net)
    results = fetch(docker_env, net, "", f"http://{address}:8000/hello.txt", f"http://{address}:9000/hello.txt")
    assert results == [[200, "hello from the origin\n"]] * 2
    admin = fetch(docker_env, net, "", f"http://{address}:9253/metrics", f"http://{address}:9253/healthz")
    assert admin[0][0] == 200 and 'mode="dns-proxy"} 1\n' in admin[0][1], admin
    assert admin[1] == [200, "ok\n"]
    assert_unprivileged(proxy)
    log = stop_cleanly(proxy)
    assert f"Forwarding port 9000 to {origin}" in log, log
