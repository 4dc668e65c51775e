"""EGRESS_{HTTP,DNS}_PROXY_WORKERS: the HTTP proxy runs one process unless asked for more, the DNS proxy 'auto'
(one per CPU, at most 4) unless told a number."""

from __future__ import annotations

import pytest

from egress_router.core.config import load_dns_proxy, load_http_proxy
from egress_router.core.errors import ConfigError

HTTP = {"EGRESS_HTTP_PROXY_DESTINATION": "*"}
DNS = {"EGRESS_DNS_PROXY_DESTINATION": "53 203.0.113.53"}
CASES = [(HTTP, "EGRESS_HTTP_PROXY_WORKERS", load_http_proxy), (DNS, "EGRESS_DNS_PROXY_WORKERS", load_dns_proxy)]
DEFAULTS = {"EGRESS_HTTP_PROXY_WORKERS": 1, "EGRESS_DNS_PROXY_WORKERS": None}  # None: 'auto'


@pytest.mark.parametrize(("base", "name", "loader"), CASES)
@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("4", 4), ("256", 256),
                                                 ("auto", None), ("AUTO", None), (" auto ", None)])
def test_worker_counts(base: dict[str, str], name: str, loader, value: str,  # type: ignore[no-untyped-def]
                       expected: int | None) -> None:
    assert loader({**base, name: value}).workers == expected


@pytest.mark.parametrize(("base", "name", "loader"), CASES)
@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_blank_is_the_default(base: dict[str, str], name: str, loader,  # type: ignore[no-untyped-def]
                                       value: str | None) -> None:
    env = dict(base) if value is None else {**base, name: value}
    assert loader(env).workers == DEFAULTS[name]


@pytest.mark.parametrize(("base", "name", "loader"), CASES)
@pytest.mark.parametrize("value", ["0", "257", "-1", "two", "1.5", "0x2", "autox", "1000000"])
def test_bad_worker_counts_name_the_variable(base: dict[str, str], name: str, loader,  # type: ignore[no-untyped-def]
                                             value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loader({**base, name: value})
    assert caught.value.variable == name
    assert repr(value) in str(caught.value) and "auto" in str(caught.value)
