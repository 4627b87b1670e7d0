"""Counts in messages read as English: `1 dendrite`, `2 dendrites`, never `1 dendrites`."""


def plural(count: int, noun: str) -> str:
    """`count noun` with an `s` unless the count is exactly one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
