"""Objectives are units: one class plus a registry line, used alike by dendrite-train and both callbacks."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli.train import app as train_app
from dendrite_convert.core.structure import add_dendrites
from dendrite_convert.training.growth import Growth
from dendrite_convert.training.objectives import OBJECTIVES, Correlation, Gradient, Objective, make_objective
from dendrite_convert.training.objectives.closed_form import ClosedForm
from dendrite_convert.training.objectives.correlation import freeze_dendrites
from dendrite_convert.training.schedule import ScheduleConfig
from tests.helpers_callbacks import hf_trainer, lightning_fit

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def _dendrite_weights(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Weights and cascade of dendrite `index` of every target (what an objective may freeze)."""
    out = {}
    for name, layer in dc.dendrite_layers(model).items():
        for key, t in layer.dendrite_layers[index].state_dict().items():
            out[f"{name}.{key}"] = t.detach().clone()
        out[f"{name}.cascade"] = layer.dendrite_cascade[index].detach().clone()
    return out


def _scales(model: nn.Module, index: int) -> list[torch.Tensor]:
    return [layer.dendrite_scales[index].detach().clone() for layer in dc.dendrite_layers(model).values()]


def _assert_frozen_and_scales_trained(model: nn.Module, inserted: list[dict], live: bool = True) -> None:
    """Every inserted dendrite still holds its weights at insertion (and, in a live model, does not require
    grad) while its scales, inserted at 0, trained."""
    assert len(inserted) >= 1
    for index, weights in enumerate(inserted):
        now = _dendrite_weights(model, index)
        assert now.keys() == weights.keys()
        assert all(torch.equal(now[k], weights[k]) for k in weights), f"dendrite {index} was trained after insertion"
        assert not live or all(p.requires_grad is False for layer in dc.dendrite_layers(model).values()
                   for p in [*layer.dendrite_layers[index].parameters(), layer.dendrite_cascade[index]] if p.numel())
        assert any(s.abs().max() > 0 for s in _scales(model, index)), f"the scales of dendrite {index} never trained"


def test_registry_names_each_class_and_options_go_by_field_name():
    assert OBJECTIVES == {"gradient": Gradient, "correlation": Correlation, "closed-form": ClosedForm}
    assert all(cls.name == name and cls.help for name, cls in OBJECTIVES.items())
    made = make_objective("correlation", candidates=3, epochs=5, samples=100, unknown_option=1)
    assert made == Correlation(candidates=3, epochs=5, samples=100) and made.dendrite_phase_epochs == 1
    assert make_objective("gradient", candidates=3, samples=7) == Gradient(samples=7)
    assert make_objective(made) is made
    with pytest.raises(dc.UsageError, match="one of gradient, correlation"):
        make_objective("magic")


def test_cli_help_lists_the_registry():
    result = CliRunner().invoke(train_app, ["--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    assert all(f"{name} ({cls.help})" in result.output for name, cls in OBJECTIVES.items())


# ---- a new objective: one class and one registry line --------------------------------------------

_INSERTED: list[dict] = []


@dataclass(frozen=True)
class RandomFeatures(Objective):
    """Fresh dendrites whose weights stay as drawn: only their scales train (the docs' example)."""

    name = "random-features"
    help = "fresh dendrites, frozen as drawn; only their scales train"

    def needs_data(self, model):
        return False

    def grow(self, model, data):
        add_dendrites(model)
        index = max(layer.num_dendrites for layer in dc.dendrite_layers(model).values()) - 1
        assert all(s.abs().max() == 0 for s in _scales(model, index))  # the function is unchanged
        _INSERTED.append(_dendrite_weights(model, index))

    def freeze_grown(self, model, first):
        freeze_dendrites(model, first)


def test_a_registered_objective_runs_in_dendrite_train(tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, RandomFeatures.name, RandomFeatures)
    _INSERTED.clear()
    sys.path.insert(0, str(DIGITS))
    from model import build

    torch.manual_seed(0)
    factory = f"{DIGITS / 'model.py'}:build"
    converted = dc.convert(build(8), factory=factory).save(tmp_path / "conv")
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(DIGITS / "adapter.py"), "-o",
                                            str(tmp_path / "run"), "--objective", "random-features",
                                            "--capacity-test", "--json", "--quiet",
                                            "--factory", factory])  # named again: the consent rule
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["objective"] == "random-features" and summary["dendrites"] == 3 and len(_INSERTED) == 3
    _assert_frozen_and_scales_trained(dc.load(tmp_path / "run" / "best", factory=factory), _INSERTED, live=False)


def test_growth_without_the_loss_refuses_an_objective_that_needs_it():
    model = dc.convert(nn.Sequential(nn.Linear(4, 3)), dc.DendriteConfig()).model
    with pytest.raises(dc.UsageError, match="correlation objective grows these dendrites from the training loss"):
        Growth(ScheduleConfig(), "correlation").start(model)


# ---- both callbacks run the correlation objective ------------------------------------------------


class _RecordedCorrelation(Correlation):
    """The correlation objective, noting each dendrite as inserted (the test compares it at the end)."""

    def grow(self, model, data):
        super().grow(model, data)
        index = max(layer.num_dendrites for layer in dc.dendrite_layers(model).values()) - 1
        assert all(s.abs().max() == 0 for s in _scales(model, index))
        _INSERTED.append(_dendrite_weights(model, index))


def test_trainer_callback_inserts_trained_frozen_correlation_dendrites(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    optimized: list[bool] = []

    class Recorder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            optimized.append(params == {id(p) for p in model.parameters() if p.requires_grad})

    _INSERTED.clear()
    trainer = hf_trainer(tmp_path, max_steps=14, callbacks=[Recorder()])
    objective = _RecordedCorrelation(candidates=2, epochs=4, samples=64)
    callback = DendriteCallback(capacity_test=True, objective=objective).attach(trainer)
    trainer.train()
    assert [h["action"] for h in callback.growth.history][:3] == ["add", "add", "add"]
    assert callback.growth.schedule.switches and all(optimized)  # frozen dendrites stay out of the optimizer
    _assert_frozen_and_scales_trained(trainer.model, _INSERTED)


def test_lightning_callback_inserts_trained_frozen_correlation_dendrites(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from dendrite_convert.integrations.lightning import DendriteCallback

    assert DendriteCallback(objective="correlation").growth.objective == Correlation()
    _INSERTED.clear()
    callback = DendriteCallback(capacity_test=True, objective=_RecordedCorrelation(candidates=2, epochs=4, samples=64))
    module = lightning_fit(tmp_path, callback, max_epochs=5)
    assert [h["action"] for h in callback.growth.history][:3] == ["add", "add", "add"]
    assert callback.growth.schedule.config.dendrite_phase_epochs == 1
    _assert_frozen_and_scales_trained(module, _INSERTED)
