"""The public verbs; the CLI is a thin layer over these."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import DendriteConfig
from .modeldir import ConvertedModel
from .loading import Source, absolute_factory, load_source
from .liveness import unreached_targets
from .rewrite import convert_model
from .static_shapes import static_batch_notes


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
        source = (Source("factory", factory=absolute_factory(factory), factory_kwargs=factory_kwargs or {})
                  if factory else Source("module"))
    else:
        model, source = load_source(model, factory, factory_kwargs, trust_pickle)
    example_inputs = list(example_inputs or []) or _known_example_inputs(model)
    model, report = convert_model(model, config, unreached_targets(model, example_inputs))
    report.notes += static_batch_notes(model)
    return ConvertedModel(model, source, config, report, example_inputs)


def _known_example_inputs(model: nn.Module) -> list[dict]:
    """Input specs a model states itself: a .pt2's recorded example, or a transformers config."""
    program_inputs = getattr(model, "_dendrite_example_inputs", None)
    if program_inputs:
        return program_inputs
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "main_input_name"):
        return []
    if model.main_input_name == "input_ids" and getattr(config, "vocab_size", None):
        tokens = {"shape": [2, 8], "dtype": "int64", "high": int(config.vocab_size)}
        decoder = [{"name": "decoder_input_ids", **tokens}] if getattr(config, "is_encoder_decoder", False) else []
        return [{"name": "input_ids", **tokens}, *decoder]
    if model.main_input_name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return [{"name": "pixel_values", "shape": [2, config.num_channels, size, size], "dtype": "float32"}]
    return []
