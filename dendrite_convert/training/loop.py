"""One training run (docs/design.md §4): epochs of neuron training, the growth between them, and the phase setup.

The per-step work is what a hand-written loop does (forward, loss, backward, step) plus one tensor add;
the loss is read back once per epoch. Everything else happens between epochs: the shared `Growth` path
(schedule, best snapshot, the objective's growth), the checkpoint (checkpoint.py) and the outputs
(outputs.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..conversion.consent import Consent
from ..conversion.modeldir import ConvertedModel, load_converted
from ..core.errors import LoadError
from ..core.layers import count_parameters
from ..core.structure import snapshot
from . import checkpoint, compiling, distributed, outputs
from .adapter import Adapter, batch_size, call, load_adapter, reiterable
from .config import TrainConfig
from .device import describe, peak_memory_mb, reset_peak_memory, resolve_device, to_device
from .growth import Growth
from .objectives import TrainingData
from .precision import Precision
from .schedule import Decision, Schedule

log = logging.getLogger(__name__)
progress = logging.getLogger("dendrite_convert.progress")  # lines the CLI shows while a run trains


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Run:
    """One training run: the model, its phase (optimizer/scheduler), its growth and its outputs."""

    def __init__(self, converted: ConvertedModel, adapter: Adapter, output: Path, config: TrainConfig,
                 on_epoch: Callable[[dict], None] | None):
        self.adapter = adapter
        self.output = output
        self.config = config
        self.on_epoch = on_epoch
        self.model = converted.model
        if distributed.active():  # torchrun: each rank its own GPU (distributed.init), else the CPU
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
                torch.device("cpu"))
        else:
            self.device = resolve_device(config.device)
        self.model.to(self.device)
        self.precision = Precision(config.precision, self.device)
        self.compile_fallback: str | None = None  # why torch.compile was given up, once it was
        self.growth = Growth(config.schedule_config(adapter.maximize), config.make_objective(), self._training_data)
        self.checkpointer = checkpoint.Checkpointer(output, converted)
        self.rows: list[dict] = []
        self.base_params = outputs.base_parameter_count(self.model)
        self.wall_before = 0.0
        self.session_start = time.perf_counter()
        self.stop_reason = ""
        self.nonfinite = False
        self._loss_checked = False
        self._warned_negative_plateau = False
        self.already_finished = False  # resumed a run that had nothing left to do
        self._last_checkpoint = time.perf_counter()
        self._checkpoint_cost = 0.0  # measured: the first epoch always writes

    @property
    def schedule(self) -> Schedule:
        return self.growth.schedule

    @property
    def initial_dendrites(self) -> int:
        return self.growth.initial

    # ---- setup ---------------------------------------------------------------------------------------
    def start(self) -> None:
        seed_everything(self.config.seed)
        self._build_data()
        self.growth.start(self.model)
        self._apply_trainable()
        self.setup_phase()

    @classmethod
    def from_checkpoint(cls, output: Path, adapter: Adapter | str | Path | None,
                        on_epoch: Callable[[dict], None] | None, consent: Consent,
                        budget: dict[str, int] | None = None, hardware: dict | None = None) -> Run:
        """The run recorded in `output/checkpoint`, ready to continue where it stopped; `budget` replaces
        its max_epochs/max_dendrites, `hardware` its device, precision or compile (another machine may resume it)."""
        state, config = checkpoint.read_state(output, budget or {})
        config = config.with_hardware(hardware or {})
        if adapter is None and not consent.trust_code:  # the recorded adapter is code named by a file
            raise LoadError(f"resume {output}: the run's adapter {state.get('adapter')} is code recorded in "
                            f"{output / 'checkpoint'}/state.json; name it again (adapter=) or pass trust_code=True "
                            "to run it.", parameter="resume")
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter if adapter is not None else state["adapter"])
        ckpt = output / "checkpoint"
        run = cls(load_converted(ckpt / "model", **consent.keywords()), adapter, output, config, on_epoch)
        run.growth.load_state_dict({"schedule": state["schedule"], "initial_dendrites": state["initial_dendrites"]})
        run.schedule.config = replace(run.schedule.config, max_epochs=config.max_epochs,
                                      max_dendrites=config.max_dendrites)
        run.base_params = state["base_params"]
        seed_everything(config.seed)
        run._build_data()
        if (ckpt / "best").is_dir():
            run.growth.best = snapshot(load_converted(ckpt / "best", **consent.keywords()).model)
        run._apply_trainable()
        run.setup_phase()
        checkpoint.restore_run(run, state)
        return run

    def _build_data(self) -> None:
        a = self.adapter
        seed = self.config.seed
        self.train_loader = distributed.shard(self._call_data("train_data", a.train_data), seed, training=True)
        self.val_loader = distributed.shard(self._call_data("val_data", a.val_data), seed, training=False)
        self.test_loader = (distributed.shard(self._call_data("test_data", a.test_data), seed, training=False)
                            if a.test_data is not None else None)

    def loaders(self) -> list:
        return [x for x in (self.train_loader, self.val_loader, self.test_loader) if x is not None]

    def _call_data(self, name: str, fn):
        data = call(self.adapter, f"{name}()", fn)
        if data is None or not reiterable(data):
            raise LoadError(
                f"adapter {self.adapter.spec}: {name}() returned {type(data).__name__}; it must return re-iterable "
                "batches such as a DataLoader or a list (not a generator, which runs out after one epoch).",
                parameter="adapter",
            )
        return data

    def _apply_trainable(self) -> None:
        """Everything trains, except what the objective keeps frozen once inserted."""
        for p in self.model.parameters():
            p.requires_grad_(p.numel() > 0)  # the first dendrite's [0, C] cascade holds nothing (DDP needs every grad)
        self.growth.objective.freeze_grown(self.model, self.initial_dendrites)

    def setup_phase(self) -> None:
        """The one place that builds what a phase trains with: the network that runs the training steps
        (`net`; a DDP wrapper goes here, rebuilt because each phase changes the parameters), the optimizer
        and the scheduler. `model` stays the unwrapped module that is evaluated and saved."""
        self.model.train()
        self.net = distributed.wrap(self.model)  # a fresh DDP: it syncs rank 0's weights and buckets these params
        if self.compiled:
            try:  # compiled afresh: the structure may have changed since the last phase
                self.net = compiling.compile_module(self.net)
            except Exception as exc:  # noqa: BLE001 - torch.compile refusing this platform at all
                self._give_up_compile(exc)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = call(self.adapter, "optimizer(params)", self.adapter.build_optimizer, self.params)
        self.scheduler = call(self.adapter, "scheduler(optimizer)", self.adapter.build_scheduler, self.optimizer)

    @contextmanager
    def _training_data(self, model: nn.Module):
        """What an objective grows from: our training batches and the adapter's loss on `model`."""
        yield TrainingData(self.train_loader, lambda batch: self.forward_loss(batch, model))

    @property
    def compiled(self) -> bool:
        """Whether the training step runs through torch.compile (asked for, and not given up)."""
        return self.config.compile and self.compile_fallback is None

    def _give_up_compile(self, exc: BaseException) -> None:
        self.compile_fallback = compiling.reason(exc)
        log.warning(f"--compile: torch.compile failed ({self.compile_fallback}); training continues without it.")
        self.net = distributed.wrap(self.model) if distributed.active() else self.model

    # ---- one epoch -----------------------------------------------------------------------------------
    def forward_loss(self, batch, net: nn.Module | None = None) -> torch.Tensor:
        if self.device.type != "cpu":
            batch = to_device(batch, self.device)
        args, kwargs = call(self.adapter, "inputs(batch)", self.adapter.model_inputs, batch)
        try:
            with self.precision.autocast():
                outputs = (net or self.net)(*args, **kwargs)
        except ValueError as exc:
            if "more than 1 value per channel when training" not in str(exc):
                raise
            n = batch_size(batch)
            raise LoadError(f"adapter {self.adapter.spec}: train_data() gave a batch of {n} sample{'s' * (n != 1)}, too "
                            "few for BatchNorm to train on; pass drop_last=True to its DataLoader (or pick a batch size "
                            "that leaves no single sample over).", parameter="adapter") from exc
        with self.precision.autocast():
            loss = call(self.adapter, "loss(outputs, batch)", self.adapter.loss, outputs, batch)
        if not self._loss_checked:
            self._check_loss(loss)
        return loss

    def _check_loss(self, loss) -> None:
        spec = self.adapter.spec
        if not isinstance(loss, torch.Tensor):
            raise LoadError(f"adapter {spec}: loss(outputs, batch) returned {type(loss).__name__}; it must return "
                            "a scalar torch.Tensor.", parameter="adapter")
        if loss.numel() != 1:
            raise LoadError(f"adapter {spec}: loss(outputs, batch) returned a tensor of shape {list(loss.shape)}; "
                            "it must return a scalar (reduce it, e.g. with .mean()).", parameter="adapter")
        if not loss.requires_grad:
            raise LoadError(f"adapter {spec}: loss(outputs, batch) does not depend on the model's parameters "
                            "(no gradient); compute it from `outputs`.", parameter="adapter")
        self._loss_checked = True

    def train_epoch(self) -> float:
        model, optimizer = self.model, self.optimizer
        model.train()
        distributed.set_epoch([self.train_loader], len(self.rows))
        total = torch.zeros((), device=self.device)
        steps = 0
        for batch in self.train_loader:
            loss = self._compiled_step(batch) if self.compiled else self._step(batch, optimizer)
            total += loss.detach()
            steps += 1
        if steps == 0:
            raise LoadError(f"adapter {self.adapter.spec}: train_data() yielded no batches.", parameter="adapter")
        total_loss, all_steps = distributed.all_sum(total.item(), steps)
        return total_loss / all_steps

    def _step(self, batch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        loss = self.forward_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        self.precision.backward_step(loss, optimizer)
        return loss

    def _compiled_step(self, batch) -> torch.Tensor:
        """A step through the compiled module; on a compile failure (torch compiles at the first call) the
        step is taken again eagerly: nothing was applied, since the failure comes before optimizer.step."""
        try:
            return self._step(batch, self.optimizer)
        except Exception as exc:
            if not compiling.is_compile_error(exc):
                raise
            self._give_up_compile(exc)
            return self._step(batch, self.optimizer)

    @torch.no_grad()
    def evaluate(self, data, name: str) -> float:
        model, adapter = self.model, self.adapter
        model.eval()
        total_t = torch.zeros((), device=self.device)
        total, count = 0.0, 0
        try:
            for batch in data:
                if self.device.type != "cpu":
                    batch = to_device(batch, self.device)
                args, kwargs = call(adapter, "inputs(batch)", adapter.model_inputs, batch)
                n = batch_size(batch)
                with self.precision.autocast():
                    outputs = model(*args, **kwargs)
                    if adapter.score is None:
                        total_t -= call(adapter, "loss(outputs, batch)", adapter.loss, outputs, batch).detach().reshape(()) * n
                    else:
                        total += self._score(outputs, batch) * n
                count += n
        finally:
            model.train()
        total, count = distributed.all_sum(total + total_t.item(), count)  # every rank decides alike
        if count == 0:
            raise LoadError(f"adapter {adapter.spec}: {name}() yielded no batches; it must give at least one "
                            "batch to score.", parameter="adapter")
        return total / count

    def _score(self, outputs, batch) -> float:
        value = call(self.adapter, "score(outputs, batch)", self.adapter.score, outputs, batch)
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            raise LoadError(f"adapter {self.adapter.spec}: score(outputs, batch) returned {type(value).__name__}; "
                            "it must return a number (a float or a one-element tensor).", parameter="adapter") from None

    def _val_test(self) -> tuple[float, float | None]:
        val = self.evaluate(self.val_loader, "val_data")
        test = self.evaluate(self.test_loader, "test_data") if self.test_loader is not None else None
        return val, test

    # ---- the loop ------------------------------------------------------------------------------------
    def loop(self) -> dict:
        if not self.schedule.done:  # a resumed run that is finished trains nowhere
            progress.info(f"training on {describe(self.device)}, {self.config.precision}"
                          f"{', compiled' if self.config.compile else ''}")
        while not self.schedule.done:
            self.run_epoch()
        return self.finish()

    def run_epoch(self) -> None:
        start = time.perf_counter()
        first_new_row = len(self.rows)
        lr = self.optimizer.param_groups[0]["lr"]
        reset_peak_memory(self.device)
        train_loss = self.train_epoch()
        val, test = self._val_test()
        dendrites = self.schedule.dendrites
        params = count_parameters(self.model)
        seconds = time.perf_counter() - start
        peak = peak_memory_mb(self.device)
        reset_peak_memory(self.device)  # a dendrite phase's row shows the growth's own peak
        growth_start = time.perf_counter()
        if not (math.isfinite(train_loss) and math.isfinite(val)):
            what = "training loss" if not math.isfinite(train_loss) else "validation score"
            decision = self.growth.abort(self.model, f"the {what} became {train_loss if what[0] == 't' else val} "
                                                     f"at epoch {self.schedule.epoch + 1}")
            self.nonfinite = True
        else:
            decision = self.growth.observe(self.model, val)  # keeps the best, restores and grows in place
        self.rows.append(self._row("neuron", dendrites, params, train_loss, val, test, lr, seconds, peak))
        if decision.save_best:
            self.checkpointer.best_changed = True
        if decision.action == "continue" and self.scheduler is not None:
            self._step_scheduler(val)
        self._after_growth(decision, growth_start)
        if decision.action != "continue" or self.nonfinite or self._checkpoint_due():
            begin = time.perf_counter()
            self.checkpointer.save(self)
            if not self.schedule.done:  # else finish() writes them next
                outputs.write_outputs(self)
            self._last_checkpoint = time.perf_counter()
            self._checkpoint_cost = self._last_checkpoint - begin
        if self.on_epoch is not None:
            for row in self.rows[first_new_row:]:  # the neuron epoch, and a dendrite phase if one followed
                self.on_epoch(row)

    def _checkpoint_due(self) -> bool:
        since = time.perf_counter() - self._last_checkpoint
        return since * self.config.checkpoint_budget >= self._checkpoint_cost

    def _row(self, phase, dendrites, params, train_loss, val, test, lr, seconds, peak) -> dict:
        return outputs.score_row(len(self.rows) + 1, phase, dendrites, params, train_loss, val, test, lr, seconds,
                                 peak)

    def raise_budget(self) -> bool:
        """A finished run continues (with a fresh optimizer, from the best model it kept) when the limit it
        stopped at was raised; a run that ended for any other reason stays finished."""
        s, cfg = self.schedule, self.config
        raised = ((s.stop_reason.startswith("reached --max-epochs") and s.epoch + s.config.dendrite_phase_epochs
                   < cfg.max_epochs)
                  or (s.stop_reason.startswith("reached --max-dendrites") and s.dendrites < cfg.max_dendrites))
        if raised and not self.nonfinite:
            s.done, s.stop_reason, self.stop_reason = False, "", ""
            return True
        return False

    def _step_scheduler(self, val: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # in the scheduler's own direction: its default mode 'min' gets -score when the score is maximised
            value = val if (self.scheduler.mode == "max") == self.adapter.maximize else -val
            if value < 0 and self.scheduler.threshold_mode == "rel" and not self._warned_negative_plateau:
                self._warned_negative_plateau = True
                log.warning(f"ReduceLROnPlateau(mode={self.scheduler.mode!r}) sees {value:.4g}: its relative threshold "
                            "only works for positive values; use mode='max' for a positive score such as accuracy.")
            self.scheduler.step(value)
        else:
            self.scheduler.step()

    def _after_growth(self, decision: Decision, start: float) -> None:
        """After `Growth` carried out a switch: every rank takes rank 0's model, a dendrite phase of its own
        is scored and recorded, and the next neuron phase is set up."""
        if decision.action == "continue":
            return
        if decision.action == "stop":
            self.stop_reason = decision.reason
            return
        distributed.broadcast_module(self.model)  # every rank starts the phase from rank 0's dendrites
        if self.growth.objective.dendrite_phase_epochs:
            val, test = self._val_test()
            self.rows.append(self._row("dendrite", self.schedule.dendrites, count_parameters(self.model), None, val,
                                       test, None, time.perf_counter() - start, peak_memory_mb(self.device)))
        self._apply_trainable()
        self.setup_phase()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    def finish(self) -> dict:
        if not self.growth.at_best:  # a stop restores it; a resumed finished run or the capacity test may not
            self.growth.restore_best(self.model)
        distributed.check_replicas(self.model)
        outputs.plot(self)
        return outputs.write_outputs(self)
