"""Issue 19: real timm and transformers architectures through every stage (the zoo's reduced mode)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_real_zoo_passes_every_stage_or_refuses_clearly(tmp_path):
    from fixtures.timm_import import import_timm

    try:
        import_timm()
    except ImportError as exc:
        pytest.skip(str(exc))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import zoo_real

    rows = zoo_real.main(["--quick", "--output", str(tmp_path / "zoo.md")])
    assert [row.name for row in rows] == zoo_real.QUICK
    for row in rows:
        for stage, status in row.status.items():
            assert status == "ok" or status.startswith("refused: "), (row.name, stage, status)  # no exit 5 either
        if row.status["export"] == "ok":
            assert row.onnx_err < 1e-4 and row.export_s < 300, (row.name, row.onnx_err, row.export_s)  # shared CI cores
    assert sum(row.passed for row in rows) >= len(rows) - 1  # Mamba's export may refuse (a loop fixes its length)
    text = (tmp_path / "zoo.md").read_text()
    assert "pass every stage" in text and "Where it goes" in text


class _Scaled(torch.nn.Module):
    """A linear layer times a gain; `reads_weight` computes it from `fc.weight` without calling `fc`."""

    def __init__(self, gain: float):
        super().__init__()
        self.fc, self.gain, self.reads_weight = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.tensor(gain)), False

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.fc.weight, self.fc.bias) if self.reads_weight else self.fc(x)
        return y * self.gain


@pytest.mark.parametrize("gain,reads_weight,dead", [(1.0, False, []), (0.0, False, []), (1.0, True, ["fc"])],
                         ids=["alive", "no error reaches it", "never runs"])
def test_the_zoo_flags_dendrites_without_gradient_only_where_the_base_layer_gets_one(gain, reads_weight, dead):
    """timm zero-initialises NF-Net's `conv3.gain`: no error reaches the layers behind it at first, base or dendrite."""
    import dendrite_convert as dc
    from conftest import randomize_dendrites

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from zoo_real import dead_dendrite_layers

    model = dc.convert(_Scaled(gain), dc.DendriteConfig(dendrites=1)).model
    randomize_dendrites(model)
    model.reads_weight = reads_weight
    model(torch.randn(5, 4)).pow(2).sum().backward()
    layer = model.fc
    assert all(p.grad is None or not p.grad.any() for p in layer.dendrite_scales) == bool(gain == 0 or reads_weight)
    assert dead_dendrite_layers(model) == dead


def test_a_rerun_of_some_models_replaces_their_rows_and_keeps_the_rest(tmp_path):
    """`--only ... --merge` (what a rerun after a fix does): rows come back from the JSON beside the results file,
    the rerun's rows replace theirs, and notes written by hand below '## Notes' survive."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import zoo_real

    results = tmp_path / "zoo.md"
    ok = dict.fromkeys(zoo_real.STAGES, "ok")
    first = [zoo_real.Row("test_resnet", 16, status={**ok, "export": "verification failed: x"}, seconds=60),
             zoo_real.Row("hf:GPT2LMHeadModel", 9, status=ok, onnx_err=1e-7, export_s=5.0, seconds=60)]
    zoo_real._write(results, ["first run"], first, readme=False)
    results.write_text(results.read_text() + "\n## Notes\n\nwritten by hand\n")
    commands, kept = zoo_real._load(results)
    assert commands == ["first run"] and kept["hf:GPT2LMHeadModel"] == first[1]
    kept["test_resnet"] = zoo_real.Row("test_resnet", 16, status=ok, onnx_err=2e-7, export_s=7.0, seconds=60)
    zoo_real._write(results, [*commands, "rerun"], list(kept.values()), readme=False)
    text = results.read_text()
    assert "`first run`; `rerun`" in text and "**2/2 pass every stage" in text and "| exit 5 |" not in text
    assert text.endswith("## Notes\n\nwritten by hand\n") and text.count("## Notes") == 1
