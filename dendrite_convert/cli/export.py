"""`dendrite-export`: dendrites folded into plain layers, written as verified ONNX, safetensors or .pt2."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..core.words import plural
from ._common import (AllowModuleOpt, FactoryAgainOpt, ForceOpt, JsonOpt, QuietOpt, TrustOpt, TrustPickleOpt, command_app,
                      console, consent, handle_errors, parse_shape, print_json)

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
    from ..core.errors import UsageError
    from ..exporting.export import ExportConfig, export as export_api
    from ..core.files import check_writable

    if onnx + safetensors + pt2 != 1:
        raise UsageError("choose exactly one of --onnx, --safetensors and --pt2.")
    check_writable(output, force)
    config = ExportConfig(
        format="onnx" if onnx else "pt2" if pt2 else "safetensors", opset=opset, atol=atol, rtol=rtol, input_shape=parse_shape(input_shape),
        adapter=adapter, prune_below=prune_below, gemm_layout=gemm_layout.value, force=force, latency=not no_latency,
        latency_threads=latency_threads, **consent(trust_code, trust_pickle, factory, allow_module),
    )
    try:
        report = export_api(directory, output, config)
    except Exception as exc:
        verify = getattr(exc, "report", None)
        if verify is not None and not quiet:
            for line in verify.lines():
                console.print(line, highlight=False, soft_wrap=True)
        raise
    if not quiet:
        _render(report)
    if json_out:
        print_json(report.to_dict())


def _render(report) -> None:
    from ..exporting.latency import render

    kept = sum(r.kept for r in report.folds)
    folded = sum(r.folded for r in report.folds)
    dropped = sum(r.dropped + len(r.pruned) for r in report.folds)
    layouts = sorted({r.layout for r in report.folds if r.layout})
    console.print(f"folded {plural(len(report.folds), 'target')}: {plural(kept, 'dendrite')} kept as extra GEMMs/convs"
                  f"{' (' + ', '.join(layouts) + ')' if layouts else ''}, {folded} folded into weights, {dropped} dropped; "
                  f"folded vs unfolded max abs error {report.fold_max_abs:.3g}", highlight=False, soft_wrap=True)
    if report.verify:
        for line in report.verify.lines():
            console.print(line, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if report.latency:
        render(report.latency, console, report.latency_inputs, report.latency_threads)
    console.print(f"wrote {report.output}", highlight=False)


app = command_app(export)

if __name__ == "__main__":  # python -m dendrite_convert.cli.export
    app()
