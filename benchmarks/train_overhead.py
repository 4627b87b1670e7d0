"""Seconds per epoch of dendrite-train's loop vs a hand-written torch loop on the same model and data.

    python benchmarks/train_overhead.py [--repeats 3] [--threads 1] [--epochs N]

Both loops do the same work per epoch: a training pass (forward, loss, backward, Adam step) and a
validation pass. dendrite-train additionally scores, checkpoints (model + best + optimizer + RNG, atomic)
and rewrites scores.csv/summary.json every epoch; that is the overhead measured. Runs are interleaved
and the fastest of --repeats is reported (as timeit does): other processes on the machine only add time.
Goal: ratio <= 1.10 at 0 dendrites. The 1- and 3-dendrite rows show what the dendrites themselves cost.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

ADAPTER = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
X = torch.randn({n}, {features}, generator=g)
Y = (X[:, :10] * torch.arange(1, 11)).argmax(1)
TRAIN, VAL = TensorDataset(X[: {n} * 4 // 5], Y[: {n} * 4 // 5]), TensorDataset(X[{n} * 4 // 5 :], Y[{n} * 4 // 5 :])
def train_data(): return DataLoader(TRAIN, batch_size={batch}, shuffle=True)
def val_data(): return DataLoader(VAL, batch_size=1024)
def loss(outputs, batch): return torch.nn.functional.cross_entropy(outputs, batch[1])
def score(outputs, batch): return (outputs.argmax(-1) == batch[1]).float().mean().item()
'''

WORKLOADS = {
    # name: (samples, features, width, batch, epochs); tiny epochs need more of them to amortise setup
    "mlp-256 (20k samples, 250 steps/epoch)": (20_000, 64, 256, 64, 10),
    "digits-size mlp-8 (1.4k samples, 18 steps/epoch)": (1_400, 64, 8, 64, 100),
}


def build(features: int = 64, width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def plain_loop(model: nn.Module, adapter, epochs: int) -> float:
    """What a user writes by hand: train + validate each epoch. Returns seconds per epoch."""
    train, val = adapter.train_data(), adapter.val_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = adapter.loss(model(x), (x, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = sum(adapter.score(model(x), (x, y)) * len(y) for x, y in val)
        _ = correct / len(val.dataset)
    return (time.perf_counter() - start) / epochs


def dendrite_loop(converted_dir: Path, adapter_path: Path, out: Path, epochs: int, dendrites: int) -> float:
    """dendrite-train's loop; returns seconds per epoch (all of it: setup, checkpoints, outputs)."""
    from dendrite_convert import TrainConfig, train

    # switch_every > epochs: no switch happens, so every epoch trains the same architecture
    config = TrainConfig(max_epochs=epochs, switch_every=epochs + 1, max_dendrites=dendrites, plot=False)
    start = time.perf_counter()
    summary = train(converted_dir, adapter_path, out, config, force=True, trust_code=True)  # our own factory
    assert summary["epochs"] == epochs
    return (time.perf_counter() - start) / epochs


def bookkeeping(out: Path, per_epoch: float) -> float:
    """Seconds per epoch spent outside the timed train/val passes (scores.csv `seconds`): setup, schedule,
    checkpoints, outputs. Unlike the ratio, this hardly moves when other processes load the machine."""
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    return per_epoch - sum(float(r["seconds"]) for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 10 and 100)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dendrite_convert import DendriteConfig, convert
    from dendrite_convert.training.adapter import load_adapter

    print(f"torch {torch.__version__}, {args.threads} thread(s), fastest of {args.repeats} interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bench_model.py").write_text(textwrap.dedent("""
            from torch import nn
            def build(features=64, width=256):
                return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, 10))
        """))
        for name, (n, features, width, batch, epochs) in WORKLOADS.items():
            epochs = args.epochs or epochs
            adapter_path = tmp / f"adapter_{width}.py"
            adapter_path.write_text(ADAPTER.format(n=n, features=features, batch=batch))
            adapter = load_adapter(adapter_path)
            dirs = {}
            for k in (0, 1, 3):
                torch.manual_seed(0)
                dirs[k] = tmp / f"conv_{width}_{k}"
                convert(build(features, width), DendriteConfig(dendrites=k), factory=f"{tmp / 'bench_model.py'}:build",
                        factory_kwargs={"features": features, "width": width}).save(dirs[k])
            dendrite_loop(dirs[0], adapter_path, tmp / "warm", 1, 0)  # imports, first-call costs
            times: dict[str, list[float]] = {"plain": [], "plain (converted, 0 dendrites)": [], 0: [], 1: [], 3: []}
            books = []
            for _ in range(args.repeats):
                torch.manual_seed(0)
                times["plain"].append(plain_loop(build(features, width), adapter, epochs))
                from dendrite_convert import load

                times["plain (converted, 0 dendrites)"].append(plain_loop(load(dirs[0], trust_code=True), adapter, epochs))
                for k in (0, 1, 3):
                    times[k].append(dendrite_loop(dirs[k], adapter_path, tmp / f"run{k}", epochs, k))
                books.append(bookkeeping(tmp / "run0", times[0][-1]))
            med = {k: min(v) for k, v in times.items()}
            base = med["plain"]
            print(f"\n{name}, {epochs} epochs per run")
            print(f"  {'loop':<44} {'s/epoch':>9} {'vs plain':>9}")
            print(f"  {'plain torch loop (original model)':<44} {base:9.4f} {1:9.3f}")
            print(f"  {'plain torch loop (converted, 0 dendrites)':<44} {med['plain (converted, 0 dendrites)']:9.4f} "
                  f"{med['plain (converted, 0 dendrites)'] / base:9.3f}")
            for k in (0, 1, 3):
                goal = "   goal <= 1.10: " + ("met" if med[k] / base <= 1.10 else "NOT met") if k == 0 else ""
                print(f"  {f'dendrite-train, {k} dendrite(s) per target':<44} {med[k]:9.4f} {med[k] / base:9.3f}{goal}")
            book = min(books)
            print(f"  dendrite-train bookkeeping outside the train/val passes (setup, schedule, checkpoints, outputs):"
                  f" {book * 1000:.2f} ms/epoch = {book / base:.1%} of the plain epoch")


if __name__ == "__main__":
    main()
