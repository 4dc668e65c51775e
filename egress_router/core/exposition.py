"""Prometheus text exposition format (version 0.0.4): metric families to text (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]

# Request durations in seconds: a proxy's own work is sub-millisecond, upstreams take 1 ms to seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float
    suffix: str = ""  # _bucket, _sum, _count of a histogram


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, type (counter, gauge, histogram), help text and samples."""

    name: str
    kind: str
    help: str
    samples: tuple[Sample, ...]


def single(name: str, kind: str, help_text: str, value: float, labels: Labels = ()) -> Family:
    return Family(name, kind, help_text, (Sample(labels, value),))


def labelled(name: str, kind: str, help_text: str, rows: Iterable[tuple[Labels, float]]) -> Family:
    return Family(name, kind, help_text, tuple(Sample(labels, value) for labels, value in rows))


def histogram(name: str, help_text: str, series: Iterable[tuple[Labels, Sequence[int], float]],
              bounds: Sequence[float] = DURATION_BUCKETS) -> Family:
    """`series`: (labels, counts per bucket, sum) with one count per bound plus one above the last (+Inf);
    the counts are per bucket, not cumulative: this makes them cumulative as the format wants."""
    samples: list[Sample] = []
    for labels, counts, total in series:
        running = 0
        for bound, count in zip([*bounds, math.inf], counts, strict=True):
            running += count
            samples.append(Sample((*labels, ("le", number(bound))), running, "_bucket"))
        samples.append(Sample(labels, total, "_sum"))
        samples.append(Sample(labels, running, "_count"))
    return Family(name, "histogram", help_text, tuple(samples))


def bucket_index(seconds: float, bounds: Sequence[float] = DURATION_BUCKETS) -> int:
    """The bucket a duration falls in (the last one: above every bound)."""
    for index, bound in enumerate(bounds):
        if seconds <= bound:
            return index
    return len(bounds)


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            labels = ",".join(f'{key}="{escape_label(value)}"' for key, value in sample.labels)
            lines.append(f"{family.name}{sample.suffix}{{{labels}}} {number(sample.value)}" if labels else
                         f"{family.name}{sample.suffix} {number(sample.value)}")
    return "\n".join(lines) + "\n"


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")
