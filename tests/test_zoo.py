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
