"""dendrite-train end to end on digits: outputs agree with each other, dendrites help, resume after SIGKILL."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dendrite_convert import TrainConfig, convert, load, load_converted, train
from dendrite_convert.training.adapter import load_adapter

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
ADAPTER = str(DIGITS / "adapter.py")
BIN = Path(sys.executable).parent




@pytest.fixture(scope="module")
def digits_converted(tmp_path_factory):
    """The digits MLP (width 8) as a converted-model directory, rebuilt from examples/digits/model.py."""
    sys.path.insert(0, str(DIGITS))
    from model import build

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("digits") / "converted"
    torch.save(build(8), path.parent / "digits.pt")  # torch classes only: its directories load without a trust flag
    convert(path.parent / "digits.pt").save(path)
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def num(text):
    return None if text == "" else float(text)


def test_outputs_agree_with_each_other(digits_converted, tmp_path):
    out = tmp_path / "run"
    summary = train(digits_converted, ADAPTER, out, TrainConfig(switch_every=2, max_dendrites=2, max_epochs=7))
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["epoch", "phase", "dendrites", "params", "train_loss", "val", "test", "lr", "seconds",
                            "peak_mem_mb"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == len(rows) and [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    best = rows[summary["best_epoch"] - 1]
    assert (num(best["val"]), num(best["test"]), int(best["params"])) == (
        summary["best_val"], summary["test_at_best"], summary["params"])
    assert summary["dendrites"] == int(best["dendrites"])
    assert summary["objective"] == "gradient" and summary["base_params"] == int(rows[0]["params"]) == 682
    # Each switch adds one dendrite per target: 3 targets of 64->8, 8->8, 8->10 = (520 + 72 + 80) + 3 * 26 scales/cascade
    dendrites = [int(r["dendrites"]) for r in rows]
    assert dendrites[:2] == [0, 0] and max(dendrites) >= 1
    one = next(int(r["params"]) for r in rows if r["dendrites"] == "1")
    assert one == 682 + 682 + 26

    # best/ is a converted-model directory with the summary's params, and reproduces best_val on val_data.
    model = load(out / "best")
    assert sum(t.numel() for t in [*model.parameters(), *model.buffers()]) == summary["params"]
    adapter = load_adapter(ADAPTER)
    model.eval()
    with torch.no_grad():
        correct = sum(adapter.score(model(x), (x, y)) * len(y) for x, y in adapter.val_data())
    assert abs(correct / len(adapter.val_data().dataset) - summary["best_val"]) < 1e-6

    # best_test_scores.csv: one row per accepted architecture, increasing params, each its best val and test there.
    best_rows = read_csv(out / "best_test_scores.csv")
    assert [int(r["dendrites"]) for r in best_rows] == list(range(summary["dendrites"] + 1))
    params = [int(r["params"]) for r in best_rows]
    assert params == sorted(set(params))
    for r in best_rows:
        same = [x for x in rows if x["phase"] == "neuron" and x["dendrites"] == r["dendrites"]]
        assert num(r["max_val"]) == max(num(x["val"]) for x in same)
        assert num(r["test"]) == num(rows[int(r["epoch"]) - 1]["test"])

    # training.png exists and marks every switch at its epoch.
    from dendrite_convert.training.plots import draw_training, switch_lines

    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert summary["switches"] and [s["epoch"] for s in summary["switches"]] == [2, 4, 6][: len(summary["switches"])]
    fig = draw_training(rows, summary["switches"], summary["best_epoch"])
    assert switch_lines(fig) == [(s["kind"], float(s["epoch"])) for s in summary["switches"]]

    # checkpoint/ holds model + best directories and the training state.
    ckpt = out / "checkpoint"
    assert load_converted(ckpt / "model").model is not None and (ckpt / "training_state.pt").is_file()
    assert json.loads((ckpt / "state.json").read_text())["schedule"]["done"] is True


def test_capacity_test_adds_three_dendrites(digits_converted, tmp_path):
    summary = train(digits_converted, ADAPTER, tmp_path / "cap", TrainConfig(capacity_test=True, plot=False))
    assert summary["epochs"] == 4 and summary["dendrites"] == 3
    assert "capacity test passed" in summary["stop_reason"]
    model = load(tmp_path / "cap" / "best")
    assert [m.num_dendrites for m in model.modules() if hasattr(m, "num_dendrites")] == [3, 3, 3]


def test_correlation_phase_is_a_row_and_leaves_the_score(digits_converted, tmp_path):
    summary = train(digits_converted, ADAPTER, tmp_path / "c",
                    TrainConfig(objective="correlation", switch_every=2, max_dendrites=1, max_epochs=5, candidates=2,
                                correlation_epochs=2, plot=False))
    rows = read_csv(tmp_path / "c" / "scores.csv")
    assert [r["phase"] for r in rows] == ["neuron", "neuron", "dendrite", "neuron", "neuron"]
    assert summary["switches"][0] == {"epoch": 2, "dendrites": 1, "kind": "add"}
    # The dendrite enters with scale 0 into the best model so far: the validation score is exactly the best's.
    best_before = max(num(r["val"]) for r in rows[:2])
    assert num(rows[2]["val"]) == best_before and rows[2]["train_loss"] == "" and rows[2]["lr"] == ""
    model = load(tmp_path / "c" / "best") if summary["dendrites"] else None
    assert model is None or all(m.num_dendrites == 1 for m in model.modules() if hasattr(m, "num_dendrites"))


def test_checkpoint_best_shares_the_model_files_only_when_it_is_the_model(digits_converted, tmp_path):
    """best/ is hard-linked to model/ when the epoch's model is the best (and once the stop restored it); after a
    switch it holds the best weights themselves, with their own structure; a finished run keeps no optimizer state."""
    run, seen = tmp_path / "run", []

    def look(row):
        ckpt = run / "checkpoint"
        state = torch.load(ckpt / "training_state.pt", weights_only=True)
        seen.append((os.path.samefile(ckpt / "best" / "model.safetensors", ckpt / "model" / "model.safetensors"),
                     load(ckpt / "best").state_dict(), load(ckpt / "model").state_dict(), state["optimizer"] is None))

    train(digits_converted, ADAPTER, run, TrainConfig(switch_every=2, max_dendrites=1, max_epochs=4, plot=False,
                                                      checkpoint_budget=1e9), on_epoch=look)  # a checkpoint every epoch
    assert [(linked, done) for linked, _, _, done in seen][::3] == [(True, False), (True, True)]  # epochs 1 and 4
    linked, best, model, _ = seen[1]  # epoch 2: a dendrite was added to the best model
    assert not linked and not any(".dendrite_" in k for k in best) and any(".dendrite_" in k for k in model)
    assert all(torch.equal(best[k], model[k]) for k in best)  # the grown model starts from the best weights
    (run / "keep.txt").write_text("mine")
    train(digits_converted, ADAPTER, run, TrainConfig(max_epochs=1, plot=False), force=True)  # the old run goes
    assert not [p for p in run.iterdir() if ".dendrite-" in p.name] and (run / "keep.txt").read_text() == "mine"


_RUNS: dict = {}


def _seed_runs(digits_converted, tmp_path, **config):
    key = tuple(sorted(config.items()))
    if key in _RUNS:  # the baseline is shared by both objectives
        return _RUNS[key]
    tests = []
    for seed in range(3):
        s = train(digits_converted, ADAPTER, tmp_path / f"s{seed}-{config.get('objective')}-{config.get('max_dendrites')}",
                  TrainConfig(seed=seed, patience=5, max_epochs=80, plot=False, **config))
        tests.append((s["test_at_best"], s["dendrites"]))
    _RUNS[key] = tests
    return tests


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gradient", "correlation"])
def test_dendrites_beat_no_dendrites_on_digits(digits_converted, tmp_path, objective):
    baseline = _seed_runs(digits_converted, tmp_path, max_dendrites=0)
    dendritic = _seed_runs(digits_converted, tmp_path, objective=objective)
    mean = lambda runs: sum(t for t, _ in runs) / len(runs)  # noqa: E731
    assert all(d == 0 for _, d in baseline)
    assert all(d >= 1 for _, d in dendritic), dendritic
    assert mean(dendritic) > mean(baseline), (objective, baseline, dendritic)


def _cli(*args):
    return [str(BIN / "dendrite-train"), *map(str, args)]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_gives_the_same_numbers(digits_converted, tmp_path):
    args = ["--adapter", ADAPTER, "--objective", "correlation", "--switch-every", "3", "--max-dendrites", "2",
            "--max-epochs", "12", "--seed", "3", "--candidates", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(digits_converted, *args, "-o", full), check=True, env=env, timeout=300)

    proc = subprocess.Popen(_cli(digits_converted, *args, "-o", killed), env=env)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(state.read_text())["rows"]) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    time.sleep(0.03)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(json.loads(state.read_text())["rows"])
    assert 5 <= done < 12
    assert not (killed / "training.png").exists()  # drawn at the end only: this run did not end
    model = load(killed / "best")  # what the killed run kept is a usable model
    assert model(torch.zeros(2, 64)).shape == (2, 10)

    out = subprocess.run(_cli("--resume", killed, "--json", "--quiet", "--adapter", ADAPTER), check=True, env=env, timeout=300,
                         capture_output=True, text=True)
    resumed = json.loads(out.stdout)
    expected = json.loads((full / "summary.json").read_text())
    for key in ("wall_seconds", "peak_mem_mb"):  # measured, not computed
        resumed.pop(key), expected.pop(key)
    assert resumed == expected
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb")} for r in rows]  # noqa: E731
    assert strip(read_csv(killed / "scores.csv")) == strip(read_csv(full / "scores.csv"))
    a, b = load(killed / "best").state_dict(), load(full / "best").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
