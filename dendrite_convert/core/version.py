"""The tool's version, in one place: written into every directory the tool saves, read by pyproject.toml."""

__version__ = "0.1.0"
