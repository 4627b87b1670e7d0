"""Is adding dendrites the best use of extra parameters and extra training for a trained model? (issue 18)

    .venv/bin/python benchmarks/growth.py            # full: 10 seeds, 6 tasks, 20 extra epochs
    .venv/bin/python benchmarks/growth.py --quick    # CI: 2 seeds, tiny budgets, same outputs

Per task and seed the plain model is trained to its plateau (early stopping on validation) and saved. Every
arm starts from that saved model, adds its parameters, and trains everything it has for the same number of
extra epochs with the adapter's optimizer and the same data order; its score is the test score at its best
validation epoch. Arms, in two budgets of added parameters (one full dendrite per target, and one rank-R
dendrite per target):

    continue          nothing added (in both budgets)
    widen             Net2WiderNet, function-preserving, to the same added parameters
    widen-random      the same new units freshly initialised, outgoing weights zero (function-preserving too)
    lora              LoRA-style adapters on every Linear/Conv, to the same added parameters
    gradient          fresh random dendrites with zero scale, trained with the network (the peer's way)
    correlation       cascade-correlation candidates, frozen, scales and network trained (full budget only)
    closed-form       second-order closed-form dendrites (the closed-form objective), then trained
    closed-form 1st   first-order closed-form dendrites (full budget only)
    gromo             the `gromo` package's own TINY growth of hidden neurons (growth_gromo.py), where it
                      builds the same network (the MLPs) and is installed; skipped with the reason elsewhere

Paired 90 % bootstrap intervals (seeds resampled jointly) compare every arm with every other arm of its
budget. Writes benchmarks/results/growth.{csv,md,png}. The mnist1d task and the gromo arm need the
benchmark-only packages of `pip install -e '.[bench]'`; without them they are skipped with the reason.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import importlib.util
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import dendrite_convert as dc  # noqa: E402
from dendrite_convert.core.structure import add_dendrites  # noqa: E402
from dendrite_convert.exporting.latency import count_flops  # noqa: E402
from dendrite_convert.training.adapter import batch_size, load_adapter  # noqa: E402
from dendrite_convert.training.loop import seed_everything  # noqa: E402
from dendrite_convert.training.objectives import OBJECTIVES, TrainingData  # noqa: E402
import growth_gromo  # noqa: E402
from growth_arms import add_lora, lora_rank, widen  # noqa: E402
from growth_report import COLUMNS, FULL, LOW, merged, read_rows, write_report  # noqa: E402
from tasks import models  # noqa: E402


@dataclass(frozen=True)
class Task:
    factory: str
    width: int
    adapter: Path
    patience: int = 10  # base training: epochs without a better validation score before its plateau is declared
    max_epochs: int = 200
    rank: int = 2  # the low-rank budget's dendrite rank
    package: str | None = None  # a benchmark-only package the task needs

    def build(self) -> torch.nn.Module:
        """The task's plain model, freshly initialised from the global RNG."""
        return getattr(models, self.factory)(self.width)


TASKS = {  # the bundled tasks of benchmarks/results.py, plus wine
    "digits (MLP)": Task("digits_mlp", 8, ROOT / "examples/digits/adapter.py"),
    "breast cancer (MLP)": Task("cancer_mlp", 4, ROOT / "benchmarks/tasks/breast_cancer.py", rank=1),
    "wine (MLP)": Task("wine_mlp", 4, ROOT / "benchmarks/tasks/wine.py", patience=30, max_epochs=400, rank=1),
    "bars (CNN)": Task("bars_cnn", 4, ROOT / "benchmarks/tasks/bars.py", patience=4, max_epochs=60),
    "reviews (tiny BERT)": Task("text_bert", 16, ROOT / "benchmarks/tasks/reviews.py", patience=3, max_epochs=40),
    "mnist1d (MLP)": Task("mnist1d_mlp", 16, ROOT / "benchmarks/tasks/mnist1d_signals.py", package="mnist1d"),
}
ARMS = [("continue", FULL), ("widen", FULL), ("widen-random", FULL), ("lora", FULL), ("gromo", FULL),
        ("gradient", FULL), ("correlation", FULL), ("closed-form", FULL), ("closed-form 1st", FULL),
        ("continue", LOW), ("widen", LOW), ("widen-random", LOW), ("lora", LOW), ("gromo", LOW), ("gradient", LOW),
        ("closed-form", LOW)]


class Runner:
    """One task: its adapter and the loops every arm shares."""

    def __init__(self, task: Task):
        self.task = task
        self.adapter = load_adapter(task.adapter)

    def forward_loss(self, model):
        def loss(batch):
            args, kwargs = self.adapter.model_inputs(batch)
            return self.adapter.loss(model(*args, **kwargs), batch)
        return loss

    @torch.no_grad()
    def evaluate(self, model, data) -> float:
        model.eval()
        total, count = 0.0, 0
        for batch in data:
            args, kwargs = self.adapter.model_inputs(batch)
            total += float(self.adapter.score(model(*args, **kwargs), batch)) * batch_size(batch)
            count += batch_size(batch)
        return total / count

    @torch.no_grad()
    def train_loss(self, model) -> float:
        """The training loss per sample, in eval mode (as the closed-form line search measures it)."""
        model.eval()
        loss = self.forward_loss(model)
        pairs = [(float(loss(batch)), batch_size(batch)) for batch in self.adapter.train_data()]
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)

    def train(self, model, epochs: int, seed: int, patience: int | None = None):
        """Train for `epochs` (or until `patience` epochs without a better validation score); returns the
        model at its best validation epoch, its test score, and the number of epochs run."""
        seed_everything(seed)
        optimizer = self.adapter.build_optimizer([p for p in model.parameters() if p.requires_grad])
        loader, val_data, test_data = self.adapter.train_data(), self.adapter.val_data(), self.adapter.test_data()
        best, best_state, best_test, since = -math.inf, None, None, 0
        loss_of = self.forward_loss(model)
        for epoch in range(epochs):
            model.train()
            for batch in loader:
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            val = self.evaluate(model, val_data)
            if val > best:
                best, best_state, best_test, since = val, copy.deepcopy(model.state_dict()), None, 0
                best_test = self.evaluate(model, test_data)
            else:
                since += 1
                if patience is not None and since >= patience:
                    break
        model.load_state_dict(best_state)
        return model, best_test, epoch + 1

    def example(self):
        args, kwargs = self.adapter.model_inputs(next(iter(self.adapter.test_data())))
        return kwargs if kwargs else tuple(args)


def _added_dendrite_params(base: torch.nn.Module, rank: int | None) -> int:
    model = dc.convert(copy.deepcopy(base), dc.DendriteConfig(rank=rank)).model
    add_dendrites(model)
    return dc.count_parameters(model) - dc.count_parameters(base)


def train_base(runner: Runner, seed: int, quick: bool = False) -> tuple[torch.nn.Module, float]:
    """The task's plain model trained to its plateau (early stopping on validation), and its test score."""
    task = runner.task
    patience, max_epochs = (1, 3) if quick else (task.patience, task.max_epochs)
    seed_everything(seed)
    base, start_test, _ = runner.train(task.build(), max_epochs, seed, patience)
    return base, start_test


def grow(arm: str, base: torch.nn.Module, rank: int | None, budget: int, runner: Runner, seed: int,
         settings: dict, dendrites: dict | None = None) -> torch.nn.Module:
    """The arm's model, grown from a copy of the trained `base` (which is left as it is); `dendrites`: more
    DendriteConfig settings for the dendrite arms."""
    model = copy.deepcopy(base)
    seed_everything(seed)  # an arm's random draws do not depend on which arms ran before it (--arms merges)
    if arm == "continue":
        return model
    if arm in ("widen", "widen-random"):
        return widen(model, budget, torch.Generator().manual_seed(seed), fresh=arm == "widen-random")
    if arm == "lora":
        return add_lora(model, lora_rank(model, budget))
    if arm == "gromo":
        return growth_gromo.grow(model, budget, runner.adapter)
    model = dc.convert(model, dc.DendriteConfig(rank=rank, **(dendrites or {}))).model
    # the objective classes dendrite-train runs, grown once from the model's own training batches and loss
    name, options = ("closed-form", {"order": 1}) if arm == "closed-form 1st" else (arm, {})
    objective = OBJECTIVES[name](**settings.get(name, {}), **options)
    data = TrainingData(runner.adapter.train_data(), runner.forward_loss(model))
    objective.grow(model, data if objective.needs_data(model) else None)
    objective.freeze_grown(model, 0)
    return model


def _flops(model, example) -> int:
    has_dendrites = any(isinstance(m, dc.DendriteLayer) for m in model.modules())
    return count_flops(dc.fold_model(model) if has_dendrites else model, example)


def run_task(name: str, out: Path, seeds: int, quick: bool, extra_epochs: int, arms: list[str]) -> list[dict]:
    torch.set_num_threads(1)  # also in a --jobs worker process
    task = TASKS[name]
    runner = Runner(task)
    samples = 256 if quick else 4096
    settings = {"correlation": {"epochs": 2 if quick else 20, "samples": samples}, "closed-form": {"samples": samples},
                "gradient": {"samples": samples}}
    example = runner.example()
    rows = []
    skipped = growth_gromo.unavailable(task.build())
    if skipped:
        print(f"{name}: gromo arm skipped: {skipped}", file=sys.stderr)
    for seed in range(seeds):
        base, start_test = train_base(runner, seed, quick)
        path = out / "growth_runs" / task.factory / f"seed_{seed}" / "base.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), path)
        base_flops, base_params, base_loss = _flops(base, example), dc.count_parameters(base), runner.train_loss(base)
        budgets = {FULL: _added_dendrite_params(base, None), LOW: _added_dendrite_params(base, task.rank)}
        for arm, budget in ARMS:
            if arm not in arms or (arm == "gromo" and skipped):
                continue
            saved = task.build()
            saved.load_state_dict(torch.load(path, weights_only=True))  # every arm starts from the saved model
            start = time.perf_counter()
            rank = task.rank if budget == LOW else None
            model = grow(arm, saved, rank, budgets[budget], runner, 1000 + seed, settings)
            drop = (base_loss - runner.train_loss(model)) / base_loss
            model, test, _ = runner.train(model, extra_epochs, 2000 + seed)
            rows.append({"task": name, "budget": budget, "arm": arm, "seed": seed,
                         "added_params": dc.count_parameters(model) - base_params,
                         "added_flops": _flops(model, example) - base_flops, "start_test": start_test,
                         "test_at_best": test, "insertion_loss_drop": drop,
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"{name} | {budget} | {arm} | seed {seed}: test {test:.2f} (start {start_test:.2f}), "
                  f"+{rows[-1]['added_params']} params, loss drop at insertion {drop:+.3f}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: 2 seeds, tiny budgets")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 10, quick 2)")
    parser.add_argument("--extra-epochs", type=int, default=None,
                        help="the epochs every arm gets (default 20, quick 1)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="subset of task names")
    parser.add_argument("--jobs", type=int, default=1,
                        help="tasks run in this many processes at once (1 thread each), started in --tasks order")
    parser.add_argument("--arms", nargs="*", default=None,
                        help="run only these arms and merge their rows into the growth.csv in --output (default: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite growth.md and growth.png from the growth.csv in --output, running nothing")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 10)
    extra = args.extra_epochs or (1 if args.quick else 20)
    if args.report_only:
        rows = read_rows(args.output / "growth.csv")
        header = (args.output / "growth.md").read_text().split("\n\n", 1)[0]
        return write_report(rows, args.output, header)
    torch.set_num_threads(1)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    missing = {name: TASKS[name].package for name in args.tasks
               if TASKS[name].package and importlib.util.find_spec(TASKS[name].package) is None}
    for name, package in missing.items():
        print(f"{name}: skipped: the {package} package is not installed (pip install -e '.[bench]')", file=sys.stderr)
    with concurrent.futures.ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn")) as pool:
        runs = {name: pool.submit(run_task, name, args.output, seeds, args.quick, extra,
                                          args.arms or [arm for arm, _ in ARMS])
                for name in args.tasks if name not in missing}
        rows = [row for name in TASKS if name in runs for row in runs[name].result()]  # tables in TASKS order
    if args.arms:
        old = args.output / "growth.csv"
        rows = merged(read_rows(old) if old.exists() else [], rows, list(TASKS))
    with (args.output / "growth.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/growth.py" + (" --quick" if args.quick else "")
    command += f" --seeds {seeds}" if args.seeds else ""
    command += f" --extra-epochs {extra}" if args.extra_epochs else ""
    command += (" --tasks " + " ".join(f'"{t}"' for t in args.tasks)) if args.tasks != list(TASKS) else ""
    command += f" --jobs {args.jobs}" if args.jobs > 1 else ""
    command += (" --arms " + " ".join(f'"{a}"' for a in args.arms)) if args.arms else ""
    shown = args.output.resolve()
    if shown != RESULTS:
        command += f" -o {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}"
    gromo = "" if importlib.util.find_spec("gromo") else "; the gromo arm skipped: gromo is not installed"
    skipped = "".join(f"; {name} skipped: {package} is not installed" for name, package in missing.items())
    write_report(rows, args.output, f"`{command}` ({seeds} seeds, {extra} extra epochs per arm, 1 CPU thread per "
                 f"task, torch {torch.__version__}, {time.perf_counter() - start:.0f} s{gromo}{skipped})")


if __name__ == "__main__":
    main()
