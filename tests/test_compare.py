"""Baseline comparison (issue 8): statistics against scipy, and a real digits comparison."""

import csv
import json
from pathlib import Path

import pytest

from dendrite_convert.training.compare import cohens_d, compare, render, summarize, untestable, welch_p_value

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


def test_regular_case_uses_student_t_and_reports_it():
    stats = pytest.importorskip("scipy.stats")
    dendrites, baseline = [93.1, 93.6, 93.9, 93.4], [92.5, 92.9, 92.6]
    result = summarize(_runs(dendrites, baseline))
    expected = stats.ttest_ind(dendrites, baseline, equal_var=False).pvalue
    assert result.untestable is None and result.p_value == pytest.approx(expected, rel=1e-12) and result.p_value < 0.05
    assert result.beyond_noise is True
    assert f"Welch's t-test p = {expected:.3g}" in _rendered(result)


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy's own reference, on a constant arm
def test_one_sided_zero_spread_is_still_a_welch_test():
    stats = pytest.importorskip("scipy.stats")
    a, b = [90.0, 90.0, 90.0], [89.0, 90.5, 89.5]
    assert untestable(a, b) is None
    assert welch_p_value(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)


@pytest.mark.parametrize("dendrites,baseline,words", [
    ([96.5, 96.5, 96.5], [96.5, 96.5, 96.5], "same scores on every seed"),          # equal arms, no spread
    ([91.0, 92.0, 93.0], [93.0, 91.0, 92.0], "same scores on every seed"),          # equal arms, with spread
    ([97.0, 97.0, 97.0], [96.5, 96.5, 96.5], "no seed-to-seed spread in either arm"),  # was "p = 0 ... beyond noise"
    ([97.0], [96.5], "at least 2 seeds in both arms"),                              # one seed
    ([97.0, 96.0], [], "at least 2 seeds in both arms"),                            # no baseline
])
def test_degenerate_comparisons_say_so_instead_of_a_p_value(dendrites, baseline, words):
    result = summarize(_runs(dendrites, baseline))
    assert result.p_value is None and result.beyond_noise is None and result.effect_size is None
    assert words in result.untestable
    text = _rendered(result)
    assert "no test" in text and words in text.replace("\n", " ")
    assert "beyond seed-to-seed noise" not in text and "p = 0" not in text


def _runs(dendrites: list[float], baseline: list[float]) -> list[tuple]:
    """(arm, seed, run dir, summary.json) as `compare` reads them from finished runs."""
    summary = {"best_val": 0.0, "params": 100, "dendrites": 1, "epochs": 5, "wall_seconds": 1.0, "maximize": True}
    return [(arm, seed, Path(f"{arm}/seed_{seed}"), summary | {"test_at_best": score})
            for arm, scores in (("dendrites", dendrites), ("baseline", baseline)) for seed, score in enumerate(scores)]


def _rendered(result) -> str:
    from rich.console import Console

    console = Console(record=True, width=200)
    render(result, console)
    return console.export_text()


@pytest.mark.slow
def test_digits_three_seeds_with_baseline_agrees_with_summaries(tmp_path):
    import time

    from dendrite_convert.conversion.consent import Consent
    from dendrite_convert.training.trainer import TrainConfig

    converted = _digits_converted(tmp_path)
    start = time.perf_counter()
    factory = Consent(factory=str(ROOT / "examples/digits/model.py") + ":build")  # named again (consent rule)
    result = compare(converted, ROOT / "examples/digits/adapter.py", tmp_path / "cmp",
                     TrainConfig(patience=5, max_epochs=40), seeds=3, baseline=True, jobs=2, consent=factory)
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
    assert [a["arm"] for a in data["arms"]] == ["dendrites", "baseline"]
    # 3 epochs are too few to keep a dendrite: both arms are the same runs, which is said, not tested (p was 1)
    assert all(r["dendrites"] == 0 for r in data["runs"]) and data["p_value"] is None
    assert "no test: both arms gave the same scores on every seed" in result.stderr
    assert "Welch's t-test p =" not in result.stderr
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "baseline", "comparison.csv", "comparison.json", "comparison.png", "dendrites"]
    again = CliRunner().invoke(app, [str(converted), "--adapter", str(ROOT / "examples/digits/adapter.py"),
                                     "-o", str(tmp_path / "cmp"), "--seeds", "2"])
    assert again.exit_code == 2 and "--force" in again.stderr
