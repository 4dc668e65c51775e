"""Loads pyroute2 modules without the package's eager top-level imports.

`import pyroute2` imports every netlink family it supports (conntrack, ndb, ipvs, nl80211, ...)
and costs about 0.2 s, most of the init container's runtime. The package is registered as a bare
namespace first, and only the modules asked for are imported. Should a pyroute2 release ever need
its package __init__ for them, we fall back to the normal import, which is only slower, and say so in the log;
setup.cfg bounds the versions whose layout is known (a unit test checks the init path's imports).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any


def _import(name: str) -> Any:
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("pyroute2 is not installed")
        shell = types.ModuleType("pyroute2")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules["pyroute2"] = shell
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        logging.getLogger(__name__).warning(
            "pyroute2's modules are not where egress-router expects them (%s); loading the whole package, "
            "which adds about 0.2 s to every start: install a pyroute2 version setup.cfg allows", exc)
        for loaded in [n for n in sys.modules if n == "pyroute2" or n.startswith("pyroute2.")]:
            del sys.modules[loaded]
        importlib.import_module("pyroute2")
        return importlib.import_module(name)


def load_pyroute2_modules() -> types.SimpleNamespace:
    """pyroute2's rtnetlink message classes (what rtnl.Rtnl sends and decodes)."""
    return types.SimpleNamespace(
        ifinfmsg=_import("pyroute2.netlink.rtnl.ifinfmsg").ifinfmsg,
        ifaddrmsg=_import("pyroute2.netlink.rtnl.ifaddrmsg").ifaddrmsg,
        rtmsg=_import("pyroute2.netlink.rtnl.rtmsg").rtmsg,
        fibmsg=_import("pyroute2.netlink.rtnl.fibmsg").fibmsg,
    )


def iproute_class() -> Any:
    """pyroute2's full IPRoute (used by the lab, where start-up time does not matter)."""
    return _import("pyroute2.iproute.linux").IPRoute


def conntrack_classes() -> tuple[Any, Any]:
    """pyroute2's Conntrack (ctnetlink) and its tuple filter class (the reload's UDP flow clean-up)."""
    module = _import("pyroute2.conntrack")
    return module.Conntrack, module.NFCTAttrTuple
