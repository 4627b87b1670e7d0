"""Did dendrites help *this* model? The same run with and without dendrites over K seeds, and a test.

`compare` trains the converted model K times with dendrites and K times with `max_dendrites=0` (the
same data, epoch budget and early stopping: plain training), reads each run's `summary.json`, and
reports mean ± std of the test score at best validation (the validation score when the adapter has
no test data), parameters and wall time per arm, Welch's t-test p-value and Cohen's d, or why there is no
test (one seed, identical arms, no spread in either arm). Seeds run one after another or in `jobs`
parallel processes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from ..conversion.consent import Consent
from ..core.files import atomic_file, check_writable
from .trainer import TrainConfig, train

ARMS = ("dendrites", "baseline")
RUN_COLUMNS = ["arm", "seed", "score", "best_val", "test_at_best", "params", "dendrites", "epochs", "wall_seconds", "run"]


@dataclass
class ArmStats:
    arm: str
    n: int
    mean: float
    std: float
    params: float
    wall_seconds: float


@dataclass
class Comparison:
    score_name: str  # "test_at_best" or "best_val"
    maximize: bool
    runs: list[dict]
    arms: list[ArmStats]
    p_value: float | None  # Welch's t-test, two-sided; None when `untestable`
    effect_size: float | None  # Cohen's d, dendrites minus baseline (positive = higher score)
    beyond_noise: bool | None
    untestable: str | None = None  # why there is no p-value (one seed, identical arms, no spread)

    def to_dict(self) -> dict:
        return asdict(self)


def _run_one(job: tuple) -> dict:
    converted, adapter, run_dir, config, threads, consent = job
    if threads:
        import torch

        torch.set_num_threads(threads)
    summary = train(converted, adapter, run_dir, config, force=True, **consent.keywords())
    return summary


def run_all(runs: list[tuple], jobs: int = 1, consent: Consent | None = None) -> list[dict]:
    """Train each (converted, adapter, run_dir, TrainConfig); in `jobs` spawned processes when > 1."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    consent = consent or Consent()
    work = [(str(converted), str(adapter), run_dir, cfg, threads, consent) for converted, adapter, run_dir, cfg in runs]
    if jobs <= 1:
        return [_run_one(job) for job in work]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_run_one, work))


def compare(converted: str | Path, adapter: str | Path, output: str | Path, config: TrainConfig | None = None,
            seeds: int = 3, baseline: bool = True, jobs: int = 1, force: bool = False,
            consent: Consent | None = None) -> Comparison:
    """Train `seeds` runs per arm into `output/<arm>/seed_<s>/` and compare them (`consent`: as for train)."""
    output = Path(output)
    check_writable(output, force)
    config = config or TrainConfig()
    arms = ARMS if baseline else ARMS[:1]
    plan = []
    for arm in arms:
        for seed in range(config.seed, config.seed + seeds):
            arm_config = replace(config, seed=seed, max_dendrites=0 if arm == "baseline" else config.max_dendrites)
            plan.append((arm, seed, output / arm / f"seed_{seed}", arm_config))
    summaries = run_all([(converted, adapter, run_dir, cfg) for _, _, run_dir, cfg in plan], jobs, consent)
    result = summarize([(arm, seed, run_dir, s) for (arm, seed, run_dir, _), s in zip(plan, summaries)])
    write_outputs(result, output)
    return result


def summarize(runs: list[tuple[str, int, Path, dict]]) -> Comparison:
    """The comparison from (arm, seed, run dir, summary.json) tuples."""
    with_test = all(s.get("test_at_best") is not None for *_, s in runs)
    score_name = "test_at_best" if with_test else "best_val"
    rows = [{"arm": arm, "seed": seed, "score": s[score_name], "best_val": s["best_val"],
             "test_at_best": s.get("test_at_best"), "params": s["params"], "dendrites": s["dendrites"],
             "epochs": s["epochs"], "wall_seconds": s["wall_seconds"], "run": str(run_dir)}
            for arm, seed, run_dir, s in runs]
    arms = []
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm and r["score"] is not None]
        if mine:
            scores = [r["score"] for r in mine]
            arms.append(ArmStats(arm, len(mine), statistics.fmean(scores),
                                 statistics.stdev(scores) if len(scores) > 1 else 0.0,
                                 statistics.fmean(r["params"] for r in mine),
                                 statistics.fmean(r["wall_seconds"] for r in mine)))
    maximize = bool(runs[0][3].get("maximize", True)) if runs else True
    p = d = beyond = None
    by_arm = {a.arm: [r["score"] for r in rows if r["arm"] == a.arm and r["score"] is not None] for a in arms}
    dendrites, plain = by_arm.get("dendrites", []), by_arm.get("baseline", [])
    reason = untestable(dendrites, plain)
    if reason is None:
        p, d = welch_p_value(dendrites, plain), cohens_d(dendrites, plain)
        beyond = p < 0.05
    return Comparison(score_name, maximize, rows, arms, p, d, beyond, reason)


def untestable(a: list[float], b: list[float]) -> str | None:
    """Why Welch's t-test says nothing about these two arms, or None when it applies.

    With one seed there is no noise estimate; identical arms have no difference to test; with no spread in
    either arm the t statistic divides by zero, and any p-value (0 or 1) would be an artefact, not evidence.
    """
    if len(a) < 2 or len(b) < 2:
        return "needs at least 2 seeds in both arms to measure seed-to-seed noise (--seeds 2 --baseline or more)"
    if sorted(a) == sorted(b):
        return (f"both arms gave the same scores on every seed ({_listed(a)}): there is no difference to test, "
                "dendrites changed nothing here")
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return (f"every dendrites seed scored {a[0]:.6g} and every baseline seed {b[0]:.6g}: with no seed-to-seed "
                "spread in either arm a t-test cannot tell whether the difference is beyond noise")
    return None


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's unequal-variance t-test; None where `untestable` explains why there is none."""
    if untestable(a, b):
        return None
    from scipy.stats import t as student_t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * student_t.sf(abs(t), df))


def cohens_d(a: list[float], b: list[float]) -> float | None:
    """Difference of means in pooled standard deviations; None when neither arm varies."""
    pooled = ((len(a) - 1) * statistics.variance(a) + (len(b) - 1) * statistics.variance(b)) / (len(a) + len(b) - 2)
    diff = statistics.fmean(a) - statistics.fmean(b)
    return None if pooled == 0 else diff / math.sqrt(pooled)


def _listed(scores: list[float]) -> str:
    return ", ".join(f"{s:.6g}" for s in sorted(scores))


def write_outputs(result: Comparison, output: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RUN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.runs)
    with atomic_file(output / "comparison.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_file(output / "comparison.json") as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    try:
        _plot(result, output / "comparison.png")
    except ImportError:  # matplotlib is the optional `plots` extra
        pass


def _plot(result: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm, color in zip(ARMS, ("tab:green", "tab:gray")):
        mine = [r for r in result.runs if r["arm"] == arm and r["score"] is not None]
        if not mine:
            continue
        ax.scatter([r["params"] for r in mine], [r["score"] for r in mine], color=color, alpha=0.5, label=f"{arm} (seeds)")
        stats = next(a for a in result.arms if a.arm == arm)
        ax.errorbar([stats.params], [stats.mean], yerr=[stats.std], color=color, marker="D", capsize=5,
                    label=f"{arm} mean ± std")
    ax.set_xlabel("parameters")
    ax.set_ylabel(result.score_name.replace("_", " "))
    title = "dendrites vs plain training"
    if result.p_value is not None:
        effect = "" if result.effect_size is None else f", d = {result.effect_size:.2f}"
        title += f" (Welch p = {result.p_value:.3g}{effect})"
    elif result.arms[1:]:
        title += " (no significance test: see comparison.json)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def render(result: Comparison, console) -> None:
    from rich.table import Table

    table = Table(title=f"{result.score_name.replace('_', ' ')}: mean ± std over seeds", title_justify="left")
    for column in ("arm", "runs", "score", "params", "seconds"):
        table.add_column(column)
    for a in result.arms:
        table.add_row(a.arm, str(a.n), f"{a.mean:.4g} ± {a.std:.2g}", f"{a.params:,.0f}", f"{a.wall_seconds:.1f}")
    console.print(table)
    if result.p_value is None:
        console.print(f"significance: no test: {result.untestable}.", highlight=False, soft_wrap=True)
        return
    verdict = "beyond seed-to-seed noise" if result.beyond_noise else "NOT beyond seed-to-seed noise"
    effect = "" if result.effect_size is None else f", Cohen's d = {result.effect_size:+.2f}"
    console.print(f"Welch's t-test p = {result.p_value:.3g}{effect}: the difference is {verdict} (p < 0.05).",
                  highlight=False, soft_wrap=True)
