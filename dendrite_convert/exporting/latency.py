"""Latency, parameters and FLOPs of the base, unfolded, folded and onnxruntime forms of a model (same process).

The one timer of the package (`time_samples`): the latency table, and the layout choices of fold and export."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.layers import count_parameters


@dataclass
class LatencyRow:
    name: str
    ms: float  # median of repeated runs
    params: int
    flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def median_ms(fns: dict[str, object], budget_s: float = 1.0) -> dict[str, float]:
    """Median wall time per call of each `fn()` in ms (see `time_samples`)."""
    return {name: statistics.median(times) for name, times in time_samples(fns, budget_s).items()}


def time_samples(fns: dict[str, object], budget_s: float = 1.0, min_rounds: int = 7, max_rounds: int = 200,
                 clock=time.perf_counter) -> dict[str, list[float]]:
    """Wall times per call (ms) of each `fn()`, measured interleaved (round-robin) so a load change on a
    shared machine hits every variant alike; each turn starts with one untimed call (warm caches), and fast
    calls are timed in groups of n so each sample lasts ~1 ms. `clock=time.thread_time` measures the CPU time of
    the calling thread instead: with one intra-op thread that is the latency on an idle core, unaffected by
    other jobs descheduling this one."""
    groups = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        groups[name] = max(1, min(100, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            n = groups[name]
            fn()  # untimed: warm the caches after the previous variant ran, so every sample is steady-state
            t0 = clock()
            for _ in range(n):
                fn()
            samples[name].append(1e3 * (clock() - t0) / n)
        rounds += 1
    return samples


def faster_layout(runners: dict[str, object], budget_s: float) -> tuple[str, dict[str, float]]:
    """"concat" when its runner is clearly (5 %) faster than "separate", else "separate"; and the median ms of each.

    Both the fold's per-layer choice (torch) and export's whole-model choice (onnxruntime) decide here."""
    times = median_ms(runners, budget_s)
    return ("concat" if times["concat"] < 0.95 * times["separate"] else "separate"), times


def _call(model: nn.Module, inputs: tuple | dict):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def count_flops(model: nn.Module, inputs: tuple | dict) -> int:
    """FLOPs of one forward (matmuls and convolutions, 2 per multiply-add) by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _call(model, copy.deepcopy(inputs))
    return int(counter.get_total_flops())


def torch_runner(model: nn.Module, inputs: tuple | dict):
    model.eval()

    def run():
        with torch.inference_mode():
            _call(model, inputs)

    return run


def onnx_params(path: str | Path) -> int:
    import onnx
    import numpy as np

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                  onnx.TensorProto.BFLOAT16) and len(t.dims) > 0)


def onnx_runner(path: str | Path, inputs: tuple | dict):
    from .verify import ort_feeds, ort_session

    session = ort_session(path, spin=False)
    feeds = ort_feeds(session, inputs)
    return lambda: session.run(None, feeds)


def latency_table(models: dict[str, nn.Module | str | Path], inputs: tuple | dict, budget_s: float = 1.0,
                  stat=statistics.median, threads: int | None = 1, clock=time.perf_counter) -> list[LatencyRow]:
    """One row per model (torch modules, or ONNX files run by onnxruntime with the FLOPs of the torch row before).

    `threads` intra-op threads for torch and onnxruntime alike (None: torch's current setting). One thread is the
    default because it is reproducible: on a busy machine a multi-threaded torch forward can wait milliseconds at
    every OpenMP barrier for a descheduled thread, which says nothing about the model.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _latency_table(models, inputs, budget_s, stat, clock)
    finally:
        torch.set_num_threads(previous)


def _latency_table(models, inputs, budget_s, stat, clock) -> list[LatencyRow]:
    runners, params, flops = {}, {}, {}
    last_flops = 0
    for name, model in models.items():
        if isinstance(model, nn.Module):
            runners[name], params[name] = torch_runner(model, inputs), count_parameters(model)
            flops[name] = last_flops = count_flops(model, inputs)
        else:
            runners[name], params[name], flops[name] = onnx_runner(model, inputs), onnx_params(model), last_flops
    samples = time_samples(runners, budget_s, clock=clock)
    return [LatencyRow(name, stat(samples[name]), params[name], flops[name]) for name in models]


def render(rows: list[LatencyRow], console, batch: list[int] | None = None, threads: int = 1) -> None:
    from rich.table import Table

    base = rows[0]
    title = f"latency (median ms, {threads} thread{'s' * (threads != 1)}{f', inputs {batch}' if batch else ''})"
    table = Table(title=title, title_justify="left")
    for col in ("model", "ms", "× base", "params", "MFLOPs", "FLOPs × base"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.ms:.3f}", f"{row.ms / base.ms:.2f}", f"{row.params:,}", f"{row.flops / 1e6:.2f}",
                      f"{row.flops / base.flops:.2f}" if base.flops else "-")
    console.print(table)
