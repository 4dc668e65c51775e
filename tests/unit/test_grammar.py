"""The line structure the three multiline grammars share (egress_router.core.lines)."""

from __future__ import annotations

import ast
from pathlib import Path

from egress_router.core import lines as grammar
from egress_router.core.lines import FIELD_SEPARATOR, rule_lines


def test_rule_lines_skip_blanks_and_comments_and_keep_line_numbers() -> None:
    text = "# header\n\n80 tcp 203.0.113.10   # web\r\n   \n\t# indented comment\n203.0.113.99\n"
    assert list(rule_lines(text)) == [
        (3, "80 tcp 203.0.113.10", "80 tcp 203.0.113.10   # web"),
        (6, "203.0.113.99", "203.0.113.99"),
    ]


def test_a_hash_anywhere_starts_a_comment() -> None:
    line = "www.example.com#not a fragment"
    assert list(rule_lines(line)) == [(1, "www.example.com", line)]


def test_nothing_but_comments_and_blanks_gives_no_rules() -> None:
    assert list(rule_lines("")) == []
    assert list(rule_lines("\n \t\n# only\n")) == []


def test_fields_are_separated_by_any_run_of_spaces_and_tabs() -> None:
    assert FIELD_SEPARATOR.split("80 \t tcp\t203.0.113.10  8080") == ["80", "tcp", "203.0.113.10", "8080"]


def test_the_module_is_pure() -> None:
    tree = ast.parse(Path(grammar.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "re", "collections.abc"}, imported
