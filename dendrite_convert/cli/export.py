"""`dendrite-export`: dendrites folded into plain layers, written as verified ONNX, safetensors or .pt2."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ._common import (AllowModuleOpt, FactoryAgainOpt, ForceOpt, JsonOpt, QuietOpt, TrustOpt, TrustPickleOpt, command_app,
                      consent, handle_errors, parse_shape)

_FMT, _VERIFY, _FOLD, _IN = "Format", "Verification", "Folding", "Inputs"


class GemmLayout(str, Enum):
    auto = "auto"
    separate = "separate"
    concat = "concat"


@handle_errors
def export(
    directory: Annotated[Path, typer.Argument(help="A converted-model directory (dendrite-convert output, or run/best from dendrite-train).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="model.onnx for --onnx, model.pt2 for --pt2, a directory for --safetensors.", show_default=False)],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write one ONNX file, verified with onnxruntime.", rich_help_panel=_FMT)] = False,
    safetensors: Annotated[bool, typer.Option("--safetensors", help="Write folded weights + folded_config.json (load with dendrite_convert.load_folded).", rich_help_panel=_FMT)] = False,
    pt2: Annotated[bool, typer.Option("--pt2", help="Write a torch.export program (load with torch.export.load, no code of ours), verified after loading.", rich_help_panel=_FMT)] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (18-23; default: the exporter's, 20).", rich_help_panel=_FMT)] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance against the unfolded model.", rich_help_panel=_VERIFY)] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance against the unfolded model.", rich_help_panel=_VERIFY)] = 1e-4,
    input_shape: Annotated[str | None, typer.Option(help="Example float input shape, e.g. 2,3,32,32 (default: recorded at conversion).", rich_help_panel=_IN)] = None,
    adapter: Annotated[str | None, typer.Option(help="Data adapter whose first validation batch is the example input.", rich_help_panel=_IN)] = None,
    prune_below: Annotated[float, typer.Option(min=0.0, help="Drop dendrites whose |scale| is below this everywhere; the output change is reported.", rich_help_panel=_FOLD)] = 0.0,
    gemm_layout: Annotated[GemmLayout, typer.Option(help="Nonlinear dendrites as separate GEMMs/convs, concatenated with the main weight, or whichever measures faster.", rich_help_panel=_FOLD)] = GemmLayout.auto,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip the latency table.")] = False,
    latency_threads: Annotated[int, typer.Option(min=0, help="Threads for the latency table, torch and onnxruntime alike (0: torch's default).")] = 1,
    factory: FactoryAgainOpt = None,
    trust_code: TrustOpt = False,
    allow_module: AllowModuleOpt = None,
    trust_pickle: TrustPickleOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fold dendrites into plain layers and write a verified ONNX file, folded safetensors or a .pt2 program."""
    from ..exporting.export import ExportConfig
    from ._exporting import check_format, export_and_report

    config = ExportConfig(
        format=check_format(onnx, safetensors, pt2, output, force), opset=opset, atol=atol, rtol=rtol,
        input_shape=parse_shape(input_shape), prune_below=prune_below, gemm_layout=gemm_layout.value, force=force,
        latency=not no_latency, latency_threads=latency_threads, **consent(trust_code, trust_pickle, factory, allow_module),
    )
    export_and_report(directory, output, config, adapter, quiet, json_out)


app = command_app(export)

if __name__ == "__main__":  # python -m dendrite_convert.cli.export
    app()
