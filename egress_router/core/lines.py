"""The line structure the three multiline grammars share (EGRESS_DESTINATION, EGRESS_HTTP_PROXY_DESTINATION,
EGRESS_DNS_PROXY_DESTINATION): one rule a line, `#` starts a comment, blank lines are ignored, and
fields are separated by spaces or tabs. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterator

FIELD_SEPARATOR = re.compile(r"[ \t]+")


def rule_lines(text: str) -> Iterator[tuple[int, str, str]]:
    """Each line that holds a rule: (its 1-based line number, the rule without comment or surrounding
    blanks, the whole line stripped: what an error message shows)."""
    for number, raw in enumerate(text.split("\n"), start=1):
        content = raw.split("#", 1)[0].strip()
        if content:
            yield number, content, raw.strip()
