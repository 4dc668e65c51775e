"""NAT: the plan as iptables rules in chains we own (pure), applied in one iptables-restore (edge).

Like kube-proxy, every rule lives in chains the router owns, jumped to from the built-in chains,
and everything is written in one `iptables-restore --noflush` transaction: it applies whole or not
at all, works with the nft and the legacy backend alike (EGRESS_IPTABLES picks one), and leaves
other owners' rules alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from .config import RouterConfig
from .destinations import Destinations
from .errors import SetupError
from .plan import Plan

log = logging.getLogger(__name__)

DNAT_CHAIN = "EGRESS-ROUTER-DNAT"
SNAT_CHAIN = "EGRESS-ROUTER-SNAT"
# built-in chain -> our chain it jumps to
JUMPS = {"PREROUTING": DNAT_CHAIN, "POSTROUTING": SNAT_CHAIN}
BACKENDS = ("nft", "legacy")  # EGRESS_IPTABLES=auto looks at both
RESTORE_WAIT_SECONDS = "10"  # legacy backend: wait for the xtables lock instead of failing


# ---------------------------------------------------------------- pure: rules and payloads

def dnat_specs(destinations: Destinations, pod_interface: str, *, legacy: bool = False) -> list[str]:
    """DNAT rule specifications in order; `legacy` gives the legacy image's spelling (no -m)."""
    specs = []
    for rule in destinations.rules:
        match = f"-p {rule.proto} --dport {rule.port}" if legacy else \
            f"-p {rule.proto} -m {rule.proto} --dport {rule.port}"
        target = str(rule.ip) if rule.remote_port is None else f"{rule.ip}:{rule.remote_port}"
        specs.append(f"-i {pod_interface} {match} -j DNAT --to-destination {target}")
    if destinations.fallback is not None:
        specs.append(f"-i {pod_interface} -j DNAT --to-destination {destinations.fallback}")
    return specs


def legacy_lines(config: RouterConfig) -> list[str]:
    """What the legacy image printed in unit-test mode."""
    assert config.destinations is not None and config.source is not None
    lines = [f"-A PREROUTING {spec}" for spec in dnat_specs(config.destinations, config.pod_interface, legacy=True)]
    lines.append(f"-A POSTROUTING -j SNAT --to-source {config.source.ip}")
    return lines


def desired_chains(plan: Plan) -> dict[str, list[str]]:
    """Our chains and their rule specifications, as iptables-save prints them."""
    assert plan.destinations is not None
    return {
        DNAT_CHAIN: dnat_specs(plan.destinations, plan.pod_interface),
        SNAT_CHAIN: [f"-o {plan.interface} -j SNAT --to-source {plan.address.ip}"],
    }


@dataclass(frozen=True, slots=True)
class NatState:
    """The nat table as iptables-save showed it: chain -> rule specifications (in order)."""

    chains: dict[str, list[str]] = field(default_factory=dict)

    def jump_count(self, builtin: str, target: str) -> int:
        return self.chains.get(builtin, []).count(f"-j {target}")

    def ours(self) -> dict[str, list[str]]:
        return {name: rules for name, rules in self.chains.items() if name in JUMPS.values()}


def parse_save(text: str) -> NatState:
    """Parse `iptables-save -t nat` output (other tables, comments and counters are ignored)."""
    chains: dict[str, list[str]] = {}
    in_nat = False
    for line in text.splitlines():
        if line.startswith("[") and "] " in line:  # iptables-save -c puts rule counters first
            line = line.split("] ", 1)[1]
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            chains.setdefault(chain, []).append(spec)
    return NatState(chains)


def restore_payload(plan: Plan, state: NatState) -> str | None:
    """The iptables-restore --noflush input converging `state` to `plan`; None if already there."""
    wanted = desired_chains(plan)
    jumps_ok = all(state.jump_count(b, t) == 1 for b, t in JUMPS.items())
    if jumps_ok and all(state.chains.get(c) == rules for c, rules in wanted.items()):
        return None
    lines = ["*nat"]
    # With --noflush, declaring a chain that exists flushes it: the rules below replace it whole.
    lines += [f":{chain} - [0:0]" for chain in wanted]
    lines += [f"-A {chain} {spec}" for chain, specs in wanted.items() for spec in specs]
    lines += jump_fixups(state)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jump_fixups(state: NatState) -> list[str]:
    """Add a missing jump, or delete surplus copies of it, so each built-in chain jumps to ours once."""
    lines = []
    for builtin, target in JUMPS.items():
        count = state.jump_count(builtin, target)
        if count == 0:
            lines.append(f"-A {builtin} -j {target}")
        lines += [f"-D {builtin} -j {target}"] * max(0, count - 1)
    return lines


def rollback_payload(before: NatState) -> str:
    """The payload that puts our chains and jumps back the way `before` had them."""
    previous = before.ours()
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in JUMPS.values()]
    lines += [f"-A {chain} {spec}" for chain in JUMPS.values() for spec in previous.get(chain, [])]
    for builtin, target in JUMPS.items():
        # after apply there is exactly one jump; put back as many as there were (often none)
        wanted = before.jump_count(builtin, target)
        lines += [f"-D {builtin} -j {target}"] * max(0, 1 - wanted)
        lines += [f"-A {builtin} -j {target}"] * max(0, wanted - 1)
    lines += [f"-X {chain}" for chain in JUMPS.values() if chain not in previous]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render(plan: Plan) -> str:
    """The payload as applied to a namespace that has none of our rules yet."""
    payload = restore_payload(plan, NatState())
    assert payload is not None
    return payload


def backend_tools(backend: str) -> tuple[str, str]:
    """The save and restore tool names of an iptables backend ("nft" or "legacy")."""
    return f"iptables-{backend}-save", f"iptables-{backend}-restore"


def count_rules(save_text: str) -> int:
    """How many rules an iptables-save dump holds, over all tables."""
    return sum(1 for line in save_text.splitlines() if line.startswith("-A "))


def choose_backend(rules: dict[str, int]) -> str:
    """EGRESS_IPTABLES=auto: the backend that already has rules (more of them), else nft.

    As kube's iptables-wrapper decides: the rules already in the namespace (a service mesh's init
    container, kubelet) tell which backend the node uses, and mixing the two breaks NAT.
    """
    return "legacy" if rules.get("legacy", 0) > rules.get("nft", 0) else "nft"


# ---------------------------------------------------------------- edge: iptables-save/restore

def find_tools(choice: str = "nft") -> tuple[str, str]:
    """Paths of the save and restore tools for EGRESS_IPTABLES (nft, legacy or auto), or a SetupError."""
    if choice != "auto":
        return _which_backend(choice)
    found = {}
    for backend in BACKENDS:
        try:
            found[backend] = _which_backend(backend)
        except SetupError:
            continue
    if not found:
        raise SetupError("neither iptables-nft-save/-restore nor iptables-legacy-save/-restore found on PATH "
                         "(EGRESS_IPTABLES=auto): install the iptables package")
    rules = {backend: _rules_in(tools[0]) for backend, tools in found.items()}
    backend = choose_backend(rules)
    if backend not in found:  # only the other backend is installed
        backend = next(iter(found))
    counts = ", ".join(f"{count} in {name}" for name, count in rules.items())
    log.info("Using the iptables %s backend (EGRESS_IPTABLES=auto; rules already present: %s)", backend, counts)
    return found[backend]


def _which_backend(backend: str) -> tuple[str, str]:
    names = backend_tools(backend)
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


def read_state(save: str) -> NatState:
    return parse_save(_run([save, "-t", "nat"]))


def restore(restore_tool: str, payload: str) -> None:
    log.debug("iptables-restore payload:\n%s", payload.rstrip())
    try:
        _run([restore_tool, "--noflush", "--wait", RESTORE_WAIT_SECONDS], stdin=payload)
    except SetupError as exc:
        raise SetupError(f"{exc}{failed_line_hint(str(exc), payload)}") from None


def failed_line_hint(message: str, payload: str) -> str:
    """iptables-restore reports 'line N failed'; show that line of our payload too."""
    found = re.search(r"line (\d+) failed", message)
    lines = payload.splitlines()
    if not found or not 1 <= int(found.group(1)) <= len(lines):
        return ""
    return f" (the rule was {lines[int(found.group(1)) - 1]!r})"


def apply(plan: Plan, restore_tool: str, before: NatState) -> tuple[int, bool]:
    """Converge the nat table (last read as `before`) to the plan.

    Returns the number of our rules and whether anything was changed.
    """
    payload = restore_payload(plan, before)
    count = sum(len(rules) for rules in desired_chains(plan).values())
    if payload is None:
        log.info("NAT rules already in place (%d rules in %s, %s)", count, DNAT_CHAIN, SNAT_CHAIN)
        return count, False
    restore(restore_tool, payload)
    log.info("Applied %d NAT rules (%s, %s) in one iptables-restore", count, DNAT_CHAIN, SNAT_CHAIN)
    return count, True


def roll_back(restore_tool: str, before: NatState) -> None:
    restore(restore_tool, rollback_payload(before))
