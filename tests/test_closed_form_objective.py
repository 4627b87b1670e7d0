"""The closed-form objective as users run it: `dendrite-train --objective closed-form`, resume, DDP, callbacks."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli.train import app as train_app
from dendrite_convert.training.objectives import OBJECTIVES, make_objective
from dendrite_convert.training.objectives import closed_form as closed_form_module
from dendrite_convert.training.objectives.base import TrainingData
from dendrite_convert.training.objectives.closed_form import ClosedForm
from tests.helpers_callbacks import hf_trainer, lightning_fit, regression_net

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

# A regression whose residual after a small tanh network is a smooth function of its inputs.
ADAPTER = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
_g = torch.Generator().manual_seed(0)
_x = torch.randn(512, 6, generator=_g)
_y = torch.stack([torch.sin(_x[:, :3].sum(1)), _x[:, 3] * _x[:, 4]], 1)
_parts = {"train": slice(0, 256), "val": slice(256, 384), "test": slice(384, 512)}
_data = {k: TensorDataset(_x[s], _y[s]) for k, s in _parts.items()}


def train_data():
    return DataLoader(_data["train"], batch_size=32, shuffle=True)


def val_data():
    return DataLoader(_data["val"], batch_size=128)


def test_data():
    return DataLoader(_data["test"], batch_size=128)


def loss(outputs, batch):
    return (outputs - batch[1]).square().mean()


def optimizer(params):
    return torch.optim.Adam(params, lr=0.01)
'''



@pytest.fixture()
def task(tmp_path):
    """(converted directory, adapter path) of the tiny regression; the model holds torch classes only."""
    adapter = tmp_path / "adapter.py"
    adapter.write_text(ADAPTER)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), tmp_path / "net.pt")
    return dc.convert(tmp_path / "net.pt").save(tmp_path / "conv"), adapter


def _rows(run: Path) -> list[dict]:
    import csv

    with open(run / "scores.csv") as f:
        return list(csv.DictReader(f))


def _drops(records) -> list[tuple[float, float]]:
    """(training loss before, after) of every growth step, from the objective's log lines."""
    found = [re.search(r"training loss (\S+) -> (\S+)", r.getMessage()) for r in records
             if r.name == closed_form_module.__name__]
    return [(float(m[1]), float(m[2])) for m in found if m]


def test_registered_with_its_options_as_fields():
    assert OBJECTIVES["closed-form"] is ClosedForm and ClosedForm.dendrite_phase_epochs == 1
    made = make_objective("closed-form", candidates=3, epochs=5, samples=100)  # TrainConfig's options, by name
    assert made == ClosedForm(samples=100) and made.config.max_samples == 100 and made.config.order == 2
    assert ClosedForm(order=1, top_k=1, min_relative_score=0.5, ridge=0.1).config.top_k == 1
    for bad in ({"order": 3}, {"ridge": 0.0}, {"top_k": 0}, {"min_relative_score": 1.5}, {"samples": 0}):
        with pytest.raises(dc.UsageError) as info:
            ClosedForm(**bad)
        assert info.value.parameter == next(iter(bad))


def test_dendrite_train_inserts_dendrites_that_lower_the_loss_at_once(task, tmp_path, caplog):
    converted, adapter = task
    caplog.set_level(logging.INFO, logger="dendrite_convert")
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--objective", "closed-form", "--switch-every", "4", "--max-dendrites", "2",
                                            "--max-epochs", "11", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["objective"] == "closed-form" and summary["dendrites"] >= 1
    rows = _rows(tmp_path / "run")
    grown_at = [i for i, r in enumerate(rows) if r["phase"] == "dendrite"]
    assert len(grown_at) == 2 and grown_at[0] == 4 and len(rows) == 11
    for i in grown_at:  # the validation score (-loss) right after insertion beats the best model it grew from
        before = max(float(r["val"]) for r in rows[:i])
        assert float(rows[i]["val"]) > before, (i, rows[i]["val"], before)
        assert int(rows[i]["params"]) > int(rows[i - 1]["params"])
    drops = _drops(caplog.records)
    assert len(drops) == 2 and all(after < 0.95 * before for before, after in drops), drops
    best = dc.load(tmp_path / "run" / "best")
    assert all(layer.num_dendrites == summary["dendrites"] for layer in dc.dendrite_layers(best).values())
    scales = [s.abs().max() for layer in dc.dendrite_layers(best).values() for s in layer.dendrite_scales]
    assert all(s > 0 for s in scales)


def test_dendrite_train_options_reach_the_objective(task, tmp_path, caplog):
    """--closed-form-order/-ridge, --grow-top-k/-min-score/-samples set the objective the run grows with."""
    converted, adapter = task
    caplog.set_level(logging.INFO, logger="dendrite_convert")
    options = ["--closed-form-order", "1", "--closed-form-ridge", "0.01", "--grow-top-k", "1", "--grow-min-score", "0.5",
               "--grow-samples", "128"]
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--objective", "closed-form", "--switch-every", "2", "--max-dendrites", "1",
                                            "--max-epochs", "4", "--quiet", *options])
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    made = dc.TrainConfig(**state["config"]).make_objective()  # what a resumed run would grow with, too
    assert made == ClosedForm(order=1, ridge=0.01, top_k=1, min_relative_score=0.5, samples=128)
    grown = [r.getMessage() for r in caplog.records if r.name == closed_form_module.__name__]
    # top-k 1: only the target with the best gain per parameter grew, and it lowered the training loss
    assert len(grown) == 1 and grown[0].startswith("closed-form growth: 1 of 2 targets grew"), grown
    assert "(not grown: other targets gain more per parameter)" in grown[0] and len(_drops(caplog.records)) == 1


@pytest.mark.parametrize("option, value, message", [
    ("--closed-form-order", "3", "Invalid value for '--closed-form-order'"),
    ("--closed-form-ridge", "0", "--closed-form-ridge must be positive, not 0.0."),
    ("--grow-top-k", "0", "Invalid value for '--grow-top-k'"),
    ("--grow-min-score", "1.5", "Invalid value for '--grow-min-score'"),
    ("--grow-samples", "0", "Invalid value for '--grow-samples'"),
])
def test_bad_closed_form_options_are_usage_errors_naming_the_option(task, tmp_path, option, value, message):
    converted, adapter = task
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                            "--objective", "closed-form", option, value], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output
    assert not (tmp_path / "run").exists()


def test_train_config_names_its_own_closed_form_options():
    for bad in ({"closed_form_order": 0}, {"closed_form_ridge": -1.0}, {"grow_top_k": 0}, {"grow_min_score": -0.1}):
        with pytest.raises(dc.UsageError) as info:
            dc.TrainConfig(**bad)
        name = next(iter(bad))
        assert info.value.parameter == name and str(info.value).startswith(f"{name} must be")


def test_resume_gives_the_same_run_bit_for_bit(task, tmp_path):
    """A run stopped after its first closed-form growth and resumed ends exactly as an uninterrupted one."""
    converted, adapter = task
    config = dc.TrainConfig(objective="closed-form", switch_every=3, max_dendrites=2, max_epochs=9, seed=2, plot=False)
    full = dc.train(converted, adapter, tmp_path / "full", config)

    class Stop(Exception):
        pass

    def stop_after_growth(row):
        if row["phase"] == "neuron" and row["dendrites"] == 1:
            raise Stop

    with pytest.raises(Stop):
        dc.train(converted, adapter, tmp_path / "cut", config, on_epoch=stop_after_growth)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert [s["dendrites"] for s in full["switches"]] == [1, 2]
    assert 4 <= len(state["rows"]) < full["switches"][1]["epoch"]  # the resumed run grows the second time
    resumed = dc.train(None, adapter, tmp_path / "cut", resume=True)
    for summary in (full, resumed):
        summary.pop("wall_seconds"), summary.pop("peak_mem_mb")  # measured, not computed
    assert resumed == full and full["dendrites"] >= 1
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb")} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "cut")) == strip(_rows(tmp_path / "full"))
    a, b = dc.load(tmp_path / "cut" / "best").state_dict(), dc.load(tmp_path / "full" / "best").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_comes_from_the_converted_model_and_where_to_grow_limits_the_targets():
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    y = torch.stack([torch.sin(x[:, :3].sum(1)), x[:, 3] * x[:, 4]], 1)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

    def mean_loss(model):
        with torch.no_grad():
            return float(sum((model(a) - b).square().mean() for a, b in batches)) / len(batches)

    for rank, objective, grown in ((1, ClosedForm(order=1), 2), (None, ClosedForm(top_k=1), 1)):
        model = regression_net(rank)
        before = mean_loss(model)
        data = TrainingData(batches, lambda batch: (model(batch[0]) - batch[1]).square().mean())
        objective.grow(model, data)
        layers = list(dc.dendrite_layers(model).values())
        assert sum(layer.num_dendrites for layer in layers) == grown
        assert mean_loss(model) < before
        if rank == 1:  # the first target (6 -> 8) gets the rank-1 dendrite the model was converted for
            first = layers[0].dendrite_layers[0]
            assert isinstance(first, nn.Sequential) and first[0].weight.shape == (1, 6)


# ---- both callbacks --------------------------------------------------------------------------------


@pytest.fixture()
def reports(monkeypatch):
    """Every growth step's per-target reports, as the objective the callback built by name produced them."""
    seen: list[dict] = []
    real = closed_form_module.add_closed_form_dendrites

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(closed_form_module, "add_closed_form_dendrites", recording)
    return seen


def _assert_grown_at_a_lower_loss(reports: list[dict], model: nn.Module) -> None:
    assert len(reports) >= 1
    grown = [r for step in reports for r in step.values() if r.grown]  # a step may grow nothing: its held-out
    assert grown and all(r.loss_after < r.loss_before for r in grown)  # batches (a quarter) found no better step
    assert max(layer.num_dendrites for layer in dc.dendrite_layers(model).values()) >= 1


def test_trainer_callback_grows_closed_form_dendrites(tmp_path, reports):
    pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    trainer = hf_trainer(tmp_path, max_steps=10)
    callback = DendriteCallback(capacity_test=True, objective="closed-form").attach(trainer)
    assert callback.growth.objective == ClosedForm()
    trainer.train()
    assert [h["action"] for h in callback.growth.history][:2] == ["add", "add"]
    _assert_grown_at_a_lower_loss(reports, trainer.model)


def test_lightning_callback_grows_closed_form_dendrites(tmp_path, reports):
    pytest.importorskip("lightning.pytorch")
    from dendrite_convert.integrations.lightning import DendriteCallback

    callback = DendriteCallback(capacity_test=True, objective="closed-form")
    module = lightning_fit(tmp_path, callback, max_epochs=4)
    assert [h["action"] for h in callback.growth.history][:3] == ["add", "add", "add"]
    _assert_grown_at_a_lower_loss(reports, module)


# ---- DDP -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_gloo_run_grows_the_same_dendrites_on_every_rank(tmp_path):
    """Rank 0 fits and inserts; the other rank adds matching dendrites and takes rank 0's weights (the run
    compares the replicas' checksums at the end and fails when they differ)."""
    sys.path.insert(0, str(DIGITS))
    from model import build

    torch.manual_seed(0)
    torch.save(build(8), tmp_path / "digits.pt")
    converted = dc.convert(tmp_path / "digits.pt").save(tmp_path / "conv")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           str(Path(sys.executable).parent / "dendrite-train"), str(converted), "--adapter", str(DIGITS / "adapter.py"),
           "-o", str(run), "--switch-every", "2", "--max-dendrites", "2", "--max-epochs", "7",
           "--objective", "closed-form", "--seed", "5", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["world_size"] == 2 and [s["dendrites"] for s in summary["switches"]][:2] == [1, 2]
    rows = _rows(run)
    first = next(i for i, r in enumerate(rows) if r["phase"] == "dendrite")
    assert float(rows[first]["val"]) > max(float(r["val"]) for r in rows[:first])  # insertion helped at once
    assert dc.dendrite_layers(dc.load(run / "best"))
