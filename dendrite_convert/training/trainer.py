"""The `train` verb of docs/design.md §4: neuron phases, dendrite switches, outputs and exact resume.

`train(converted, adapter, output, config)` runs the loop (loop.py) and returns the summary dict that is
also written to `output/summary.json`. Every output is written atomically after each epoch, so a crash or
Ctrl-C loses at most the current epoch, and `train(..., resume=True)` continues bit for bit (CPU)
from checkpoint/ (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, replace
from collections.abc import Callable
from pathlib import Path

from ..conversion.consent import Consent
from ..conversion.modeldir import ConvertedModel, load_converted
from ..core.errors import LoadError, UsageError
from ..core.files import (LOCK_FILE, check_unlocked, is_temporary, output_lock, remove_in_background, remove_stale,
                          temporary_name, wait_removed)
from . import distributed
from .adapter import Adapter, load_adapter
from .config import TrainConfig
from .checkpoint import STATE_VERSION
from .outputs import write_text
from .loop import Run

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]

REQUEST_FILE = "run.json"  # what the run was started with, so --resume can start it again before its first checkpoint
OUTPUT_NAMES = ("best", "checkpoint", "scores.csv", "best_test_scores.csv", "training.png", "summary.json", REQUEST_FILE)


def train(
    converted: ConvertedModel | str | Path | None,
    adapter: Adapter | str | Path | None,
    output: str | Path,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    budget: dict[str, int] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    trust_code: bool = False,
    factory: str | None = None,
    allow_modules=(),
    hardware: dict | None = None,
) -> dict:
    """Train a converted model with dendrites; returns the summary (also `output/summary.json`).

    With `resume=True`, `output` is an earlier run directory: the model, config and adapter come from
    its checkpoint (an `adapter` given here replaces the recorded one) and training continues from the
    last completed epoch; a run killed before its first checkpoint starts again from what it recorded.
    `budget` ({"max_epochs": n, "max_dendrites": n}) replaces those limits on resume, so a finished run
    continues when a limit it stopped at is raised; otherwise resuming it returns its summary with
    `already_finished` set. `on_epoch(row)` is called after every epoch with its `scores.csv` row.
    One process writes `output` at a time (`output/.dendrite.lock`).
    `trust_code`, `factory` and `allow_modules` are the consent for code the directories name, as for
    `load_converted`; resuming runs the recorded adapter only with `trust_code` (else pass `adapter`).
    `hardware` ({"device": "cpu"}, precision, compile) replaces the recorded ones on resume, e.g. to continue
    on another machine.

    Example:
        summary = train("converted/", "adapter.py", "run/", TrainConfig(max_epochs=30))
    """
    output = Path(output)
    unknown = sorted(set(budget or {}) - {"max_epochs", "max_dendrites"})
    if unknown or (budget and not resume):
        raise UsageError(f"budget takes max_epochs and max_dendrites, on resume only (got {', '.join(unknown or budget)}).")
    consent = Consent.of(trust_code, factory, allow_modules)
    joined = distributed.init()  # under torchrun: this rank's device; None otherwise
    try:
        if resume:
            if not output.is_dir():
                raise UsageError(f"resume {output}: no such run directory to continue.", parameter="resume")
            with _one_writer(output):
                return _resume(output, adapter, on_epoch, budget or {}, consent, hardware or {})
        if converted is None or adapter is None:
            raise UsageError("train needs a converted model and an adapter (or resume=True).")
        if distributed.is_main():
            check_unlocked(output)  # a run writing there right now is named, with or without --force
        _check_new_output(output, force)  # before the slow loading; again below, under the lock
        request = {"converted": None if isinstance(converted, ConvertedModel) else str(Path(converted).resolve())}
        if not isinstance(converted, ConvertedModel):
            converted = load_converted(converted, **consent.keywords())
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)
        with _one_writer(output):
            _check_new_output(output, force)
            return _start(converted, adapter, output, config or TrainConfig(), on_epoch, request)
    finally:
        wait_removed()  # the replaced checkpoints and cleared outputs are gone when train returns
        if joined is not None:
            distributed.shutdown()


def _one_writer(output: Path):
    """The output's lock, held by rank 0 (the only rank that writes)."""
    return output_lock(output) if distributed.is_main() else contextlib.nullcontext()


def _check_new_output(output: Path, force: bool) -> None:
    """A new run writes into a missing folder, or one holding nothing but what a run of this tool leaves
    before its first checkpoint (its request, lock and temporaries); anything else needs --force."""
    if force or not output.exists():
        return
    if not output.is_dir():
        raise UsageError(f"output {output} is a file; give a directory for the run.", parameter="output")
    if any(not _unstarted_leftover(p.name) for p in output.iterdir()):
        started = (output / "checkpoint").exists()
        raise UsageError(f"output {output} already holds {'a run' if started else 'files'}; pass force=True to "
                         f"replace {'it' if started else 'the outputs of a run there'}"
                         f"{' or resume=True to continue it' if started else ''}.", parameter="output")


def _unstarted_leftover(name: str) -> bool:
    return name in (REQUEST_FILE, LOCK_FILE) or (is_temporary(name) and ".dendrite-tmp-" in name)


def _start(converted: ConvertedModel, adapter: Adapter, output: Path, config: TrainConfig,
           on_epoch: Callable[[dict], None] | None, request: dict) -> dict:
    """A new run: earlier outputs cleared, the request recorded, then the loop."""
    if distributed.is_main():
        _clear_outputs(output)
        write_text(output / REQUEST_FILE, json.dumps({"version": STATE_VERSION, **request, "adapter": adapter.spec,
                                                      "config": asdict(config)}, indent=2) + "\n")
    distributed.barrier()
    run = Run(converted, adapter, output, config, on_epoch)
    run.start()
    return run.loop()


def _resume(output: Path, adapter, on_epoch, budget: dict[str, int], consent: Consent, hardware: dict) -> dict:
    """Continue from the checkpoint; without one, start again from the recorded request."""
    ckpt = output / "checkpoint"
    if distributed.is_main():
        remove_stale(ckpt)  # a kill during the directory swap leaves the previous checkpoint aside
        remove_stale(output / "best")
    distributed.barrier()
    if (ckpt / "state.json").is_file():
        run = Run.from_checkpoint(output, adapter, on_epoch, consent, budget, hardware)
        summary = run.loop()
        return {**summary, "already_finished": True} if run.already_finished else summary
    if not (output / REQUEST_FILE).is_file():
        raise UsageError(f"resume {output}: no checkpoint there (expected {ckpt}/state.json).", parameter="resume")
    try:
        request = json.loads((output / REQUEST_FILE).read_text())
        config = replace(TrainConfig(**request["config"]), **budget).with_hardware(hardware)
        converted = request["converted"]
        spec = request["adapter"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"resume {output}: {output / REQUEST_FILE} is unreadable ({type(exc).__name__}: {exc}).",
                        parameter="resume") from exc
    if converted is None:
        raise UsageError(f"resume {output}: the run was killed before its first checkpoint and was started from a "
                         "model in memory; start it again with train().", parameter="resume")
    if adapter is None and not consent.trust_code:  # the recorded adapter is code named by a file
        raise LoadError(f"resume {output}: the run's adapter {spec} is code recorded in {output / REQUEST_FILE}; "
                        "name it again (adapter=) or pass trust_code=True to run it.", parameter="resume")
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter if adapter is not None else spec)
    log.info("%s has no checkpoint yet: starting the run again from the beginning", output)
    return _start(load_converted(converted, **consent.keywords()), adapter, output, config, on_epoch,
                  {"converted": converted})


def _clear_outputs(output: Path) -> None:
    """--force: remove only what a run writes, never anything else in the folder. Directories are renamed to
    temporaries at once and deleted while the run trains (a kill leaves temporaries that are cleaned up later)."""
    for name in OUTPUT_NAMES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            aside = temporary_name(path)
            os.replace(path, aside)
            remove_in_background(aside)
        elif path.exists():
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)
