"""What a safetensors file holds, read from its header alone: no tensor data is loaded, so a recipe can be
checked against it (and a structure read off its names) before anything is allocated."""

from __future__ import annotations

from pathlib import Path

from .errors import LoadError


def read_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` of a safetensors file; LoadError when it is missing or damaged."""
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        raise LoadError(f"{weights} is missing; the directory is incomplete.")
    try:
        with safe_open(str(weights), "pt") as f:
            header = {}
            for name in f.keys():
                part = f.get_slice(name)
                header[name] = (part.get_dtype(), tuple(part.get_shape()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{weights} cannot be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}).") from exc
    return header
