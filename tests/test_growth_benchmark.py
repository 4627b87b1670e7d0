"""The fair growth benchmark (issue 18) in its reduced CI mode, and the function-preserving arms it compares."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

import growth_gromo  # noqa: E402
from growth_arms import add_lora, lora_cost, lora_rank, widen, widen_pairs  # noqa: E402
from tasks import models  # noqa: E402

from dendrite_convert import count_parameters  # noqa: E402


@pytest.mark.parametrize("factory, width, x", [
    ("digits_mlp", 8, torch.randn(6, 64)), ("bars_cnn", 4, torch.randn(6, 1, 12, 12)),
])
def test_widening_and_lora_preserve_the_function_and_add_the_budget(factory, width, x):
    model = getattr(models, factory)(width).eval()
    wide = widen(model, 600, torch.Generator().manual_seed(0)).eval()
    fresh = widen(model, 600, torch.Generator().manual_seed(0), fresh=True).eval()
    rank = lora_rank(model, 600)
    adapted = add_lora(model, rank).eval()
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-5)
        assert torch.allclose(fresh(x), model(x), atol=1e-6)  # the new units' outgoing weights are zero
        assert torch.equal(adapted(x), model(x))
    assert count_parameters(fresh) == count_parameters(wide)
    n = model[0].weight.shape[0]
    new_rows = fresh[0].weight[n:]  # fresh units: none of them a copy of an old one, and not zero
    assert new_rows.abs().sum() > 0 and not any(torch.equal(row, old) for row in new_rows for old in model[0].weight)
    assert len(widen_pairs(model)) == 2
    added = count_parameters(wide) - count_parameters(model)
    assert 400 < added < 800  # the closest whole number of units to 600
    assert count_parameters(adapted) - count_parameters(model) == lora_cost(model, rank)
    # the copies do not stay copies: one training step moves a duplicated unit and its original apart
    first = wide[0].weight
    loss = wide.train()(x).square().sum()
    loss.backward()
    original = next(k for k in range(n) if torch.equal(first[n], first[k]))  # unit n is a copy of `original`
    assert not torch.allclose(first.grad[original], first.grad[n])


def test_gromo_grows_the_mlps_it_builds_with_its_own_neurons():
    assert "Linear/ReLU chains" in growth_gromo.unavailable(models.bars_cnn(4)) or "not installed" in \
        growth_gromo.unavailable(models.bars_cnn(4))
    pytest.importorskip("gromo")
    from dendrite_convert.training.adapter import load_adapter

    adapter = load_adapter(ROOT / "examples" / "digits" / "adapter.py")
    torch.manual_seed(0)
    model = models.digits_mlp(8)
    assert growth_gromo.unavailable(model) is None

    def train_loss(net):
        with torch.no_grad():
            return float(sum(adapter.loss(net(b[0]), b) * len(b[1]) for b in adapter.train_data()))

    grown = growth_gromo.grow(model, 300, adapter)
    wide = widen(model, 300, torch.Generator().manual_seed(0))
    assert [type(m) for m in grown] == [type(m) for m in model]
    assert count_parameters(grown) == count_parameters(wide)  # the units widening adds, found by TINY
    assert train_loss(grown) < 0.95 * train_loss(model)  # its neurons (and step) lower the loss at once


@pytest.mark.slow
def test_growth_quick_mode_is_complete_and_consistent(tmp_path):
    out = tmp_path / "results"
    tasks = ["wine (MLP)", "bars (CNN)"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/growth.py"), "--quick", "-o", str(out), "--tasks",
                           *tasks, "--jobs", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bars (CNN): gromo arm skipped: " in done.stderr  # gromo grows MLPs only (or is not installed)
    with_gromo = importlib.util.find_spec("gromo") is not None
    arms = {"wine (MLP)": 14 + 2 * with_gromo, "bars (CNN)": 14}  # (arm, budget) pairs per task
    rows = list(csv.DictReader((out / "growth.csv").open()))
    assert len(rows) == sum(arms.values()) * 2  # x seeds
    for task in tasks:
        for seed in ("0", "1"):
            mine = [r for r in rows if r["task"] == task and r["seed"] == seed]
            assert len(mine) == arms[task]
            assert len({r["start_test"] for r in mine}) == 1  # every arm starts from the same saved model
            by_arm = {(r["arm"], r["budget"]): r for r in mine}
            for arm in ("continue", "widen", "widen-random", "lora", "gradient", "correlation"):  # function-preserving insertions
                assert abs(float(by_arm[(arm, "full")]["insertion_loss_drop"])) < 1e-4
            assert int(by_arm[("continue", "full")]["added_params"]) == 0
            full = int(by_arm[("gradient", "full")]["added_params"])
            assert int(by_arm[("correlation", "full")]["added_params"]) == full
            assert 0 < int(by_arm[("closed-form", "full")]["added_params"]) <= full
            assert int(by_arm[("gradient", "low-rank")]["added_params"]) < full
            # closed-form insertion lowers the training loss at once (it is line-searched on training batches)
            assert float(by_arm[("closed-form 1st", "full")]["insertion_loss_drop"]) > 0
            if ("gromo", "full") in by_arm:  # TINY's neurons, at widening's units, lower the loss at once too
                assert 0 < int(by_arm[("gromo", "full")]["added_params"]) <= int(by_arm[("widen", "full")]["added_params"])
                assert float(by_arm[("gromo", "full")]["insertion_loss_drop"]) > 0
    table = (out / "growth.md").read_text()
    overview = len({(r["budget"], r["arm"]) for r in rows})  # the README's table: one line per budget and arm
    assert table.count("\n| ") == 1 + overview + 1 + sum(arms.values())  # and one per task, budget and arm
    assert table.count("\n- ") == len(tasks) * 2 + 1  # one verdict per task and budget, and the goal
    assert "- **Goal** (" in table and "reached on " in table
    assert (out / "growth.png").stat().st_size > 20_000


def test_rows_of_a_run_of_some_arms_replace_their_own_rows_only():
    from growth_report import merged

    def row(task, arm, seed, score):
        return {"task": task, "budget": "full", "arm": arm, "seed": seed, "test_at_best": score}

    old = [row(task, arm, seed, 1.0) for task in ("wine (MLP)", "digits (MLP)") for seed in (0, 1)
           for arm in ("continue", "closed-form")]
    new = [row("wine (MLP)", "closed-form", seed, 2.0) for seed in (0, 1, 2)]
    rows = merged(old, new, ["digits (MLP)", "wine (MLP)"])
    assert len(rows) == len(old) + 1  # seed 2 is new, seeds 0 and 1 replaced
    assert [r["test_at_best"] for r in rows if r["arm"] == "closed-form" and r["task"] == "wine (MLP)"] == [2.0] * 3
    assert all(r["test_at_best"] == 1.0 for r in rows if r["arm"] == "continue" or r["task"] == "digits (MLP)")
    assert [r["task"] for r in rows][:4] == ["digits (MLP)"] * 4  # the tables keep the tasks' order


def test_growth_variants_compare_dendrite_variants_with_new_neurons_on_the_same_budget():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/growth_variants.py"), "--task", "digits (MLP)",
                           "--seeds", "1", "--extra-epochs", "1", "--quick"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    added = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert added["continue"] == 0
    budget = added["gradient"]  # one full dendrite per target
    assert added["widen-random"] > 0.5 * budget and added["gradient, fresh features"] == budget
    # the rank-matched dendrites (in -> R -> out) spend no more than the budget, and on digits' width-8 layers
    # a full dendrite is already the cheapest shape at rank 8, so R < 8 and they cost less
    assert 0 < added["closed-form, rank-matched"] <= budget
    assert added["gradient, fresh features, rank-matched"] < budget
