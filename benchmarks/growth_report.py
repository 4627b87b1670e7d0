"""The report of benchmarks/growth.py: paired intervals, the verdicts, the tables and the plot, from growth.csv's rows."""

from __future__ import annotations

import csv
import random
import statistics
from pathlib import Path

FULL, LOW = "full", "low-rank"
DENDRITE_ARMS = ("gradient", "correlation", "closed-form", "closed-form 1st")
COLUMNS = ["task", "budget", "arm", "seed", "added_params", "added_flops", "start_test", "test_at_best",
           "insertion_loss_drop", "seconds"]


def paired_interval(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """Mean of a - b over seeds and its 90 % bootstrap interval (seeds resampled jointly)."""
    rng = random.Random(0)
    diffs = [x - y for x, y in zip(a, b)]
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return statistics.fmean(diffs), means[int(0.05 * draws)], means[int(0.95 * draws) - 1]


def _scores(rows, task, budget, arm) -> list[float]:
    return [r["test_at_best"] for r in sorted(rows, key=lambda r: r["seed"])
            if r["task"] == task and r["budget"] == budget and r["arm"] == arm]


def summarize(rows: list[dict]) -> tuple[str, list[str]]:
    """The markdown table, and one verdict line per task and budget."""
    lines = ["| task | budget | arm | added params | added FLOPs | start test % | test % (mean ± std) | "
             "loss drop at insertion | s per arm (grow + train) | vs continue (90 % CI) | "
             "worst lower bound vs the others |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts, reached = [], {}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        for budget in (FULL, LOW):
            arms = list(dict.fromkeys(r["arm"] for r in rows if r["task"] == task and r["budget"] == budget))
            winners = []
            for arm in arms:
                mine = [r for r in rows if r["task"] == task and r["budget"] == budget and r["arm"] == arm]
                scores = _scores(rows, task, budget, arm)
                std = statistics.stdev(scores) if len(scores) > 1 else 0.0
                vs = "-"
                if arm != "continue":
                    m, lo, hi = paired_interval(scores, _scores(rows, task, budget, "continue"))
                    vs = f"{m:+.2f} ({lo:+.2f} to {hi:+.2f})"
                worst = min((paired_interval(scores, _scores(rows, task, budget, o))[1] for o in arms if o != arm),
                            default=float("nan"))
                if worst > 0:
                    winners.append(arm)
                mean = lambda key: statistics.fmean(r[key] for r in mine)  # noqa: E731
                lines.append(f"| {task} | {budget} | {arm} | {mean('added_params'):,.0f} | "
                             f"{mean('added_flops'):,.0f} | {mean('start_test'):.2f} | "
                             f"{statistics.fmean(scores):.2f} ± {std:.2f} | {mean('insertion_loss_drop'):+.3f} | "
                             f"{mean('seconds'):.1f} | {vs} | {worst:+.2f} |")
            by_mean = sorted(arms, key=lambda a: -statistics.fmean(_scores(rows, task, budget, a)))
            winner = winners[0] if winners else None
            if winner in DENDRITE_ARMS:
                reached.setdefault(task, f"{winner}, {budget} budget")
            verdicts.append(f"- {task}, {budget} budget: best mean {by_mean[0]}; "
                            + (f"{winner} beats every other arm with a 90 % interval above zero"
                               + (" (a dendrite arm)" if winner in DENDRITE_ARMS else "") if winner
                               else "no arm beats every other with a 90 % interval above zero")
                            + _dendrites_against_the_rest(rows, task, budget, by_mean))
    verdicts.append(f"- **Goal** (some dendrite arm beats every other arm of its budget with a 90 % interval above "
                    f"zero, on at least 3 of {len(tasks)} tasks): reached on {len(reached)} of {len(tasks)}"
                    + (f" ({'; '.join(f'{t}: {w}' for t, w in reached.items())})" if reached else ""))
    return "\n".join(lines), verdicts


def _dendrites_against_the_rest(rows: list[dict], task: str, budget: str, by_mean: list[str]) -> str:
    """The user's question in one clause: the best dendrite arm against the best other way to spend the budget."""
    mine = [a for a in by_mean if a in DENDRITE_ARMS]
    others = [a for a in by_mean if a not in DENDRITE_ARMS]
    if not mine or not others:
        return ""
    mean, low, high = paired_interval(_scores(rows, task, budget, mine[0]), _scores(rows, task, budget, others[0]))
    return f"; best dendrite arm ({mine[0]}) against the best other ({others[0]}): {mean:+.2f} ({low:+.2f} to {high:+.2f})"


def overview(rows: list[dict]) -> str:
    """Test % (mean ± std over seeds, added parameters in brackets) per arm and task, the best mean of each
    task and budget in bold: the README's table."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["| budget | arm | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for budget in (FULL, LOW):
        arms = list(dict.fromkeys(r["arm"] for r in rows if r["budget"] == budget))
        best = {t: max((statistics.fmean(s) for a in arms if (s := _scores(rows, t, budget, a))), default=None)
                for t in tasks}
        for arm in arms:
            cells = []
            for task in tasks:
                scores = _scores(rows, task, budget, arm)
                if not scores:
                    cells.append("-")
                    continue
                added = statistics.fmean(r["added_params"] for r in rows
                                         if r["task"] == task and r["budget"] == budget and r["arm"] == arm)
                mean, std = statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0
                text = f"{mean:.2f} ± {std:.2f}"
                cells.append(f"{'**' + text + '**' if mean == best[task] else text} (+{added:,.0f})")
            lines.append(f"| {budget} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    """growth.csv's rows with their numbers as numbers."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in COLUMNS[3:]:
            row[key] = float(row[key]) if "." in row[key] or "e" in row[key] else int(row[key])
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    colors = dict(zip(dict.fromkeys(r["arm"] for r in rows), plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for (ax_p, ax_f), task in zip(axes, tasks):
        for (arm, budget) in dict.fromkeys((r["arm"], r["budget"]) for r in rows if r["task"] == task):
            if arm == "continue" and budget == LOW:  # the same runs as in the full budget
                continue
            mine = [r for r in rows if r["task"] == task and r["arm"] == arm and r["budget"] == budget]
            scores = [r["test_at_best"] for r in mine]
            err = statistics.stdev(scores) if len(scores) > 1 else 0.0
            style = {"marker": "o" if budget == FULL else "s", "capsize": 3, "color": colors[arm],
                     "label": arm if arm == "continue" else f"{arm} ({budget})"}
            for ax, key in ((ax_p, "added_params"), (ax_f, "added_flops")):
                ax.errorbar([statistics.fmean(r[key] for r in mine)], [statistics.fmean(scores)], yerr=[err], **style)
        ax_p.set(title=f"{task}: test vs added parameters", xlabel="added parameters", ylabel="test score")
        ax_f.set(title=f"{task}: test vs added inference FLOPs", xlabel="added FLOPs per forward")
        ax_p.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merged(old: list[dict], new: list[dict], tasks: list[str]) -> list[dict]:
    """`old` with every row that `new` has for the same task, budget, arm and seed replaced, tables in `tasks` order."""
    key = lambda r: (r["task"], r["budget"], r["arm"], int(r["seed"]))  # noqa: E731
    rows = {key(r): r for r in old} | {key(r): r for r in new}
    order = {name: i for i, name in enumerate(tasks)}
    return sorted(rows.values(), key=lambda r: (order.get(r["task"], len(order)), int(r["seed"])))


def write_report(rows: list[dict], out: Path, header: str) -> None:
    plot(rows, out / "growth.png")
    table, verdicts = summarize(rows)
    report = f"{header}\n\n{overview(rows)}\n\n{table}\n\n" + "\n".join(verdicts) + "\n"
    (out / "growth.md").write_text(report)
    print(report)
