"""EGRESS_{HTTP,DNS}_PROXY_WORKERS: one process unless asked for more; 'auto' is one per CPU."""

from __future__ import annotations

import pytest

from egress_router.core.config import load_dns_proxy, load_http_proxy
from egress_router.core.errors import ConfigError

HTTP = {"EGRESS_HTTP_PROXY_DESTINATION": "*"}
DNS = {"EGRESS_DNS_PROXY_DESTINATION": "53 203.0.113.53"}
CASES = [(HTTP, "EGRESS_HTTP_PROXY_WORKERS", load_http_proxy), (DNS, "EGRESS_DNS_PROXY_WORKERS", load_dns_proxy)]


@pytest.mark.parametrize(("base", "name", "loader"), CASES)
@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("", 1), ("  ", 1), ("1", 1), ("4", 4), ("256", 256),
                                                 ("auto", None), ("AUTO", None), (" auto ", None)])
def test_worker_counts(base: dict[str, str], name: str, loader, value: str | None,  # type: ignore[no-untyped-def]
                       expected: int | None) -> None:
    env = dict(base) if value is None else {**base, name: value}
    assert loader(env).workers == expected


@pytest.mark.parametrize(("base", "name", "loader"), CASES)
@pytest.mark.parametrize("value", ["0", "257", "-1", "two", "1.5", "0x2", "autox", "1000000"])
def test_bad_worker_counts_name_the_variable(base: dict[str, str], name: str, loader,  # type: ignore[no-untyped-def]
                                             value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loader({**base, name: value})
    assert caught.value.variable == name
    assert repr(value) in str(caught.value) and "auto" in str(caught.value)
