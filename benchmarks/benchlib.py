"""Helpers shared by the benchmarks: tool checks, timed runs in a lab namespace, statistics, RESULTS.md.

Not part of the package. Everything here runs inside the namespace lab (egress_router.lab.Lab)
and touches no interface of the machine; the only processes it ends are ones it started, by pid.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
REFERENCE = BENCH / "reference" / "legacy-egress-router.sh"
WORK = BENCH / ".work"  # scratch files (git-ignored)
RESULTS = BENCH / "RESULTS.md"
PYTHON = sys.executable

# After the reference script exits, its background (-U) arping sleeps 2 s and then runs for ~1 s.
BACKGROUND_WAIT_SECONDS = 6.0

ARPING_HELP = ("the reference needs iputils arping, as the legacy image used: apt-get install iputils-arping "
               "(on Debian it replaces the package 'arping', Thomas Habets' arping, whose -A and -I mean "
               "something else), or set ARPING=/path/to/iputils/arping")


class BenchError(Exception):
    """A benchmark run failed or did not do what it should have: the figures would be meaningless."""


# ---------------------------------------------------------------- preconditions

def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks build network namespaces: run them as root "
                 "(sudo .venv/bin/python benchmarks/<script>.py)")


def check_tools(*, reference: bool = True) -> str | None:
    """Exit with a clear message if a tool is missing; return the iputils arping to use (if `reference`)."""
    needed = ["nsenter", "ip", "iptables", "iptables-save", "iptables-restore"]
    if reference:
        needed += ["bash", "setsid"]
    missing = [tool for tool in needed if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install iproute2 iptables util-linux bash")
    if not reference:
        return None
    return find_arping()


def find_arping() -> str:
    wanted = os.environ.get("ARPING") or "arping"
    path = shutil.which(wanted)
    if path is None:
        sys.exit(f"{wanted} not found: {ARPING_HELP}")
    try:
        probe = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.exit(f"cannot run {path} -V ({exc}): {ARPING_HELP}")
    version = (probe.stdout + probe.stderr).strip().splitlines()
    if not version or "iputils" not in version[0]:
        sys.exit(f"{path} is not iputils arping ({version[0] if version else 'no version'}): {ARPING_HELP}")
    return path


def arping_version(path: str) -> str:
    probe = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return (probe.stdout + probe.stderr).strip().splitlines()[0]


# ---------------------------------------------------------------- the machine

def command_output(argv: Sequence[str]) -> str:
    """The first line a command prints (a version, say), or "unknown"."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "unknown"


def python_build() -> str:
    """The interpreter egress-router runs on in the benchmarks (the venv's), and whether it loads libpython
    as a shared library. Debian's python3 (the image's, and what scripts/bootstrap makes the venv from)
    has it built in and is built with PGO and LTO; a default pyenv build is neither, and runs the proxy
    measurably slower (about 7% in an A/B on 2026-11-22)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
        shared = any("libpython" in line for line in handle)
    return f"{os.path.realpath(sys.executable)}, {'shared libpython' if shared else 'libpython built in'}"


def machine_info(arping: str | None = None) -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    iptables = command_output(["iptables", "--version"])
    backend = re.search(r"\((\w+)\)", iptables)
    import importlib.metadata

    from egress_router import __version__

    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "egress_router"],
                            capture_output=True, text=True, timeout=10, check=False)
    dirty = bool(status.stdout.strip())
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": command_output(["nproc"]),
        "kernel": platform.release(),
        "cpu": cpu,
        "iptables": iptables,
        "iptables backend": backend.group(1) if backend else "unknown",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({python_build()})",
        "pyroute2": importlib.metadata.version("pyroute2"),
        "egress-router": f"{__version__} (commit {commit}{', egress_router/ modified' if dirty else ''})",
        "bash": command_output(["bash", "-c", "echo $BASH_VERSION"]),
    }
    if arping:
        info["arping"] = f"{arping_version(arping)} ({arping})"
    stale = stale_bytecode()
    info["bytecode"] = (f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; "
                        f"{len(stale)} imported module(s) without an up-to-date .pyc"
                        + (f" ({', '.join(stale[:6])}{', ...' if len(stale) > 6 else ''})" if stale else ""))
    info["load average at start"] = load_average()
    return info


def load_average() -> str:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return " ".join(handle.read().split()[:3])


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs' time spent not idle over `seconds` (from /proc/stat), before we start."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def busy_warning(info: dict[str, str]) -> str | None:
    busy = cpu_busy()
    info["CPU busy just before the start"] = f"{100 * busy:.0f}% (1 s sample of /proc/stat)"
    if busy > 0.15:
        return (f"warning: the machine is busy ({100 * busy:.0f}% of its CPUs in the last second, before any "
                "benchmark work); the figures will be noisier and slower than on a quiet machine")
    return None


def stale_bytecode() -> list[str]:
    """Modules this process imported (init mode's set) whose .pyc is missing or older than the source:
    every run compiles those again when bytecode is not written (PYTHONDONTWRITEBYTECODE)."""
    import importlib.util

    import egress_router.container  # noqa: F401
    import egress_router.core.config  # noqa: F401
    import egress_router.entry  # noqa: F401
    import egress_router.router  # noqa: F401
    from egress_router.net.pyroute import load_pyroute2_modules

    load_pyroute2_modules()
    stale = []
    for name, module in sorted(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if not source or not source.endswith(".py") or name.startswith("__") or Path(source).parent == BENCH:
            continue
        cached = importlib.util.cache_from_source(source)
        if not os.path.exists(cached) or os.path.getmtime(cached) < os.path.getmtime(source):
            stale.append(name)
    return stale


def machine_lines(info: Mapping[str, str]) -> list[str]:
    return [f"- {key}: {value}" for key, value in info.items()]


# ---------------------------------------------------------------- statistics and tables

@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p90: float
    low: float
    high: float
    mean: float
    p25: float
    p75: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        p90 = statistics.quantiles(ordered, n=10, method="inclusive")[-1] if len(ordered) > 1 else ordered[0]
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
        return cls(len(ordered), statistics.median(ordered), p90, ordered[0], ordered[-1], statistics.fmean(ordered),
                   p25, p75)


def nat_payload(env: Mapping[str, str]) -> str:
    """The iptables-restore payload the router applies to a fresh namespace for `env` (a NAT mode)."""
    from egress_router.core.config import load
    from egress_router.core.plan import build_plan

    nat = build_plan(load(env), "macvlan0").nat
    assert nat is not None, "a NAT mode's plan has a NAT step"
    return nat.render()


def nat_payloads(env: Mapping[str, str]) -> dict[int, str]:
    """Each family's restore payload (4: iptables, 6: ip6tables) the router applies to a fresh namespace."""
    from egress_router.core.config import load
    from egress_router.core.plan import build_plan

    return {nat.version: nat.render() for nat in build_plan(load(env), "macvlan0").nats}


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def round_order(index: int, contenders: Sequence[str]) -> list[str]:
    """The order of round `index`: as given in even rounds, reversed in odd ones (so over an even number of
    rounds each contender runs before each other one equally often)."""
    return list(contenders) if index % 2 == 0 else list(reversed(contenders))


def rotating_order(index: int, contenders: Sequence[str]) -> list[str]:
    """The order of round `index` for three or more contenders: rotated by one each round, and every other
    cycle of rotations reversed (for three, six rounds run all six orders: each contender runs before each
    other one, and in each position, equally often)."""
    shift = index % len(contenders)
    order = list(contenders[shift:]) + list(contenders[:shift])
    return list(reversed(order)) if (index // len(contenders)) % 2 else order


def cpu_times() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat: two samples give the share over a stretch."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    total = sum(values[:8])  # guest time is counted in user time already
    steal = values[7] if len(values) > 7 else 0
    return total - values[3] - values[4], steal, total


def cpu_share_since(start: tuple[int, int, int]) -> tuple[float, float]:
    """Shares of the CPUs' time since `start` (cpu_times()) that were not idle (any process, ours too, and
    steal) and that the hypervisor stole."""
    now = cpu_times()
    total = max(1, now[2] - start[2])
    return (now[0] - start[0]) / total, (now[1] - start[1]) / total


MIN_AB_ROUNDS = 3  # below this, an IQR says nothing about the noise


def ab_compare(label: str, ours: Sequence[float], baseline: Sequence[float], show: Callable[[float], str], *,
               higher_better: bool) -> list[str]:
    """One row of an A/B table: each side's median, IQR and min-max over the rounds, the ratio ours/baseline of
    the medians, the per-round ratios (same round, so the same stretch of machine time) and a verdict. A
    difference counts as real only if the two sides' IQRs do not overlap (and each has MIN_AB_ROUNDS values);
    otherwise it is within the spread."""
    a, b = Stats.of(ours), Stats.of(baseline)
    paired = Stats.of([x / y for x, y in zip(ours, baseline, strict=False) if y]) if any(baseline) else None

    def spread(stats: Stats) -> str:
        return f"{show(stats.p25)}-{show(stats.p75)} / {show(stats.low)}-{show(stats.high)}"

    if min(a.n, b.n) < MIN_AB_ROUNDS:
        verdict = f"too few rounds to judge (fewer than {MIN_AB_ROUNDS})"
    elif a.p25 > b.p75 or a.p75 < b.p25:
        verdict = "ours better" if (a.median > b.median) == higher_better else "ours WORSE"
        verdict += " (IQRs apart)"
    else:
        verdict = "within the spread (IQRs overlap)"
    return [label, show(a.median), spread(a), show(b.median), spread(b),
            f"{a.median / b.median:.3f}" if b.median else "-",
            f"{paired.median:.3f} ({paired.low:.2f}-{paired.high:.2f})" if paired else "-", verdict]


AB_HEADERS = ["", "ours median", "ours IQR / min-max", "baseline median", "baseline IQR / min-max",
              "ours/baseline (medians)", "per-round ratio median (min-max)", "verdict"]


# ---------------------------------------------------------------- a baseline: another checkout with its own venv

@dataclass(frozen=True)
class Baseline:
    """egress-router from another checkout of this repository (`--baseline TREE`), run with TREE's interpreter
    and TREE's code: its `.venv/bin/egress-router` console script (an editable install of TREE)."""

    tree: Path
    facts: str

    @property
    def python(self) -> Path:
        return self.tree / ".venv" / "bin" / "python"

    def command(self) -> list[str]:
        return [str(self.tree / ".venv" / "bin" / "egress-router")]

    @staticmethod
    def env(env: Mapping[str, str]) -> dict[str, str]:
        """`env` without what could make TREE's interpreter import another tree's code."""
        return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


BASELINE_HELP = ("also measure egress-router from TREE, another checkout of this repository with its own .venv "
                 "(./scripts/bootstrap there), as a third contender 'baseline' in the same alternating rounds, "
                 "and print ours/baseline with the spread")

BASELINE_PROBE = """import importlib.util, os, pathlib, sys
import egress_router
root = pathlib.Path(egress_router.__file__).resolve().parent
def stale(p):
    c = importlib.util.cache_from_source(str(p))
    return not os.path.exists(c) or os.path.getmtime(c) < os.path.getmtime(p)
stale = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py")) if stale(p)]
print(root)
print(egress_router.__version__)
print(len(stale), " ".join(stale[:6]))
"""


def load_baseline(tree: Path | None) -> Baseline | None:
    """The `--baseline` checkout, checked: its venv's console script exists and its interpreter imports
    egress_router from TREE itself (an editable install points at its own tree). Exits with a message if not."""
    if tree is None:
        return None
    tree = tree.resolve()
    script = tree / ".venv" / "bin" / "egress-router"
    if not os.access(script, os.X_OK):
        sys.exit(f"--baseline {tree}: no {script}; run ./scripts/bootstrap in that checkout first")
    baseline = Baseline(tree, "")
    try:
        probe = subprocess.run([str(baseline.python), "-c", BASELINE_PROBE], capture_output=True, text=True,
                               timeout=60, check=False, env=Baseline.env(os.environ), cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.exit(f"--baseline {tree}: cannot run {baseline.python}: {exc}")
    lines = probe.stdout.splitlines()
    if probe.returncode != 0 or len(lines) < 3:
        sys.exit(f"--baseline {tree}: {baseline.python} cannot import egress_router: {probe.stderr.strip()[-800:]}")
    package, version, stale = Path(lines[0]), lines[1], lines[2].strip()
    if package.parent != tree:
        sys.exit(f"--baseline {tree}: its interpreter imports egress_router from {package}, not from that tree")
    commit = command_output(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "egress_router"],
                            capture_output=True, text=True, timeout=10, check=False)
    facts = (f"{tree}, egress-router {version} (commit {commit}"
             f"{', egress_router/ modified' if status.stdout.strip() else ''}), "
             f"{os.path.realpath(baseline.python)}; its egress_router/ modules without an up-to-date .pyc: "
             f"{stale.split(' ', 1)[0]}{' (' + stale.split(' ', 1)[1] + ')' if ' ' in stale else ''}")
    return Baseline(tree, facts)


# ---------------------------------------------------------------- timed runs in a lab namespace

@dataclass(frozen=True)
class Run:
    seconds: float
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    started_epoch: float  # time.time() just before the process was started
    # user + system CPU time of the process and every descendant it waited for (nsenter waits for the program,
    # which waits for its tools): unlike wall time, waiting for a CPU on a busy machine does not count
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        status = "timed out" if self.returncode is None else f"exit status {self.returncode}"
        tail = "\n".join((self.stdout + self.stderr).strip().splitlines()[-15:])
        return f"{status} after {secs(self.seconds)}\n{tail}"


def in_namespace(lab: Any, role: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` in a lab namespace, as lab.exec does it."""
    return ["nsenter", f"--net={lab.path(role)}", "--", *argv]


def timed_run(argv: Sequence[str], env: Mapping[str, str] | None, *, timeout: float,
              stdin_path: Path | None = None) -> Run:
    """Wall time of one process from start to exit. It gets a session of its own, so on timeout
    it and its children (this run's process group, which we created) are killed."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started_epoch = time.time()
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, stdin=stdin,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
            code: int | None = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group of the process we started
            out, err = process.communicate(timeout=30)
            code = None
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Run(seconds, code, out.decode(errors="replace"), err.decode(errors="replace"), started_epoch, cpu)


def settle_background(lab: Any, pidfile: Path, *, bound: float = BACKGROUND_WAIT_SECONDS) -> str:
    """Wait (bounded) for the reference's background arping job to finish before the lab goes.

    The pid comes from the reference script run we just started. It is acted on only if that
    process is inside this lab's router namespace (so it is ours, not a reused pid), through a
    pidfd. Returns 'finished', 'none' or 'killed' (only if it outlived `bound`)."""
    if not pidfile.exists():
        return "none"
    pid = int(pidfile.read_text().strip())
    pidfile.unlink()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return "finished"
    try:
        try:
            here = os.stat(f"/proc/{pid}/ns/net")
        except FileNotFoundError:
            return "finished"
        router = os.stat(lab.path("router"))
        if (here.st_dev, here.st_ino) != (router.st_dev, router.st_ino):
            return "finished"  # the pid now belongs to someone else: ours is gone; leave it alone
        if select.select([pidfd], [], [], bound)[0]:
            return "finished"
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 5)
        return "killed"
    finally:
        os.close(pidfd)


def count_lines(text: str, prefix: str, contains: str = "") -> int:
    return sum(1 for line in text.splitlines() if line.startswith(prefix) and contains in line)


# ---------------------------------------------------------------- RESULTS.md

RESULTS_HEADER = """# Benchmark results

Written by the scripts in this folder (see README.md for how to run them and what they measure).
Each script replaces its own section when it runs again; figures are from one run on the machine
described in that section. The reference runs iputils arping, as the legacy image did (Debian
package iputils-arping; Debian's package arping is Thomas Habets' arping, whose options differ).
"""


def write_results(section: str, body: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")
    print(f"\nwrote benchmarks/{path.name} (section {section})")


def run_benchmark(main: Callable[[], int], interrupted: str) -> NoReturn:
    """A benchmark script's entry: its exit status, or one line for a failure or Ctrl-C (no traceback)."""
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted ({interrupted})")


class Deadline:
    """A time bound for a benchmark's loops (on top of their round counts)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end
