"""EGRESS_LOG_FORMAT's JSON lines (formatter, early errors) and squid's native access.log line."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from egress_router import logs
from egress_router.container import run_container
from egress_router.core import variables as v
from egress_router.core.errors import ConfigError
from egress_router.proxy.squid_log import DENIED, INVALID, INVALID_URL, MISS, TUNNEL, logged_url, one_field, squid_line

NOW = 1733059000.1234  # 2024-12-01T13:16:40.123Z


def record(message: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("egress_router.proxy.http", level, __file__, 1, message, args, None)
    made.created = NOW
    made.__dict__.update(extra)
    return made


def parsed(line: str) -> dict[str, object]:
    assert "\n" not in line, line
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


@pytest.fixture
def restored() -> Iterator[None]:
    """configure() changes the package's and the root logger and sys.excepthook: put them back."""
    package, root = logging.getLogger("egress_router"), logging.getLogger()
    saved = (package.handlers[:], package.level, package.propagate, root.handlers[:], root.level, sys.excepthook)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
    logging.captureWarnings(False)
    package.handlers[:], package.level, package.propagate, root.handlers[:], root.level, sys.excepthook = saved


# ------------------------------------------------------------------ JSON

def test_rfc3339_utc_with_milliseconds() -> None:
    assert logs.rfc3339(NOW) == "2024-12-01T13:16:40.123Z"
    assert logs.rfc3339(1733059000.0) == "2024-12-01T13:16:40.000Z"
    assert logs.rfc3339(1733059000.9996) == "2024-12-01T13:16:40.999Z"  # never .1000, never the next second


def test_a_json_line_has_time_level_logger_message() -> None:
    line = parsed(logs.JsonFormatter().format(record("Applied %d step(s)", 3)))
    assert line == {"time": "2024-12-01T13:16:40.123Z", "level": "info", "logger": "egress_router.proxy.http",
                    "message": "Applied 3 step(s)"}


def test_fields_non_ascii_and_newlines_stay_in_one_object() -> None:
    text = logs.JsonFormatter().format(record("héllo\nwörld \"quoted\" ☃", level=logging.WARNING,
                                              fields={"client": "198.51.100.2:4000", "status": 403}))
    assert "☃" in text  # UTF-8, not \u escapes
    line = parsed(text)
    assert line["message"] == "héllo\nwörld \"quoted\" ☃" and line["level"] == "warning"
    assert line["fields"] == {"client": "198.51.100.2:4000", "status": 403}


def test_an_exception_is_inside_the_object() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        made = record("Worker %d failed", 1, level=logging.ERROR, exc_info=sys.exc_info())
    line = parsed(logs.JsonFormatter().format(made))
    assert line["message"] == "Worker 1 failed"
    exc = line["exc"]
    assert isinstance(exc, str) and exc.startswith("Traceback") and "ValueError: bad thing" in exc


def test_a_bare_squid_line_is_the_message_of_a_json_object_but_alone_in_text() -> None:
    squid = "1733059000.123      5 198.51.100.2 TCP_MISS/200 120 GET http://www.example.com/ - HIER_NONE/- -"
    made = record("%s", squid, **{logs.BARE: True, logs.FIELDS: {"status": 200}})
    assert logs._Formatter().format(made) == squid
    assert parsed(logs.JsonFormatter().format(made))["message"] == squid
    plain = logs._Formatter().format(record("Ready"))
    assert plain.endswith(" [info] Ready") and plain.startswith("2024-12-01T13:16:40Z")  # the default, unchanged


def test_configure_json_every_line_parses_other_loggers_and_uncaught_exceptions_too(
        restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(False, "json")
    logging.getLogger("egress_router.router").info("Ready: %s", "ünïcode")
    logging.getLogger("egress_router.router").debug("not shown without debug")
    logging.getLogger("asyncio").warning("Task was destroyed but it is pending!")
    warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    lines = capsys.readouterr().err.splitlines()
    records = [parsed(line) for line in lines]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("egress_router.router", "info"), ("asyncio", "warning"), ("py.warnings", "warning"),
        ("egress_router", "critical")], lines
    assert records[0]["message"] == "Ready: ünïcode"
    assert "DeprecationWarning: a deprecated thing" in str(records[2]["message"])
    assert "RuntimeError: boom" in str(records[3]["exc"])


def test_configure_text_is_the_default(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure()
    logging.getLogger("egress_router.router").info("Ready")
    assert capsys.readouterr().err.endswith(" [info] Ready\n")


def test_an_early_error_is_one_json_line_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"EGRESS_LOG_FORMAT": "json", "EGRESS_SOURCE": "192.0.2.999", "EGRESS_GATEWAY": "192.0.2.1",
           "EGRESS_DESTINATION": "203.0.113.10", "EGRESS_ROUTER_MODE": "init"}
    with pytest.raises(SystemExit) as exit_:
        run_container(env)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    line = parsed(err.rstrip("\n"))
    assert line["level"] == "error" and line["fields"] == {"variable": "EGRESS_SOURCE"}
    assert str(line["message"]).startswith("EGRESS_SOURCE: ") and "192.0.2.999" in str(line["message"])
    with pytest.raises(SystemExit):
        run_container({**env, "EGRESS_LOG_FORMAT": "text"})
    assert capsys.readouterr().err.startswith("error: EGRESS_SOURCE: ")
    with pytest.raises(SystemExit):  # a bad format itself: said in text, the one format certain to be read
        run_container({**env, "EGRESS_LOG_FORMAT": "yaml"})
    assert capsys.readouterr().err == "error: EGRESS_LOG_FORMAT: 'yaml' is not one of text, json\n"


def test_the_variables() -> None:
    assert v.LOG_FORMAT.read({}) == "text"
    assert v.LOG_FORMAT.read({"EGRESS_LOG_FORMAT": " json "}) == "json"
    assert v.LOG_FORMAT.choices == ("text", "json")
    read = v.HTTP_ACCESS_LOG.read
    assert read({}) == ""
    for on in ("1", "true", "yes", "on", "TRUE"):
        assert read({"EGRESS_HTTP_PROXY_ACCESS_LOG": on}) == "text"
    for off in ("0", "false", "no", "off"):
        assert read({"EGRESS_HTTP_PROXY_ACCESS_LOG": off}) == ""
    assert read({"EGRESS_HTTP_PROXY_ACCESS_LOG": "squid"}) == "squid"
    assert read({"EGRESS_HTTP_PROXY_ACCESS_LOG": " Squid "}) == "squid"
    with pytest.raises(ConfigError, match=r"EGRESS_HTTP_PROXY_ACCESS_LOG: 'combined' is not one of .*squid$"):
        read({"EGRESS_HTTP_PROXY_ACCESS_LOG": "combined"})


# ------------------------------------------------------------------ squid

def fields(line: str) -> list[str]:
    return line.split()


def test_squid_line_of_an_allowed_request() -> None:
    line = squid_line(NOW, 125.7, "198.51.100.2", MISS, 200, 1234, "GET", "http://www.example.com/hello",
                      "203.0.113.10", "text/html")
    assert line == ("1733059000.123    125 198.51.100.2 TCP_MISS/200 1234 GET http://www.example.com/hello - "
                    "HIER_DIRECT/203.0.113.10 text/html")
    assert fields(line) == ["1733059000.123", "125", "198.51.100.2", "TCP_MISS/200", "1234", "GET",
                            "http://www.example.com/hello", "-", "HIER_DIRECT/203.0.113.10", "text/html"]


def test_squid_line_of_a_denied_request() -> None:
    line = squid_line(NOW, 0.4, "2001:db8::2", DENIED, 403, 173, "GET", "http://internal.example.com/", None,
                      "text/plain; charset=utf-8")
    assert line == ("1733059000.123      0 2001:db8::2 TCP_DENIED/403 173 GET http://internal.example.com/ - "
                    "HIER_NONE/- text/plain;charset=utf-8")


def test_squid_line_of_a_connect_tunnel() -> None:
    line = squid_line(NOW, 60_123.9, "198.51.100.2", TUNNEL, 200, 5012, "CONNECT", "api.example.com:443",
                      "2001:db8:5::11", None)
    assert line == ("1733059000.123  60123 198.51.100.2 TCP_TUNNEL/200 5012 CONNECT api.example.com:443 - "
                    "HIER_DIRECT/2001:db8:5::11 -")


def test_squid_widths_pad_but_never_cut() -> None:
    # %9ld.%03d: the seconds right-aligned in 9, the milliseconds zero-padded; %6ld; %03d for the status
    short = squid_line(5.0045, 7, "192.0.2.1", INVALID, 99, 0, "NONE", INVALID_URL, None, None)
    assert short.startswith("        5.004      7 192.0.2.1 NONE_NONE/099 0 NONE error:invalid-request - ")
    assert short.endswith(" HIER_NONE/- -")
    long = squid_line(NOW, 12_345_678, "192.0.2.1", MISS, 504, 0, "GET", "http://a.example/", None, None)
    assert fields(long)[1] == "12345678"


def test_the_logged_url_and_single_fields() -> None:
    assert logged_url("www.example.com", 80, "/hello?token=secret&x=1") == "http://www.example.com/hello"
    assert logged_url("www.example.com", 8080, "/") == "http://www.example.com:8080/"
    assert logged_url("[2001:db8::10]", 81, "/a?b") == "http://[2001:db8::10]:81/a"
    assert one_field("text/html; charset=utf-8") == "text/html;charset=utf-8"
    assert one_field(" ") == "-"
    # ten fields whatever the values hold (a pipeline splits on spaces)
    assert len(fields(squid_line(NOW, 1, "192.0.2.1", MISS, 200, 1, "GET", "http://a.example/x y", None, "a b"))) == 10
