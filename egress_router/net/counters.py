"""Reads the counters of the router's NAT chains: one `iptables-save -c -t nat` per family, run side by side."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping

from ..core.counters import RuleCounter, parse_counters
from ..core.errors import SetupError

# A save tool that hangs (a stuck xtables lock, a wedged nft) must not hold a scrape beyond the scraper's own
# timeout (Prometheus: 10 s by default): the scrape then answers without these counters.
READ_TIMEOUT_SECONDS = 5.0


def read_counters(tools: Mapping[int, tuple[str, str]]) -> dict[int, list[RuleCounter]]:
    """Our chains' rule counters per family (4: iptables, 6: ip6tables), read with each family's save tool
    (`tools`: version -> (save, restore), the backend the router applied its rules with).

    `-c -t nat` prints the nat table only, with every rule's counters: measured on nf_tables, as fast as
    listing one chain (`-S CHAIN -v`), which would take two runs per family (DNAT and SNAT). Both families'
    tools start at once, so a dual-stack scrape waits for about one run, not two."""
    started: dict[int, tuple[str, subprocess.Popen[str]]] = {}  # version -> (the tool's name, its process)
    read: set[int] = set()  # the ones whose output was collected (their pipes are closed)
    try:
        for version, (save, _) in sorted(tools.items()):
            try:
                started[version] = os.path.basename(save), subprocess.Popen(
                    [save, "-c", "-t", "nat"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
            except OSError as exc:
                raise SetupError(f"cannot run {save}: {exc.strerror}") from None
        deadline = time.monotonic() + READ_TIMEOUT_SECONDS
        found: dict[int, list[RuleCounter]] = {}
        for version, (name, process) in started.items():
            try:
                out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
                read.add(version)
            except subprocess.TimeoutExpired:
                raise SetupError(f"{name} -c -t nat did not answer within {READ_TIMEOUT_SECONDS:g} s") from None
            if process.returncode != 0:
                detail = " ".join(err.split()) or f"exit status {process.returncode}"
                raise SetupError(f"{name} -c -t nat failed: {detail}")
            found[version] = parse_counters(out)
        return found
    finally:
        for version, (_, process) in started.items():  # only the processes started here, on any way out
            if version not in read:
                if process.poll() is None:
                    process.kill()
                process.communicate()
