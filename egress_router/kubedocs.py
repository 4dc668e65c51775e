"""Kubernetes YAML or JSON text -> its objects, one by one (the parse of `validate -f` and `convert`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class KubeObject:
    """One object of a file: which file, which document, its body."""

    file: str
    document: int
    body: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def label(self) -> str:
        name = _mapping(self.body.get("metadata")).get("name")
        if isinstance(name, str) and name:
            return f"{self.kind}/{name}"
        return f"{self.kind}/(unnamed, document {self.document})"

    @property
    def namespace(self) -> str | None:
        namespace = _mapping(self.body.get("metadata")).get("namespace")
        return namespace if isinstance(namespace, str) and namespace else None


def parse_objects(name: str, text: str) -> tuple[list[KubeObject], list[str]]:
    """The objects of a YAML or JSON text (every document, a List's items one by one) and its problems."""
    import yaml  # only for `validate -f`: the container's start path never pays for it

    try:
        # JSON may be indented with tabs, which YAML refuses
        documents = [json.loads(text)] if name.endswith(".json") else _json_or_yaml(text)
    except json.JSONDecodeError as exc:
        return [], [f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "cannot be parsed"
        return [], [f"YAML syntax error{where}: {_one_line(problem)}"]
    except yaml.YAMLError as exc:
        return [], [f"not YAML: {_one_line(str(exc))}"]
    except RecursionError:
        return [], ["YAML nested too deeply to be a Kubernetes manifest"]
    objects: list[KubeObject] = []
    problems: list[str] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue  # an empty document (a trailing ---)
        for obj, problem in _flatten(name, number, document):
            if problem:
                problems.append(problem)
            else:
                objects.append(obj)
    return objects, problems


def _json_or_yaml(text: str) -> list[Any]:
    """JSON without a .json name (stdin): JSON may be indented with tabs, which YAML refuses."""
    if text.lstrip().startswith("{"):
        try:
            return [json.loads(text)]
        except json.JSONDecodeError:
            pass  # YAML flow style, or broken: YAML's message then
    return load_yaml(text)


def load_yaml(text: str) -> list[Any]:
    """Every document of `text`: with libyaml's loader when PyYAML has it (~10x faster on long rule lists), and on
    an error again with PyYAML's own, whose messages (and line numbers) are the ones people know."""
    import yaml

    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return list(yaml.load_all(text, Loader=fast))
        except (yaml.YAMLError, RecursionError):
            pass
    return list(yaml.safe_load_all(text))


def _flatten(name: str, number: int, document: Any) -> Iterator[tuple[KubeObject, str]]:
    """The objects in a document; a List's items one by one."""
    if not isinstance(document, dict):
        yield KubeObject(name, number, {}), f"document {number} is not a Kubernetes object (a mapping with a kind)"
        return
    kind = document.get("kind")
    if not isinstance(kind, str) or not kind:
        yield KubeObject(name, number, {}), f"document {number} has no kind"
        return
    if kind == "List" or (kind.endswith("List") and "items" in document):
        items = document.get("items")
        if not isinstance(items, list):
            yield KubeObject(name, number, {}), f"document {number}: {kind} without a list of items"
            return
        for item in items:
            yield from _flatten(name, number, item)
        return
    yield KubeObject(name, number, document), ""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _one_line(text: str) -> str:
    return " ".join(text.split())
