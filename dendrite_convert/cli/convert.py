"""`dendrite-convert` and `dendrite inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (AllowModuleOpt, ForceOpt, JsonOpt, QuietOpt, TrustOpt, TrustPickleOpt, command_app, handle_errors,
                      parse_json_option, parse_shape)

_IN, _DENDRITES, _GRAPH = "Input", "Dendrites", "Graph"


@handle_errors
def convert(
    model: Annotated[Path, typer.Argument(help="A saved model: .pt/.bin (pickled module or state dict), .safetensors, .pt2, TorchScript, or a Hugging Face model folder.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Converted-model directory to write.", show_default=False)],
    factory: Annotated[str | None, typer.Option(help="Builds the architecture for weights-only inputs: pkg.module:fn or path/to/file.py:fn.", rich_help_panel=_IN)] = None,
    factory_kwargs: Annotated[str | None, typer.Option(help="JSON keyword arguments for --factory.", rich_help_panel=_IN)] = None,
    input_shape: Annotated[str | None, typer.Option(help="Example input shape, e.g. 2,3,32,32: the conversion is checked on it bit for bit, and it is recorded for export.", rich_help_panel=_IN)] = None,
    dendrites: Annotated[int, typer.Option(min=0, help="Dendrites to pre-insert in every target.", rich_help_panel=_DENDRITES)] = 0,
    activation: Annotated[str, typer.Option(help="Dendrite nonlinearity: sigmoid, tanh or identity.", rich_help_panel=_DENDRITES)] = "sigmoid",
    dendrite_rank: Annotated[int | None, typer.Option(min=1, help="Low-rank dendrites (in → R → out) instead of full copies of each layer.", rich_help_panel=_DENDRITES)] = None,
    dendrite_channels: Annotated[float | None, typer.Option(help="Channel-selective dendrites: each new dendrite serves only this fraction of its layer's output channels, those with the largest remaining error.", rich_help_panel=_DENDRITES)] = None,
    include: Annotated[list[str] | None, typer.Option(help="Only targets whose name matches this glob or whose type is this name (repeatable).", rich_help_panel=_DENDRITES)] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip targets whose name matches this glob or whose type is this name (repeatable).", rich_help_panel=_DENDRITES)] = None,
    norm_pairs: Annotated[bool, typer.Option("--norm-pairs/--no-norm-pairs", help="Treat a conv/linear that alone feeds a BatchNorm and the norm as one neuron.", rich_help_panel=_DENDRITES)] = True,
    strict_graph: Annotated[bool, typer.Option("--strict-graph", help="Fail (exit 4) instead of falling back to module swapping where fx cannot trace.", rich_help_panel=_GRAPH)] = False,
    trust_code: TrustOpt = False,
    allow_module: AllowModuleOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Insert dendrite layers into a saved PyTorch model by torch.fx graph rewriting."""
    from ..conversion.config import DendriteConfig
    from ..conversion.convert import convert as convert_api
    from ._converting import check_output, save_and_report

    check_output(output, force)
    config = DendriteConfig(
        dendrites=dendrites, activation=activation, rank=dendrite_rank, channel_fraction=dendrite_channels, include=include or [], exclude=exclude or [],
        pair_norms=norm_pairs, strict_graph=strict_graph,
    )
    shape = parse_shape(input_shape)
    converted = convert_api(
        model, config, factory=factory, factory_kwargs=parse_json_option(factory_kwargs, "--factory-kwargs"),
        trust_code=trust_code or trust_pickle, allow_modules=tuple(allow_module or ()), example_inputs=[{"shape": shape, "dtype": "float32"}] if shape else None,
    )
    save_and_report(converted, output, force, quiet, json_out)


@handle_errors
def inspect(
    directory: Annotated[Path, typer.Argument(help="A converted-model directory (from dendrite-convert or dendrite-train).", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Print the conversion report of a converted-model directory again, and the code loading it would run.

    Inspecting reads only the directory's JSON: it never runs code, so it needs no trust option.
    """
    from ._converting import show_directory

    show_directory(directory, json_out)


app = command_app(convert)

if __name__ == "__main__":  # python -m dendrite_convert.cli.convert
    app()
