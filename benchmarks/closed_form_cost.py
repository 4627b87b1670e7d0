"""What one closed-form growth step costs on a real CNN, against a training pass over the same samples.

    .venv/bin/python benchmarks/closed_form_cost.py                  # timm's resnet10t, 64x64 images, 32 samples
    .venv/bin/python benchmarks/closed_form_cost.py --side 96 --samples 64 --model test_convnext

Prints the step's time split into its parts (one pass summing statistics, the fits, the line searches), the
time of a forward-backward pass over the same samples, and, side by side on the widest target's covariance,
the two whitenings a first-order fit can use (S^-1/2 by eigendecomposition, and the Cholesky factor with
triangular solves it uses): the fits' cost grows with the cube of a target's fan-in, not with the data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import dendrite_convert as dc  # noqa: E402
from dendrite_convert.training.objectives import closed_form_growth as growth  # noqa: E402
from dendrite_convert.training.objectives.closed_form_fit import _sym_power, _Whitening  # noqa: E402
from fixtures.real_zoo import CLASSES, build  # noqa: E402


def timed(module, name: str, spent: dict[str, float]) -> None:
    """Wrap module.name so that its calls add their wall time to spent[name]."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="a timm model of fixtures/real_zoo.py")
    parser.add_argument("--side", type=int, default=64, help="image side")
    parser.add_argument("--samples", type=int, default=32, help="training samples the step reads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = [{"name": "x", "shape": [2, 3, args.side, args.side], "dtype": "float32"}]
    model = dc.convert(build(args.model), dc.DendriteConfig(), example_inputs=spec).model
    batches = [(torch.randn(8, 3, args.side, args.side), torch.randint(0, CLASSES, (8,)))
               for _ in range(max(args.samples // 8, 2))]

    def loss(batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    def training_pass():
        for batch in batches:
            loss(batch).backward()
        model.zero_grad(set_to_none=True)

    passes = best_of(3, training_pass)
    spent: dict[str, float] = {}
    for name in ("record_statistics", "_fit", "insert_closed_form"):
        timed(growth, name, spent)
    start = time.perf_counter()
    reports = growth.add_closed_form_dendrites(model, batches, loss)
    step = time.perf_counter() - start
    layers = dc.dendrite_layers(model)
    widest = max(layers, key=lambda n: growth._fan_in(layers[n]))
    d = growth._fan_in(layers[widest])
    x = torch.randn(4 * d, d, dtype=torch.float64)
    s = x.T @ x / x.shape[0] + 1e-3 * torch.eye(d, dtype=torch.float64)
    cov_xe = torch.randn(d, layers[widest].out_channels, dtype=torch.float64)  # what a fit whitens
    eig = best_of(3, lambda: _sym_power(s, -0.5) @ cov_xe)
    chol = best_of(3, lambda: _Whitening(s)(cov_xe))

    print(f"torch {torch.__version__}, 1 thread; {args.model}, {len(batches) * 8} samples of "
          f"{args.side}x{args.side}, {len(layers)} targets, {sum(r.grown for r in reports.values())} grown")
    print(f"  forward-backward pass over the samples   {passes:8.2f} s   1.00")
    print(f"  closed-form growth step                  {step:8.2f} s  {step / passes:5.1f}x")
    for name, label in (("record_statistics", "statistics (one pass)"), ("_fit", "fits"),
                        ("insert_closed_form", "line searches")):
        print(f"    {label:38s} {spent.get(name, 0.0):8.2f} s  {spent.get(name, 0.0) / passes:5.1f}x")
    print(f"  whitening of the widest target ({widest}, d = {d}): S^-1/2 {eig:.3f} s, "
          f"Cholesky and a triangular solve {chol:.3f} s ({eig / chol:.1f}x faster)")


if __name__ == "__main__":
    main()
