"""The training loop of docs/design.md §4: neuron phases, dendrite switches, outputs and exact resume.

`train(converted, adapter, output, config)` runs the loop and returns the summary dict that is also
written to `output/summary.json`. Every output is written atomically after each epoch, so a crash or
Ctrl-C loses at most the current epoch, and `train(..., resume=True)` continues bit for bit (CPU).

The per-step work is what a hand-written loop does (forward, loss, backward, step) plus one tensor add;
the loss is read back once per epoch. Everything else happens between epochs.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapter import Adapter, batch_size, load_adapter
from .correlation import CorrelationConfig, add_correlation_dendrites, error_ranked_channels, freeze_dendrites
from ..core.errors import LoadError, UsageError
from . import distributed
from ..core.structure import add_dendrites, max_dendrites
from ..core.files import atomic_directory, atomic_file, check_writable, remove_stale
from ..core.layers import count_parameters, dendrite_layers
from ..conversion.modeldir import ConvertedModel, load_converted
from .schedule import Decision, Schedule, ScheduleConfig

log = logging.getLogger(__name__)

OBJECTIVES = ("gradient", "correlation")
SCORE_COLUMNS = ["epoch", "phase", "dendrites", "params", "train_loss", "val", "test", "lr", "seconds"]
BEST_COLUMNS = ["params", "dendrites", "epoch", "max_val", "test"]
STATE_VERSION = 1
# The checkpoint is replaced atomically (rename) every epoch, which survives any crash of this process;
# it is also fsynced, for power loss, at most this often and at the end, since fsync dominates the per-epoch
# cost on small models.
DURABLE_EVERY_S = 60.0


@dataclass
class TrainConfig:
    """How `dendrite-train` alternates phases (docs/design.md §4); defaults follow the peer."""

    objective: str = "gradient"  # gradient | correlation
    candidates: int = 4  # correlation: candidate dendrites per target
    patience: int = 10  # epochs without improvement before a switch
    switch_every: int | None = None  # switch every N epochs instead
    max_dendrites: int = 100
    max_epochs: int = 100
    capacity_test: bool = False
    seed: int = 0
    correlation_epochs: int = 20  # candidate-training passes over the recorded samples
    correlation_samples: int = 4096  # training samples recorded per dendrite phase (and to rank channels)
    plot: bool = True  # draw training.png at the end (needs matplotlib)
    # Checkpoint (and outputs) after every epoch, unless epochs are so short that this would cost more than
    # this fraction of the training time: then after every few epochs, so a crash loses at most about
    # (checkpoint time / checkpoint_budget) seconds, e.g. 0.3 s for digits. Switches and the end always write.
    checkpoint_budget: float = 0.05

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}.")
        for name in ("candidates", "patience", "max_epochs", "correlation_epochs", "correlation_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}.")
        if self.switch_every is not None and self.switch_every < 1:
            raise UsageError(f"--switch-every must be at least 1, not {self.switch_every}.")
        if self.max_dendrites < 0:
            raise UsageError(f"--max-dendrites must be 0 or more, not {self.max_dendrites}.")
        if not self.checkpoint_budget > 0:
            raise UsageError(f"checkpoint_budget must be positive, not {self.checkpoint_budget}.")

    def schedule_config(self, maximize: bool) -> ScheduleConfig:
        return ScheduleConfig(
            patience=self.patience, switch_every=self.switch_every, max_dendrites=self.max_dendrites,
            max_epochs=self.max_epochs, capacity_test=self.capacity_test, maximize=maximize,
            dendrite_phase_epochs=1 if self.objective == "correlation" else 0,
        )

    def correlation_config(self) -> CorrelationConfig:
        return CorrelationConfig(candidates=self.candidates, epochs=self.correlation_epochs,
                                 max_samples=self.correlation_samples)


def train(
    converted: ConvertedModel | str | Path | None,
    adapter: Adapter | str | Path | None,
    output: str | Path,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train a converted model with dendrites; returns the summary (also `output/summary.json`).

    With `resume=True`, `output` is an earlier run directory: the model, config and adapter come from
    its checkpoint (an `adapter` given here replaces the recorded one) and training continues from the
    last completed epoch. `on_epoch(row)` is called after every epoch with its `scores.csv` row.

    Example:
        summary = train("converted/", "adapter.py", "run/", TrainConfig(max_epochs=30))
    """
    output = Path(output)
    joined = distributed.init()  # under torchrun: this rank's device; None otherwise
    try:
        if resume:
            run = _Run.from_checkpoint(output, adapter, on_epoch)
        else:
            if converted is None or adapter is None:
                raise UsageError("train needs a converted model and an adapter (or resume=True).")
            check_writable(output, force)
            if not isinstance(converted, ConvertedModel):
                converted = load_converted(converted)
            if not isinstance(adapter, Adapter):
                adapter = load_adapter(adapter)
            if distributed.is_main():
                _clear_outputs(output)
            distributed.barrier()
            run = _Run(converted, adapter, output, config or TrainConfig(), on_epoch)
            run.start()
        return run.loop()
    finally:
        if joined is not None:
            distributed.shutdown()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


OUTPUT_NAMES = ("best", "checkpoint", "scores.csv", "best_test_scores.csv", "training.png", "summary.json")


def _clear_outputs(output: Path) -> None:
    """--force: remove only what a run writes, never anything else in the folder."""
    for name in OUTPUT_NAMES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    output.mkdir(parents=True, exist_ok=True)


def base_parameter_count(model: nn.Module) -> int:
    """Parameters and buffers the model needs without any dendrite (tied tensors once)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or not t.is_floating_point() or ".dendrite_" in f".{name}":
            continue
        seen.add(id(t))
        total += t.numel()
    return total


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loader_generators(loader) -> list[torch.Generator]:
    """Generators a DataLoader draws from besides the global RNG (so resume restores them too)."""
    gens = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


class _Run:
    """One training run: the model, its phase (optimizer/scheduler), the schedule and the outputs."""

    def __init__(self, converted: ConvertedModel, adapter: Adapter, output: Path, config: TrainConfig,
                 on_epoch: Callable[[dict], None] | None):
        self.converted = converted
        self.adapter = adapter
        self.output = output
        self.config = config
        self.on_epoch = on_epoch
        self.model = converted.model
        if distributed.active() and torch.cuda.is_available():
            self.model.to(torch.device("cuda", torch.cuda.current_device()))
        self.device = next(self.model.parameters()).device
        self.schedule = Schedule(config.schedule_config(adapter.maximize))
        self.rows: list[dict] = []
        self.best_model: nn.Module | None = None
        self.best_changed = False
        self.initial_dendrites = max_dendrites(self.model)
        self.base_params = base_parameter_count(self.model)
        self.wall_before = 0.0
        self.session_start = time.perf_counter()
        self.stop_reason = ""
        self.nonfinite = False
        self._loss_checked = False
        self._config_text: dict[tuple, str] = {}
        self._last_durable = time.monotonic()
        self._last_checkpoint = time.perf_counter()
        self._checkpoint_cost = 0.0  # measured: the first epoch always writes

    # ---- setup ---------------------------------------------------------------------------------------
    def start(self) -> None:
        seed_everything(self.config.seed)
        self._build_data()
        self.schedule.dendrites = self.schedule.best_dendrites = self.initial_dendrites
        self._apply_trainable()
        self.setup_phase()

    def _build_data(self) -> None:
        a = self.adapter
        seed = self.config.seed
        self.train_loader = distributed.shard(self._call_data("train_data", a.train_data), seed, training=True)
        self.val_loader = distributed.shard(self._call_data("val_data", a.val_data), seed, training=False)
        self.test_loader = (distributed.shard(self._call_data("test_data", a.test_data), seed, training=False)
                            if a.test_data is not None else None)

    def _call_data(self, name: str, fn):
        try:
            data = fn()
        except Exception as exc:
            raise LoadError(f"--adapter {self.adapter.spec}: {name}() raised {type(exc).__name__}: {exc}.") from exc
        if data is None or not hasattr(data, "__iter__") or iter(data) is data:
            raise LoadError(
                f"--adapter {self.adapter.spec}: {name}() returned {type(data).__name__}; it must return re-iterable "
                "batches such as a DataLoader or a list (not a generator, which runs out after one epoch)."
            )
        return data

    def _apply_trainable(self, model: nn.Module | None = None) -> None:
        """Everything trains, except correlation dendrites: they are frozen once inserted."""
        model = self.model if model is None else model
        for p in model.parameters():
            p.requires_grad_(p.numel() > 0)  # the first dendrite's [0, C] cascade holds nothing (DDP needs every grad)
        if self.config.objective == "correlation":
            freeze_dendrites(model, first=self.initial_dendrites)

    def setup_phase(self) -> None:
        """The one place that builds what a phase trains with: the network that runs the training steps
        (`net`; a DDP wrapper goes here, rebuilt because each phase changes the parameters), the optimizer
        and the scheduler. `model` stays the unwrapped module that is evaluated and saved."""
        self.model.train()
        self.net = distributed.wrap(self.model)  # a fresh DDP: it syncs rank 0's weights and buckets these params
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.adapter.build_optimizer(self.params)
        self.scheduler = self.adapter.build_scheduler(self.optimizer)

    # ---- one epoch -----------------------------------------------------------------------------------
    def forward_loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        if self.device.type != "cpu":
            batch = _to_device(batch, self.device)
        args, kwargs = self.adapter.model_inputs(batch)
        loss = self.adapter.loss((net or self.net)(*args, **kwargs), batch)
        if not self._loss_checked:
            self._check_loss(loss)
        return loss

    def _check_loss(self, loss) -> None:
        spec = self.adapter.spec
        if not isinstance(loss, torch.Tensor):
            raise LoadError(f"--adapter {spec}: loss(outputs, batch) returned {type(loss).__name__}; it must return "
                            "a scalar torch.Tensor.")
        if loss.numel() != 1:
            raise LoadError(f"--adapter {spec}: loss(outputs, batch) returned a tensor of shape {list(loss.shape)}; "
                            "it must return a scalar (reduce it, e.g. with .mean()).")
        if not loss.requires_grad:
            raise LoadError(f"--adapter {spec}: loss(outputs, batch) does not depend on the model's parameters "
                            "(no gradient); compute it from `outputs`.")
        self._loss_checked = True

    def train_epoch(self) -> float:
        model, optimizer = self.model, self.optimizer
        model.train()
        distributed.set_epoch([self.train_loader], len(self.rows))
        total = torch.zeros((), device=self.device)
        steps = 0
        for batch in self.train_loader:
            loss = self.forward_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        if steps == 0:
            raise LoadError(f"--adapter {self.adapter.spec}: train_data() yielded no batches.")
        total_loss, all_steps = distributed.all_sum(total.item(), steps)
        return total_loss / all_steps

    @torch.no_grad()
    def evaluate(self, data, name: str) -> float:
        model, adapter = self.model, self.adapter
        model.eval()
        total_t = torch.zeros((), device=self.device)
        total, count = 0.0, 0
        try:
            for batch in data:
                if self.device.type != "cpu":
                    batch = _to_device(batch, self.device)
                args, kwargs = adapter.model_inputs(batch)
                outputs = model(*args, **kwargs)
                n = batch_size(batch)
                if adapter.score is None:
                    total_t -= adapter.loss(outputs, batch).detach().reshape(()) * n
                else:
                    total += self._score(outputs, batch) * n
                count += n
        finally:
            model.train()
        total, count = distributed.all_sum(total + total_t.item(), count)  # every rank decides alike
        if count == 0:
            raise LoadError(f"--adapter {adapter.spec}: {name}() yielded no batches; it must give at least one "
                            "batch to score.")
        return total / count

    def _score(self, outputs, batch) -> float:
        value = self.adapter.score(outputs, batch)
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            raise LoadError(f"--adapter {self.adapter.spec}: score(outputs, batch) returned {type(value).__name__}; "
                            "it must return a number (a float or a one-element tensor).") from None

    # ---- the loop ------------------------------------------------------------------------------------
    def loop(self) -> dict:
        while not self.schedule.done:
            self.run_epoch()
        return self.finish()

    def run_epoch(self) -> None:
        start = time.perf_counter()
        first_new_row = len(self.rows)
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss = self.train_epoch()
        val = self.evaluate(self.val_loader, "val_data")
        test = self.evaluate(self.test_loader, "test_data") if self.test_loader is not None else None
        dendrites = self.schedule.dendrites
        params = count_parameters(self.model)
        if not (math.isfinite(train_loss) and math.isfinite(val)):
            what = "training loss" if not math.isfinite(train_loss) else "validation score"
            decision = self.schedule.abort(f"the {what} became {train_loss if what[0] == 't' else val} at epoch "
                                           f"{self.schedule.epoch + 1}")
            self.nonfinite = True
        else:
            decision = self.schedule.observe(val)
        self.rows.append(self._row("neuron", dendrites, params, train_loss, val, test, lr, time.perf_counter() - start))
        if decision.save_best:
            self.best_model = copy.deepcopy(self.model)
            self.best_changed = True
        if decision.action == "continue" and self.scheduler is not None:
            self._step_scheduler(val)
        self.apply(decision)
        if decision.action != "continue" or self.nonfinite or self._checkpoint_due():
            begin = time.perf_counter()
            self.save_checkpoint()
            self.write_outputs()
            self._last_checkpoint = time.perf_counter()
            self._checkpoint_cost = self._last_checkpoint - begin
        if self.on_epoch is not None:
            for row in self.rows[first_new_row:]:  # the neuron epoch, and a dendrite phase if one followed
                self.on_epoch(row)

    def _checkpoint_due(self) -> bool:
        since = time.perf_counter() - self._last_checkpoint
        return since * self.config.checkpoint_budget >= self._checkpoint_cost

    def _row(self, phase, dendrites, params, train_loss, val, test, lr, seconds) -> dict:
        return {"epoch": len(self.rows) + 1, "phase": phase, "dendrites": dendrites, "params": params,
                "train_loss": train_loss, "val": val, "test": test, "lr": lr, "seconds": seconds}

    def _step_scheduler(self, val: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val)
        else:
            self.scheduler.step()

    def apply(self, decision: Decision) -> None:
        if decision.action == "continue":
            return
        if decision.restore and self.best_model is not None:
            self.model = copy.deepcopy(self.best_model)
        if decision.action == "stop":
            self.stop_reason = decision.reason
            return
        start = time.perf_counter()
        if self.config.objective == "gradient":
            channels = error_ranked_channels(self.model, dendrite_layers(self.model), self.train_loader,
                                             lambda batch: self.forward_loss(batch, self.model),
                                             self.config.correlation_samples)
            add_dendrites(self.model, channels)
            distributed.broadcast_module(self.model)  # every rank starts the phase from rank 0's dendrites and channels
        else:
            model = self.model  # the restored best model; the phase's `net` is rebuilt below
            add_correlation_dendrites(model, dendrite_layers(model), self.train_loader,
                                      lambda batch: self.forward_loss(batch, model), self.config.correlation_config())
            distributed.broadcast_module(model)  # every rank keeps rank 0's candidates
            self.schedule.note_dendrite_phase()
            val = self.evaluate(self.val_loader, "val_data")
            test = self.evaluate(self.test_loader, "test_data") if self.test_loader is not None else None
            self.rows.append(self._row("dendrite", self.schedule.dendrites, count_parameters(self.model), None, val,
                                       test, None, time.perf_counter() - start))
        self._apply_trainable()
        self.setup_phase()

    # ---- outputs -------------------------------------------------------------------------------------
    def _converted(self, model: nn.Module) -> ConvertedModel:
        return replace(self.converted, model=model)

    def save_checkpoint(self) -> None:
        """checkpoint/ = model/ + best/ (converted-model directories) + training state, replaced atomically.

        Written every epoch, so it is kept lean: weights straight to safetensors, the directory config
        re-rendered only when the structure changes, an unchanged best/ hard-linked from the last one.
        """
        if not distributed.is_main():  # rank 0 alone writes; every rank holds the same state
            return
        ckpt = self.output / "checkpoint"
        now = time.monotonic()
        durable = self.schedule.done or now - self._last_durable >= DURABLE_EVERY_S
        if durable:
            self._last_durable = now
        with atomic_directory(ckpt, force=True, durable=durable) as tmp:
            self._write_model_dir(tmp / "model", self.model)
            if self.best_model is not None:
                if self.best_changed or not (ckpt / "best").is_dir():
                    self._write_model_dir(tmp / "best", self.best_model)
                else:  # unchanged: hard links cost nothing
                    shutil.copytree(ckpt / "best", tmp / "best", copy_function=_link_or_copy)
            buffer = io.BytesIO()
            torch.save({"optimizer": self.optimizer.state_dict(),
                        "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                        "rng": self._rng_tensors()}, buffer)
            (tmp / "training_state.pt").write_bytes(buffer.getvalue())
            (tmp / "state.json").write_text(json.dumps(self._state(), separators=(",", ":")) + "\n")
        if self.best_changed and self.best_model is not None:
            with atomic_directory(self.output / "best", force=True, durable=durable) as tmp:
                for file in (ckpt / "best").iterdir():
                    _link_or_copy(file, tmp / file.name)
            self.best_changed = False

    def _write_model_dir(self, path: Path, model: nn.Module) -> None:
        """What ConvertedModel.save writes, inside a directory that is already temporary."""
        from safetensors.torch import save_model

        from ..conversion.modeldir import CONFIG_FILE, WEIGHTS_FILE

        path.mkdir()
        save_model(model, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        key = tuple(layer.num_dendrites for layer in dendrite_layers(model).values())
        if key not in self._config_text:
            self._config_text[key] = json.dumps(self._converted(model).to_json(), indent=2) + "\n"
        (path / CONFIG_FILE).write_text(self._config_text[key])

    def _rng_tensors(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "loaders": [g.get_state() for loader in self._loaders() for g in _loader_generators(loader)]}

    def _loaders(self) -> list:
        return [x for x in (self.train_loader, self.val_loader, self.test_loader) if x is not None]

    def _state(self) -> dict:
        np_state = np.random.get_state()
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "adapter": self.adapter.spec,
            "schedule": self.schedule.to_dict(),
            "rows": self.rows,
            "initial_dendrites": self.initial_dendrites,
            "base_params": self.base_params,
            "wall_seconds": self.wall_seconds(),
            "stop_reason": self.stop_reason,
            "nonfinite": self.nonfinite,
            "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    def write_outputs(self) -> None:
        self.last_summary = self.summary()
        if not distributed.is_main():
            return
        _write_csv(self.output / "scores.csv", SCORE_COLUMNS, self.rows)
        _write_csv(self.output / "best_test_scores.csv", BEST_COLUMNS, self.best_test_scores())
        _write_text(self.output / "summary.json", json.dumps(self.last_summary, indent=2) + "\n")

    def best_test_scores(self) -> list[dict]:
        """The peer's bestTestScores: per accepted architecture, its best validation and the test score there."""
        pick = max if self.adapter.maximize else min
        out = []
        accepted = range(self.initial_dendrites, self.schedule.best_dendrites + 1)
        for d in accepted:
            rows = [r for r in self.rows if r["phase"] == "neuron" and r["dendrites"] == d and math.isfinite(r["val"])]
            if rows:
                best = pick(rows, key=lambda r: r["val"])
                out.append({"params": best["params"], "dendrites": d, "epoch": best["epoch"], "max_val": best["val"],
                            "test": best["test"]})
        return out

    def summary(self) -> dict:
        s = self.schedule
        best_row = self._best_row()
        return {
            "best_val": None if best_row is None else best_row["val"],
            "test_at_best": None if best_row is None else best_row["test"],
            "params": None if best_row is None else best_row["params"],
            "base_params": self.base_params,
            "dendrites": s.best_dendrites if best_row is not None else None,
            "best_epoch": None if best_row is None else best_row["epoch"],
            "epochs": len(self.rows),
            "wall_seconds": round(self.wall_seconds(), 3),
            "objective": self.config.objective,
            "maximize": self.adapter.maximize,
            "seed": self.config.seed,
            "finished": s.done,
            "nonfinite": self.nonfinite,
            "stop_reason": s.stop_reason or None,
            "switches": s.switches,
            "world_size": distributed.world_size(),
        }

    def _best_row(self) -> dict | None:
        if self.schedule.best is None:
            return None
        # Row numbers count dendrite phases too; the schedule's best_epoch counts the same epochs.
        return next((r for r in self.rows if r["epoch"] == self.schedule.best_epoch), None)

    def finish(self) -> dict:
        if self.best_model is not None:
            self.model = self.best_model
        distributed.check_replicas(self.model)
        if self.config.plot and distributed.is_main():
            self._plot()
        self.write_outputs()
        return self.last_summary

    def _plot(self) -> None:
        try:
            from .plots import save_training_png
        except ImportError:  # pragma: no cover - matplotlib is the optional `plots` extra
            log.warning("matplotlib is not installed, so training.png was not drawn (pip install matplotlib).")
            return
        try:
            save_training_png(self.output / "training.png", self.rows, self.schedule.switches,
                              self.schedule.best_epoch or None, "-loss" if self.adapter.score is None else "score")
        except ImportError:
            log.warning("matplotlib is not installed, so training.png was not drawn (pip install matplotlib).")

    # ---- resume --------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, output: Path, adapter: Adapter | str | Path | None,
                        on_epoch: Callable[[dict], None] | None) -> _Run:
        ckpt = output / "checkpoint"
        if distributed.is_main():
            remove_stale(ckpt)  # a kill during the directory swap leaves the previous checkpoint aside
            remove_stale(output / "best")
        distributed.barrier()
        if not (ckpt / "state.json").is_file():
            raise UsageError(f"--resume {output}: no checkpoint there (expected {ckpt}/state.json from dendrite-train).")
        try:
            state = json.loads((ckpt / "state.json").read_text())
            config = TrainConfig(**{f.name: state["config"][f.name] for f in fields(TrainConfig)
                                    if f.name in state["config"]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoadError(f"--resume {output}: {ckpt}/state.json is unreadable ({type(exc).__name__}: {exc}).") from exc
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter if adapter is not None else state["adapter"])
        converted = load_converted(ckpt / "model")
        run = cls(converted, adapter, output, config, on_epoch)
        run.initial_dendrites = state["initial_dendrites"]
        run.base_params = state["base_params"]
        seed_everything(config.seed)
        run._build_data()
        run.schedule = Schedule.from_dict(state["schedule"])
        run.rows = state["rows"]
        run.wall_before = float(state["wall_seconds"])
        run.stop_reason = state["stop_reason"]
        run.nonfinite = state["nonfinite"]
        if (ckpt / "best").is_dir():
            run.best_model = load_converted(ckpt / "best").model
            run._apply_trainable(run.best_model)
        run._apply_trainable()
        run.setup_phase()
        blob = torch.load(ckpt / "training_state.pt", weights_only=True)
        run.optimizer.load_state_dict(blob["optimizer"])
        if run.scheduler is not None and blob["scheduler"] is not None:
            run.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"]["torch"])
        gens = [g for loader in run._loaders() for g in _loader_generators(loader)]
        for g, s in zip(gens, blob["rng"]["loaders"]):
            g.set_state(s)
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = state["numpy_rng"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        return run


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
    _write_text(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    """Atomic but not fsynced: these files are derived from the fsynced checkpoint and rewritten from it
    on resume, so durability costs nothing per epoch here."""
    with atomic_file(path, durable=False) as tmp:
        tmp.write_text(text)
