"""What `dendrite-export` checks and shows around the library call: the format options, the adapter's
example, the verification and latency tables."""

from __future__ import annotations

from pathlib import Path

from ..core.words import plural
from ._common import console, print_json


def check_format(onnx: bool, safetensors: bool, pt2: bool, output: Path, force: bool) -> str:
    """The one format chosen, after checking that the output may be written."""
    from ..core.errors import UsageError
    from ..core.files import check_writable

    if onnx + safetensors + pt2 != 1:
        raise UsageError("choose exactly one of --onnx, --safetensors and --pt2.")
    check_writable(output, force)
    return "onnx" if onnx else "pt2" if pt2 else "safetensors"


def export_and_report(directory: Path, output: Path, config, adapter: str | None, quiet: bool, json_out: bool) -> None:
    """Export with the adapter's first validation batch as the example (unless --input-shape gives one);
    the verification table is shown also when it fails."""
    from ..exporting.export import export

    inputs = None
    if adapter and not config.input_shape:
        from ..training.adapter import example_inputs

        inputs = example_inputs(adapter)
    try:
        report = export(directory, output, config, inputs=inputs)
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
