"""Loads pyroute2's IPRoute without the package's eager top-level imports.

`import pyroute2` imports every netlink family it supports (conntrack, ndb, ipvs, nl80211, ...)
and costs about 0.2 s, most of the init container's runtime. We need only rtnetlink, so the
package is registered as a bare namespace first and `pyroute2.iproute.linux` is imported alone.
Should a pyroute2 release ever need its package __init__ for that, we fall back to the normal
import, which is only slower.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


def iproute_class() -> Any:
    if "pyroute2" in sys.modules:
        return importlib.import_module("pyroute2.iproute.linux").IPRoute
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("pyroute2 is not installed")
    shell = types.ModuleType("pyroute2")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["pyroute2"] = shell
    try:
        return importlib.import_module("pyroute2.iproute.linux").IPRoute
    except ImportError:
        for name in [n for n in sys.modules if n == "pyroute2" or n.startswith("pyroute2.")]:
            del sys.modules[name]
        return importlib.import_module("pyroute2").IPRoute


def netlink_error() -> type[Exception]:
    iproute_class()
    return importlib.import_module("pyroute2.netlink.exceptions").NetlinkError  # type: ignore[no-any-return]
