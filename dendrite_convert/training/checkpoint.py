"""checkpoint/: everything `train(..., resume=True)` needs to continue a run bit for bit (CPU).

`checkpoint/` holds `model/` and `best/` (converted-model directories), `training_state.pt` (optimizer,
scheduler, fp16 gradient scaler, torch, CUDA and loader RNG states) and `state.json` (config, adapter, schedule, rows, Python and
NumPy RNG states). It is replaced atomically after every epoch (or every few, see
`TrainConfig.checkpoint_budget`), so a crash or Ctrl-C loses at most the epochs since; `best/` beside it
is refreshed from it whenever the best model changes. Nothing in it depends on the device that wrote it:
weights are written from CPU copies and the training state is read with map_location="cpu", then moved to
the device the resumed run uses (which may be another one).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..conversion.modeldir import CONFIG_FILE, WEIGHTS_FILE, ConvertedModel
from ..core.errors import LoadError
from ..core.files import atomic_directory
from ..core.structure import Snapshot, dendrite_counts, restore
from . import distributed
from .config import TrainConfig

if TYPE_CHECKING:
    from .loop import Run

STATE_VERSION = 1
# The checkpoint is replaced atomically (rename) every epoch, which survives any crash of this process;
# it is also fsynced, for power loss, at most this often and at the end, since fsync dominates the per-epoch
# cost on small models.
DURABLE_EVERY_S = 60.0


class Checkpointer:
    """Writes one run's checkpoint/ and best/, keeping what makes a per-epoch checkpoint cheap."""

    def __init__(self, output: Path, converted: ConvertedModel):
        self.output = output
        self.converted = converted
        self.best_changed = False  # the best model changed since best/ was last written
        self._config_text: dict[tuple, str] = {}
        self._last_durable = time.monotonic()

    def save(self, run: Run) -> None:
        """checkpoint/ = model/ + best/ (converted-model directories) + training state, replaced atomically.

        Written every epoch, so it is kept lean: weights straight to safetensors, the directory config
        re-rendered only when the structure changes, a best/ that is the model (or unchanged) hard-linked, the
        optimizer state left out once the run is done (a finished run that continues gets a fresh optimizer), and
        the replaced checkpoint deleted in the background.
        """
        if not distributed.is_main():  # rank 0 alone writes; every rank holds the same state
            return
        ckpt = self.output / "checkpoint"
        now = time.monotonic()
        done = run.schedule.done
        durable = done or now - self._last_durable >= DURABLE_EVERY_S
        if durable:
            self._last_durable = now
        best = run.growth.best
        with atomic_directory(ckpt, force=True, durable=durable, remove_later=True) as tmp:
            self._write_model_dir(tmp / "model", run.model)
            if best is not None:
                if run.growth.at_best:  # the model is the best: the same files
                    shutil.copytree(tmp / "model", tmp / "best", copy_function=_link_or_copy)
                elif self.best_changed or not (ckpt / "best").is_dir():
                    self._write_best_dir(tmp / "best", best, run.model)
                else:  # unchanged: hard links cost nothing
                    shutil.copytree(ckpt / "best", tmp / "best", copy_function=_link_or_copy)
            torch.save({"optimizer": None if done else run.optimizer.state_dict(),  # twice the weights, unused
                        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
                        "scaler": run.precision.state_dict(),
                        "rng": _rng_tensors(run.loaders(), run.device)}, tmp / "training_state.pt")
            (tmp / "state.json").write_text(json.dumps(_state(run), separators=(",", ":")) + "\n")
        self.converted.source.files = {name: ckpt / "model" / name for name in self.converted.source.files}
        if self.best_changed and best is not None:
            with atomic_directory(self.output / "best", force=True, durable=durable, remove_later=True) as tmp:
                for file in (ckpt / "best").iterdir():
                    _link_or_copy(file, tmp / file.name)
            self.best_changed = False

    def _write_model_dir(self, path: Path, model: nn.Module) -> None:
        self._write_files(path, model, self._config_of(model))

    def _write_best_dir(self, path: Path, best: Snapshot, model: nn.Module) -> None:
        """best/ straight from the CPU snapshot; a module of its structure is built only to render a config
        not rendered yet."""
        text = self._config_text.get(tuple(best.counts.items()))
        if text is None:
            module = _as_module(best, model)
            self._write_files(path, module, self._config_of(module))
        else:
            self._write_files(path, _StateOnly(best.state), text)

    def _config_of(self, model: nn.Module) -> str:
        """The directory config of `model`'s structure (its dendrite counts), rendered once per structure."""
        key = tuple(dendrite_counts(model).items())
        if key not in self._config_text:
            self._config_text[key] = json.dumps(replace(self.converted, model=model).to_json(), indent=2) + "\n"
        return self._config_text[key]

    def _write_files(self, path: Path, weights: nn.Module, config_text: str) -> None:
        """What ConvertedModel.save writes, inside a directory that is already temporary."""
        from safetensors.torch import save_model

        path.mkdir()
        save_model(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        files = self.converted.source.files.values()  # hard links only to this run's own copies, never the user's files
        self.converted.source.copy_files(path, link=all(self.output.resolve() in Path(f).resolve().parents for f in files))
        (path / CONFIG_FILE).write_text(config_text)


class _StateOnly(nn.Module):
    """A module that is nothing but a state dict, for safetensors' save_model (which drops tied duplicates)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self._state)


def _as_module(best: Snapshot, model: nn.Module) -> nn.Module:
    """The best snapshot as a module to save: a copy of `model` (which never has fewer dendrites than its
    best, so restoring only truncates and draws no random numbers) holding the snapshot's state."""
    module = copy.deepcopy(model)
    restore(module, best)
    return module


def read_state(output: Path, budget: dict[str, int]) -> tuple[dict, TrainConfig]:
    """state.json of the run in `output` and its config, with `budget` (max_epochs/max_dendrites) replacing
    the recorded limits."""
    ckpt = output / "checkpoint"
    try:
        state = json.loads((ckpt / "state.json").read_text())
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise LoadError(f"resume {output}: {ckpt}/state.json has version {version!r}, but this "
                            f"dendrite_convert resumes version {STATE_VERSION} only; resume with the version that "
                            "wrote it.", parameter="resume")
        recorded = {f.name: state["config"][f.name] for f in fields(TrainConfig) if f.name in state["config"]}
        config = TrainConfig(**{**recorded, **budget})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{ckpt}/state.json is unreadable ({type(exc).__name__}: {exc}), so the run in {output} "
                        "cannot be resumed.") from exc
    return state, config


def restore_run(run: Run, state: dict) -> None:
    """Put the recorded training state into a run built from the checkpoint's model, config and adapter,
    after its data and phase are set up: schedule, rows, best model, optimizer, scheduler, every RNG."""
    ckpt = run.output / "checkpoint"
    run.rows = state["rows"]
    run.wall_before = float(state["wall_seconds"])
    run.stop_reason = state["stop_reason"]
    run.nonfinite = state["nonfinite"]
    blob = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    if run.schedule.done:  # its model is the restored best: the optimizer state saved with it is not its own
        run.already_finished = not run.raise_budget()
    else:
        run.optimizer.load_state_dict(blob["optimizer"])  # moves the state to its parameters' device
        run.precision.load_state_dict(blob.get("scaler"))
        if run.scheduler is not None and blob["scheduler"] is not None:
            run.scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    if run.device.type == "cuda" and blob["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(blob["rng"]["cuda"], run.device)
    gens = [g for loader in run.loaders() for g in _loader_generators(loader)]
    for g, s in zip(gens, blob["rng"]["loaders"]):
        g.set_state(s)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _state(run: Run) -> dict:
    np_state = np.random.get_state()
    return {
        "version": STATE_VERSION,
        "config": asdict(run.config),
        "adapter": run.adapter.spec,
        "schedule": run.schedule.to_dict(),
        "rows": run.rows,
        "initial_dendrites": run.initial_dendrites,
        "base_params": run.base_params,
        "wall_seconds": run.wall_seconds(),
        "stop_reason": run.stop_reason,
        "nonfinite": run.nonfinite,
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _rng_tensors(loaders: list, device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "loaders": [g.get_state() for loader in loaders for g in _loader_generators(loader)]}


def _loader_generators(loader) -> list[torch.Generator]:
    """Generators a DataLoader draws from besides the global RNG (so resume restores them too)."""
    gens = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
