"""Inference latency of full vs low-rank and channel-selective dendrites where it matters: a FLOP-bound 1024-wide MLP (issue 9).

    .venv/bin/python benchmarks/cheap_latency.py

Each structure gets random non-zero dendrite scales, is folded, exported to ONNX (verified against the
unfolded model) and timed at batch 64 on one thread, side by side in one process.
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dendrite_convert as dc  # noqa: E402
from dendrite_convert.core.structure import add_dendrites  # noqa: E402

STRUCTURES = [  # name, rank, channel fraction, dendrites per target
    ("no dendrites", None, None, 0), ("1 full dendrite", None, None, 1), ("1 rank-8 dendrite", 8, None, 1),
    ("1 rank-32 dendrite", 32, None, 1), ("1 dendrite, 1/8 chans", None, 0.125, 1),
    ("1 dendrite, 1/4 chans", None, 0.25, 1), ("3 full dendrites", None, None, 3), ("3 rank-8 dendrites", 8, None, 3),
    ("3 dendrites, 1/8 chans", None, 0.125, 3),
]


def structure_latency(model: torch.nn.Module, rank: int | None, fraction: float | None, dendrites: int,
                      shape: list[int], out: Path) -> dict:
    """Latency rows (by runtime) of `model` converted with `dendrites` per target and random non-zero scales:
    the cost of the architecture. Selective dendrites serve the placeholder channels; which ones does not
    change the cost."""
    torch.manual_seed(0)
    converted = dc.convert(model, dc.DendriteConfig(rank=rank, channel_fraction=fraction))
    for _ in range(dendrites):
        add_dendrites(converted.model)
    with torch.no_grad():
        for layer in dc.dendrite_layers(converted.model).values():
            for scale in layer.dendrite_scales:
                scale.normal_()
    report = dc.export(converted.model, out, dc.ExportConfig(input_shape=shape, force=True))
    return {row.name: row for row in report.latency}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                               torch.nn.ReLU(), torch.nn.Linear(1024, 10))


def main() -> None:
    torch.set_num_threads(1)
    print(f"MLP 1024-1024-1024-10, batch 64, 1 thread, torch {torch.__version__}: onnxruntime median ms")
    print(f"{'structure':22s} {'params':>10s} {'MFLOPs':>8s} {'ORT ms':>8s} {'added ms':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for name, rank, fraction, dendrites in STRUCTURES:
            rows = structure_latency(mlp(), rank, fraction, dendrites, [64, 1024], Path(tmp) / "m.onnx")
            ort = rows["onnxruntime"]
            base = ort.ms if base is None else base
            print(f"{name:22s} {ort.params:10,d} {ort.flops / 1e6:8.1f} {ort.ms:8.3f} {ort.ms - base:9.3f}")


if __name__ == "__main__":
    main()
