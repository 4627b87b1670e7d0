"""Architecture coverage (issue 10): every family of the peer's catalogue converts with exact outputs.

Training (--capacity-test) and ONNX export of the same zoo are added once those commands land.
"""

import pytest
import torch

import dendrite_convert as dc
from fixtures.zoo import ZOO


def _out(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", list(ZOO))
def test_family_converts_exactly_with_the_expected_targets(family):
    build, make_inputs, expected = ZOO[family]
    model = build().eval()
    inputs = make_inputs()
    reference = _out(model, inputs)
    converted = dc.convert(model, dc.DendriteConfig(dendrites=1))
    names = {t.name for t in converted.report.targets}
    if expected is not None:
        assert names == expected
    assert torch.equal(_out(converted.model.eval(), inputs), reference)
    unsupported = {s.type for s in converted.report.skipped if "not supported" in s.reason}
    assert unsupported <= {"MultiheadAttention", "LSTM", "Embedding"}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_family_trains_through_a_capacity_test(family, tmp_path):
    """dendrite-train --capacity-test: three dendrites are added to every target and trained; losses stay finite."""
    import math

    from dendrite_convert.training.trainer import TrainConfig, train
    from fixtures.zoo import zoo_adapter

    build, _, _ = ZOO[family]
    converted = dc.convert(build(), factory=f"fixtures.zoo:{build.__name__}")
    summary = train(converted, zoo_adapter(family), tmp_path / "run", TrainConfig(capacity_test=True, max_epochs=10))
    assert [s["dendrites"] for s in summary["switches"]] == [1, 2, 3]
    assert summary["stop_reason"].startswith("capacity test passed")
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()[1:]
    assert all(math.isfinite(float(r.split(",")[4])) for r in rows if r.split(",")[4])
    best = dc.load(tmp_path / "run" / "best", trust_code=True)
    assert {layer.num_dendrites for layer in dc.dendrite_layers(best).values()} == {3}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_family_exports_to_onnx_within_1e_5(family, tmp_path):
    """3 dendrites with random scales and cascade, folded, exported, and run in onnxruntime at other sizes."""
    from conftest import randomize_dendrites
    from fixtures.zoo import example_specs

    build, _, _ = ZOO[family]
    converted = dc.convert(build(), dc.DendriteConfig(dendrites=3), factory=f"fixtures.zoo:{build.__name__}",
                           example_inputs=example_specs(family))
    converted.model.eval()
    randomize_dendrites(converted.model)
    report = dc.export(converted, tmp_path / "model.onnx", dc.ExportConfig(atol=1e-5, rtol=1e-5, latency=False))
    assert report.verify.ok
    assert max(o.max_abs for o in report.verify.outputs) <= 1e-5
    assert report.verify.input_shapes != [s["shape"] for s in example_specs(family)]  # checked at other sizes
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model.onnx.data").exists()
