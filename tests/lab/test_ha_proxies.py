"""High availability in the proxy modes (egress_router/ha_keeper.py), in the HA lab: one replica holds EGRESS_SOURCE and
proxies, a standby's proxy refuses at once, a stop hands over, and a dead proxy or keeper gives the address up."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_router.admin import children
from egress_router.halab import CLIENT, METRICS_PORT, OUT_IPS, OUT_IPS6, SOURCE, SOURCE6, HaLab
from tests.lab.conftest import HALAB_TOOLS, require_lab
from tests.lab.origin import Origin
from tests.lab.test_ha import Replicas, until

HTTP_PORT = 8080
FORWARD_PORT = 7000
HELLO = f"hello from {OUT_IPS[0]}:80\n"


class ProxyReplicas(Replicas):
    """Replicas in http-proxy or dns-proxy mode (the single-container layout: each sets its network up)."""

    def __init__(self, lab: HaLab, directory: Path, mode: str, workers: int):
        super().__init__(lab, directory)
        self.mode, self.workers = mode, workers

    def env(self, i: int, **variables: str) -> dict[str, str]:
        env = super().env(i, EGRESS_ROUTER_MODE=self.mode)
        del env["EGRESS_DESTINATION"]
        if self.mode == "http-proxy":
            env.update(EGRESS_HTTP_PROXY_DESTINATION="203.0.113.0/24", EGRESS_HTTP_PROXY_WORKERS=str(self.workers),
                       EGRESS_HTTP_PROXY_PORT=str(HTTP_PORT), EGRESS_PROXY_GRACE_SECONDS="2")
        else:
            env.update(EGRESS_DNS_PROXY_DESTINATION=f"{FORWARD_PORT} {OUT_IPS[0]}",
                       EGRESS_DNS_PROXY_WORKERS=str(self.workers), EGRESS_PROXY_GRACE_SECONDS="2")
        env.update(variables)
        return env

    def proxy_pid(self, i: int) -> int:
        """The proxy under replica i's keeper (the other child is keepalived)."""
        keeper = self.processes[i].pid
        for pid in children(keeper):
            if Path(f"/proc/{pid}/comm").read_text().strip() != "keepalived":
                return pid
        raise AssertionError(f"no proxy under the keeper {keeper}: {self.log(i)}")

    def metrics(self, i: int) -> str:
        return curl(self.lab, f"http://{self.lab.pod_ip(i)}:{METRICS_PORT}/metrics")[1]


def curl(lab: HaLab, url: str, *, proxy: str | None = None) -> tuple[int, str]:
    """curl from the clients' address in the node namespace: (HTTP status, body)."""
    argv = ["curl", "-sS", "--max-time", "5", "--interface", CLIENT, "-o", "-", "-w", "\n%{http_code}", url]
    if proxy is not None:
        argv[1:1] = ["--proxy", proxy]
    result = lab.exec("node", argv, timeout=10)
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def through(lab: HaLab, i: int, path: str = "/hello") -> tuple[int, str]:
    """A request through replica i's HTTP proxy to the origin at 203.0.113.10."""
    return curl(lab, f"http://{OUT_IPS[0]}{path}", proxy=f"http://{lab.pod_ip(i)}:{HTTP_PORT}")


@pytest.fixture
def origin(ha_lab: HaLab) -> Iterator[Origin]:
    server = Origin()
    with ha_lab.entered("out"):
        server.listen(OUT_IPS[0], 80)
    server.start()
    yield server
    server.stop()


def proxies(lab: HaLab, directory: Path, mode: str, workers: int) -> ProxyReplicas:
    return ProxyReplicas(lab, directory, mode, workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_http_proxy_replicas_one_proxies_from_the_address_the_standby_refuses(ha_lab: HaLab, origin: Origin,
                                                                              tmp_path: Path, workers: int) -> None:
    replicas = proxies(ha_lab, tmp_path, "http-proxy", workers)
    active, standby = replicas.start_all()
    assert through(ha_lab, active) == (200, HELLO), replicas.logs()
    status, body = through(ha_lab, standby)
    assert status == 503 and "standby" in body, (status, body)
    assert [seen.peer_ip for seen in origin.requests()] == [SOURCE]  # one request reached it, from the address
    assert (replicas.ready(active), replicas.ready(standby)) == (0, 1)
    assert ha_lab.http_status(standby) == 503 and ha_lab.http_status(standby, "/healthz") == 200
    assert "egress_router_ha_active 1" in replicas.metrics(active)
    standby_metrics = replicas.metrics(standby)
    assert "egress_router_ha_active 0" in standby_metrics
    assert 'egress_router_http_requests_total{verdict="standby"} 1' in standby_metrics


def test_a_stop_hands_the_address_over_and_the_proxy_stops(ha_lab: HaLab, origin: Origin, tmp_path: Path) -> None:
    replicas = proxies(ha_lab, tmp_path, "http-proxy", 2)
    active, other = replicas.start_all()
    assert through(ha_lab, active)[0] == 200
    stopped = time.monotonic()
    replicas.processes[active].terminate()  # the kubelet's SIGTERM goes to the container's first process
    took = until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200)
    assert took is not None and took < 1.5, (took, replicas.logs())
    assert through(ha_lab, other) == (200, HELLO)
    assert replicas.processes[active].wait(timeout=10) == 0, replicas.log(active)
    assert time.monotonic() - stopped < 2 + 2  # the proxy drained within its grace period (nothing was open)
    log = replicas.log(active)
    assert log.index("handing EGRESS_SOURCE over") < log.index("Stopped"), log  # the address did not wait for it
    assert {seen.peer_ip for seen in origin.requests()} == {SOURCE}


def test_the_hand_over_does_not_wait_for_the_drain(ha_lab: HaLab, origin: Origin, tmp_path: Path) -> None:
    replicas = proxies(ha_lab, tmp_path, "http-proxy", 1)
    active, other = replicas.start_all()
    slow = threading.Thread(target=through, args=(ha_lab, active, "/slow?delay=4"), daemon=True)
    slow.start()  # a request the proxy drains for (its grace period is 2 s)
    assert until(lambda: any(seen.path == "/slow" for seen in origin.requests()), timeout=3) is not None
    replicas.processes[active].terminate()
    took = until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200)
    assert took is not None and took < 1.5, (took, replicas.logs())
    assert replicas.processes[active].poll() is None  # still draining while the other replica serves
    assert through(ha_lab, other) == (200, HELLO)
    assert replicas.processes[active].wait(timeout=10) == 0


def test_a_dead_proxy_gives_the_address_up(ha_lab: HaLab, origin: Origin, tmp_path: Path) -> None:
    replicas = proxies(ha_lab, tmp_path, "http-proxy", 1)
    active, other = replicas.start_all()
    os.kill(replicas.proxy_pid(active), signal.SIGKILL)
    assert until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200) is not None, \
        replicas.logs()
    assert replicas.processes[active].wait(timeout=10) == 1  # the container ends; the kubelet restarts it
    assert "The proxy exited (killed by SIGKILL); this replica gives EGRESS_SOURCE up" in replicas.log(active)
    assert through(ha_lab, other) == (200, HELLO)


def test_a_dead_keeper_takes_its_proxy_and_keepalived_along(ha_lab: HaLab, origin: Origin, tmp_path: Path) -> None:
    replicas = proxies(ha_lab, tmp_path, "http-proxy", 2)
    active, other = replicas.start_all()
    keeper = replicas.processes[active]
    tree = children(keeper.pid)
    assert len(tree) == 2, tree  # the proxy's master and keepalived
    keeper.kill()
    keeper.wait(timeout=5)
    # the kernel's SIGTERM (PR_SET_PDEATHSIG) ends both: no proxy keeps serving from a replica nobody elects
    assert until(lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in
                                 Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3] for pid in tree),
                 timeout=5) is not None
    # keepalived's goodbye moves the address at once; what the dead keeper left lapses within its lifetime
    assert until(lambda: ha_lab.holders() == [other] and ha_lab.http_status(other) == 200) is not None, \
        (ha_lab.holders(), replicas.logs())
    assert through(ha_lab, other) == (200, HELLO)


@pytest.mark.parametrize("workers", [1, 2])
def test_dns_proxy_replicas_relay_from_the_address_the_standby_refuses(ha_lab: HaLab, tmp_path: Path,
                                                                       workers: int) -> None:
    servers = ha_lab.serve_outside()
    replicas = proxies(ha_lab, tmp_path, "dns-proxy", workers)
    active, standby = replicas.start_all()
    assert ha_lab.connect(active, FORWARD_PORT) == SOURCE, replicas.logs()
    with pytest.raises(OSError):  # reset at once
        ha_lab.connect(standby, FORWARD_PORT)
    assert [reply.peer_ip for reply in servers.seen] == [SOURCE]
    assert 'result="rejected"} 1' in replicas.metrics(standby)
    replicas.processes[active].send_signal(signal.SIGTERM)
    assert until(lambda: ha_lab.holders() == [standby] and ha_lab.http_status(standby) == 200) is not None
    assert ha_lab.connect(standby, FORWARD_PORT) == SOURCE
    assert replicas.processes[active].wait(timeout=10) == 0


def test_dual_stack_http_proxy_replicas_hand_both_addresses_over(tmp_path: Path) -> None:
    require_lab(HALAB_TOOLS)
    with HaLab(2, dual_stack=True) as lab:
        server = Origin()
        with lab.entered("out"):
            server.listen(OUT_IPS[0], 80)
            server.listen(OUT_IPS6[0], 80)
        server.start()
        try:
            replicas = proxies(lab, tmp_path, "http-proxy", 1)
            for i in range(2):
                replicas.start(i, EGRESS_HTTP_PROXY_DESTINATION="203.0.113.0/24\n2001:db8:203::/64")
            active = replicas.active()
            other = 1 - active
            url6 = f"http://[{OUT_IPS6[0]}]/hello"
            proxy = f"http://{lab.pod_ip(active)}:{HTTP_PORT}"
            assert curl(lab, url6, proxy=proxy)[0] == 200 and through(lab, active)[0] == 200, replicas.logs()
            assert lab.holders(SOURCE6) == [active]
            replicas.processes[active].terminate()
            assert until(lambda: lab.holders() == [other] and lab.holders(SOURCE6) == [other] and
                         lab.http_status(other) == 200) is not None, replicas.logs()
            assert curl(lab, url6, proxy=f"http://{lab.pod_ip(other)}:{HTTP_PORT}")[0] == 200
            assert {seen.peer_ip for seen in server.requests()} == {SOURCE, SOURCE6}
            assert replicas.processes[active].wait(timeout=10) == 0
        finally:
            server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_proxy_under_a_keeper_reloads_its_rules_on_a_file_change_and_on_sighup(
        ha_lab: HaLab, origin: Origin, tmp_path: Path, workers: int) -> None:
    rules = tmp_path / "allow"
    rules.write_text("203.0.113.11\n", encoding="ascii")
    replicas = proxies(ha_lab, tmp_path, "http-proxy", workers)
    for i in range(2):
        replicas.start(i, EGRESS_HTTP_PROXY_DESTINATION="", EGRESS_HTTP_PROXY_DESTINATION_FILE=str(rules))
    active = replicas.active()
    assert through(ha_lab, active)[0] == 403  # 203.0.113.10 is not allowed yet
    replacement = tmp_path / "allow.new"
    replacement.write_text("203.0.113.0/24\n", encoding="ascii")
    replacement.replace(rules)  # the proxy's own watch (inotify in the proxy's process, under the keeper)
    assert until(lambda: through(ha_lab, active)[0] == 200, timeout=5) is not None, replicas.log(active)
    replicas.processes[active].send_signal(signal.SIGHUP)  # to the keeper, which passes it on to the proxy
    assert until(lambda: "SIGHUP: EGRESS_HTTP_PROXY_DESTINATION_FILE=" in replicas.log(active), timeout=5), \
        replicas.log(active)
    assert replicas.processes[active].poll() is None and ha_lab.holders() == [active]  # nobody died of it
    rules.write_text("203.0.113.11\n", encoding="ascii")  # written in place this time
    assert until(lambda: through(ha_lab, active)[0] == 403, timeout=5) is not None, replicas.log(active)
