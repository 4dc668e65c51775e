"""What installing the package puts on a user's machine (its license too), and the pyroute2 versions whose layout we
rely on."""

from __future__ import annotations

import configparser
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# https://www.apache.org/licenses/LICENSE-2.0.txt, byte for byte (Debian's /usr/share/common-licenses/Apache-2.0)
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


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


def test_the_license_is_the_apache_2_text_that_setup_cfg_declares_and_ships() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert text.split(b"\n", 3)[1:3] == [b" " * 33 + b"Apache License", b" " * 27 + b"Version 2.0, January 2004"]
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256, "LICENSE must be the published text, unedited"
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    assert config["metadata"]["license"] == "Apache-2.0"
    assert config["metadata"]["license_files"].split() == ["LICENSE"]  # so the wheel's .dist-info carries it


def test_the_image_build_gets_the_license() -> None:
    """The build context is an allow-list and the builder copies named files: LICENSE must be in both, or the
    image's wheel is built without it (setuptools only warns that the license_files pattern matched nothing)."""
    for ignore in (".dockerignore", ".containerignore"):
        assert "!LICENSE" in (ROOT / ignore).read_text().splitlines(), ignore
    copies = [line.split()[1:-1] for line in (ROOT / "Containerfile").read_text().splitlines()
              if line.startswith("COPY ") and line.endswith(" /src/")]
    assert any("LICENSE" in files for files in copies), copies


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
