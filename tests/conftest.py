"""Suite-wide rules: in CI (CI=true) or with EGRESS_ROUTER_NO_SKIP=1, a skipped test is a failure."""

from __future__ import annotations

import os

import pytest


def skips_forbidden() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1") or bool(os.environ.get("EGRESS_ROUTER_NO_SKIP"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and skips_forbidden() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where skips are not allowed (CI): {reason}"
