"""Typed errors that every Confide entry point raises; each message carries its fix."""

from __future__ import annotations


class ConfideError(Exception):
    """Base class of every error Confide raises on purpose.

    The message always says what went wrong *and* what to do about it, so the
    CLI can print it as one line without a traceback.
    """


class ConfigError(ConfideError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


class DataNotFoundError(ConfideError, FileNotFoundError):
    """A data set file or folder is missing."""


class DataFormatError(ConfideError, ValueError):
    """A data file exists but is not in the expected format."""
