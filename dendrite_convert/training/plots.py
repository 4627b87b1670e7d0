"""`training.png`: the peer's graphs, readable — scores with phase switches, learning rate, epoch times."""

from __future__ import annotations

import math
from pathlib import Path

SWITCH_COLORS = {"add": "tab:cyan", "retry": "tab:orange"}
DPI = 80


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def prepare() -> None:
    """Import matplotlib with the Agg backend (plotter.py does this ahead of time); ImportError without it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.backends.backend_agg  # noqa: F401 - what savefig renders with
    import matplotlib.figure  # noqa: F401


def warm_up() -> None:
    """Load the font and fill the text caches the first drawing would otherwise pay for (plotter.py)."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.text(0.1, 0.5, "0123456789.e-+ epoch score", fontsize="small")
    fig.savefig(io.BytesIO(), format="png", dpi=DPI)


def draw_training(rows: list[dict], switches: list[dict], best_epoch: int | None, score_name: str = "score"):
    """A matplotlib Figure (Agg) of the run; switch markers are vertical lines at the switch epochs."""
    prepare()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.06, top=0.96, wspace=0.24, hspace=0.28)  # fixed: a layout
    # engine would measure every label several times, doubling the cost of the plot
    ax_score, ax_loss, ax_lr, ax_time = fig.subplots(2, 2).ravel()
    epochs = [int(r["epoch"]) for r in rows]
    neuron = [r for r in rows if r["phase"] == "neuron"]
    ne = [int(r["epoch"]) for r in neuron]

    ax_score.plot(epochs, [_num(r["val"]) for r in rows], label=f"validation {score_name}", color="tab:blue")
    if any(not math.isnan(_num(r["test"])) for r in rows):
        ax_score.plot(epochs, [_num(r["test"]) for r in rows], label=f"test {score_name}", color="tab:green", alpha=0.7)
    if best_epoch:
        best = next((r for r in rows if int(r["epoch"]) == best_epoch), None)
        if best is not None:
            ax_score.plot([best_epoch], [_num(best["val"])], "k*", markersize=12, label="best (kept)")
    for kind in ("add", "retry"):
        xs = [s["epoch"] for s in switches if s["kind"] == kind]
        for i, x in enumerate(xs):
            ax_score.axvline(x, color=SWITCH_COLORS[kind], linestyle="--", gid=f"switch-{kind}",
                             label=("dendrite added" if kind == "add" else "retry, fresh dendrite") if i == 0 else None)
    ax_score.set(title="Scores (dashed: dendrites added)", xlabel="epoch", ylabel=score_name)
    ax_score.legend(loc="best", fontsize="small")

    ax_loss.plot(ne, [_num(r["train_loss"]) for r in neuron], color="tab:red")
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="loss")
    ax_lr.plot(ne, [_num(r["lr"]) for r in neuron], color="tab:purple")
    ax_lr.set(title="Learning rate", xlabel="epoch", ylabel="lr")
    for phase, color in (("neuron", "tab:blue"), ("dendrite", "tab:cyan")):
        sel = [r for r in rows if r["phase"] == phase]
        if sel:
            ax_time.bar([int(r["epoch"]) for r in sel], [_num(r["seconds"]) for r in sel], color=color, label=phase)
    ax_time.set(title="Epoch times", xlabel="epoch", ylabel="seconds")
    ax_time.legend(loc="best", fontsize="small")
    return fig


def switch_lines(fig) -> list[tuple[str, float]]:
    """(kind, epoch) of every switch marker drawn on the score axes (for tests and tools)."""
    ax = fig.axes[0]
    return [(line.get_gid().removeprefix("switch-"), float(line.get_xdata()[0]))
            for line in ax.get_lines() if (line.get_gid() or "").startswith("switch-")]


def save_training_png(path: Path, rows: list[dict], switches: list[dict], best_epoch: int | None,
                      score_name: str = "score") -> None:
    from ..core.files import atomic_file

    fig = draw_training(rows, switches, best_epoch, score_name)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
