"""NAT on the system: finds the iptables backend's tools, reads the nat table, runs one iptables-restore.

The rules and payloads are computed in core.nat; this module only runs iptables-save/-restore.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from ..core.errors import SetupError
from ..core.nat import (
    BACKENDS,
    NatRules,
    NatState,
    backend_tools,
    choose_backend,
    count_rules,
    desired_chains,
    failed_line_hint,
    parse_save,
    restore_payload,
    rollback_payload,
)

log = logging.getLogger(__name__)

RESTORE_WAIT_SECONDS = "10"  # legacy backend: wait for the xtables lock instead of failing


def find_tools(choice: str = "nft", version: int = 4) -> tuple[str, str]:
    """Paths of the save and restore tools for EGRESS_IPTABLES (nft, legacy or auto), or a SetupError."""
    return find_family_tools(choice, (version,))[version]


def find_family_tools(choice: str, versions: tuple[int, ...]) -> dict[int, tuple[str, str]]:
    """The save and restore tools of each family in `versions` (4: iptables, 6: ip6tables), of one backend.

    EGRESS_IPTABLES=auto picks the backend once, by the rules of all those families together: the node
    uses one backend for both, and our IPv4 and IPv6 rules belong beside the others'."""
    if choice != "auto":
        return {version: _which_backend(choice, version) for version in versions}
    found: dict[str, dict[int, tuple[str, str]]] = {}
    for backend in BACKENDS:
        try:
            found[backend] = {version: _which_backend(backend, version) for version in versions}
        except SetupError:
            continue
    if not found:
        missing = " and ".join(f"neither {backend_tools('nft', v)[0]}/-restore nor {backend_tools('legacy', v)[0]}"
                               "/-restore" for v in versions)
        raise SetupError(f"{missing} found on PATH (EGRESS_IPTABLES=auto): install the iptables package")
    rules = {backend: sum(_rules_in(tools[0]) for tools in per_family.values())
             for backend, per_family in found.items()}
    backend = choose_backend(rules)
    if backend not in found:  # only the other backend is installed
        backend = next(iter(found))
    counts = ", ".join(f"{count} in {name}" for name, count in rules.items())
    log.info("Using the iptables %s backend (EGRESS_IPTABLES=auto; rules already present: %s)", backend, counts)
    return found[backend]


def _which_backend(backend: str, version: int = 4) -> tuple[str, str]:
    names = backend_tools(backend, version)
    save, restore = (shutil.which(name) for name in names)
    if not save or not restore:
        missing = " and ".join(name for name, path in zip(names, (save, restore), strict=True) if not path)
        other = "legacy" if backend == "nft" else "nft"
        raise SetupError(f"{missing} not found on PATH (EGRESS_IPTABLES={backend}): install the iptables "
                         f"package, or set EGRESS_IPTABLES to {other} or auto")
    log.debug("iptables backend: %s (%s, %s)", backend, save, restore)
    return save, restore


def _rules_in(save: str) -> int:
    """Rules the backend's save tool shows; a backend that cannot even be read has none we could keep."""
    try:
        return count_rules(_run([save]))
    except SetupError as exc:
        log.debug("Counting the rules of %s failed: %s", save, exc)
        return 0


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise SetupError(f"cannot run {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise SetupError(f"{os.path.basename(argv[0])} failed: {detail}")
    return done.stdout


def read_state(save: str, tables: tuple[str, ...] = ("nat", "mangle")) -> NatState:
    """The tables we manage, as iptables-save shows them (one run per table: never the whole ruleset)."""
    return parse_save("".join(_run([save, "-t", table]) for table in tables))


def restore(restore_tool: str, payload: str) -> None:
    log.debug("iptables-restore payload:\n%s", payload.rstrip())
    try:
        _run([restore_tool, "--noflush", "--wait", RESTORE_WAIT_SECONDS], stdin=payload)
    except SetupError as exc:
        raise SetupError(f"{exc}{failed_line_hint(str(exc), payload)}") from None


def apply(nat: NatRules, restore_tool: str, before: NatState) -> tuple[int, bool]:
    """Converge our chains (last read as `before`) to `nat`, every table in one iptables-restore.

    Returns the number of our NAT rules and whether anything was changed.
    """
    payload = restore_payload(nat, before)
    what = describe(nat)
    if payload is None:
        kind = ("IPv6 NAT rules" if nat.chains else "IPv6 connection-mark rules") if nat.version == 6 else \
            ("NAT rules" if nat.chains else "Connection-mark rules")
        log.info("%s already in place (%s)", kind, what)
        return len(nat_specs(nat)), False
    restore(restore_tool, payload)
    log.info("Applied %s in one %s-restore", what, nat.tool)
    return len(nat_specs(nat)), True


def nat_specs(nat: NatRules) -> list[str]:
    return [spec for rules in desired_chains(nat).values() for spec in rules]


def describe(nat: NatRules) -> str:
    """'5 NAT rules (EGRESS-ROUTER-DNAT, EGRESS-ROUTER-SNAT) and 2 connection-mark rules (...)'."""
    parts = []
    family = "IPv6 " if nat.version == 6 else ""
    if nat.chains:
        parts.append(f"{len(nat_specs(nat))} {family}NAT rules ({', '.join(chain for chain, _ in nat.chains)})")
    if nat.mangle:
        marks = sum(len(rules) for _, rules in nat.mangle)
        parts.append(f"{marks} {family}connection-mark rules ({', '.join(chain for chain, _ in nat.mangle)})")
    return " and ".join(parts)


def roll_back(restore_tool: str, before: NatState, tables: tuple[str, ...] = ("nat",)) -> None:
    restore(restore_tool, rollback_payload(before, tables))
