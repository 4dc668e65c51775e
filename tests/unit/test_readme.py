"""The README stays true where it can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from egress_router.cli import main, variables_markdown
from egress_router.core.variables import VARIABLES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_the_variables_table_is_the_generated_one() -> None:
    assert variables_markdown() in README, "README.md's variable table is stale: paste `egress-router variables " \
                                           "--markdown` into the Configuration section"


def test_every_variable_is_in_the_table_once_with_its_modes() -> None:
    rows = [line for line in variables_markdown().splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([A-Z_]+)`", row).group(1) for row in rows] == list(VARIABLES)  # type: ignore[union-attr]
    assert all(row.count(" | ") == 3 and "<" not in row for row in rows)


def test_variables_command_lists_them_all() -> None:
    result = CliRunner().invoke(main, ["variables"])
    assert result.exit_code == 0, result.output
    for name, variable in VARIABLES.items():
        assert f"{name}  [default: {variable.shown_default}]" in result.output
    assert CliRunner().invoke(main, ["variables", "--markdown"]).output.rstrip("\n") == variables_markdown()


def test_every_example_is_in_the_examples_index() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    index = (examples / "README.md").read_text(encoding="utf-8")
    for manifest in sorted(examples.glob("*.yaml")):
        assert manifest.name in index, f"examples/README.md does not list {manifest.name}"
