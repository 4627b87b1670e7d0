"""Dendrites inside an unmodified Hugging Face `transformers.Trainer`: one callback, no fork.

    from dendrite_convert import convert, DendriteConfig
    from dendrite_convert.integrations.transformers import DendriteCallback

    model = convert(BertForSequenceClassification(config), DendriteConfig()).model
    args = TrainingArguments("out", eval_strategy="steps", eval_steps=50, save_steps=50, ...)
    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...)
    DendriteCallback(patience=3).attach(trainer)
    trainer.train()            # trainer.model is the best model when this returns

What it does (docs/design.md §4, the same `growth.Growth` and objectives as `dendrite-train`; one *evaluation*
plays the role of one epoch): after every evaluation it reads `metric` (default `eval_loss`, minimised;
a metric whose name has no "loss" is maximised unless `maximize` says otherwise), keeps the best
state (weights and dendrite counts) in CPU memory, and when the metric has not improved for
`patience` evaluations it restores the best state, lets the objective add one dendrite to every target
(gradient: a fresh one, a channel-selective one serving the channels where the Trainer's `compute_loss`
on its training batches leaves the most error; correlation: the best of N candidates fit to that error,
frozen) and rebuilds the optimizer with `Trainer.create_optimizer` (so `optim`,
`optimizer_cls_and_kwargs` or a subclass's `create_optimizer` are honoured) and the LR scheduler with
`Trainer.create_scheduler`; the new scheduler continues at the current step (the schedule is a
function of the global step), the optimizer state starts fresh. On "stop" it sets
`control.should_training_stop`; at the end of training the best state is put back into `trainer.model`.

Trainer arguments it needs:
- `eval_strategy="steps"` (with `eval_steps`) or `"epoch"`, and an `eval_dataset`: evaluations drive it;
- `load_best_model_at_end=False` (the default): the callback restores the best model itself, and a
  checkpoint of a smaller architecture could not be loaded into the grown model anyway;
- one process (no DDP/FSDP/DeepSpeed): the training loop keeps its own reference to the wrapped model,
  which a callback cannot re-wrap after the parameter set changes (use `dendrite-train` under torchrun);
- `save_steps` aligned with `eval_steps` is recommended so each checkpoint holds a settled structure.

Checkpoints: a converted transformers model is still a `PreTrainedModel`, so the Trainer saves it
with `save_pretrained`. `attach` renames the model's tied-weight keys to the wrapped layers
(`decoder.weight` -> `decoder.base_layer.weight`) so that tied embeddings are de-duplicated as usual
instead of failing in safetensors. `on_save` adds `dendrite_structure.json` (dendrites per target and
the schedule state) and `dendrite_best.safetensors` (the best state) to each `checkpoint-N/`.
To resume, give the fresh converted model the checkpoint's structure first:

    model = convert(build_model(), DendriteConfig()).model
    trainer = Trainer(model=model, args=args, ...)
    DendriteCallback(patience=3, resume_from="out/checkpoint-40").attach(trainer)  # or restore_structure(model, ...)
    trainer.train(resume_from_checkpoint="out/checkpoint-40")
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from . import missing_extra

try:
    import accelerate  # noqa: F401  (the Trainer needs it; say so here rather than mid-training)
    import transformers
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - exercised by the no-extras subprocess test
    raise missing_extra("transformers and accelerate", "transformers", _exc) from _exc

from ..core.words import plural
from ..conversion.rewrite import retie_weight_keys
from ..core.errors import UsageError
from ..core.layers import DendriteLayer
from ..core.structure import STRUCTURE_FILE, dendrite_counts, restore_structure, save_structure
from ..training.growth import Growth, carry_lr_schedule
from ..training.objectives import Objective, TrainingData, make_objective
from ..training.schedule import ScheduleConfig

__all__ = ["DendriteCallback", "restore_structure", "retie_weight_keys"]

log = logging.getLogger(__name__)

BEST_FILE = "dendrite_best.safetensors"


class DendriteCallback(TrainerCallback):
    """Adds dendrites during `Trainer.train()` when the evaluation metric stops improving.

    Args:
        metric: evaluation metric to watch (`eval_` is prepended if missing); default
            `args.metric_for_best_model` or `eval_loss`.
        maximize: direction; default `args.greater_is_better` when `metric` is that metric, else
            False for names containing "loss" and True otherwise.
        patience: evaluations without improvement before dendrites are added.
        switch_every: add dendrites every N evaluations instead of using patience.
        max_dendrites: dendrites per target at most.
        max_evaluations: evaluations at most before the schedule stops training (default: no limit;
            the Trainer's `max_steps`/`num_train_epochs` end training as usual).
        capacity_test: add a dendrite at every evaluation, three times (checks the setup).
        objective: how dendrites learn, as for `dendrite-train --objective`: "gradient" (trained with the
            network) or "correlation" (candidates fit to the error signal of the Trainer's own loss on its
            training batches, the best inserted frozen), or an `Objective` instance for other options.
        resume_from: a `checkpoint-N/` folder written with this callback: `attach` restores its
            dendrite structure, schedule and best state (then pass it to `train(resume_from_checkpoint=)`).
        trainer: attach to this Trainer right away (same as calling `attach`).
    """

    def __init__(self, metric: str | None = None, maximize: bool | None = None, patience: int = 10,
                 switch_every: int | None = None, max_dendrites: int = 100, max_evaluations: int | None = None,
                 capacity_test: bool = False, objective: str | Objective = "gradient",
                 resume_from: str | os.PathLike | None = None, trainer: transformers.Trainer | None = None):
        self.metric = metric
        self.objective = make_objective(objective)
        self.maximize = maximize
        self.schedule_kwargs = {"patience": patience, "switch_every": switch_every, "max_dendrites": max_dendrites,
                                "max_epochs": max_evaluations or 10**9, "capacity_test": capacity_test}
        ScheduleConfig(**self.schedule_kwargs)  # validate now, not at the first evaluation
        self.resume_from = resume_from
        self.trainer: transformers.Trainer | None = None
        self.growth: Growth | None = None
        self._training = False
        if trainer is not None:
            self.attach(trainer)

    # ---- setup -----------------------------------------------------------------------------------
    def attach(self, trainer: transformers.Trainer) -> DendriteCallback:
        """Register with `trainer` (it needs the Trainer to rebuild the optimizer); returns self."""
        args = trainer.args
        if str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise UsageError("DendriteCallback switches on evaluations: set TrainingArguments(eval_strategy='steps', "
                             "eval_steps=N) or eval_strategy='epoch', and pass an eval_dataset.")
        if args.load_best_model_at_end:
            raise UsageError("DendriteCallback restores the best model itself: set load_best_model_at_end=False "
                             "(a checkpoint of a smaller architecture cannot be loaded into the grown model).")
        if args.world_size > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise UsageError("DendriteCallback supports one training process only (the Trainer's loop keeps the "
                             "wrapped model, which cannot be re-wrapped after dendrites are added); use "
                             "`torchrun ... dendrite-train` for distributed runs.")
        if not any(isinstance(m, DendriteLayer) for m in trainer.model.modules()):
            raise UsageError("trainer.model has no dendrite layers: convert it first with dendrite_convert.convert().")
        if trainer.optimizer is not None:
            log.warning("DendriteCallback rebuilds the optimizer with Trainer.create_optimizer when dendrites are "
                        "added; the optimizer passed in `optimizers=` is used only until then (pass "
                        "`optimizer_cls_and_kwargs=` to keep your optimizer type).")
        self.trainer = trainer
        self.metric_key, self.maximize = self._resolve_metric(args)
        self.growth = Growth(ScheduleConfig(maximize=self.maximize, **self.schedule_kwargs), self.objective,
                             self._training_data)
        retie_weight_keys(trainer.model)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.growth.start(trainer.model)  # before train() builds the optimizer: frozen dendrites stay out of it
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    @contextmanager
    def _training_data(self, model):
        """What the objective grows from (the error signal of channel-selective or correlation dendrites):
        the Trainer's own loss on its own training batches."""
        trainer = self._need_trainer()
        loader = trainer.get_train_dataloader()  # the Trainer's columns, collator and device placement
        try:
            yield TrainingData(loader, lambda batch: trainer.compute_loss(model, batch))
        finally:  # accelerate keeps every loader it prepared; this one is done
            prepared = getattr(trainer.accelerator, "_dataloaders", None)
            if isinstance(prepared, list) and loader in prepared:
                prepared.remove(loader)

    def _resolve_metric(self, args) -> tuple[str, bool]:
        metric = self.metric or args.metric_for_best_model or "loss"
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        maximize = self.maximize
        if maximize is None:
            best = args.metric_for_best_model
            if best and (best if best.startswith("eval_") else f"eval_{best}") == key and args.greater_is_better is not None:
                maximize = bool(args.greater_is_better)
            else:
                maximize = "loss" not in key
        return key, maximize

    def _need_trainer(self) -> transformers.Trainer:
        if self.trainer is None:
            raise UsageError("DendriteCallback needs the Trainer: create it with DendriteCallback(...).attach(trainer) "
                             "instead of Trainer(callbacks=[...]).")
        return self.trainer

    # ---- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._need_trainer()
        self.growth.start(trainer.model)
        self._training = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self._training or self.growth.done:
            return  # an evaluate() outside train(), or after the schedule ended
        trainer = self._need_trainer()
        if not metrics or self.metric_key not in metrics:
            raise UsageError(f"metric {self.metric_key!r} is not among this evaluation's metrics "
                             f"({sorted(metrics or {})}); pass DendriteCallback(metric=...).", parameter="metric")
        value = float(metrics[self.metric_key])
        evaluated = self.growth.schedule.dendrites
        decision = self.growth.observe(trainer.model, value, state.global_step)
        # `dendrites`: what the evaluated model had; the action says what happens next (also in trainer_state.json)
        state.log_history.append({"step": state.global_step, self.metric_key: value, "dendrites": evaluated,
                                  "dendrite_action": decision.action})
        if decision.action in ("add", "retry"):
            log.info("step %d: %s=%.6g; %s -> %s per target", state.global_step, self.metric_key, value,
                     decision.action, plural(self.growth.schedule.dendrites, "dendrite"))
            self._rebuild_optimizer()
        elif decision.action == "stop":
            log.info("step %d: dendrite schedule stopped: %s", state.global_step, decision.reason)
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or self.trainer is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():  # e.g. a hyper-parameter search writes into run-* folders
            log.warning("DendriteCallback: %s not found; the dendrite structure was not saved with it.", folder)
            return
        self.save_checkpoint(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        trainer = self.trainer
        if trainer is None:
            return
        before = dendrite_counts(trainer.model)
        if self.growth.restore_best(trainer.model):
            log.info("DendriteCallback: restored the best model (%s=%s, %s per target)", self.metric_key,
                     self.growth.best_value, plural(self.growth.schedule.best_dendrites, "dendrite"))
        if dendrite_counts(trainer.model) != before:
            # The optimizer holds parameters of the grown model: a later train() must build a new one.
            trainer.optimizer = trainer.lr_scheduler = None
            trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None

    # ---- optimizer -------------------------------------------------------------------------------
    def _rebuild_optimizer(self) -> None:
        """What `Trainer._prepare_for_training` does for the optimizer and scheduler, for the new parameters."""
        trainer = self._need_trainer()
        accelerator = trainer.accelerator
        old_optimizer, old_scheduler = trainer.optimizer, trainer.lr_scheduler
        optimizers = getattr(accelerator, "_optimizers", [])
        if old_optimizer in optimizers:  # the accelerator keeps every prepared optimizer: drop the stale one
            optimizers.remove(old_optimizer)
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.create_optimizer()
        trainer.optimizer = accelerator.prepare_optimizer(trainer.optimizer)
        trainer.create_scheduler(num_training_steps=trainer.state.max_steps)
        carry_lr_schedule(old_scheduler, trainer.lr_scheduler)
        trainer.callback_handler.optimizer = trainer.optimizer
        trainer.callback_handler.lr_scheduler = trainer.lr_scheduler

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Write the dendrite structure, schedule state and best state into a checkpoint folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = self.growth.state_dict()
        best_state = state.pop("best_state")
        aliases: dict[str, str] = {}
        if best_state is not None:
            unique, seen = {}, {}
            for name, tensor in best_state.items():
                if id(tensor) in seen:
                    aliases[name] = seen[id(tensor)]
                else:
                    seen[id(tensor)] = name
                    unique[name] = tensor.contiguous()
            tmp = folder / f".{BEST_FILE}.tmp"
            save_file(unique, str(tmp), metadata={"format": "pt"})
            tmp.replace(folder / BEST_FILE)
        save_structure(self.trainer.model, folder, {"metric": self.metric_key, "maximize": self.maximize,
                                                    "callback": {**state, "best_aliases": aliases}})

    def load_checkpoint(self, folder: str | os.PathLike) -> dict[str, int]:
        """Restore the structure of `trainer.model`, the schedule and the best state from a checkpoint folder."""
        trainer = self._need_trainer()
        folder = Path(folder)
        counts = restore_structure(trainer.model, folder)
        path = folder / STRUCTURE_FILE
        if path.is_file():
            data = json.loads(path.read_text()).get("callback")
            if data:
                best_state = None
                if (folder / BEST_FILE).is_file():
                    from safetensors.torch import load_file

                    best_state = load_file(str(folder / BEST_FILE))
                    for name, source in data.get("best_aliases", {}).items():
                        best_state[name] = best_state[source]
                self.growth.load_state_dict({**data, "best_state": best_state})
        return counts

    @property
    def best_value(self) -> float | None:
        return None if self.growth is None else self.growth.best_value
