"""The configuration's inputs as this process sees them: the environment and the files it names.

The core never reads a file (core.config.load takes their content); this is the one place that does,
for the container path, the CLI and the reload watchers alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .core import variables as v
from .core.config import RouterConfig, load
from .core.egressrouter import with_config_document
from .core.errors import ConfigError
from .kubedocs import load_yaml

MAX_FILE_BYTES = 16 * 1024 * 1024  # ~700,000 redirect rules: a larger file is a mistake, not a rule list


def read_files(env: Mapping[str, str]) -> dict[str, str]:
    """The content of every file the environment names (path -> text): the rule files and
    EGRESS_ROUTER_CONFIG_FILE."""
    files: dict[str, str] = {}
    if v.CONFIG_FILE.is_set(env):
        path = v.CONFIG_FILE.read(env)
        files[path] = read_rule_file(path, v.CONFIG_FILE.name)
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
    return tuple(variable.read(env) for variable in (v.CONFIG_FILE, *v.RULE_FILES.values()) if variable.is_set(env))


def load_config(env: Mapping[str, str]) -> RouterConfig:
    """core.config.load with the rule files read and an EgressRouter from EGRESS_ROUTER_CONFIG_FILE applied."""
    files = read_files(env)
    return load(with_config_file(env, files), files)


def with_config_file(env: Mapping[str, str], files: Mapping[str, str]) -> Mapping[str, str]:
    """`env` plus what the EgressRouter in EGRESS_ROUTER_CONFIG_FILE supplies (`env` itself if it is unset)."""
    if not v.CONFIG_FILE.is_set(env):
        return env
    path = v.CONFIG_FILE.read(env)
    where = f"{v.CONFIG_FILE.name}={path}"
    return with_config_document(env, parse_document(files[path], where, json_first=path.endswith(".json")), where)


def parse_document(text: str, where: str, *, json_first: bool = False) -> Any:
    """One YAML or JSON document (JSON is YAML, except for tabs in its indentation: tried first when the name
    says .json or the text starts with '{'); a syntax error is one line naming `where`, the line and the column."""
    import yaml  # only when a document is given: the init container's start path never pays for it

    if json_first or text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if json_first:
                raise ConfigError(where, f"JSON syntax error at column {exc.colno}: {exc.msg}", line=exc.lineno) \
                    from None
    try:
        # libyaml's loader where there is one: a reload of 10,000 rules must stay well under 2 s
        documents = [doc for doc in load_yaml(text) if doc is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(exc.problem or exc.context or "cannot be parsed").split())
        raise ConfigError(where, f"YAML syntax error{'' if mark is None else f' at column {mark.column + 1}'}: "
                          f"{problem}", line=None if mark is None else mark.line + 1) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(where, f"not YAML: {' '.join(str(exc).split())}") from None
    if len(documents) != 1:
        raise ConfigError(where, f"holds {len(documents)} documents, not one EgressRouter")
    return documents[0]


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
