"""The benchmark command (issue 8) in its reduced CI mode: complete and self-consistent outputs."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_results_quick_mode_is_complete_and_consistent(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/results.py"), "--quick", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    tasks = {r["task"] for r in rows}
    assert len(tasks) == 4
    assert len(rows) == 4 * 5 * 2  # tasks x arms x seeds
    for row in rows:  # every table row is what that run's summary.json says
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert float(row["test_at_best"]) == summary["test_at_best"]
        assert int(row["params"]) == summary["params"] and int(row["dendrites"]) == summary["dendrites"]
        if row["arm"] in ("plain", "plain widened"):
            assert summary["dendrites"] == 0
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        gradient = [int(r["params"]) for r in mine if r["arm"] == "gradient"]
        widened = [int(r["params"]) for r in mine if r["arm"] == "plain widened"]
        assert min(widened) >= sum(gradient) / len(gradient)  # widened to at least the dendritic size
        assert (out / f"{task.split(' ')[0]}.png").stat().st_size > 5_000
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 1 + 20  # header + one line per task and arm


@pytest.mark.slow
def test_closed_form_cost_splits_a_growth_step_on_a_real_cnn():
    from fixtures.timm_import import import_timm

    try:
        import_timm()
    except ImportError as exc:
        pytest.skip(str(exc))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/closed_form_cost.py"), "--model", "test_resnet",
                           "--side", "32", "--samples", "16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    times = dict(re.findall(r"^ {2,4}(\S.*?) {2,}([\d.]+) s ", done.stdout, flags=re.M))
    step, training_pass = float(times.pop("closed-form growth step")), float(times.pop("forward-backward pass over "
                                                                                      "the samples"))
    seconds = {label: float(value) for label, value in times.items()}
    assert set(seconds) == {"statistics (one pass)", "fits", "line searches"} and training_pass > 0
    assert 0 < sum(seconds.values()) <= step  # the parts are inside the step
    assert "x faster)" in done.stdout and "16 samples of 32x32, 16 targets" in done.stdout
