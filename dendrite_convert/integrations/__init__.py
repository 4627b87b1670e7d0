"""Callbacks that run the dendrite schedule inside other people's training loops.

- `dendrite_convert.integrations.transformers.DendriteCallback`: Hugging Face `Trainer`
  (`pip install ".[transformers]"` from a clone);
- `dendrite_convert.integrations.lightning.DendriteCallback`: `lightning.pytorch.Trainer`
  (`pip install ".[lightning]"` from a clone).

Both submodules import their library on import and say which extra to install when it is missing;
this package itself imports nothing optional.
"""


def missing_extra(library: str, extra: str, exc: ImportError) -> ImportError:
    """The ImportError a user sees when an integration's library is not installed."""
    return ImportError(
        f"dendrite_convert.integrations.{extra} needs {library}, which is not installed "
        f"({exc}); install it with: pip install 'dendrite-convert[{extra}]' (from a clone: pip install '.[{extra}]')"
    )
