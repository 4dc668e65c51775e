"""The pure core imports only the standard library and core/ itself: walked with ast, so the rule holds by itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import egress_router.core

CORE = Path(egress_router.core.__file__).resolve().parent


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute names for relative imports inside core/."""
    package = "egress_router.core"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module or "")
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found.add(f"{base}.{node.module}" if node.module else base)
    return found


def outside(path: Path) -> set[str]:
    """What `path` imports from neither the standard library nor core/."""
    return {name for name in imports_of(path)
            if not (name == "egress_router.core" or name.startswith("egress_router.core."))
            and name.split(".")[0] not in sys.stdlib_module_names}


def test_core_modules_import_only_the_standard_library_and_core() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) >= 10, modules  # the walk really found the core
    for path in modules:
        assert outside(path) == set(), path.name


def test_the_walk_catches_outside_imports(tmp_path: Path) -> None:
    """The check itself can fail: third-party, sibling-package and parent-relative imports are seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("import click\nfrom ..net import rtnl\nfrom ..proxy.http import x\nfrom .values import y\n")
    assert imports_of(bad) == {"click", "egress_router.net", "egress_router.proxy.http", "egress_router.core.values"}
    assert outside(bad) == {"click", "egress_router.net", "egress_router.proxy.http"}
