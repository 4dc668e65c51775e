"""The configuration's inputs as this process sees them: the environment and the rule files it names.

The core never reads a file (core.config.load takes their content); this is the one place that does,
for the container path, the CLI and the reload watchers alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .core import variables as v
from .core.config import RouterConfig, load
from .core.errors import ConfigError

MAX_FILE_BYTES = 16 * 1024 * 1024  # ~700,000 redirect rules: a larger file is a mistake, not a rule list


def read_files(env: Mapping[str, str]) -> dict[str, str]:
    """The content of every rule file the environment names (path -> text)."""
    files: dict[str, str] = {}
    for variable in v.RULE_FILES.values():
        if variable.is_set(env):
            path = variable.read(env)
            files[path] = read_rule_file(path, variable.name)
    return files


def read_rule_file(path: str, variable: str) -> str:
    where = f"{variable}={path}"
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, f"cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(where, f"is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(where, f"is not UTF-8 text (byte {exc.start})", line=line) from None


def watched_paths(env: Mapping[str, str]) -> tuple[str, ...]:
    """Every file the configuration was read from: the ones a long-running mode watches and reloads."""
    return tuple(variable.read(env) for variable in v.RULE_FILES.values() if variable.is_set(env))


def load_config(env: Mapping[str, str]) -> RouterConfig:
    """core.config.load with the rule files read."""
    return load(env, read_files(env))


@dataclass(frozen=True, slots=True)
class Stamp:
    """What changes when a file is replaced or rewritten: a ConfigMap volume swaps its `..data` symlink, so
    the path then resolves to another inode; an in-place write changes the size or the modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def stamp(path: str) -> Stamp | None:
    """The file's stamp, following symlinks; None if it cannot be stat'ed now (mid-swap, removed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    """Polls a few files for changes (cheap: one stat each). Polling rather than inotify: it sees a symlink
    swap anywhere on the path, subPath and bind mounts, and in-place writes alike, with nothing to re-arm."""

    def __init__(self, paths: Iterable[str]):
        self.paths = tuple(dict.fromkeys(paths))
        self.stamps = {path: stamp(path) for path in self.paths}

    def changed(self) -> bool:
        """Whether any file changed since the last call (or since the watch began)."""
        now = {path: stamp(path) for path in self.paths}
        if now == self.stamps:
            return False
        self.stamps = now
        return True
