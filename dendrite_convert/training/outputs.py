"""What a run shows: scores.csv, best_test_scores.csv, summary.json and training.png (docs/design.md §4).

All of it is derived from the run's rows and schedule, rewritten whole after each checkpoint (and from the
checkpoint on resume), so these files are atomic but not fsynced.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..core.files import atomic_file
from . import distributed

if TYPE_CHECKING:
    from .loop import Run

log = logging.getLogger(__name__)

SCORE_COLUMNS = ["epoch", "phase", "dendrites", "params", "train_loss", "val", "test", "lr", "seconds", "peak_mem_mb"]
BEST_COLUMNS = ["params", "dendrites", "epoch", "max_val", "test"]


def base_parameter_count(model: nn.Module) -> int:
    """Parameters and buffers the model needs without any dendrite (tied tensors once)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or not t.is_floating_point() or ".dendrite_" in f".{name}":
            continue
        seen.add(id(t))
        total += t.numel()
    return total


def score_row(epoch, phase, dendrites, params, train_loss, val, test, lr, seconds, peak_mem_mb=None) -> dict:
    """One row of scores.csv; peak_mem_mb: the epoch's peak CUDA memory, or the process's peak RSS so far."""
    return {"epoch": epoch, "phase": phase, "dendrites": dendrites, "params": params,
            "train_loss": train_loss, "val": val, "test": test, "lr": lr, "seconds": seconds,
            "peak_mem_mb": peak_mem_mb}


def write_outputs(run: Run) -> dict:
    """Rewrite scores.csv, best_test_scores.csv and summary.json (rank 0); returns the summary."""
    data = summary(run)
    if distributed.is_main():
        _write_csv(run.output / "scores.csv", SCORE_COLUMNS, run.rows)
        _write_csv(run.output / "best_test_scores.csv", BEST_COLUMNS, best_test_scores(run))
        write_text(run.output / "summary.json", json.dumps(data, indent=2) + "\n")
    return data


def best_test_scores(run: Run) -> list[dict]:
    """The peer's bestTestScores: per accepted architecture, its best validation and the test score there."""
    pick = max if run.adapter.maximize else min
    out = []
    accepted = range(run.initial_dendrites, run.schedule.best_dendrites + 1)
    for d in accepted:
        rows = [r for r in run.rows if r["phase"] == "neuron" and r["dendrites"] == d and math.isfinite(r["val"])]
        if rows:
            best = pick(rows, key=lambda r: r["val"])
            out.append({"params": best["params"], "dendrites": d, "epoch": best["epoch"], "max_val": best["val"],
                        "test": best["test"]})
    return out


def summary(run: Run) -> dict:
    s = run.schedule
    best_row = _best_row(run)
    return {
        "best_val": None if best_row is None else best_row["val"],
        "test_at_best": None if best_row is None else best_row["test"],
        "params": None if best_row is None else best_row["params"],
        "base_params": run.base_params,
        "dendrites": s.best_dendrites if best_row is not None else None,
        "best_epoch": None if best_row is None else best_row["epoch"],
        "epochs": len(run.rows),
        "wall_seconds": round(run.wall_seconds(), 3),
        "objective": run.config.objective,
        "maximize": run.adapter.maximize,
        "seed": run.config.seed,
        "finished": s.done,
        "nonfinite": run.nonfinite,
        "stop_reason": s.stop_reason or None,
        "switches": s.switches,
        "world_size": distributed.world_size(),
        "device": str(run.device),
        "precision": run.config.precision,
        "compiled": run.compiled,
        "compile_fallback": run.compile_fallback,
        "peak_mem_mb": max((r["peak_mem_mb"] for r in run.rows if r.get("peak_mem_mb") is not None), default=None),
    }


def _best_row(run: Run) -> dict | None:
    if run.schedule.best is None:
        return None
    # Row numbers count dendrite phases too; the schedule's best_epoch counts the same epochs.
    return next((r for r in run.rows if r["epoch"] == run.schedule.best_epoch), None)


def plot(run: Run) -> None:
    """training.png (rank 0, unless the run draws none), when Pillow (the optional `plots` extra) is installed."""
    if not (run.config.plot and distributed.is_main()):
        return
    from .plots import save_training_png

    try:
        save_training_png(run.output / "training.png", run.rows, run.schedule.switches,
                          run.schedule.best_epoch or None, "-loss" if run.adapter.score is None else "score")
    except ImportError as exc:  # pragma: no cover - Pillow comes with the optional `plots` extra
        log.warning(f"training.png was not drawn ({exc}); pip install pillow.")


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    write_text(path, buffer.getvalue())


def write_text(path: Path, text: str) -> None:
    """Atomic but not fsynced: these files are derived from the fsynced checkpoint and rewritten from it
    on resume, so durability costs nothing per epoch here."""
    with atomic_file(path, durable=False) as tmp:
        tmp.write_text(text)
