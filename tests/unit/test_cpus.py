"""EGRESS_*_WORKERS=auto: the affinity mask capped by a cgroup v2 or v1 CPU quota, read from fake cgroup trees."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from egress_router.proxy import cpus
from egress_router.proxy.cpus import choose

# /proc/self/mountinfo lines as the kernel writes them (the shapes of a v2 host, a RHEL 7 node, a hybrid host)
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755\n"
    "26 25 0:22 / /sys/fs/cgroup/systemd rw,nosuid shared:9 - cgroup cgroup rw,xattr,name=systemd\n"
    "29 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct\n"
    "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory\n"
)
HYBRID_MOUNTS = V1_MOUNTS + (
    "31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw\n")
POD = "/kubepods/burstable/pod5f2c/0d1e"
V1_CGROUP = f"11:memory:{POD}\n4:cpu,cpuacct:{POD}\n1:name=systemd:{POD}\n"


def tree(root: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Path:
    """A fake / under `root`: /proc/self/{mountinfo,cgroup} and the cgroup files (directories made as needed)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


def v1(root: Path, quota: str, period: str = "100000\n", path: str = "/") -> Path:
    """A v1 node whose container sees its own cgroup at the mount point (a cgroup namespace: path /)."""
    base = "/sys/fs/cgroup/cpu,cpuacct" + ("" if path == "/" else path)
    cgroup = V1_CGROUP.replace(POD, path)
    return tree(root, V1_MOUNTS, cgroup, {f"{base}/cpu.cfs_quota_us": quota, f"{base}/cpu.cfs_period_us": period,
                                          f"{base}/cpu.shares": "1024\n"})


def test_v2_without_a_limit_is_the_affinity_count(tmp_path: Path) -> None:
    root = tree(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert choose(8, root).cpus == 8
    assert choose(8, root).quota is None


@pytest.mark.parametrize(("cpu_max", "expected"), [("150000 100000", 2), ("50000 100000", 1), ("800000 100000", 8),
                                                   ("1600000 100000", 8), ("100000 100000", 1)])
def test_v2_quota_caps_the_affinity_count(tmp_path: Path, cpu_max: str, expected: int) -> None:
    root = tree(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": cpu_max + "\n"})
    assert choose(8, root).cpus == expected


def test_v2_cgroup_at_a_path_below_the_mount(tmp_path: Path) -> None:
    """No cgroup namespace: /proc/self/cgroup names the full path, the files are below the mount point."""
    scope = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab12.scope"
    root = tree(tmp_path, V2_MOUNT, f"0::{scope}\n", {
        "/sys/fs/cgroup/cpu.max": "1000000 100000\n",  # another cgroup's file at the top: not ours
        f"/sys/fs/cgroup{scope}/cpu.max": "250000 100000\n"})
    assert choose(8, root).cpus == 3


def test_v2_a_parents_quota_limits_too(tmp_path: Path) -> None:
    scope = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab12.scope"
    root = tree(tmp_path, V2_MOUNT, f"0::{scope}\n", {
        f"/sys/fs/cgroup{scope}/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods.slice/kubepods-pod1.slice/cpu.max": "120000 100000\n"})
    choice = choose(8, root)
    assert choice.cpus == 2 and choice.quota is not None and choice.quota.cpus == 1.2


def test_v1_without_a_limit_is_the_affinity_count(tmp_path: Path) -> None:
    assert choose(8, v1(tmp_path, "-1\n")).cpus == 8


@pytest.mark.parametrize(("quota", "expected"), [("50000", 1), ("250000", 3), ("150000", 2), ("2000000", 8)])
def test_v1_quota_caps_the_affinity_count(tmp_path: Path, quota: str, expected: int) -> None:
    choice = choose(8, v1(tmp_path, quota + "\n"))
    assert choice.cpus == expected
    assert choice.quota is not None and choice.quota.source == "cgroup v1"


def test_v1_cgroup_at_a_path_below_the_mount(tmp_path: Path) -> None:
    """A host process (or docker without a cgroup namespace and a mount of the whole hierarchy)."""
    assert choose(8, v1(tmp_path, "250000\n", path=POD)).cpus == 3


def test_v1_mount_root_is_the_containers_own_cgroup(tmp_path: Path) -> None:
    """docker on RHEL 7 (no cgroup namespace): the mount's root and the path are both the pod's; files at the top."""
    mountinfo = V1_MOUNTS.replace(" / /sys/fs/cgroup/cpu,cpuacct ", f" {POD} /sys/fs/cgroup/cpu,cpuacct ")
    root = tree(tmp_path, mountinfo, V1_CGROUP, {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                                                 "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert choose(8, root).cpus == 1


def test_v1_a_cgroup_outside_the_mount_is_not_guessed(tmp_path: Path) -> None:
    mountinfo = V1_MOUNTS.replace(" / /sys/fs/cgroup/cpu,cpuacct ", " /other /sys/fs/cgroup/cpu,cpuacct ")
    root = tree(tmp_path, mountinfo, V1_CGROUP, {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                                                 "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert choose(8, root).cpus == 8


def test_hybrid_host_reads_the_v1_cpu_controller(tmp_path: Path) -> None:
    """systemd's hybrid layout: controllers on v1, an empty v2 hierarchy at /sys/fs/cgroup/unified (no cpu.max)."""
    root = tree(tmp_path, HYBRID_MOUNTS, V1_CGROUP.replace(POD, "/") + "0::/\n", {
        "/sys/fs/cgroup/unified/cgroup.procs": "1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    choice = choose(8, root)
    assert choice.cpus == 2
    assert choice.describe() == "cgroup v1 CPU quota 1.5 CPUs of 8"


def test_hybrid_host_without_a_limit(tmp_path: Path) -> None:
    root = tree(tmp_path, HYBRID_MOUNTS, V1_CGROUP.replace(POD, "/") + "0::/\n", {
        "/sys/fs/cgroup/unified/cgroup.procs": "1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert choose(4, root).cpus == 4


@pytest.mark.parametrize("missing", ["proc/self/mountinfo", "proc/self/cgroup", "sys/fs/cgroup/cpu,cpuacct"])
def test_missing_files_leave_the_affinity_count(tmp_path: Path, missing: str) -> None:
    root = v1(tmp_path, "50000\n")
    target = root / missing
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    assert choose(6, root).cpus == 6


def test_a_missing_period_file_leaves_the_affinity_count(tmp_path: Path) -> None:
    root = v1(tmp_path, "50000\n")
    (root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us").unlink()
    assert choose(6, root).cpus == 6


def test_nothing_mounted_leaves_the_affinity_count(tmp_path: Path) -> None:
    root = tree(tmp_path, "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n", "0::/\n", {})
    assert choose(3, root).cpus == 3


@pytest.mark.parametrize(("quota", "period"), [("lots\n", "100000\n"), ("50000\n", "0\n"), ("50000\n", "\n"),
                                               ("-5\n", "100000\n"), ("5e4\n", "100000\n"), ("\xff\n", "100000\n"),
                                               ("50000 100000\n", "100000\n")])
def test_v1_junk_is_no_quota_and_a_debug_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, quota: str,
                                              period: str) -> None:
    root = v1(tmp_path, quota, period)
    with caplog.at_level(logging.DEBUG, logger=cpus.__name__):
        assert choose(8, root).cpus == 8
    assert any("cgroup v1 CPU quota" in record.getMessage() and "ignored" in record.getMessage()
               for record in caplog.records), caplog.text


@pytest.mark.parametrize("cpu_max", ["", "max", "150000", "1.5 100000", "150000 100000 7", "max max", "٣ 100000",
                                     "150000 0"])
def test_v2_junk_is_no_quota_and_a_debug_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, cpu_max: str) -> None:
    root = tree(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": cpu_max})
    with caplog.at_level(logging.DEBUG, logger=cpus.__name__):
        assert choose(8, root).cpus == 8
    assert "cgroup v2 CPU quota" in caplog.text and "ignored" in caplog.text


@pytest.mark.parametrize(("mountinfo", "cgroup"), [
    ("garbage\n\n-\n1 2 3 4 5 6 - cgroup2\n", "0::/\n"),
    (V2_MOUNT, "nonsense\n::\n0::relative/path\n"),
    (V2_MOUNT, "0::/../../etc\n")])
def test_junk_proc_files_leave_the_affinity_count(tmp_path: Path, mountinfo: str, cgroup: str) -> None:
    root = tree(tmp_path, mountinfo, cgroup, {"/sys/fs/cgroup/cpu.max": "50000 100000\n", "/etc/cpu.max": "1 1\n"})
    assert choose(8, root).cpus == 8


def test_mount_points_with_escaped_characters(tmp_path: Path) -> None:
    mountinfo = V2_MOUNT.replace(" /sys/fs/cgroup ", r" /sys/fs/my\040cgroup ")
    root = tree(tmp_path, mountinfo, "0::/\n", {"/sys/fs/my cgroup/cpu.max": "250000 100000\n"})
    assert choose(8, root).cpus == 3


def test_mount_points_with_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    root = tree(tmp_path, "", "0::/\n", {})
    mountinfo = V2_MOUNT.replace(" /sys/fs/cgroup ", " /sys/fs/cg\xff ")
    (root / "proc/self/mountinfo").write_bytes(mountinfo.encode("latin-1"))
    (root / "sys/fs").mkdir(parents=True)
    directory = Path(os.fsdecode(bytes(root / "sys/fs") + b"/cg\xff"))
    directory.mkdir()
    (directory / "cpu.max").write_text("250000 100000\n")
    assert choose(8, root).cpus == 3


def test_never_below_one(tmp_path: Path) -> None:
    root = tree(tmp_path, V2_MOUNT, "0::/\n", {"/sys/fs/cgroup/cpu.max": "1000 100000\n"})
    assert choose(8, root).cpus == 1
    assert choose(0, tmp_path / "nowhere").cpus == 1


def test_auto_says_how_many_workers_and_why(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)))
    with caplog.at_level(logging.INFO, logger=cpus.__name__):
        assert cpus.auto_workers("HTTP proxy", v1(tmp_path / "a", "150000\n")) == 2
        assert cpus.auto_workers("DNS proxy", v1(tmp_path / "b", "-1\n")) == 4
        assert cpus.auto_workers("DNS proxy", v1(tmp_path / "c", "1200000\n")) == 4
        assert cpus.auto_workers("DNS proxy", v1(tmp_path / "d", "20000\n")) == 1
        assert cpus.auto_workers("DNS proxy", v1(tmp_path / "e", "300000\n")) == 3
        assert cpus.auto_workers("DNS proxy", v1(tmp_path / "f", "400000\n")) == 4
    assert [record.getMessage() for record in caplog.records] == [
        "HTTP proxy: auto: 2 workers (cgroup v1 CPU quota 1.5 CPUs of 8)",
        "DNS proxy: auto: 4 workers (8 CPU(s) in the affinity mask, no cgroup CPU quota; at most 4 by auto, a number "
        "asks for more)",
        "DNS proxy: auto: 4 workers (8 CPU(s) in the affinity mask; the cgroup v1 CPU quota 12 CPUs allows them all; "
        "at most 4 by auto, a number asks for more)",
        "DNS proxy: auto: 1 worker (cgroup v1 CPU quota 0.2 CPUs of 8)",
        "DNS proxy: auto: 3 workers (cgroup v1 CPU quota 3 CPUs of 8)",
        "DNS proxy: auto: 4 workers (cgroup v1 CPU quota 4 CPUs of 8)"]


def test_this_machine(tmp_path: Path) -> None:
    """The real files: a count between 1 and the affinity mask's, whatever cgroup layout this host has."""
    assert 1 <= cpus.available_cpus() <= len(os.sched_getaffinity(0))
