"""What `dendrite-convert` and `dendrite inspect` check and show around the library call."""

from __future__ import annotations

from pathlib import Path

from ._common import console, print_json


def check_output(output: Path, force: bool) -> None:
    """Before the slow loading: the output may be written (a new path, or --force)."""
    from ..core.files import check_writable
    from ..core.outputs import check_output_location

    check_output_location(output)
    check_writable(output, force)


def save_and_report(converted, output: Path, force: bool, quiet: bool, json_out: bool) -> None:
    """Write the converted directory, then its report on stderr (and as JSON on stdout with --json)."""
    converted.save(output, force=force)
    report = converted.refreshed_report()
    if not quiet:
        report.render(console)
        console.print(f"wrote {output}")
    if json_out:
        print_json(report.to_dict())


def show_directory(directory: Path, json_out: bool) -> None:
    """A directory's conversion report and the code loading it would run, from its JSON alone."""
    from ..conversion.modeldir import read_config
    from ..conversion.rebuild import code_needed
    from ..conversion.report import ConversionReport

    data = read_config(directory)
    report = ConversionReport.from_dict(data["recipe"])
    if json_out:
        print_json(report.to_dict())
    else:
        console.print(f"{directory}: source {data['source'].get('kind')} {data['source'].get('path') or ''}")
        report.render(console)
        console.print(code_needed(data["source"]), highlight=False, soft_wrap=True)
