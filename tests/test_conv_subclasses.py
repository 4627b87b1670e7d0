"""Issue 19 item 1: conv subclasses that compute their convolution in forward are never folded as plain convs.

timm is not a dependency here, so its two offenders are rewritten in-test as timm writes them: ScaledStdConv2d
(NF-ResNets) standardises its weight in forward, Conv2dSame (TF-ported EfficientNets) pads by the input size.
They are left without dendrites, listed as skipped with the reason, and exported faithfully as model code.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dendrite_convert as dc


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d: weight standardised per output channel, times a learned gain."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=1, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.gain = nn.Parameter(torch.full((out_channels, 1, 1, 1), 1.5))
        self.scale, self.eps = self.weight[0].numel() ** -0.5, eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TensorFlow 'SAME' padding computed from the input size in forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=2):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pad = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((pad // 2, pad - pad // 2))
        x = F.pad(x, [*pads[1], *pads[0]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = ScaledStdConv2d(3, 8, 3)
        self.same = Conv2dSame(8, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.same(F.relu(self.std(x)))).mean((2, 3)))


def test_subclasses_are_skipped_with_the_reason_and_convert_exactly():
    model = Net().eval()
    x = torch.randn(2, 3, 9, 9)
    reference = model(x)
    converted = dc.convert(model, dc.DendriteConfig(dendrites=1))
    assert [t.name for t in converted.report.targets] == ["head"]
    skipped = {s.name: s.reason for s in converted.report.skipped}
    assert "ScaledStdConv2d computes its output in its own forward" in skipped["std"]
    assert "Conv2dSame computes its output in its own forward" in skipped["same"]
    assert type(converted.model.std) is ScaledStdConv2d and type(converted.model.same) is Conv2dSame
    assert torch.equal(converted.model.eval()(x), reference)


@pytest.mark.parametrize("layer", [ScaledStdConv2d(3, 8, 3), Conv2dSame(3, 8, 3)], ids=["std", "same"])
def test_the_plain_conv_math_differs_from_theirs(layer):
    """Why they are refused: a plain nn.Conv2d with their weight and hyper-parameters computes something else."""
    plain = nn.Conv2d(3, 8, 3, stride=layer.stride, padding=layer.padding)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(1, 3, 9, 9)
    ours, theirs = plain(x), layer(x)
    assert ours.shape != theirs.shape or (ours - theirs).abs().max() > 0.1


def test_a_model_with_them_exports_with_parity(tmp_path):
    from conftest import randomize_dendrites

    converted = dc.convert(Net(), dc.DendriteConfig(dendrites=2), example_inputs=[{"shape": [2, 3, 9, 9]}])
    converted.model.eval()
    randomize_dendrites(converted.model)
    report = dc.export(converted, tmp_path / "m.onnx", dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="separate",
                                                                        latency=False))
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    assert [r.name for r in report.folds] == ["head"]
