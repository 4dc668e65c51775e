"""Rules from files (EGRESS_*_DESTINATION_FILE): the same grammars, errors that name the file and line, and
the watch that notices a ConfigMap volume's symlink swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egress_router.core.config import load, rule_files
from egress_router.core.errors import ConfigError
from egress_router.sources import FileWatch, load_config, read_files

NETWORK = {"EGRESS_SOURCE": "192.0.2.99", "EGRESS_GATEWAY": "192.0.2.1"}


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    return str(caught.value)


def test_redirect_rules_from_a_file_equal_the_inline_ones(tmp_path: Path) -> None:
    rules = "80 tcp 203.0.113.10\n# a comment\n\n8443 tcp 203.0.113.11 443\n203.0.113.12\n"
    path = write(tmp_path / "destination", rules)
    from_file = load_config({**NETWORK, "EGRESS_ROUTER_MODE": "init", "EGRESS_DESTINATION_FILE": path})
    inline = load({**NETWORK, "EGRESS_ROUTER_MODE": "init", "EGRESS_DESTINATION": rules})
    assert from_file.destinations == inline.destinations
    assert from_file.destinations is not None and len(from_file.destinations.rules) == 2


def test_a_bad_line_names_the_variable_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "destination", "80 tcp 203.0.113.10\n\n81 tcp 203.0.113\n")
    message = error({**NETWORK, "EGRESS_DESTINATION_FILE": path})
    assert message.startswith(f"EGRESS_DESTINATION_FILE={path} line 3: '81 tcp 203.0.113': ")


def test_the_proxy_modes_are_chosen_by_their_files_too(tmp_path: Path) -> None:
    acl = write(tmp_path / "acl", "*.example.com\n")
    config = load_config({"EGRESS_HTTP_PROXY_DESTINATION_FILE": acl})
    assert config.mode == "http-proxy" and config.http_proxy is not None
    assert config.http_proxy.acl.describe() == load({"EGRESS_HTTP_PROXY_DESTINATION": "*.example.com"}) \
        .http_proxy.acl.describe()  # type: ignore[union-attr]
    forwards = write(tmp_path / "forwards", "7000 www.example.com 80\n")
    config = load_config({"EGRESS_DNS_PROXY_DESTINATION_FILE": forwards})
    assert config.mode == "dns-proxy" and config.dns_proxy is not None
    assert [(f.port, f.host, f.remote_port) for f in config.dns_proxy.forwards] == [(7000, "www.example.com", 80)]
    message = error({"EGRESS_HTTP_PROXY_DESTINATION_FILE": acl, "EGRESS_DNS_PROXY_DESTINATION_FILE": forwards})
    assert "EGRESS_DNS_PROXY_DESTINATION" in message and "two containers" in message


@pytest.mark.parametrize("grammar, rules", [("EGRESS_DESTINATION", "80 tcp 203.0.113.10"),
                                            ("EGRESS_HTTP_PROXY_DESTINATION", "*"),
                                            ("EGRESS_DNS_PROXY_DESTINATION", "7000 203.0.113.10")])
def test_inline_and_file_together_is_an_error(tmp_path: Path, grammar: str, rules: str) -> None:
    path = write(tmp_path / "rules", rules)
    message = error({**NETWORK, grammar: rules, f"{grammar}_FILE": path})
    assert message == f"{grammar}_FILE: is set together with {grammar}: give the rules in one of them"


def test_unreadable_empty_and_binary_files_are_one_line_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert error({**NETWORK, "EGRESS_DESTINATION_FILE": missing}) == \
        f"EGRESS_DESTINATION_FILE={missing}: cannot read it: No such file or directory"
    assert error({**NETWORK, "EGRESS_DESTINATION_FILE": str(tmp_path)}) == \
        f"EGRESS_DESTINATION_FILE={tmp_path}: cannot read it: Is a directory"
    empty = write(tmp_path / "empty", "  \n\n")
    assert error({**NETWORK, "EGRESS_DESTINATION_FILE": empty}) == f"EGRESS_DESTINATION_FILE={empty}: is empty"
    binary = write(tmp_path / "binary", b"80 tcp 203.0.113.10\n\xff\xfe\n")
    assert error({**NETWORK, "EGRESS_DESTINATION_FILE": binary}) == \
        f"EGRESS_DESTINATION_FILE={binary} line 2: is not UTF-8 text (byte 20)"


def test_the_core_reads_no_file_itself(tmp_path: Path) -> None:
    path = write(tmp_path / "destination", "80 tcp 203.0.113.10\n")
    env = {**NETWORK, "EGRESS_DESTINATION_FILE": path}
    assert rule_files(env) == (path,)
    assert "was not read" in str(pytest.raises(ConfigError, load, env).value)
    assert load(env, {path: "81 tcp 203.0.113.11\n"}).destinations.rules[0].port == 81  # type: ignore[union-attr]
    assert read_files(env) == {path: "80 tcp 203.0.113.10\n"}


def configmap_volume(directory: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does when a ConfigMap changes: a new timestamped directory, then an atomic rename of
    a fresh `..data` symlink over the old one; the visible names are symlinks into `..data`."""
    target = directory / version
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
        visible = directory / name
        if not visible.is_symlink():
            visible.symlink_to(Path("..data") / name)
    (directory / "..data_tmp").symlink_to(version)
    os.rename(directory / "..data_tmp", directory / "..data")


def test_the_watch_sees_a_configmap_swap_and_an_in_place_write(tmp_path: Path) -> None:
    configmap_volume(tmp_path, "..2026_12_01_00_00_00.1", {"destination": "80 tcp 203.0.113.10\n"})
    path = str(tmp_path / "destination")
    watch = FileWatch([path])
    assert not watch.changed()
    configmap_volume(tmp_path, "..2026_12_01_00_00_01.2", {"destination": "80 tcp 203.0.113.10\n"})
    assert watch.changed()  # same content, new file: the reload then finds nothing to do
    assert not watch.changed()
    configmap_volume(tmp_path, "..2026_12_01_00_00_02.3", {"destination": "81 tcp 203.0.113.11\n"})
    assert watch.changed()
    assert read_files({"EGRESS_DESTINATION_FILE": path}) == {path: "81 tcp 203.0.113.11\n"}
    with open(tmp_path / "..data" / "destination", "a", encoding="utf-8") as file:
        file.write("82 tcp 203.0.113.12\n")  # a hostPath or a hand edit: written in place
    assert watch.changed()
    (tmp_path / "..data").unlink()
    assert watch.changed()  # gone (mid-swap, or the volume went away): a change, which the reload reports
    assert not watch.changed()


def test_inotify_wakes_on_a_configmap_swap(tmp_path: Path) -> None:
    import select
    import signal

    from egress_router.inotify import Notifier

    configmap_volume(tmp_path, "..2026_12_01_00_00_00.1", {"destination": "80 tcp 203.0.113.10\n"})
    notifier = Notifier.open([str(tmp_path / "destination")])
    assert notifier is not None
    try:
        assert not notifier.drain()
        configmap_volume(tmp_path, "..2026_12_01_00_00_01.2", {"destination": "81 tcp 203.0.113.10\n"})
        assert select.select([notifier.fd], [], [], 5.0)[0]
        assert notifier.drain() and not notifier.drain()
        # as the long-running loops use it: a signal, taken with sigtimedwait
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        try:
            notifier.signal_on_events(signal.SIGIO)
            assert signal.sigtimedwait({signal.SIGIO}, 0) is None
            configmap_volume(tmp_path, "..2026_12_01_00_00_02.3", {"destination": "82 tcp 203.0.113.10\n"})
            received = signal.sigtimedwait({signal.SIGIO}, 5.0)
            assert received is not None and received.si_signo == signal.SIGIO
            assert notifier.drain()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        notifier.close()
    assert Notifier.open([]) is None  # nothing to watch
