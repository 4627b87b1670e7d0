"""A whole `dendrite-train` run on the digits MLP against the loop a user would write by hand, side by side.

    python benchmarks/digits_run.py [--repeats 10] [--compile]

The small task of issue 15: sklearn's digits, the width-8 MLP of examples/digits, 0 dendrites, default
patience (10). The hand-written loop does the same per-epoch work (a training pass, validation and test
scores, early stopping on validation with dendrite-train's improvement rule, the best weights kept) and writes
nothing; it draws the same random numbers, so both loops see the same shuffles and stop at the same epoch
(checked). dendrite-train's time is the whole `train()` call: loading the converted directory, every epoch, its
checkpoints, best/, scores.csv, summary.json and training.png, with the imports only it needs (Pillow).
Each run is a fresh process that has imported what both need (torch, dendrite_convert, the adapter's data)
before its clock starts. The kinds of run alternate, --repeats times; each repeat's ratio compares runs made
next to each other, and the median and range of those ratios are reported, with the ratio of the fastest runs
(other processes only add time) and of CPU time, which a shared CPU disturbs less.
Goal: the whole run within 1.5x of the hand-written loop. --compile adds dendrite-train --compile (its whole run
includes the compilation; "median epoch" is the steady state).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
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
    from dendrite_convert.training.schedule import DEFAULT_RAW_THRESHOLD, DEFAULT_THRESHOLDS

    model = load(converted)
    torch.manual_seed(0)
    train, val, test = adapter.train_data(), adapter.val_data(), adapter.test_data()
    for data in (train, val, test):  # dendrite-train opens each loader once to check it: the same draws
        iter(data)
    optimizer = adapter.optimizer(model.parameters())
    best, best_state, since, epochs = None, None, 0, 0
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
        if best is None or scores[0] - best > max(DEFAULT_THRESHOLDS[0] * abs(best), DEFAULT_RAW_THRESHOLD):
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


def _cpu() -> float:
    """CPU time of this process and the children it waited for."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def one(kind: str, converted: Path, out: Path) -> None:
    """One timed run in this (fresh) process; prints {"seconds", "cpu", "epochs", ...}."""
    import torch
    import torch._dynamo  # noqa: F401 - torch.optim imports it at the first optimizer: paid alike, before the clock

    from dendrite_convert.training.adapter import load_adapter

    adapter = load_adapter(ADAPTER)  # sklearn and the data: both loops need them
    cpu, start = _cpu(), time.perf_counter()
    if kind == "hand":
        epochs = hand_written(converted, adapter)
    else:
        epochs = dendrite_train(converted, adapter, out, plot=kind != "tool-noplot", compile=kind == "tool-compile")
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu
    median = None
    if kind != "hand":
        import csv

        with open(out / "scores.csv") as f:
            median = sorted(float(r["seconds"]) for r in csv.DictReader(f))[epochs // 2]
    print(json.dumps({"seconds": seconds, "cpu": cpu, "epochs": epochs, "threads": torch.get_num_threads(),
                      "median": median}))


def _measure(kind: str, converted: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--one", kind, str(converted), str(out)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
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
    epochs = {r["epochs"] for rs in runs.values() for r in rs}
    if len(epochs) != 1:
        raise SystemExit(f"the loops stopped at different epochs ({sorted(epochs)}): the comparison is not like "
                         "for like")
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    hand = best["hand"]
    print(f"torch {torch.__version__}, {hand['threads']} thread(s), {args.repeats} alternating runs of each kind, "
          f"each in a fresh process; {epochs.pop()} epochs in every run")
    print(f"  {'loop':<36} {'fastest s':>9} {'median s':>9} {'CPU s':>7}")
    labels = {"hand": "hand-written (writes nothing)", "tool": "dendrite-train (every output)",
              "tool-noplot": "dendrite-train, plot=False", "tool-compile": "dendrite-train --compile"}
    for kind, rs in runs.items():
        print(f"  {labels[kind]:<36} {best[kind]['seconds']:9.3f} {statistics.median(r['seconds'] for r in rs):9.3f} "
              f"{statistics.median(r['cpu'] for r in rs):7.3f}")
    if "tool-compile" in best:
        print(f"  compiled median epoch {best['tool-compile']['median']:.4f} s vs {best['tool']['median']:.4f} s eager")
    for kind in [k for k in runs if k != "hand"]:
        wall = [t["seconds"] / h["seconds"] for t, h in zip(runs[kind], runs["hand"])]
        cpu = [t["cpu"] / h["cpu"] for t, h in zip(runs[kind], runs["hand"])]
        goal = f"   goal <= 1.5: {'met' if statistics.median(wall) <= 1.5 else 'NOT met'}" if kind == "tool" else ""
        print(f"  {labels[kind]}: wall {_spread(wall)}, fastest/fastest {best[kind]['seconds'] / hand['seconds']:.2f}x,"
              f" CPU {_spread(cpu)}{goal}")


if __name__ == "__main__":
    main()
