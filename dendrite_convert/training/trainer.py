"""The `train` verb of DESIGN §4: neuron phases, dendrite switches, outputs and exact resume.

`train(converted, adapter, output, config)` runs the loop (loop.py) and returns the summary dict that is
also written to `output/summary.json`. Every output is written atomically after each epoch, so a crash or
Ctrl-C loses at most the current epoch, and `train(..., resume=True)` continues bit for bit (CPU)
from checkpoint/ (checkpoint.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..conversion.consent import Consent
from ..conversion.modeldir import ConvertedModel, load_converted
from ..core.errors import UsageError
from ..core.files import check_writable
from . import distributed
from .adapter import Adapter, load_adapter
from .config import TrainConfig
from .loop import Run

__all__ = ["TrainConfig", "train"]

OUTPUT_NAMES = ("best", "checkpoint", "scores.csv", "best_test_scores.csv", "training.png", "summary.json")


def train(
    converted: ConvertedModel | str | Path | None,
    adapter: Adapter | str | Path | None,
    output: str | Path,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    trust_code: bool = False,
    factory: str | None = None,
    allow_modules=(),
    hardware: dict | None = None,
) -> dict:
    """Train a converted model with dendrites; returns the summary (also `output/summary.json`).

    With `resume=True`, `output` is an earlier run directory: the model, config and adapter come from
    its checkpoint (an `adapter` given here replaces the recorded one) and training continues from the
    last completed epoch. `on_epoch(row)` is called after every epoch with its `scores.csv` row.
    `trust_code`, `factory` and `allow_modules` are the consent for code the directories name, as for
    `load_converted`; resuming runs the recorded adapter only with `trust_code` (else pass `adapter`).
    `hardware` ({"device": "cpu"}, precision, compile) replaces the recorded ones on resume, e.g. to continue
    on another machine.

    Example:
        summary = train("converted/", "adapter.py", "run/", TrainConfig(max_epochs=30))
    """
    output = Path(output)
    joined = distributed.init()  # under torchrun: this rank's device; None otherwise
    try:
        if resume:
            run = Run.from_checkpoint(output, adapter, on_epoch, Consent.of(trust_code, factory, allow_modules),
                                      hardware)
        else:
            if converted is None or adapter is None:
                raise UsageError("train needs a converted model and an adapter (or resume=True).")
            check_writable(output, force)
            if not isinstance(converted, ConvertedModel):
                converted = load_converted(converted, trust_code=trust_code, factory=factory,
                                           allow_modules=allow_modules)
            if not isinstance(adapter, Adapter):
                adapter = load_adapter(adapter)
            if distributed.is_main():
                _clear_outputs(output)
            distributed.barrier()
            run = Run(converted, adapter, output, config or TrainConfig(), on_epoch)
            run.start()
        return run.loop()
    finally:
        if joined is not None:
            distributed.shutdown()


def _clear_outputs(output: Path) -> None:
    """--force: remove only what a run writes, never anything else in the folder."""
    for name in OUTPUT_NAMES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)
