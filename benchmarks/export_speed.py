"""ONNX export time of real zoo models, by phase (issue 19): the median of a few exports per model.

    python benchmarks/export_speed.py --only test_efficientnet hf:BertForSequenceClassification --repeats 3

Each model of fixtures/real_zoo.py is converted, given one dendrite per target with random non-zero scales (so
every target keeps a nonlinear dendrite and `--gemm-layout auto` has something to decide), and exported to ONNX
with verification, as `dendrite-export --onnx` does. The phases are those of benchmarks/zoo_real.py: tracing
(capture, decompositions, ONNX optimizer and translation of the export that is kept), layout choice (any other
ONNX export and the onnxruntime timing), fold, verification.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import dendrite_convert as dc  # noqa: E402
from conftest import randomize_dendrites  # noqa: E402
from dendrite_convert.core.structure import add_dendrites  # noqa: E402
from fixtures.real_zoo import build, example_specs  # noqa: E402
from zoo_real import _Clock, _shares, _timed_export  # noqa: E402

GROUPS = {"tracing": ("capture (torch.export)", "decompositions", "ONNX optimizer", "ONNX translation"),
          "layout choice": ("second layout export", "layout timing"), "fold": ("fold",),
          "verification": ("verification",), "other": ("other",)}


def time_exports(name: str, repeats: int, tmp: Path) -> tuple[list[float], dict[str, float], str]:
    specs = example_specs(name)
    converted = dc.convert(build(name), dc.DendriteConfig(), example_inputs=specs, factory="fixtures.real_zoo:build",
                           factory_kwargs={"name": name})
    add_dendrites(converted.model)
    randomize_dendrites(converted.model)
    totals, shares, notes = [], {g: 0.0 for g in GROUPS}, ""
    for _ in range(repeats):
        clock = _Clock()
        start = time.perf_counter()
        with _timed_export(clock):
            report = dc.export(converted, tmp / "model.onnx", dc.ExportConfig(latency=False, force=True))
        totals.append(time.perf_counter() - start)
        phases = _shares(clock, totals[-1])
        for group, members in GROUPS.items():
            shares[group] += sum(phases[m] for m in members)
        notes = "; ".join(n for n in report.notes if n.startswith("--gemm-layout"))
    return totals, {g: s / sum(totals) for g, s in shares.items()}, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", required=True, help="models of fixtures/real_zoo.py")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | median export s | " + " | ".join(GROUPS) + " | layout |")
    print("|---|---|" + "---|" * len(GROUPS) + "---|")
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                totals, shares, notes = time_exports(name, args.repeats, Path(tmp))
            except Exception as exc:  # a model that does not convert or export is a row, not the end
                print(f"| `{name}` | {type(exc).__name__}: {' '.join(str(exc).split())[:200]} |", flush=True)
                continue
        cells = " | ".join(f"{100 * shares[g]:.0f} %" for g in GROUPS)
        print(f"| `{name}` | {statistics.median(totals):.1f} | {cells} | {notes} |", flush=True)


if __name__ == "__main__":
    main()
