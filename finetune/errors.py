"""Errors meant for people: what was wrong, where, and what to do. The CLI prints them without a traceback."""
from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(FinetuneError):
    """One or more config problems, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


class DataError(FinetuneError):
    """A bad data file or row. Message names the file, the line/row and the field."""
