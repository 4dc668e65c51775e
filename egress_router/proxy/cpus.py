"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2 cpu.max or v1 CFS)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.values import AUTO_WORKERS_CAP

__all__ = ["CpuChoice", "auto_workers", "available_cpus", "choose", "cpu_quota"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mount:
    """One cgroup line of /proc/self/mountinfo."""

    root: str  # the directory of the hierarchy that is mounted here (the cgroup namespace's view)
    point: str
    version: int  # 2: cgroup2; 1: a v1 hierarchy
    controllers: frozenset[str]  # v1: the controllers bound to it (from the super options)


@dataclass(frozen=True, slots=True)
class Quota:
    cpus: float  # quota / period: 1.5 means one and a half CPUs of time per period
    source: str  # "cgroup v2" or "cgroup v1"
    where: str  # the directory that sets it (for the debug log)


@dataclass(frozen=True, slots=True)
class CpuChoice:
    """What `auto` picks and why."""

    cpus: int
    affinity: int
    quota: Quota | None

    def describe(self) -> str:
        if self.quota is None:
            return f"{self.affinity} CPU(s) in the affinity mask, no cgroup CPU quota"
        amount = f"{self.quota.source} CPU quota {number(self.quota.cpus)} CPUs"
        if self.cpus < self.affinity:
            return f"{amount} of {self.affinity}"
        return f"{self.affinity} CPU(s) in the affinity mask; the {amount} allows them all"


def number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def choose(affinity: int, root: Path = Path("/")) -> CpuChoice:
    """The CPUs `affinity` allows, capped by the quota of this process's cgroup (files read under `root`)."""
    quota = cpu_quota(root)
    cpus = max(1, affinity)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota.cpus)))
    return CpuChoice(cpus, affinity, quota)


def available_cpus(root: Path = Path("/")) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota if it has one."""
    return choose(len(os.sched_getaffinity(0)), root).cpus


def auto_workers(name: str, root: Path = Path("/")) -> int:
    """The worker count `auto` means (the CPUs available, at most AUTO_WORKERS_CAP), said in the log with its
    reason."""
    choice = choose(len(os.sched_getaffinity(0)), root)
    count = min(choice.cpus, AUTO_WORKERS_CAP)
    reason = choice.describe() + (f"; at most {AUTO_WORKERS_CAP} by auto, a number asks for more"
                                  if count < choice.cpus else "")
    log.info("%s: auto: %d worker%s (%s)", name, count, "" if count == 1 else "s", reason)
    return count


def cpu_quota(root: Path = Path("/")) -> Quota | None:
    """The tightest CPU quota on this process's cgroup and its ancestors: cgroup v2 first, else v1.

    On a hybrid host (v1 controllers, an empty v2 hierarchy beside them) the v2 side has no cpu.max and
    the v1 cpu hierarchy decides. Anything unreadable or malformed counts as no quota (a debug line says
    what): a wrong guess costs some memory, a crash would cost the proxy."""
    try:
        mounts = parse_mountinfo(read(root / "proc/self/mountinfo"))
        groups = parse_cgroups(read(root / "proc/self/cgroup"))
    except (OSError, ValueError) as exc:
        log.debug("No cgroup CPU quota read: %s", exc)
        return None
    for version, reader in ((2, cpu_max), (1, cfs_quota)):
        path = groups.get(version)
        if path is None:
            continue
        for mount in mounts:
            if mount.version != version or (version == 1 and "cpu" not in mount.controllers):
                continue
            directory = cgroup_directory(root, mount, path)
            if directory is None:
                continue
            quota = tightest(directory, root / mount.point.lstrip("/"), reader, f"cgroup v{version}")
            if quota is not None:
                return quota
            break  # the first mount that holds our cgroup speaks for the hierarchy
    return None


def read(path: Path) -> str:
    # mount points may hold any bytes; the numbers are checked where they are parsed
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


_NUMBER = re.compile(r"[0-9]{1,19}")


_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (\\040 ...)."""
    return _ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts; lines that are not cgroup mounts, or are malformed, are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        fstype, extra = fields[dash + 1:dash + 2], fields[dash + 3:dash + 4]
        if fstype == ["cgroup2"]:
            mounts.append(Mount(unescape(fields[3]), unescape(fields[4]), 2, frozenset()))
        elif fstype == ["cgroup"]:
            options = frozenset(extra[0].split(",")) if extra else frozenset[str]()
            mounts.append(Mount(unescape(fields[3]), unescape(fields[4]), 1, options))
    return mounts


def parse_cgroups(text: str) -> dict[int, str]:
    """/proc/self/cgroup: this process's cgroup path in the v2 hierarchy (0::/path) and in the v1 cpu one."""
    paths: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths.setdefault(2, path)
        elif "cpu" in controllers.split(","):
            paths.setdefault(1, path)
    return paths


def cgroup_directory(root: Path, mount: Mount, path: str) -> Path | None:
    """Where this process's cgroup files are under `mount`, or None if the mount does not hold it.

    Inside a container with its own cgroup namespace both the path and the mount's root are `/`; without
    one (docker on RHEL 7) both are the container's full path, and its files are at the mount point."""
    relative = PurePosixPath(path)
    base = PurePosixPath(mount.root)
    if ".." in relative.parts or not relative.is_absolute():
        log.debug("cgroup path %r is not one to follow", path)
        return None
    if relative != base and base not in relative.parents:
        log.debug("cgroup %s is not under the mount of %s at %s", path, mount.root, mount.point)
        return None
    directory = root / mount.point.lstrip("/") / relative.relative_to(base)
    return directory if directory.is_dir() else None


def tightest(directory: Path, top: Path, reader: Callable[[Path], float | None], source: str) -> Quota | None:
    """The smallest quota from `directory` up to `top` (a parent's quota limits its children too)."""
    found: Quota | None = None
    current = directory
    while True:
        try:
            cpus = reader(current)
        except (OSError, ValueError, ZeroDivisionError) as exc:
            log.debug("%s CPU quota in %s ignored: %s", source, current, exc)
            cpus = None
        if cpus is not None and (found is None or cpus < found.cpus):
            found = Quota(cpus, source, str(current))
        if current == top or current.parent == current:
            return found
        current = current.parent


def cpu_max(directory: Path) -> float | None:
    """cgroup v2: cpu.max is "QUOTA PERIOD" in microseconds, QUOTA "max" when unlimited; None: no file, no limit."""
    try:
        text = read(directory / "cpu.max")
    except FileNotFoundError:
        return None
    fields = text.split()
    quota_ok = fields[:1] == ["max"] or bool(fields and _NUMBER.fullmatch(fields[0]))
    if len(fields) != 2 or not quota_ok or not _NUMBER.fullmatch(fields[1]):
        raise ValueError(f"cpu.max holds {text.strip()[:40]!r}")
    return None if fields[0] == "max" else int(fields[0]) / int(fields[1])


def cfs_quota(directory: Path) -> float | None:
    """cgroup v1: cpu.cfs_quota_us (-1 when unlimited) over cpu.cfs_period_us; None: no files, no limit."""
    try:
        quota, period = read(directory / "cpu.cfs_quota_us").strip(), read(directory / "cpu.cfs_period_us").strip()
    except FileNotFoundError:
        return None
    if quota == "-1":
        return None
    if not _NUMBER.fullmatch(quota) or not _NUMBER.fullmatch(period):
        raise ValueError(f"cpu.cfs_quota_us holds {quota[:40]!r}, cpu.cfs_period_us {period[:40]!r}")
    return int(quota) / int(period)
