"""Regenerate the README's results table from scratch on bundled offline data (issue 8).

    .venv/bin/python benchmarks/results.py            # full: 5 seeds per arm, documented in the README
    .venv/bin/python benchmarks/results.py --quick    # CI: 2 seeds, short budgets, same outputs

For each task: plain training (no dendrites), gradient, correlation and closed-form dendrites, and a plain
model widened to the gradient arm's parameter count; every arm over the same seeds with the same
epoch budget and early stopping. Writes benchmarks/results/{runs.csv,results.md,<task>.png} and
appends the training-overhead and export-latency benchmarks' own output to results.md.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import dendrite_convert as dc  # noqa: E402
from dendrite_convert.conversion.consent import Consent  # noqa: E402
from dendrite_convert.training.compare import cohens_d, run_all, welch_p_value  # noqa: E402
from dendrite_convert.training.trainer import TrainConfig  # noqa: E402

OWN_CODE = Consent(trust_code=True)  # the directories' factory is this repository's benchmarks/tasks/models.py
from tasks import models  # noqa: E402

TASKS = {  # name -> (factory, width, adapter, full budget)
    "digits (MLP)": ("digits_mlp", 8, ROOT / "examples/digits/adapter.py", TrainConfig(patience=5, max_epochs=60)),
    "breast cancer (MLP)": ("cancer_mlp", 4, ROOT / "benchmarks/tasks/breast_cancer.py",
                            TrainConfig(patience=5, max_epochs=60)),
    "bars (CNN)": ("bars_cnn", 4, ROOT / "benchmarks/tasks/bars.py", TrainConfig(patience=4, max_epochs=40)),
    "reviews (tiny BERT)": ("text_bert", 16, ROOT / "benchmarks/tasks/reviews.py", TrainConfig(patience=3, max_epochs=24)),
}
ARMS = ("plain", "gradient", "correlation", "closed-form", "plain widened")
RUN_COLUMNS = ["task", "arm", "seed", "width", "run", "params", "dendrites", "epochs", "best_val", "test_at_best", "wall_seconds"]


def _convert(task_dir: Path, factory: str, width: int) -> Path:
    torch.manual_seed(0)
    model = getattr(models, factory)(width)
    out = task_dir / f"converted_w{width}"
    if not out.exists():
        converted = dc.convert(model, factory=f"{ROOT / 'benchmarks/tasks/models.py'}:{factory}",
                               factory_kwargs={"width": width})
        converted.save(out)
    return out


def _matching_width(factory: str, width: int, params: float) -> int:
    """The smallest width whose plain model has at least `params` parameters."""
    for w in range(width, 64 * width):
        try:
            if dc.count_parameters(getattr(models, factory)(w)) >= params:
                return w
        except ValueError:  # e.g. a hidden size the attention heads do not divide
            continue
    return 64 * width


def run_task(name: str, out: Path, seeds: int, jobs: int, quick: bool) -> list[dict]:
    factory, width, adapter, config = TASKS[name]
    if quick:
        config = replace(config, patience=1, max_epochs=4, correlation_epochs=2, correlation_samples=256)
    task_dir = out / "runs" / factory
    converted = _convert(task_dir, factory, width)
    arm_configs = {"plain": replace(config, max_dendrites=0), "gradient": replace(config, objective="gradient"),
                   "correlation": replace(config, objective="correlation"),
                   "closed-form": replace(config, objective="closed-form")}
    plan = [(arm, s, converted, width, replace(cfg, seed=s)) for arm, cfg in arm_configs.items() for s in range(seeds)]
    run_dirs = [task_dir / arm / f"seed_{s}" for arm, s, *_ in plan]
    summaries = run_all([(c, adapter, run, cfg) for (_, _, c, _, cfg), run in zip(plan, run_dirs)], jobs, OWN_CODE)
    gradient_params = statistics.fmean(sm["params"] for (arm, *_), sm in zip(plan, summaries) if arm == "gradient")
    wide = _matching_width(factory, width, gradient_params)
    wide_dir = _convert(task_dir, factory, wide)
    wide_plan = [("plain widened", s, wide_dir, wide, replace(config, max_dendrites=0, seed=s)) for s in range(seeds)]
    wide_dirs = [task_dir / "widened" / f"seed_{s}" for _, s, *_ in wide_plan]
    summaries += run_all([(c, adapter, run, cfg) for (_, _, c, _, cfg), run in zip(wide_plan, wide_dirs)], jobs, OWN_CODE)
    return [{"task": name, "arm": arm, "seed": s, "width": w, "run": run.relative_to(out).as_posix(),  # movable output
             "params": sm["params"], "dendrites": sm["dendrites"], "epochs": sm["epochs"], "best_val": sm["best_val"], "test_at_best": sm["test_at_best"],
             "wall_seconds": sm["wall_seconds"]}
            for (arm, s, _, w, _), run, sm in zip(plan + wide_plan, run_dirs + wide_dirs, summaries)]


def table(rows: list[dict]) -> str:
    lines = ["| task | arm | params | dendrites | test accuracy % (mean ± std) | vs plain: Welch p | Cohen's d | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        plain = [r["test_at_best"] for r in rows if r["task"] == task and r["arm"] == "plain"]
        for arm in ARMS:
            mine = [r for r in rows if r["task"] == task and r["arm"] == arm]
            scores = [r["test_at_best"] for r in mine]
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            p = d = "-"
            if arm != "plain" and welch_p_value(scores, plain) is not None:
                p, d = f"{welch_p_value(scores, plain):.3g}", f"{cohens_d(scores, plain):+.2f}"
            lines.append(
                f"| {task} | {arm} | {statistics.fmean(r['params'] for r in mine):,.0f} | "
                f"{statistics.fmean(r['dendrites'] for r in mine):.1f} | {statistics.fmean(scores):.2f} ± {std:.2f} | "
                f"{p} | {d} | {statistics.fmean(r['wall_seconds'] for r in mine):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in dict.fromkeys(r["task"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, color in zip(ARMS, ("tab:gray", "tab:green", "tab:blue", "tab:red", "tab:orange")):
            mine = [r for r in rows if r["task"] == task and r["arm"] == arm]
            ax.scatter([r["params"] for r in mine], [r["test_at_best"] for r in mine], color=color, alpha=0.4)
            scores = [r["test_at_best"] for r in mine]
            ax.errorbar([statistics.fmean(r["params"] for r in mine)], [statistics.fmean(scores)],
                        yerr=[statistics.stdev(scores) if len(scores) > 1 else 0], color=color, marker="D",
                        capsize=4, label=arm)
        ax.set(title=task, xlabel="parameters", ylabel="test accuracy at best validation (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{task.split(' ')[0]}.png", dpi=100)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI mode: 2 seeds, short budgets")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 5, quick 2)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="subset of task names")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    shutil.rmtree(args.output / "runs", ignore_errors=True)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [row for name in args.tasks for row in run_task(name, args.output, seeds, args.jobs, args.quick)]
    with (args.output / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.output)
    extras = []
    if not args.quick:
        for script in ("train_overhead.py", "export_bench.py"):
            if (ROOT / "benchmarks" / script).exists():
                done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
                failure = f"\nfailed (exit {done.returncode}): {done.stderr.strip()[-500:]}" if done.returncode else ""
                extras.append(f"### {script}\n\n```\n{done.stdout.strip()}{failure}\n```")
    machine = f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    command = "python benchmarks/results.py" + (" --quick" if args.quick else "")
    report = (f"## Results\n\n`{command}` ({seeds} seeds per arm, {machine}, {time.perf_counter() - start:.0f} s)\n\n"
              f"{table(rows)}\n\n" + "\n\n".join(extras) + "\n")
    (args.output / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
