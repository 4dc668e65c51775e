"""The HTTP proxy with real clients in the client namespace, as a cluster's pods use it: apt-get fetching a small
trusted repository, git cloning over dumb HTTP and Python's `requests` keeping one connection alive for many
GETs. Every client is pointed at the proxy by its own proxy setting; the files come from `python -m http.server`
in the destination namespace (mirror.example.net, 203.0.113.11, behind the gateway), and a proxy whose allow list
leaves that name out must refuse each client. Nothing of the machine's own apt or git configuration is read or
written: every client runs with a private configuration inside the test's tmp_path."""

# ruff: noqa: F811 (the tests take the imported fixtures by their names)

from __future__ import annotations

import email.utils
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from egress_router.lab import ROUTER_POD_IP, SOURCE_IP, Lab
from tests.lab.httpserver import serving
from tests.lab.origin import Origin
from tests.lab.test_http_proxy import (  # noqa: F401 (start_proxy: the fixture)
    ACCESS_LINE,
    API,
    HOSTS,
    PORT,
    Proxy,
    StartProxy,
    configure_network,
    eventually,
    scrape,
    start_proxy,
)

MIRROR, MIRROR_IP = "mirror.example.net", API  # the file server's name, in the router namespace's hosts file
DENYING_PORT = PORT + 1  # a second proxy whose allow list does not have MIRROR
CLIENT_TIMEOUT = 60.0  # no client command may take longer (each normally takes well under a second)
SERVER_LOG = re.compile(r'^(?P<peer>\S+) - - \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/1\.[01]" '
                        r'(?P<status>\d{3}) ')
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Lab Author", "GIT_AUTHOR_EMAIL": "author@example.com",
                "GIT_COMMITTER_NAME": "Lab Committer", "GIT_COMMITTER_EMAIL": "committer@example.com"}


# ------------------------------------------------------------------ the file server (destination namespace)

@dataclass
class FileServer:
    """`python -m http.server` (HTTP/1.1) serving `root` on MIRROR_IP:port; its request log in `log`."""

    root: Path
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"http://{MIRROR}:{self.port}/{path.lstrip('/')}"

    def requests(self) -> list[re.Match[str]]:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return [m for line in text.splitlines() if (m := SERVER_LOG.match(line))]


def free_port(lab: Lab, role: str, ip: str) -> int:
    with lab.entered(role), socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def file_server(lab: Lab, tmp_path: Path) -> Iterator[FileServer]:
    root, log = tmp_path / "www", tmp_path / "http.server.log"
    root.mkdir()
    port = free_port(lab, "dest", MIRROR_IP)
    try:
        with serving(lab, "dest", MIRROR_IP, port, root, log):
            yield FileServer(root, port, log)
    finally:
        print(f"--- http.server log:\n{log.read_text(errors='replace')}")


# ------------------------------------------------------------------ the proxies and the clients

def start_proxies(lab: Lab, start_proxy: StartProxy) -> tuple[Proxy, Proxy]:
    """The network set up once, then two proxy-only processes: one allowing MIRROR (PORT), one not (DENYING_PORT).

    The denying one allows api.example.com, a name for the same address: MIRROR is refused by its name."""
    lab.etc_file("router", "hosts", HOSTS + f"{MIRROR_IP} {MIRROR}\n")  # before the proxies start, as they read it
    configure_network(lab)
    allowing = start_proxy(f"{MIRROR}\nwww.example.com", network=False, port=PORT, wait=False)
    denying = start_proxy("www.example.com\napi.example.com", network=False, port=DENYING_PORT, wait=False)
    for proxy in (allowing, denying):
        proxy.wait_ready()
    return allowing, denying


def proxy_url(port: int) -> str:
    return f"http://{ROUTER_POD_IP}:{port}"


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A small environment: no proxy variables, no EGRESS_*, a HOME of the test's own."""
    home.mkdir(exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(home), "LC_ALL": "C.UTF-8",
            **extra}


def in_client(lab: Lab, argv: Sequence[str], env: dict[str, str], *, cwd: Path | None = None,
              timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """A command in the client namespace (the pod beside the router), waited for at most `timeout` seconds."""
    return subprocess.run([*lab.enter_argv("client"), *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def local(argv: Sequence[str], env: dict[str, str], *, cwd: Path | None = None) -> str:
    """A preparation step in the test's own namespace, without the network (dpkg-deb, local git)."""
    result = subprocess.run(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(argv)} exited with {result.returncode}:\n{result.stderr}"
    return result.stdout


def mirror_lines(proxy: Proxy) -> list[re.Match[str]]:
    """The proxy's access-log lines for requests to MIRROR."""
    return [m for line in proxy.lines() if (m := ACCESS_LINE.search(line)) and MIRROR in m["target"]]


def allowed_count(lab: Lab, port: int) -> float:
    return scrape(lab, port)['egress_router_http_requests_total{verdict="allowed"}']


def denied_count(lab: Lab, port: int) -> float:
    return scrape(lab, port)['egress_router_http_requests_total{verdict="denied"}']


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def require_tool(name: str) -> None:
    """A client the test needs: missing is a failure (CI reports skips as failures anyway), with the fix."""
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: this test runs the real {name} through the proxy "
                    f"(apt-get install {name})")


# ------------------------------------------------------------------ 1. apt-get update and download

PACKAGES = {"egr-lab-tools": 300_000, "egr-lab-data": 450_000}  # name -> random payload bytes


def build_deb(work: Path, name: str, size: int) -> Path:
    tree = work / f"{name}-tree"
    payload = tree / "usr" / "share" / name / "payload.bin"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(random.Random(name).randbytes(size))
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: Lab <lab@example.com>\n"
        f"Installed-Size: {size // 1024 + 1}\nDescription: egress-router lab package\n random payload of {size}"
        " bytes, fetched through the proxy\n", encoding="utf-8")
    deb = work / f"{name}_1.0-1_all.deb"
    local(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)], client_env(work / "home"))
    return deb


def write_repository(repo: Path, debs: Sequence[Path]) -> None:
    """A flat repository: the .debs, Packages (and .gz) and an unsigned Release listing their hashes."""
    repo.mkdir(parents=True)
    stanzas = []
    for deb in debs:
        shutil.copy(deb, repo / deb.name)
        name = deb.name.split("_", 1)[0]
        stanzas.append(f"Package: {name}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: Lab <lab@example.com>\n"
                       f"Filename: ./{deb.name}\nSize: {deb.stat().st_size}\nSHA256: {sha256_file(deb)}\n"
                       "Description: egress-router lab package\n")
    packages = "\n".join(stanzas).encode()
    (repo / "Packages").write_bytes(packages)
    (repo / "Packages.gz").write_bytes(gzip.compress(packages, mtime=0))
    sums = "".join(f" {sha256_file(repo / index)} {(repo / index).stat().st_size} {index}\n"
                   for index in ("Packages", "Packages.gz"))
    (repo / "Release").write_text(f"Origin: egress-router lab\nLabel: egress-router lab\n"
                                  f"Date: {email.utils.formatdate(usegmt=True)}\nSHA256:\n{sums}", encoding="utf-8")


def apt_config(base: Path, server: FileServer, proxy_port: int) -> Path:
    """A private apt: APT_CONFIG is read first and points every other configuration file and state directory
    into `base`, so that not even /etc/apt/apt.conf.d (with its hooks) is read and /var is never written."""
    empty = base / "empty.d"
    for directory in (empty, base / "state" / "lists" / "partial", base / "cache" / "archives" / "partial",
                      base / "log"):
        directory.mkdir(parents=True)
    (base / "status").write_text("")
    (base / "sources.list").write_text(f"deb [trusted=yes] {server.url('repo')} ./\n")
    settings = {
        "Dir::Etc::Main": "/dev/null", "Dir::Etc::Parts": empty, "Dir::Etc::SourceList": base / "sources.list",
        "Dir::Etc::SourceParts": empty, "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": empty,
        "Dir::Etc::Trusted": "/dev/null", "Dir::Etc::TrustedParts": empty, "Dir::Etc::netrc": "/dev/null",
        "Dir::Etc::netrcparts": empty, "Dir::State": base / "state", "Dir::State::status": base / "status",
        "Dir::Cache": base / "cache", "Dir::Log": base / "log", "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root", "Acquire::http::Proxy": f"{proxy_url(proxy_port)}/",
        "Acquire::Languages": "none", "Acquire::EnableSrvLookup": "false", "Acquire::Retries": "0",
        "Acquire::http::Timeout": "10", "APT::Get::List-Cleanup": "false"}
    config = base / "apt.conf"
    config.write_text("".join(f'{key} "{value}";\n' for key, value in settings.items()), encoding="utf-8")
    return config


def apt_get(lab: Lab, config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # the private places again on the command line, where they win over any configuration file
    base = config.parent
    options = [f"-oDir::Etc::SourceList={base / 'sources.list'}", f"-oDir::Etc::SourceParts={base / 'empty.d'}",
               f"-oDir::State={base / 'state'}", f"-oDir::Cache={base / 'cache'}",
               f"-oDir::State::status={base / 'status'}", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]
    return in_client(lab, ["apt-get", "-q", *options, *args], client_env(base / "home", APT_CONFIG=str(config)),
                     cwd=cwd)


def test_apt_get_update_and_download_through_the_proxy(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                       file_server: FileServer, tmp_path: Path) -> None:
    require_tool("apt-get")
    require_tool("dpkg-deb")
    (tmp_path / "build").mkdir()
    debs = [build_deb(tmp_path / "build", name, size) for name, size in PACKAGES.items()]
    write_repository(file_server.root / "repo", debs)
    allowing, denying = start_proxies(lab, start_proxy)
    allowed_before = allowed_count(lab, PORT)

    config = apt_config(tmp_path / "apt", file_server, PORT)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    update = apt_get(lab, config, "update", cwd=downloads)
    assert update.returncode == 0 and "W:" not in update.stderr and "E:" not in update.stderr, output(update)
    lists = [p.name for p in (config.parent / "state" / "lists").iterdir() if p.name.endswith("Packages")]
    assert len(lists) == 1, (lists, output(update))
    download = apt_get(lab, config, "download", *PACKAGES, cwd=downloads)
    assert download.returncode == 0, output(download)
    for deb in debs:
        fetched = downloads / deb.name
        assert fetched.is_file(), (sorted(p.name for p in downloads.iterdir()), output(download))
        assert sha256_file(fetched) == sha256_file(deb), f"{deb.name} arrived changed"
    assert not list((config.parent / "cache" / "archives").glob("*.deb")), "download only: nothing in the cache"

    # every request went through the allowing proxy, from the reserved source, and each was counted once
    served = file_server.requests()
    paths = [m["path"] for m in served]
    assert {m["peer"] for m in served} == {SOURCE_IP}, served
    assert sum(p.endswith("/Release") for p in paths) == 1, paths
    assert sum(p.endswith(".deb") for p in paths) == len(debs), paths
    assert eventually(lambda: len(mirror_lines(allowing)) == len(served)), (paths, allowing.stderr)
    assert {m["verdict"] for m in mirror_lines(allowing) if m["status"] == "200"} == {"allowed"}
    assert allowed_count(lab, PORT) - allowed_before == len(served)
    for deb in debs:
        line = next(m for m in mirror_lines(allowing) if m["target"].endswith(deb.name))
        assert (line["status"], int(line["down"])) == ("200", deb.stat().st_size), line.group(0)

    # the same apt through the proxy that does not allow MIRROR: refused with 403, nothing reaches the server
    denied_before = denied_count(lab, DENYING_PORT)
    config = apt_config(tmp_path / "apt-denied", file_server, DENYING_PORT)
    refused = apt_get(lab, config, "update", cwd=downloads)
    assert refused.returncode != 0, output(refused)  # apt 2.6: 100, "E: Failed to fetch ... 403  Forbidden"
    assert "403  Forbidden" in refused.stdout + refused.stderr and "E: " in refused.stderr, output(refused)
    assert not [p for p in (config.parent / "state" / "lists").iterdir() if p.name.endswith("Packages")]
    assert len(file_server.requests()) == len(served), "the denying proxy let a request reach the server"
    assert eventually(lambda: len(mirror_lines(denying)) >= 1)
    assert {(m["verdict"], m["status"]) for m in mirror_lines(denying)} == {("denied", "403")}, denying.stderr
    assert denied_count(lab, DENYING_PORT) - denied_before == len(mirror_lines(denying))
    assert origin.requests() == [], "the lab origin was not asked for anything"


# ------------------------------------------------------------------ 2. git clone over dumb HTTP

def git_env(home: Path) -> dict[str, str]:
    """git without the machine's or the user's configuration."""
    return client_env(home, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null", GIT_TERMINAL_PROMPT="0",
                      **GIT_IDENTITY)


def make_bare_repository(tmp_path: Path, bare: Path) -> tuple[str, dict[str, bytes]]:
    """A bare repository of three commits pushed from a local scratch clone; (HEAD commit id, files at HEAD)."""
    env = git_env(tmp_path / "home")
    scratch = tmp_path / "scratch"
    local(["git", "init", "-q", "-b", "main", str(scratch)], env)
    files: dict[str, bytes] = {}
    for number in range(3):
        files[f"notes/{number}.txt"] = f"commit {number}: the egress router's lab\n".encode() * (number + 1)
        files["data.bin"] = random.Random(number).randbytes(200_000)
        for name, content in files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(content)
        local(["git", "add", "-A"], env, cwd=scratch)
        local(["git", "commit", "-q", "-m", f"commit {number}"], env, cwd=scratch)
    local(["git", "init", "-q", "--bare", "-b", "main", str(bare)], env)
    local(["git", "push", "-q", str(bare), "main"], env, cwd=scratch)
    local(["git", "update-server-info"], env, cwd=bare)
    return local(["git", "rev-parse", "HEAD"], env, cwd=scratch).strip(), files


def test_git_clone_over_dumb_http_through_the_proxy(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                    file_server: FileServer, tmp_path: Path) -> None:
    require_tool("git")
    head, files = make_bare_repository(tmp_path, file_server.root / "repo.git")
    allowing, denying = start_proxies(lab, start_proxy)
    env = git_env(tmp_path / "home")
    clone = tmp_path / "clone"
    result = in_client(lab, ["git", "-c", f"http.proxy={proxy_url(PORT)}", "-c", "http.lowSpeedLimit=1",
                             "-c", "http.lowSpeedTime=20", "clone", "-q", file_server.url("repo.git"), str(clone)], env)
    assert result.returncode == 0, output(result)
    assert local(["git", "rev-parse", "HEAD"], env, cwd=clone).strip() == head
    assert local(["git", "rev-list", "--count", "HEAD"], env, cwd=clone).strip() == "3"
    for name, content in files.items():
        assert (clone / name).read_bytes() == content, name
    local(["git", "fsck", "--full", "--strict"], env, cwd=clone)  # every object intact

    served = file_server.requests()
    paths = [m["path"] for m in served]
    assert any(p.startswith("/repo.git/info/refs") for p in paths), paths  # the dumb protocol's first request
    assert any("/objects/" in p for p in paths), paths
    assert {m["peer"] for m in served} == {SOURCE_IP}, served
    assert eventually(lambda: len(mirror_lines(allowing)) == len(served)), (paths, allowing.stderr)

    refused = in_client(lab, ["git", "-c", f"http.proxy={proxy_url(DENYING_PORT)}", "clone", "-q",
                              file_server.url("repo.git"), str(tmp_path / "refused")], env)
    assert refused.returncode != 0, output(refused)
    assert "error: 403" in refused.stderr, output(refused)
    assert "remote: access to mirror.example.net is denied by the egress policy" in refused.stderr, output(refused)
    assert not (tmp_path / "refused" / ".git").exists()
    assert len(file_server.requests()) == len(served), "the denying proxy let a request reach the server"
    assert eventually(lambda: len(mirror_lines(denying)) == 1), denying.stderr  # the first request ends it
    assert {(m["verdict"], m["status"]) for m in mirror_lines(denying)} == {("denied", "403")}, denying.stderr
    assert origin.requests() == []


# ------------------------------------------------------------------ 3. Python requests, one keep-alive Session

REQUESTS_SCRIPT = """
import hashlib, json, sys
import requests
proxy, urls = sys.argv[1], sys.argv[2:]
session = requests.Session()
session.trust_env = False  # only the proxy given here
session.proxies = {"http": proxy}
answers = []
for url in urls:
    response = session.get(url, timeout=10)
    answers.append([url, response.status_code, hashlib.sha256(response.content).hexdigest(), len(response.content),
                    response.text if response.status_code == 403 else ""])
print(json.dumps(answers))
"""
FILES = 20


def test_requests_session_keeps_one_connection_for_twenty_gets(lab: Lab, origin: Origin, start_proxy: StartProxy,
                                                               file_server: FileServer, tmp_path: Path) -> None:
    python = sys.executable  # the venv's: requests is a dependency of the test tools installed there
    check = subprocess.run([python, "-c", "import requests"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"requests is not importable by {python}: {check.stderr}"
    rng = random.Random(2024)
    (file_server.root / "files").mkdir()
    held: dict[str, bytes] = {}
    for number in range(FILES):
        path = f"files/{number:02d}-{rng.randrange(10**6)}.bin"
        held[file_server.url(path)] = rng.randbytes(rng.choice((0, 1, 100, 4096, 65_537, 250_000)))
        (file_server.root / path).write_bytes(held[file_server.url(path)])
    allowing, _ = start_proxies(lab, start_proxy)
    allowed_before = allowed_count(lab, PORT)
    denied_url = "http://internal.example.com/hello"  # not in the allowing proxy's list
    result = in_client(lab, [python, "-c", REQUESTS_SCRIPT, proxy_url(PORT), *held, denied_url],
                       client_env(tmp_path / "home"))
    assert result.returncode == 0, output(result)
    answers = json.loads(result.stdout)
    assert [a[0] for a in answers] == [*held, denied_url]
    for (url, status, digest, length, _), body in zip(answers[:FILES], held.values(), strict=True):
        assert (status, length, digest) == (200, len(body), hashlib.sha256(body).hexdigest()), url
    assert answers[-1][1] == 403 and answers[-1][4] == \
        "access to internal.example.com is denied by the egress policy\n", answers[-1]

    served = file_server.requests()
    assert sorted(m["path"] for m in served) == sorted("/" + url.split("/", 3)[3] for url in held)
    assert {m["peer"] for m in served} == {SOURCE_IP}
    assert eventually(lambda: len(mirror_lines(allowing)) == FILES)
    lines = mirror_lines(allowing)
    assert [int(m["down"]) for m in lines] == [len(body) for body in held.values()], [m.group(0) for m in lines]
    assert allowed_count(lab, PORT) - allowed_before == FILES
    # keep-alive through the proxy: all twenty (and the refusal after them) came on one client connection
    refusal = [m for line in allowing.lines() if (m := ACCESS_LINE.search(line)) and "internal" in m["target"]]
    assert len(refusal) == 1 and refusal[0]["verdict"] == "denied"
    clients = {m["client"] for m in [*lines, *refusal]}
    assert len(clients) == 1, f"the proxy did not keep the Session's connection alive: {sorted(clients)}"
    assert origin.requests() == []
