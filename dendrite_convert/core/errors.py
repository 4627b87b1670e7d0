"""Typed errors: each user mistake maps to one sentence and one exit code (docs/design.md §6).

Library code words its messages in Python terms (`switch_every must be at least 1`), never as command-line
flags, and names the argument at fault in `parameter`; the CLI (cli/_common.py) turns that name into the
command's option (`--switch-every must be at least 1`) and `exit_code` into the process's exit status.
"""

from __future__ import annotations


class DendriteError(Exception):
    """Base class; `exit_code` is what the CLI returns when this reaches it.

    Args:
        parameter: the Python name of the argument at fault, when there is one; the message starts with it.
    """

    exit_code = 1

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class UsageError(DendriteError, ValueError):
    """Arguments that cannot work (alone or together) or an output that already exists; a ValueError too."""

    exit_code = 2


class LoadError(DendriteError):
    """A model, weights file, factory or adapter that cannot be loaded."""

    exit_code = 3


class ConversionError(DendriteError):
    """Conversion could not be done as asked (e.g. a graph fallback under --strict-graph)."""

    exit_code = 4


class VerificationError(DendriteError):
    """An exported artifact does not reproduce the model within tolerance."""

    exit_code = 5
