"""`training.png`: the peer's graphs, readable — scores with phase switches, training loss, learning rate, epoch times.

Drawn with Pillow, in the training process, when the run ends. matplotlib would be simpler to call, but importing
it and drawing took 0.7 s of CPU time, nearly a whole small run (the digits MLP trains in 0.75 s; see
benchmarks/digits_run.py); this figure costs about 0.05 s. Lines are drawn at twice the size and reduced (smooth edges); text uses Pillow's
own font. Four panels of a fixed layout, with "nice" ticks (steps of 1, 2, 2.5 or 5 times a power of ten).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

WIDTH, HEIGHT = 960, 720  # pixels of the image
SCALE = 2  # drawn at this multiple of the size, then reduced
COLORS = {"val": (31, 119, 180), "test": (44, 160, 44), "loss": (214, 39, 40), "lr": (148, 103, 189),
          "neuron": (31, 119, 180), "dendrite": (23, 190, 207), "add": (23, 190, 207), "retry": (255, 127, 14),
          "ink": (30, 30, 30), "grid": (228, 228, 228)}
SWITCH_LABELS = {"add": "dendrite added", "retry": "retry, fresh dendrite"}


@dataclass
class Figure:
    image: object  # a PIL.Image
    switches: list[tuple[str, float]]  # (kind, epoch) of every switch line drawn on the score panel


@dataclass
class Panel:
    """One graph: its plotting area in pixels of the image (left, top, right, bottom) and the data it spans."""

    box: tuple[int, int, int, int]
    x: tuple[float, float]
    y: tuple[float, float]

    def at(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + (x - self.x[0]) / (self.x[1] - self.x[0]) * (right - left),
                bottom - (y - self.y[0]) / (self.y[1] - self.y[0]) * (bottom - top))


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _span(values: list[float], floor: float | None = None) -> tuple[float, float]:
    """The range to show `values` in, with a margin (from `floor` when given: bars start at 0)."""
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(finite if floor is None else [floor, *finite]), max(finite)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.1 or 1.0  # a constant series gets a range around it
    return (lo if lo == floor else lo - pad), hi + pad


def ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> tuple[list[float], int]:
    """Tick values within [lo, hi], about `count` of them (`whole`: integers only), and the decimals that tell
    them apart."""
    raw = max((hi - lo) / count, 1.0 if whole else 0.0)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9) and not (whole and m == 2.5))
    first = math.ceil(lo / step - 1e-9)
    values = [(first + i) * step for i in range(int(math.floor(hi / step + 1e-9) - first) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / power, 3) == 2.5 else 0))
    return values, decimals


def _label(value: float, decimals: int) -> str:
    return f"{value:.2e}" if decimals > 6 or abs(value) >= 1e6 else f"{value:.{decimals}f}"


class _Canvas:
    """The image being drawn, at SCALE times its size; coordinates are pixels of the final image."""

    def __init__(self):
        from PIL import Image, ImageDraw, ImageFont, features

        if not features.check("freetype2"):
            raise ImportError("Pillow was built without FreeType, which training.png's text needs")
        self.Image, self.ImageDraw = Image, ImageDraw
        self.image = Image.new("RGB", (WIDTH * SCALE, HEIGHT * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.fonts = {size: ImageFont.load_default(size=size * SCALE) for size in (10, 11, 13)}

    def line(self, points: list[tuple[float, float]], color, width: float = 1.5) -> None:
        scaled = [(x * SCALE, y * SCALE) for x, y in points]
        if len(scaled) == 1:
            (x, y), r = scaled[0], width * SCALE
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        else:
            self.draw.line(scaled, fill=color, width=round(width * SCALE), joint="curve")

    def dashed(self, x: float, top: float, bottom: float, color, on: float = 6, off: float = 4) -> None:
        y = top
        while y < bottom:
            self.line([(x, y), (x, min(y + on, bottom))], color)
            y += on + off

    def rectangle(self, box: tuple[float, float, float, float], fill=None, outline=None) -> None:
        self.draw.rectangle([v * SCALE for v in box], fill=fill, outline=outline, width=SCALE)

    def star(self, x: float, y: float, radius: float = 8) -> None:
        points = [(x + r * math.sin(i * math.pi / 5), y - r * math.cos(i * math.pi / 5))
                  for i, r in zip(range(10), [radius, radius * 0.4] * 5)]
        self.draw.polygon([(px * SCALE, py * SCALE) for px, py in points], fill=COLORS["ink"])

    def text(self, xy: tuple[float, float], text: str, size: int = 10, anchor: str = "mm") -> float:
        """Writes `text` placed by its `anchor` (Pillow's: "lm" left-middle, "rm", "mt", ...); returns its width."""
        self.draw.text((xy[0] * SCALE, xy[1] * SCALE), text, fill=COLORS["ink"], font=self.fonts[size], anchor=anchor)
        return self.draw.textlength(text, font=self.fonts[size]) / SCALE

    def vertical_text(self, center: tuple[float, float], text: str, size: int = 11) -> None:
        font = self.fonts[size]
        left, top, right, bottom = font.getbbox(text)
        tile = self.Image.new("L", (right - left, bottom - top), 0)
        self.ImageDraw.Draw(tile).text((-left, -top), text, fill=255, font=font)
        tile = tile.rotate(90, expand=True)
        corner = (round(center[0] * SCALE - tile.width / 2), round(center[1] * SCALE - tile.height / 2))
        self.image.paste(COLORS["ink"], corner, tile)

    def finished(self):
        return self.image.reduce(SCALE)


def _panel(canvas: _Canvas, cell: tuple[int, int], title: str, xlabel: str, ylabel: str, x: tuple[float, float],
           y: tuple[float, float]) -> Panel:
    """Grid, frame, ticks, title and labels of the panel in grid cell (column, row); returns it for the data."""
    cx, cy = cell[0] * WIDTH // 2, cell[1] * HEIGHT // 2
    panel = Panel((cx + 74, cy + 54, cx + WIDTH // 2 - 16, cy + HEIGHT // 2 - 52), x, y)
    left, top, right, bottom = panel.box
    x_ticks, x_decimals = ticks(*x, count=6, whole=True)
    y_ticks, y_decimals = ticks(*y)
    for value in x_ticks:
        px = panel.at(value, y[0])[0]
        canvas.line([(px, top), (px, bottom)], COLORS["grid"], 1)
        canvas.line([(px, bottom), (px, bottom + 4)], COLORS["ink"], 1)
        canvas.text((px, bottom + 7), _label(value, x_decimals), anchor="mt")
    for value in y_ticks:
        py = panel.at(x[0], value)[1]
        canvas.line([(left, py), (right, py)], COLORS["grid"], 1)
        canvas.line([(left - 4, py), (left, py)], COLORS["ink"], 1)
        canvas.text((left - 7, py), _label(value, y_decimals), anchor="rm")
    canvas.rectangle(panel.box, outline=COLORS["ink"])
    canvas.text(((left + right) / 2, cy + 16), title, size=13)
    canvas.text(((left + right) / 2, bottom + 32), xlabel, size=11)
    canvas.vertical_text((cx + 14, (top + bottom) / 2), ylabel)
    return panel


def _legend(canvas: _Canvas, panel: Panel, entries: list[tuple[str, tuple, str]]) -> None:
    """One row above the plotting area: (label, color, kind) with kind a line, a bar or a star."""
    x, y = panel.box[0], panel.box[1] - 13
    for label, color, kind in entries:
        if kind == "star":
            canvas.star(x + 9, y, 6)
        elif kind == "bar":
            canvas.rectangle((x + 4, y - 5, x + 14, y + 5), fill=color)
        else:
            canvas.line([(x, y), (x + 18, y)], color, 2)
        x += 24 + canvas.text((x + 24, y), label, anchor="lm") + 14


def _series(canvas: _Canvas, panel: Panel, xs: list[int], ys: list[float], color) -> None:
    """A line through the finite points, broken where a value is missing."""
    run: list[tuple[float, float]] = []
    for x, y in [*zip(xs, ys), (None, math.nan)]:
        if x is not None and math.isfinite(y):
            run.append(panel.at(x, y))
        elif run:
            canvas.line(run, color)
            run = []


def draw_training(rows: list[dict], switches: list[dict], best_epoch: int | None, score_name: str = "score") -> Figure:
    """The run's figure; switch markers are dashed vertical lines at the switch epochs."""
    canvas = _Canvas()
    epochs = [int(r["epoch"]) for r in rows]
    first, last = min(epochs, default=1), max(epochs, default=1)
    x = (first - max(0.6, (last - first) * 0.03), last + max(0.6, (last - first) * 0.03))  # room for the bars
    neuron = [r for r in rows if r["phase"] == "neuron"]
    ne = [int(r["epoch"]) for r in neuron]
    val, test = [_num(r["val"]) for r in rows], [_num(r["test"]) for r in rows]
    has_test = any(math.isfinite(v) for v in test)

    scores = _panel(canvas, (0, 0), "Scores (dashed: dendrites added)", "epoch", score_name, x,
                    _span(val + (test if has_test else [])))
    legend = [(f"validation {score_name}", COLORS["val"], "line")]
    drawn = [(s["kind"], float(s["epoch"])) for s in switches]
    for kind, epoch in drawn:
        canvas.dashed(scores.at(epoch, 0)[0], scores.box[1], scores.box[3], COLORS[kind])
    legend += [(SWITCH_LABELS[kind], COLORS[kind], "line") for kind in SWITCH_LABELS if kind in dict(drawn)]
    _series(canvas, scores, epochs, val, COLORS["val"])
    if has_test:
        _series(canvas, scores, epochs, test, COLORS["test"])
        legend.insert(1, (f"test {score_name}", COLORS["test"], "line"))
    best = next((r for r in rows if best_epoch and int(r["epoch"]) == best_epoch), None)
    if best is not None and math.isfinite(_num(best["val"])):
        canvas.star(*scores.at(best_epoch, _num(best["val"])))
        legend.append(("best (kept)", COLORS["ink"], "star"))
    _legend(canvas, scores, legend)

    losses, lrs = [_num(r["train_loss"]) for r in neuron], [_num(r["lr"]) for r in neuron]
    _series(canvas, _panel(canvas, (1, 0), "Training loss", "epoch", "loss", x, _span(losses)), ne, losses,
            COLORS["loss"])
    _series(canvas, _panel(canvas, (0, 1), "Learning rate", "epoch", "lr", x, _span(lrs)), ne, lrs, COLORS["lr"])

    seconds = [_num(r["seconds"]) for r in rows]
    times = _panel(canvas, (1, 1), "Epoch times", "epoch", "seconds", x, _span(seconds, floor=0.0))
    phases = [p for p in ("neuron", "dendrite") if any(r["phase"] == p for r in rows)]
    for epoch, row, value in zip(epochs, rows, seconds):
        if math.isfinite(value):
            (left, top), (right, bottom) = times.at(epoch - 0.4, value), times.at(epoch + 0.4, 0.0)
            canvas.rectangle((left, top, max(right, left + 1), bottom), fill=COLORS[row["phase"]])
    _legend(canvas, times, [(p, COLORS[p], "bar") for p in phases])
    return Figure(canvas.finished(), drawn)


def switch_lines(fig: Figure) -> list[tuple[str, float]]:
    """(kind, epoch) of every switch marker drawn on the score panel (for tests and tools)."""
    return list(fig.switches)


def save_training_png(path: Path, rows: list[dict], switches: list[dict], best_epoch: int | None,
                      score_name: str = "score") -> None:
    from ..core.files import atomic_file

    fig = draw_training(rows, switches, best_epoch, score_name)
    with atomic_file(path, durable=False) as tmp:  # derived from scores.csv, as the other outputs
        fig.image.save(tmp, format="PNG")
