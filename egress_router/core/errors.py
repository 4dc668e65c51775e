"""The exception types the CLI turns into one-line messages (no tracebacks for user errors)."""

from __future__ import annotations


class EgressRouterError(Exception):
    """An error meant for a human: its str() is the whole message."""


class ConfigError(EgressRouterError):
    """A bad configuration value: names the variable, the line (for multiline values) and the text."""

    def __init__(self, variable: str, reason: str, *, line: int | None = None, text: str | None = None):
        self.variable = variable
        self.reason = reason
        self.line = line
        self.text = text
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.variable if self.line is None else f"{self.variable} line {self.line}"
        if self.text is None:
            return f"{where}: {self.reason}"
        return f"{where}: {quote(self.text)}: {self.reason}"


class SetupError(EgressRouterError):
    """The environment cannot carry out the plan (missing interface, privileges, tools, ...)."""


def quote(text: str) -> str:
    """Quote user text for a message; control characters are escaped so the message stays one line."""
    return repr(text)
