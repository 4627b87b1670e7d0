"""The cost-frontier benchmark (issue 9) in its reduced CI mode: complete, consistent outputs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_frontier_quick_mode(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/cost_frontier.py"), "--quick", "--ranks", "1", "--fractions", "0.25",
                           "--tasks", "digits (MLP)", "-o", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert {r["arm"] for r in rows} == {"plain", "full", "rank 1", "channels 0.25", "plain widened"} and len(rows) == 10
    for row in rows:
        summary = json.loads((tmp_path / row["run"] / "summary.json").read_text())
        assert float(row["test_at_best"]) == summary["test_at_best"] and int(row["dendrites"]) == summary["dendrites"]
        assert float(row["ort_ms"]) > 0
    plain = int(next(r["flops"] for r in rows if r["arm"] == "plain"))
    per_dendrite = {arm: [(int(r["flops"]) - plain) / int(r["dendrites"]) for r in rows
                          if r["arm"] == arm and int(r["dendrites"]) > 0] for arm in ("full", "rank 1", "channels 0.25")}
    assert all(per_dendrite.values())
    assert max(per_dendrite["rank 1"]) < 0.25 * min(per_dendrite["full"])  # a rank-1 dendrite is far cheaper
    # a quarter of the channels: about a quarter of the FLOPs (ceil rounding makes it a little more)
    assert 0.2 < max(per_dendrite["channels 0.25"]) / min(per_dendrite["full"]) < 0.3
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "frontier.md").read_text().count("\n| digits") == 5


def test_gain_share_interval_reflects_seed_noise():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cost_frontier import gain_share_interval

    assert gain_share_interval([90.0] * 5, [92.0] * 5, [91.5] * 5) == (0.75, 0.75)  # no noise: the exact share
    plain, full = [89.0, 91.0] * 3, [91.0, 93.0] * 3
    assert gain_share_interval(plain, full, [90.5, 92.5] * 3) == (0.75, 0.75)  # a seed effect shared by all arms
    low, high = gain_share_interval(plain, full, [92.5, 90.5] * 3)  # arm noise as large as the gain
    assert low < 0.75 < high and high - low > 0.5
