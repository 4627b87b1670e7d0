"""A whole `dendrite-train` run on the digits MLP against the hand-written loop a user would write, side by side.

    python benchmarks/digits_run.py [--repeats 5]

The task of issue 15: sklearn's digits, the width-8 MLP of examples/digits, 0 dendrites, default patience
(10). The hand-written loop does the same per-epoch work (train pass, validation and test scores, early
stopping on validation with the best weights kept) and writes nothing. dendrite-train's time is the whole
`train()` call: loading the converted directory and adapter, every epoch, its checkpoints, best/, scores.csv,
summary.json and training.png. Both run in this process after a warm-up (imports paid once, as in a
long-lived process), interleaved; the fastest of --repeats is reported (other processes only add time).
Goal: whole run within 1.5x of the hand-written loop.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
ADAPTER = DIGITS / "adapter.py"


def hand_written(converted: Path, adapter, patience: int, max_epochs: int = 100) -> tuple[float, int]:
    """Train until `patience` epochs without a better validation score; returns (seconds, epochs)."""
    from dendrite_convert import load

    start = time.perf_counter()
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
    return time.perf_counter() - start, epochs


def dendrite_train(converted: Path, out: Path) -> tuple[float, int]:
    from dendrite_convert import TrainConfig, train

    start = time.perf_counter()
    summary = train(converted, ADAPTER, out, TrainConfig(max_dendrites=0), force=True)
    return time.perf_counter() - start, summary["epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(DIGITS))
    from model import build

    from dendrite_convert import convert
    from dendrite_convert.training.adapter import load_adapter

    adapter = load_adapter(ADAPTER)  # sets torch to 1 thread, as the run does
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(build(8), tmp / "digits.pt")
        convert(tmp / "digits.pt").save(tmp / "converted")
        dendrite_train(tmp / "converted", tmp / "warm")  # imports and first-call costs, once for both
        hand_written(tmp / "converted", adapter, 10)
        hand, ours = [], []
        for i in range(args.repeats):
            ours.append(dendrite_train(tmp / "converted", tmp / "run"))
            hand.append(hand_written(tmp / "converted", adapter, 10))
        h, o = min(hand), min(ours)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fastest of {args.repeats} interleaved runs")
        print(f"  {'loop':<34} {'epochs':>6} {'seconds':>8} {'s/epoch':>8}")
        print(f"  {'hand-written (no outputs)':<34} {h[1]:6d} {h[0]:8.3f} {h[0] / h[1]:8.4f}")
        print(f"  {'dendrite-train (all outputs)':<34} {o[1]:6d} {o[0]:8.3f} {o[0] / o[1]:8.4f}")
        ratio = o[0] / h[0]
        print(f"  whole run ratio {ratio:.2f} (goal <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}); "
              f"per epoch {o[0] / o[1] / (h[0] / h[1]):.2f}")


if __name__ == "__main__":
    main()
