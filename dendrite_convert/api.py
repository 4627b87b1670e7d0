"""The public verbs; the CLI is a thin layer over these."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import DendriteConfig
from .modeldir import ConvertedModel
from .loading import Source, load_source
from .rewrite import convert_model


def convert(
    model: nn.Module | str | Path,
    config: DendriteConfig | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    trust_pickle: bool = False,
    example_inputs: list[dict] | None = None,
) -> ConvertedModel:
    """Insert dendrite layers into a model (an `nn.Module` or a saved file/directory).

    An in-memory model is converted in place; to save it later, pass `factory` (how to rebuild
    its architecture), since converted directories never pickle code.

    Example:
        converted = convert("model.pt", DendriteConfig(dendrites=1))
        converted.save("converted/")
    """
    config = config or DendriteConfig()
    if isinstance(model, nn.Module):
        source = Source("factory", factory=factory, factory_kwargs=factory_kwargs or {}) if factory else Source("module")
    else:
        model, source = load_source(model, factory, factory_kwargs, trust_pickle)
    model, report = convert_model(model, config)
    return ConvertedModel(model, source, config, report, list(example_inputs or []))
