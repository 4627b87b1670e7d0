"""Typed errors: each user mistake maps to one sentence and one exit code (docs/design.md §6)."""


class DendriteError(Exception):
    """Base class; `exit_code` is what the CLI returns when this reaches it."""

    exit_code = 1


class UsageError(DendriteError):
    """Options that cannot work together or an output that already exists."""

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
