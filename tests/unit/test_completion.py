"""Shell completion as people set it up: the script click generates, sourced into real bash, zsh and fish.

It must work in an empty environment (no EGRESS_* variables: completion is not the container path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from egress_router.core.variables import MODES

BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = BIN / "egress-router"
SUBCOMMANDS = {"convert", "demo", "dns-proxy", "http-proxy", "ready", "render", "validate", "variables", "verify"}


def shell(argv: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/test installs it)")
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"{CONSOLE_SCRIPT} is not installed")
    env = {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": "/nonexistent", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def bash_complete(*words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed), with the generated script sourced."""
    script = ('eval "$(_EGRESS_ROUTER_COMPLETE=bash_source egress-router)" || exit 9\n'
              'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))\n'
              '_egress_router_completion egress-router\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    done = shell(["bash", "-c", script, "bash", "egress-router", *words])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


def fish_complete(line: str) -> list[str]:
    done = shell(["fish", "--no-config", "-c",
                  f"env _EGRESS_ROUTER_COMPLETE=fish_source egress-router | source; complete -C '{line}'"])
    assert done.returncode == 0, done.stderr
    return [entry.split("\t", 1)[0] for entry in done.stdout.splitlines()]


def test_bash_completes_subcommands() -> None:
    assert set(bash_complete("")) == SUBCOMMANDS
    assert bash_complete("va") == ["validate", "variables"]


def test_bash_completes_options_and_their_choices() -> None:
    assert "--iptables" in bash_complete("render", "--")
    assert bash_complete("render", "--mode", "") == list(MODES)
    assert bash_complete("validate", "--iptables", "") == ["nft", "legacy", "auto"]


def test_fish_completes_subcommands_and_choices() -> None:
    assert set(fish_complete("egress-router ")) >= SUBCOMMANDS
    assert fish_complete("egress-router va") == ["validate", "variables"]
    # fish sorts the candidates itself
    assert sorted(fish_complete("egress-router render --mode ")) == sorted(MODES)


def test_zsh_registers_the_completion_function() -> None:
    done = shell(["zsh", "-f", "-c", 'autoload -U compinit && compinit -u -D && '
                  'eval "$(_EGRESS_ROUTER_COMPLETE=zsh_source egress-router)" && print -r -- $_comps[egress-router]'])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "_egress_router_completion"


def test_zsh_protocol_answers_with_candidates_and_help() -> None:
    """What the registered zsh function asks egress-router for, and gets back (type, value, help)."""
    done = shell(["env", "COMP_WORDS=egress-router render --ipt", "COMP_CWORD=2",
                  "_EGRESS_ROUTER_COMPLETE=zsh_complete", "egress-router"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["plain", "--iptables"]
    assert lines[2].startswith("EGRESS_IPTABLES: ")


@pytest.mark.parametrize("source", ["bash_source", "zsh_source", "fish_source"])
def test_generating_the_script_needs_no_configuration(source: str) -> None:
    """The defect this guards: completion used to run the container path ('EGRESS_SOURCE: is not set')."""
    done = shell(["env", f"_EGRESS_ROUTER_COMPLETE={source}", "egress-router"])
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr
    assert "_egress_router_completion" in done.stdout or "egress-router" in done.stdout
