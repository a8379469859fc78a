"""The one base of every error cmalign raises on purpose, so a command can tell a user's mistake from a bug.

A :class:`CmalignError` is a message for the user: the CLI prints it as one ``error:`` line (exit status 2).
Any other exception is a bug and keeps its traceback. Each subclass also derives from the built-in error
it used to be (``ValueError``, ``FileNotFoundError``...), so ``except ValueError`` in user code still works.
"""

from __future__ import annotations


class CmalignError(Exception):
    """A problem with the user's input, files, settings or environment, worded for the user."""


class ConfigError(CmalignError, ValueError):
    """An option, config key or argument value is invalid."""


class MissingInputError(CmalignError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputExistsError(CmalignError, FileExistsError):
    """The output location is taken and overwriting was not asked for."""


class MissingDependencyError(CmalignError, ImportError):
    """An optional dependency (an extra) is needed for this command and is not installed."""
