"""What installing the package puts on a user's machine, and the pyroute2 versions whose layout we rely on."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter of this venv, with an environment of nothing but PATH."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})


def test_only_the_package_is_installed_at_the_top_level() -> None:
    """The root entrypoint.py (the design card's container entry) is not installed as a module `entrypoint`."""
    top_level = importlib.metadata.distribution("egress-router").read_text("top_level.txt")
    assert top_level is not None
    assert top_level.split() == ["egress_router"]


def test_setup_cfg_has_no_stale_sections_and_bounds_pyroute2() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    assert "flake8" not in config.sections()  # ruff is the linter (ruff.toml)
    assert "py_modules" not in config["options"]
    requires = importlib.metadata.distribution("egress-router").requires or []
    pyroute2 = next(req for req in requires if req.startswith("pyroute2"))
    assert "<" in pyroute2 and ">=" in pyroute2, pyroute2


def test_the_init_path_does_not_import_pyroute2_whole() -> None:
    """The init container's netlink path loads only pyroute2's message classes: not the package __init__,
    not the asyncio IPRoute (about 0.2 s more per start); a pyroute2 release that moves them fails here."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import egress_router.router\n"
        "from egress_router.net.rtnl import Rtnl\n"
        "with Rtnl() as rtnl:\n"
        "    assert rtnl.links()\n"
        "print(getattr(sys.modules['pyroute2'], '__file__', None))\n"
        "print(sorted(n for n in sys.modules if n.startswith(('pyroute2.iproute', 'pyroute2.ndb', 'asyncio'))))\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["None", "[]"], done.stdout
    assert "loading the whole package" not in done.stderr


def test_the_fallback_is_not_silent() -> None:
    """Should pyroute2's layout change, the slow path still works and says so in the log."""
    code = (
        "import importlib, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from egress_router.net import pyroute\n"
        "print(pyroute._import('pyroute2.netlink.rtnl.no_such_module_here'))\n"
    )
    done = run_python(code)
    assert done.returncode == 1  # the module really does not exist, also after the whole import
    assert "loading the whole package" in done.stderr
    assert "ModuleNotFoundError" in done.stderr
