"""Container fixtures: the Docker engine, the image built from the Containerfile, per-run networks and containers.

Everything the tests create is named `egr-<run id>-<role>` (host links `egr<run id><letter>`), labelled
`egress-router-test=<run id>`, and removed at the end, also when a test fails: containers, networks,
the host veth a macvlan network hangs on, and the image with the build's intermediate images.
The engine must not touch the host's network (scripts/dockerd starts it so); the networks use
documentation addresses only. No engine reachable at all: the tests skip, saying why (CI fails them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LABEL = "egress-router-test"
BASE_IMAGE = os.environ.get("EGRESS_ROUTER_BASE_IMAGE", "egress-router-base:bookworm")
TOOLS_IMAGE = os.environ.get("EGRESS_ROUTER_TOOLS_IMAGE", "egress-router-tools:bookworm")
PLAIN_IMAGE = os.environ.get("EGRESS_ROUTER_PLAIN_IMAGE", "egress-router-plain:bookworm")
PUBLIC_BASE = "debian:bookworm-slim"  # the Containerfile's default BASE
POD_SUBNET, POD_GATEWAY = "198.51.100.0/24", "198.51.100.1"
LAN_SUBNET, LAN_GATEWAY, LAN_DOCKER_RANGE = "192.0.2.0/24", "192.0.2.1", "192.0.2.128/25"
SERVICE_SUBNET, SERVICE_GATEWAY = "203.0.113.0/24", "203.0.113.1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/container/" in str(item.path):
            item.add_marker(pytest.mark.container)


@dataclass
class Docker:
    """The engine, this run's id, and everything created through it (removed by cleanup, newest first)."""

    client: Any
    run_id: str = field(default_factory=lambda: f"{os.getpid() % 100000}{secrets.token_hex(2)}")
    _undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def name(self, role: str) -> str:
        return f"egr-{self.run_id}-{role}"

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.run_id}

    def created(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def cleanup(self) -> list[str]:
        """Undo everything in reverse order; returns what could not be removed."""
        failures = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep going: one leftover must not leave the others behind
                failures.append(f"{what}: {exc}")
        return failures

    # ------------------------------------------------------------ containers
    def create(self, image: str, role: str, **options: Any) -> Any:
        """A container (not started); removed (forcibly) at cleanup."""
        from docker.errors import NotFound

        container = self.client.containers.create(image, name=self.name(role), labels=self.labels, **options)

        def remove() -> None:
            with contextlib.suppress(NotFound):  # run() removes its containers itself
                container.remove(force=True, v=True)

        self.created(f"container {container.name}", remove)
        return container

    def start(self, image: str, role: str, **options: Any) -> Any:
        container = self.create(image, role, **options)
        container.start()
        return container

    def run(self, image: str, role: str, timeout: float = 60, **options: Any) -> tuple[int, str, str]:
        """Run a container to its end: (exit status, stdout, stderr); the container is removed at once."""
        container = self.create(image, role, **options)
        try:
            container.start()
            status = container.wait(timeout=timeout)["StatusCode"]
            out = container.logs(stdout=True, stderr=False).decode()
            err = container.logs(stdout=False, stderr=True).decode()
        finally:
            container.remove(force=True, v=True)
        return status, out, err

    # ------------------------------------------------------------ networks
    def network(self, role: str, subnet: str, gateway: str, *, driver: str = "bridge", ip_range: str | None = None,
                options: dict[str, str] | None = None) -> Any:
        from docker.types import IPAMConfig, IPAMPool

        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=subnet, gateway=gateway, iprange=ip_range)])
        net = self.client.networks.create(self.name(role), driver=driver, ipam=ipam, options=options or {},
                                          labels=self.labels)
        self.created(f"network {net.name}", net.remove)
        return net

    def host_veth(self, letter: str) -> str:
        """A veth pair on the host, both ends up, attached to nothing: a parent for a macvlan network."""
        name, peer = f"egr{self.run_id}{letter}", f"egr{self.run_id}{letter}p"
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
        self.created(f"host link {name}", lambda: subprocess.run(["ip", "link", "del", name], check=True))
        for link in (name, peer):
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        return name


def container_ip(container: Any, network: Any) -> str:
    container.reload()
    return str(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def wait_for_log(container: Any, text: str, timeout: float = 20) -> str:
    """Poll the container's log until `text` appears; fail with the log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while True:
        log = container.logs().decode()
        if text in log:
            return log
        container.reload()
        if container.status not in ("created", "running") or time.monotonic() > deadline:
            pytest.fail(f"{container.name} ({container.status}) did not log {text!r} within {timeout} s:\n{log}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def docker_env() -> Iterator[Docker]:
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        pytest.skip("the docker package is not installed (pip install -e '.[test]')")
    try:
        client = docker.from_env(version="auto", timeout=180)
        client.ping()
    except DockerException as exc:
        pytest.skip(f"no Docker engine reachable ({exc}); start one with `sudo scripts/dockerd start`")
    env = Docker(client)
    try:
        yield env
    finally:
        failures = env.cleanup()
        client.close()
        if failures:
            pytest.fail("could not remove: " + "; ".join(failures))


def ensure_base_images(docker_env: Docker) -> None:
    """The locally made base images (scripts/container-base is idempotent and quick when they exist), the plain
    one too: made before any build starts, so that no build's clean-up takes it for one of its own images."""
    from docker.errors import ImageNotFound

    for images, flags in (((BASE_IMAGE, TOOLS_IMAGE), []), ((PLAIN_IMAGE,), ["--plain"])):
        try:
            for name in images:
                docker_env.client.images.get(name)
        except ImageNotFound:
            done = subprocess.run([str(REPO / "scripts" / "container-base"), *flags], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"scripts/container-base {' '.join(flags)} failed:\n{done.stderr}")


@pytest.fixture(scope="session")
def image(docker_env: Docker) -> Iterator[str]:
    """The image under test: EGRESS_ROUTER_TEST_IMAGE if set (kept), else built now from the Containerfile
    (offline: the local base, the wheelhouse scripts/build-image prepares, no network) and removed at the end."""
    from egress_router import __version__

    given = os.environ.get("EGRESS_ROUTER_TEST_IMAGE")
    ensure_base_images(docker_env)
    if given:
        docker_env.client.images.get(given)
        yield given
        return
    wheels = subprocess.run([str(REPO / "scripts" / "build-image"), "--wheels-only"], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    if wheels.returncode != 0:
        pytest.fail(f"scripts/build-image --wheels-only failed:\n{wheels.stderr}")
    tag = f"egress-router-test:{docker_env.run_id}"
    before = {img.id for img in docker_env.client.images.list(all=True)}

    def remove_build() -> None:
        # the image, then the build's intermediate images (the builder stage) that were not there before
        docker_env.client.images.remove(tag, force=True)
        left = [img for img in docker_env.client.images.list(all=True) if img.id not in before]
        for img in sorted(left, key=lambda i: i.attrs["Created"], reverse=True):
            with contextlib.suppress(Exception):
                docker_env.client.images.remove(img.id, force=True, noprune=False)

    started = time.monotonic()
    try:
        _, log = docker_env.client.images.build(path=str(REPO), dockerfile="Containerfile", tag=tag, rm=True,
                                                forcerm=True, network_mode="none", labels=docker_env.labels,
                                                buildargs={"BASE": BASE_IMAGE, "VERSION": __version__,
                                                           "SOURCE": "test"})
    except Exception:
        remove_build()
        raise
    docker_env.created(f"image {tag}", remove_build)
    output = "".join(str(chunk.get("stream", "")) for chunk in log)
    if "builder: offline, from the wheelhouse in the build context" not in output:
        pytest.fail(f"the offline build did not take the wheelhouse:\n{output}")
    sys.stderr.write(f"\nbuilt {tag} in {time.monotonic() - started:.1f} s\n")
    yield tag


# What a failed download looks like in pip's and apt's output: only such a failure is tried again.
NETWORK_FAILURES = ("No route to host", "Connection reset", "Connection refused", "timed out", "Temporary failure",
                    "Max retries exceeded", "Could not fetch URL", "Failed to fetch", "Unable to connect")
ONLINE_ATTEMPTS = 3


@dataclass(frozen=True)
class OnlineBuild:
    tag: str
    log: str  # the last attempt's output (stdout and stderr of `docker build`)
    ca_bundle: Path  # the host's CA certificates, handed to the builder in build/index-ca.crt


def checkout_context(destination: Path) -> None:
    """The build context as a fresh clone has it: git's tracked and untracked-but-not-ignored files, so no build/."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a deleted but still tracked file is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


@pytest.fixture(scope="session")
def online_image(docker_env: Docker, tmp_path_factory: pytest.TempPathFactory) -> OnlineBuild:
    """The image built the usual way, `docker build -t TAG .` with the docker CLI and no build argument, from a
    checkout without build/wheelhouse: the public base and the package index. The base is PUBLIC_BASE if the
    engine has it (pulled), else the local plain Debian (scripts/container-base --plain) tagged so for the run;
    the network is the host's where the engine has no bridge network (scripts/dockerd). The host's CA bundle goes
    to build/index-ca.crt (TLS to the index may be inspected by a proxy that only the host trusts)."""
    from docker.errors import ImageNotFound

    ensure_base_images(docker_env)
    plain = docker_env.client.images.get(PLAIN_IMAGE)
    try:
        ours = docker_env.client.images.get(PUBLIC_BASE).id == plain.id  # left by an interrupted run
    except ImageNotFound:
        ours = True
    if ours:
        plain.tag(PUBLIC_BASE)
        docker_env.created(f"tag {PUBLIC_BASE}", lambda: docker_env.client.images.remove(PUBLIC_BASE, noprune=True))
    context = tmp_path_factory.mktemp("checkout")
    checkout_context(context)
    assert not (context / "build").exists()
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt").resolve()
    (context / "build").mkdir()
    shutil.copyfile(bundle, context / "build" / "index-ca.crt")
    tag = f"egress-router-online-test:{docker_env.run_id}"
    bridged = any(net.name == "bridge" for net in docker_env.client.networks.list())
    command = ["docker", "build", "-t", tag, *([] if bridged else ["--network", "host"]), "."]
    images = {img.id for img in docker_env.client.images.list(all=True)}
    containers = {c.id for c in docker_env.client.containers.list(all=True)}

    def remove_build() -> None:
        # the image, the intermediate images and (after a failed step) containers the build left
        with contextlib.suppress(ImageNotFound):
            docker_env.client.images.remove(tag, force=True)
        for container in docker_env.client.containers.list(all=True):
            if container.id not in containers:
                container.remove(force=True)
        left = [img for img in docker_env.client.images.list(all=True) if img.id not in images]
        for img in sorted(left, key=lambda i: i.attrs["Created"], reverse=True):
            with contextlib.suppress(Exception):
                docker_env.client.images.remove(img.id, force=True, noprune=False)

    docker_env.created(f"image {tag}", remove_build)
    started = time.monotonic()
    for attempt in range(1, ONLINE_ATTEMPTS + 1):
        done = subprocess.run(command, cwd=context, capture_output=True, text=True, timeout=600)
        log = done.stdout + done.stderr
        if done.returncode == 0:
            break
        if attempt == ONLINE_ATTEMPTS or not any(failure in log for failure in NETWORK_FAILURES):
            pytest.fail(f"{' '.join(command)} failed (attempt {attempt}):\n{log}")
        sys.stderr.write(f"\n{' '.join(command)}: a download failed (attempt {attempt}); trying again\n")
    sys.stderr.write(f"\nbuilt {tag} the usual way in {time.monotonic() - started:.1f} s\n")
    return OnlineBuild(tag, log, bundle)


@dataclass(frozen=True)
class PodNetwork:
    """A pod network namespace held by a long-lived "pause" container from the tools image (iproute2,
    iptables): eth0 on a bridge network (the cluster side), a macvlan interface on a macvlan network
    whose parent is a host veth made for this run (the node's LAN)."""

    pause: Any
    pod_net: Any
    lan_net: Any

    @property
    def network_mode(self) -> str:
        return f"container:{self.pause.id}"


@pytest.fixture(scope="session")
def pod(docker_env: Docker, image: str) -> PodNetwork:
    # Docker numbers a container's interfaces in the order of its networks' names: a- before b- makes
    # the pod network eth0, as the cluster network is in a pod, and the macvlan eth1 (Multus: net1).
    pod_net = docker_env.network("a-pod", POD_SUBNET, POD_GATEWAY,
                                 options={"com.docker.network.bridge.name": f"egr{docker_env.run_id}b"})
    parent = docker_env.host_veth("l")
    lan_net = docker_env.network("b-lan", LAN_SUBNET, LAN_GATEWAY, driver="macvlan", ip_range=LAN_DOCKER_RANGE,
                                 options={"parent": parent, "macvlan_mode": "bridge"})
    # Forwarding on for the pod, as a cluster sets the sysctl (the router's /proc/sys is read-only);
    # NET_ADMIN only so that testinfra can read the nat table from inside (iptables -S needs it).
    pause = docker_env.create(TOOLS_IMAGE, "pause", command=["sleep", "infinity"], network=pod_net.name,
                              sysctls={"net.ipv4.ip_forward": "1"}, cap_add=["NET_ADMIN"])
    lan_net.connect(pause)
    pause.start()
    return PodNetwork(pause, pod_net, lan_net)


ORIGIN = ("mkdir -p /srv && echo 'hello from the origin' >/srv/hello.txt && "
          "exec python3 -m http.server 8000 --bind 0.0.0.0 --directory /srv")


@dataclass(frozen=True)
class Services:
    """A bridge network for the proxy tests (its host bridge named for this run) and an HTTP origin on it."""

    net: Any
    origin: str  # the origin's address; it serves /hello.txt on port 8000


@pytest.fixture(scope="session")
def services(docker_env: Docker) -> Services:
    net = docker_env.network("svc", SERVICE_SUBNET, SERVICE_GATEWAY,
                             options={"com.docker.network.bridge.name": f"egr{docker_env.run_id}s"})
    origin = docker_env.start(TOOLS_IMAGE, "origin", command=["sh", "-c", ORIGIN], network=net.name)
    return Services(net, container_ip(origin, net))
