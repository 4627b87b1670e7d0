"""dendrite_convert: add dendrites to any saved PyTorch model, train them, export plain inference artifacts.

The public names are imported on first use (PEP 562), so `import dendrite_convert` and every `--help` stay
instant: torch is loaded only when something needs it.
"""

from __future__ import annotations

import importlib

from .core.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "convert": ".conversion.convert",
    "DendriteConfig": ".conversion.config",
    "ConvertedModel": ".conversion.modeldir", "load": ".conversion.modeldir", "load_converted": ".conversion.modeldir",
    "ExportConfig": ".exporting.export", "export": ".exporting.export",
    "load_folded": ".exporting.foldeddir",
    "fold_model": ".exporting.fold",
    "ConversionError": ".core.errors", "DendriteError": ".core.errors", "LoadError": ".core.errors",
    "UsageError": ".core.errors", "VerificationError": ".core.errors",
    "DendriteLayer": ".core.layers", "count_parameters": ".core.layers", "dendrite_layers": ".core.layers",
    "TrainConfig": ".training.trainer", "train": ".training.trainer",
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
