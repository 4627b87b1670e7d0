"""A whole `dendrite-train` run on the digits MLP against the loop a user would write by hand, side by side.

    python benchmarks/digits_run.py [--repeats 5] [--compile]

The small task of issue 15: sklearn's digits, the width-8 MLP of examples/digits, 0 dendrites, default
patience (10). The hand-written loop does the same per-epoch work (a training pass, validation and test
scores, early stopping on validation with the best weights kept) and writes nothing. dendrite-train's time
is the whole `train()` call: loading the converted directory, every epoch, its checkpoints, best/, scores.csv,
summary.json and training.png, with the imports only it needs (matplotlib). Each run is a fresh process that
has imported what both need (torch, dendrite_convert, the adapter's data) before its clock starts; the
two kinds of run alternate and the fastest of --repeats each is reported (other processes only add time).
Goal: the whole run within 1.5x of the hand-written loop. --compile adds dendrite-train --compile (its whole run
includes the compilation; "median epoch" is the steady state).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
ADAPTER = DIGITS / "adapter.py"


def hand_written(converted: Path, adapter, patience: int = 10, max_epochs: int = 100) -> int:
    """Train until `patience` epochs without a better validation score; returns the epochs run."""
    import torch

    from dendrite_convert import load

    torch.manual_seed(0)
    model = load(converted)
    train, val, test = adapter.train_data(), adapter.val_data(), adapter.test_data()
    optimizer = adapter.optimizer(model.parameters())
    best, best_state, since, epochs = -float("inf"), None, 0, 0
    for _ in range(max_epochs):
        epochs += 1
        model.train()
        for batch in train:
            loss = adapter.loss(model(batch[0]), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            scores = [sum(adapter.score(model(b[0]), b) * len(b[1]) for b in data) / len(data.dataset)
                      for data in (val, test)]
        if scores[0] > best:
            best, best_state, since = scores[0], copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    return epochs


def dendrite_train(converted: Path, adapter, out: Path, plot: bool = True, compile: bool = False) -> int:
    from dendrite_convert import TrainConfig, train

    summary = train(converted, adapter, out, TrainConfig(max_dendrites=0, plot=plot, compile=compile), force=True)
    if compile and not summary["compiled"]:
        raise SystemExit(f"torch.compile fell back: {summary['compile_fallback']}")
    return summary["epochs"]


def one(kind: str, converted: Path, out: Path) -> None:
    """One timed run in this (fresh) process; prints {"seconds", "epochs"}."""
    import torch
    import torch._dynamo  # noqa: F401 - torch.optim imports it at the first optimizer: paid alike, before the clock

    from dendrite_convert.training.adapter import load_adapter

    adapter = load_adapter(ADAPTER)  # sklearn and the data: both loops need them
    start = time.perf_counter()
    if kind == "hand":
        epochs = hand_written(converted, adapter)
    else:
        epochs = dendrite_train(converted, adapter, out, plot=kind != "tool-noplot", compile=kind == "tool-compile")
    seconds = time.perf_counter() - start
    median = None
    if kind != "hand":
        import csv

        with open(out / "scores.csv") as f:
            median = sorted(float(r["seconds"]) for r in csv.DictReader(f))[epochs // 2]
    print(json.dumps({"seconds": seconds, "epochs": epochs, "threads": torch.get_num_threads(), "median": median}))


def _measure(kind: str, converted: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", kind, str(converted), str(out)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time dendrite-train --compile")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], Path(args.one[1]), Path(args.one[2]))
        return
    import torch

    sys.path.insert(0, str(DIGITS))
    from model import build

    from dendrite_convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(build(8), tmp / "digits.pt")
        convert(tmp / "digits.pt").save(tmp / "converted")
        runs: dict[str, list[dict]] = {"hand": [], "tool": [], "tool-noplot": []}
        if args.compile:
            runs["tool-compile"] = []
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(_measure(kind, tmp / "converted", tmp / "run"))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    hand, tool, noplot = best["hand"], best["tool"], best["tool-noplot"]
    print(f"torch {torch.__version__}, {hand['threads']} thread(s), fastest of {args.repeats} alternating runs, "
          "each in a fresh process")
    print(f"  {'loop':<36} {'epochs':>6} {'seconds':>8} {'s/epoch':>8}")
    print(f"  {'hand-written (writes nothing)':<36} {hand['epochs']:6d} {hand['seconds']:8.3f} "
          f"{hand['seconds'] / hand['epochs']:8.4f}")
    print(f"  {'dendrite-train (every output)':<36} {tool['epochs']:6d} {tool['seconds']:8.3f} "
          f"{tool['seconds'] / tool['epochs']:8.4f}")
    print(f"  {'dendrite-train, plot=False':<36} {noplot['epochs']:6d} {noplot['seconds']:8.3f} "
          f"{noplot['seconds'] / noplot['epochs']:8.4f}")
    if "tool-compile" in best:
        c = best["tool-compile"]
        print(f"  {'dendrite-train --compile':<36} {c['epochs']:6d} {c['seconds']:8.3f} {c['seconds'] / c['epochs']:8.4f}"
              f"   median epoch {c['median']:.4f} s vs {tool['median']:.4f} s eager")
    ratio = tool["seconds"] / hand["seconds"]
    per_epoch = (tool["seconds"] / tool["epochs"]) / (hand["seconds"] / hand["epochs"])
    print(f"  whole run: {ratio:.2f}x the hand-written loop (goal <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
          f"per epoch {per_epoch:.2f}x; without training.png {noplot['seconds'] / hand['seconds']:.2f}x")


if __name__ == "__main__":
    main()
