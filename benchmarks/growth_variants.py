"""Why new neurons beat dendrites on the narrow MLPs of benchmarks/growth.py (issue 18): is it the dendrites'
initialisation, their shape, or what they can express?

    .venv/bin/python benchmarks/growth_variants.py --task "mnist1d (MLP)" --seeds 10
    .venv/bin/python benchmarks/growth_variants.py --task "mnist1d (MLP)" --width 128   # a wide model

Every row starts from the same plain models as growth.py (trained to their plateau with the same seeds), adds
about the full budget (one full dendrite per target) and trains for the same extra epochs. Dendrite variants:

    gradient, fresh features  the peer's dendrites with weights ~ N(0, 1) instead of N(0, 0.01^2): their
                              activation is no longer almost linear around zero, like a new neuron's
    closed-form, rank-matched one rank-R dendrite per target (in -> R -> out, the output factor free), R the
                              largest rank below the budget: the shape of R new neurons per layer, but
                              feeding the target's own channels
    closed-form, tanh         the closed-form fit through tanh instead of sigmoid

against continuing, `widen-random` (new neurons of the layer type's own initialisation, outgoing weights zero)
and gromo's TINY neurons. Prints one markdown table: test % mean ± std and the paired 90 % interval against
continuing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

import growth_gromo
from growth import TASKS, Runner, _added_dendrite_params, dc, grow, train_base
from growth_report import FULL, paired_interval

VARIANTS = {  # name: (growth.py arm, DendriteConfig settings; "matched" rank: the largest within the budget)
    "continue": ("continue", {}),
    "widen-random": ("widen-random", {}),
    "gromo": ("gromo", {}),
    "gradient": ("gradient", {}),
    "gradient, fresh features": ("gradient", {"init_std": 1.0}),
    "gradient, fresh features, rank-matched": ("gradient", {"init_std": 1.0, "rank": "matched"}),
    "closed-form": ("closed-form", {}),
    "closed-form, rank-matched": ("closed-form", {"rank": "matched"}),
    "closed-form, tanh": ("closed-form", {"activation": "tanh"}),
}


def matched_rank(base: torch.nn.Module, budget: int) -> int:
    """The largest dendrite rank that adds fewer parameters than `budget` (full dendrites; a target where
    rank R is not cheaper than a full copy takes a full one, so the count grows with R up to the budget)."""
    rank = 1
    while _added_dendrite_params(base, rank + 1) < budget:
        rank += 1
    return rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d (MLP)", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--extra-epochs", type=int, default=20, help="the epochs every row gets")
    parser.add_argument("--width", type=int, default=None, help="the model's width (default: the task's own)")
    parser.add_argument("--quick", action="store_true", help="CI mode: tiny base training and budgets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TASKS[args.task]
    runner = Runner(dataclasses.replace(task, width=args.width or task.width))
    samples = 256 if args.quick else 4096
    settings = {name: {"samples": samples} for name in ("closed-form", "gradient")}
    variants = dict(VARIANTS)
    if skipped := growth_gromo.unavailable(runner.task.build()):
        print(f"gromo skipped: {skipped}")
        del variants["gromo"]
    scores: dict[str, list[float]] = {name: [] for name in variants}
    added: dict[str, list[int]] = {name: [] for name in variants}
    for seed in range(args.seeds):
        base, _ = train_base(runner, seed, args.quick)
        budget = _added_dendrite_params(base, None)
        matched = matched_rank(base, budget)
        for name, (arm, dendrites) in variants.items():
            dendrites = dict(dendrites)
            rank = matched if dendrites.pop("rank", None) == "matched" else None
            model = grow(arm, base, rank, budget, runner, 1000 + seed, settings, dendrites)
            added[name].append(dc.count_parameters(model) - dc.count_parameters(base))  # as growth.py counts
            scores[name].append(runner.train(model, args.extra_epochs, 2000 + seed)[1])
    print(f"{args.task}, width {runner.task.width}, {args.seeds} seeds, {args.extra_epochs} extra epochs, "
          f"{FULL} budget\n")
    print("| variant | added params | test % (mean ± std) | vs continue (90 % CI) |\n|---|---|---|---|")
    for name, values in scores.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        vs = "-"
        if name != "continue":
            mean, low, high = paired_interval(values, scores["continue"])
            vs = f"{mean:+.2f} ({low:+.2f} to {high:+.2f})"
        print(f"| {name} | {statistics.fmean(added[name]):,.0f} | {statistics.fmean(values):.2f} ± {std:.2f} | {vs} |")


if __name__ == "__main__":
    main()
