"""Baseline comparison (issue 8): statistics against scipy, and a real digits comparison."""

import csv
import json
from pathlib import Path

import pytest

from dendrite_convert.training.compare import cohens_d, compare, welch_p_value

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("a,b", [
    ([1.0, 2.0, 3.0], [2.5, 3.5, 4.0, 5.0]),
    ([90.1, 90.4, 89.8, 90.0], [90.2, 90.9, 90.5]),
    ([0.5, 0.51], [0.2, 0.9, 0.1, 0.7, 0.4]),
])
def test_welch_and_cohen_match_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    assert welch_p_value(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    pooled = ((len(a) - 1) * stats.tvar(a) + (len(b) - 1) * stats.tvar(b)) / (len(a) + len(b) - 2)
    assert cohens_d(a, b) == pytest.approx((sum(a) / len(a) - sum(b) / len(b)) / pooled**0.5)


@pytest.mark.slow
def test_digits_three_seeds_with_baseline_agrees_with_summaries(tmp_path):
    import time

    from dendrite_convert.training.trainer import TrainConfig

    converted = _digits_converted(tmp_path)
    start = time.perf_counter()
    result = compare(converted, ROOT / "examples/digits/adapter.py", tmp_path / "cmp",
                     TrainConfig(patience=5, max_epochs=40), seeds=3, baseline=True, jobs=2)
    assert time.perf_counter() - start < 300
    assert result.score_name == "test_at_best" and result.p_value is not None and 0 <= result.p_value <= 1
    rows = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert len(rows) == 6 and {r["arm"] for r in rows} == {"dendrites", "baseline"}
    for row in rows:  # the table agrees with every per-seed summary.json it wrote
        summary = json.loads((Path(row["run"]) / "summary.json").read_text())
        assert float(row["score"]) == summary["test_at_best"]
        assert int(row["params"]) == summary["params"] and int(row["dendrites"]) == summary["dendrites"]
    baseline = [r for r in rows if r["arm"] == "baseline"]
    assert {int(r["dendrites"]) for r in baseline} == {0}
    means = {a.arm: a.mean for a in result.arms}
    for arm in ("dendrites", "baseline"):
        scores = [float(r["score"]) for r in rows if r["arm"] == arm]
        assert means[arm] == pytest.approx(sum(scores) / 3)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


def _digits_converted(tmp_path: Path) -> Path:
    import importlib.util

    import torch

    import dendrite_convert as dc

    spec = importlib.util.spec_from_file_location("digits_model", ROOT / "examples/digits/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.build().state_dict(), tmp_path / "model.pt")
    return dc.convert(tmp_path / "model.pt", factory=str(ROOT / "examples/digits/model.py") + ":build").save(
        tmp_path / "converted")


def test_cli_seeds_and_baseline(tmp_path):
    from typer.testing import CliRunner

    from dendrite_convert.cli.train import app

    converted = _digits_converted(tmp_path)
    result = CliRunner().invoke(app, [str(converted), "--adapter", str(ROOT / "examples/digits/adapter.py"),
                                      "-o", str(tmp_path / "cmp"), "--seeds", "2", "--baseline", "--max-epochs", "3",
                                      "--patience", "1", "--json", "--factory", str(ROOT / "examples/digits/model.py") + ":build"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["arm"] for a in data["arms"]] == ["dendrites", "baseline"] and data["p_value"] is not None
    assert "Welch's t-test p =" in result.stderr
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "baseline", "comparison.csv", "comparison.json", "comparison.png", "dendrites"]
    again = CliRunner().invoke(app, [str(converted), "--adapter", str(ROOT / "examples/digits/adapter.py"),
                                     "-o", str(tmp_path / "cmp"), "--seeds", "2"])
    assert again.exit_code == 2 and "--force" in again.stderr
