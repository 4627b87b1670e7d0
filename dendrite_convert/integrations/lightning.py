"""Dendrites inside an unmodified `lightning.pytorch.Trainer`: one callback.

    from dendrite_convert import convert, DendriteConfig
    from dendrite_convert.integrations.lightning import DendriteCallback

    module = MyLightningModule(net=convert(make_net(), DendriteConfig()).model)
    trainer = L.Trainer(max_epochs=50, callbacks=[DendriteCallback(monitor="val_loss", patience=3)])
    trainer.fit(module, train_loader, val_loader)   # the module holds the best model afterwards

What it does (docs/design.md §4, the same `growth.Growth` and objectives as `dendrite-train`; one validation run
plays the role of one epoch): at the end of every validation (not the sanity check) it reads `monitor` from
`trainer.callback_metrics` (log it with `self.log("val_loss", ...)` in `validation_step`), keeps the
best state (weights and dendrite counts) in CPU memory, and when the metric has not improved for
`patience` validations it restores the best state, lets the objective add one dendrite to every target of
the LightningModule (gradient: a fresh one, a channel-selective one serving the channels where the module's
`training_step` loss on the training batches leaves the most error; correlation: the best of N candidates
fit to that error, frozen) and rebuilds the optimizers and LR schedulers through
`trainer.strategy.setup_optimizers(trainer)`, i.e. the module's own `configure_optimizers()` on the
new parameter set; a scheduler of the same type continues at its current step. On "stop" it sets
`trainer.should_stop`; when fitting ends the best state is put back into the module.

Needs: a single-device strategy (CPU or one GPU; DDP wraps the parameter set once and a callback
cannot re-wrap it: use `torchrun ... dendrite-train`), and `configure_optimizers` that builds its
optimizer from `self.parameters()` when called (not once in `__init__`).

Checkpoints: `ModelCheckpoint` saves the grown module as usual; this callback's state (schedule and
best state) is saved with it. Lightning loads a checkpoint's weights before any callback runs, so the
fresh module needs the checkpoint's dendrite structure first: pass `resume_from=` (the same path as
`fit(ckpt_path=...)`) or call `dendrite_convert.core.structure.restore_structure(module, path)` yourself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

from . import missing_extra

try:
    import lightning.pytorch as pl
except ImportError as _exc:  # pragma: no cover - exercised by the no-extras subprocess test
    raise missing_extra("lightning", "lightning", _exc) from _exc

from ..core.errors import UsageError
from ..core.layers import DendriteLayer
from ..core.structure import dendrite_counts, restore_structure
from ..training.growth import Growth, carry_lr_schedule
from ..training.objectives import Objective, TrainingData
from ..core.words import plural
from ..training.schedule import ScheduleConfig

__all__ = ["DendriteCallback", "restore_structure"]

log = logging.getLogger(__name__)


def _no_logging(*args, **kwargs) -> None:
    """`self.log` while an objective runs training_step outside the loop (Lightning refuses logging there)."""


class DendriteCallback(pl.Callback):
    """Adds dendrites during `Trainer.fit()` when the monitored validation metric stops improving.

    Args:
        monitor: a metric the module logs during validation.
        mode: "min" or "max"; default "min" for names containing "loss", else "max".
        patience, switch_every, max_dendrites, capacity_test: as for `dendrite-train`, counted in validations.
        max_validations: validations at most before the schedule stops training (default: no limit).
        objective: how dendrites learn, as for `dendrite-train --objective`: "gradient" (trained with the
            network) or "correlation" (candidates fit to the error signal of the module's `training_step`
            loss, the best inserted frozen), or an `Objective` instance for other options.
        resume_from: the checkpoint given to `fit(ckpt_path=...)`: its dendrite structure is applied to
            the module in `setup`, before Lightning loads the weights.
    """

    def __init__(self, monitor: str = "val_loss", mode: str | None = None, patience: int = 10,
                 switch_every: int | None = None, max_dendrites: int = 100, max_validations: int | None = None,
                 capacity_test: bool = False, objective: str | Objective = "gradient",
                 resume_from: str | os.PathLike | None = None):
        if mode not in (None, "min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', not {mode!r}.", parameter="mode")
        self.monitor = monitor
        self.mode = mode or ("min" if "loss" in monitor else "max")
        self.resume_from = resume_from
        self.growth = Growth(ScheduleConfig(
            patience=patience, switch_every=switch_every, max_dendrites=max_dendrites,
            max_epochs=max_validations or 10**9, capacity_test=capacity_test, maximize=self.mode == "max",
        ), objective, self._training_data)
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ---- Lightning events ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise UsageError("DendriteCallback supports single-device training only (DDP wraps the parameter set "
                             "once and cannot be re-wrapped from a callback); use `torchrun ... dendrite-train`.")
        if not any(isinstance(m, DendriteLayer) for m in pl_module.modules()):
            raise UsageError("the LightningModule has no dendrite layers: convert its network first with "
                             "dendrite_convert.convert().")
        if self.growth.objective.needs_data(pl_module) and not pl_module.automatic_optimization:
            raise UsageError(f"the {self.growth.objective.name} objective grows these dendrites from the module's "
                             "training_step loss, which a manually optimised module (automatic_optimization=False) "
                             "steps itself; use automatic optimization (or the gradient objective without "
                             "channel-selective dendrites).")
        self._trainer = trainer
        if self.resume_from is not None:
            counts = restore_structure(pl_module, self.resume_from)
            log.info("DendriteCallback: restored the dendrite structure of %s (%s at most)",
                     self.resume_from, plural(max(counts.values(), default=0), "dendrite"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.growth.start(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.growth.done or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise UsageError(f"monitor {self.monitor!r} was not logged during validation (logged: "
                             f"{sorted(trainer.callback_metrics)}); log it with self.log({self.monitor!r}, ...) in "
                             "validation_step.", parameter="monitor")
        decision = self.growth.observe(pl_module, float(value), trainer.global_step)
        if decision.action in ("add", "retry"):
            log.info("step %d: %s=%.6g; %s -> %s per target", trainer.global_step, self.monitor,
                     float(value), decision.action, plural(self.growth.schedule.dendrites, "dendrite"))
            self._rebuild_optimizers(trainer)
        elif decision.action == "stop":
            log.info("step %d: dendrite schedule stopped: %s", trainer.global_step, decision.reason)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        before = dendrite_counts(pl_module)
        if self.growth.restore_best(pl_module) and dendrite_counts(pl_module) != before:
            log.info("DendriteCallback: restored the best model (%s=%s, %s per target)", self.monitor,
                     self.growth.best_value, plural(self.growth.schedule.best_dendrites, "dendrite"))

    @contextmanager
    def _training_data(self, pl_module: pl.LightningModule):
        """What the objective grows from (the error signal of channel-selective or correlation dendrites): the
        module's own `training_step` loss on the training data. Batches come from a private single-process
        loader over the same dataset (the loop's iterator, workers and RNG are left alone) and go through the
        strategy's transfer hooks and the precision plugin as in training; logging is muted meanwhile."""
        trainer = self._trainer
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise UsageError(f"the {self.growth.objective.name} objective reads the error signal from one training "
                             "DataLoader; this fit has another kind: train on one DataLoader.")
        private = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, collate_fn=loader.collate_fn,
                             generator=torch.Generator())
        precision = trainer.precision_plugin

        def loss(batch):
            batch = precision.convert_input(trainer.strategy.batch_to_device(batch))
            with precision.forward_context():
                out = pl_module.training_step(batch, 0)
            return out["loss"] if isinstance(out, Mapping) else out

        pl_module.log = pl_module.log_dict = _no_logging  # instance attributes shadow the methods meanwhile
        try:
            yield TrainingData(private, loss)
        finally:
            del pl_module.log, pl_module.log_dict

    # ---- optimizers ------------------------------------------------------------------------------
    @staticmethod
    def _rebuild_optimizers(trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        old_schedulers = [config.scheduler for config in strategy.lr_scheduler_configs]
        strategy.setup_optimizers(trainer)  # calls configure_optimizers() on the new parameter set
        for old, config in zip(old_schedulers, strategy.lr_scheduler_configs):
            carry_lr_schedule(old, config.scheduler)

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, **self.growth.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.growth.load_state_dict(state_dict)

    @property
    def best_value(self) -> float | None:
        return self.growth.best_value

