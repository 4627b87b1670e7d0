"""The public verbs; the CLI is a thin layer over these."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from ..core.structure import set_dendrite_counts
from . import selfcheck
from .config import DendriteConfig
from .modeldir import ConvertedModel
from .consent import Consent
from .factories import absolute_factory
from .liveness import unreached_targets
from .loading import Source, factory_source, load_source
from .rewrite import convert_model, refresh_report
from .selfcheck import derived_inputs
from .sequence_axes import with_sequence_axes
from .static_shapes import static_batch_notes


def convert(
    model: nn.Module | str | Path,
    config: DendriteConfig | None = None,
    *,
    factory: str | None = None,
    factory_kwargs: dict | None = None,
    trust_code: bool = False,
    allow_modules=(),
    example_inputs: list[dict] | None = None,
    trust_pickle: bool | None = None,
) -> ConvertedModel:
    """Insert dendrite layers into a model (an `nn.Module` or a saved file/directory).

    Before returning, the converted model (zero dendrites) is checked bit for bit against the original on
    `example_inputs` (else an input derived from the first layer); a difference is a ConversionError.
    An in-memory model is converted in place; to save it later, pass `factory` (how to rebuild
    its architecture), since converted directories never pickle code. A file may make this process run
    only torch's own classes and the modules you name (`factory`, `allow_modules`) unless you pass
    `trust_code=True` (`trust_pickle` is its deprecated name); TorchScript always needs it.

    Example:
        converted = convert("model.pt", DendriteConfig(dendrites=1))
        converted.save("converted/")
    """
    config = config or DendriteConfig()
    consent = Consent.of(trust_code, absolute_factory(factory), allow_modules, trust_pickle)
    if isinstance(model, nn.Module):
        source = factory_source("factory", factory, factory_kwargs or {}) if factory else Source("module")
    else:
        model, source = load_source(model, factory, factory_kwargs, consent)
    given = list(example_inputs or [])
    example_inputs = given or _known_example_inputs(model)
    check_inputs, description = ((example_inputs, "example input") if example_inputs
                                 else (derived_inputs(model), "input derived from the first layer"))
    reference = selfcheck.record(model, check_inputs, description, explicit=bool(given))
    model, report = convert_model(model, replace(config, dendrites=0), unreached_targets(model, check_inputs))
    if isinstance(reference, selfcheck.Reference):
        report.notes.append(selfcheck.verify(model, reference))
        timed = with_sequence_axes(model, example_inputs)  # recurrent targets take any sequence length
        report.notes += [f"input {i}: axis {next(a for a, n in s['axes'].items() if n == 'sequence')} is time; the "
                         "export takes any sequence length" for i, s in enumerate(timed) if s not in example_inputs]
        example_inputs = timed
    else:
        report.notes.append(reference)
    report.notes += static_batch_notes(model)
    if config.dendrites:  # added after the check, which proves the rewrite with zero dendrites
        set_dendrite_counts(model, config.dendrites)
        report = refresh_report(model, report)
    return ConvertedModel(model, source, config, report, example_inputs, consent)


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
