"""Closed-form dendrites on grouped and depthwise convs: each group is fitted as it would be alone, its dendrite
removes the error its inputs explain, and the grown dendrites fold and export exactly."""

import copy

import pytest
import torch
from torch import nn

from dendrite_convert import DendriteConfig, ExportConfig, convert, dendrite_layers, export
from dendrite_convert.exporting.fold import fold_model
from dendrite_convert.training.objectives.closed_form_fit import record_statistics
from dendrite_convert.training.objectives.closed_form_growth import ClosedFormConfig, _fit, add_closed_form_dendrites

FIRST = ClosedFormConfig(order=1)


def _mse(model):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


class _Halves(nn.Module):
    """Two ungrouped convs on the two halves of the channels: what a conv of groups=2 computes."""

    def __init__(self, grouped: nn.Conv2d):
        super().__init__()
        self.a, self.b = (nn.Conv2d(2, 3, 3, padding=1) for _ in range(2))
        with torch.no_grad():
            for i, half in enumerate((self.a, self.b)):
                half.weight.copy_(grouped.weight[3 * i:3 * i + 3])
                half.bias.copy_(grouped.bias[3 * i:3 * i + 3])

    def forward(self, x):
        return torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)


@pytest.mark.parametrize("order", [1, 2])
def test_a_grouped_conv_is_fitted_as_its_groups_would_be_alone(order):
    g = torch.Generator().manual_seed(0)
    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    halves = _Halves(grouped)
    x, y = torch.randn(64, 4, 5, 5, generator=g), torch.randn(64, 6, 5, 5, generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model, split = convert(nn.Sequential(grouped), DendriteConfig()).model, convert(halves, DendriteConfig()).model
    stats = record_statistics(model, batches, _mse(model), dendrite_layers(model), curvature={"0"})["0"]
    alone = record_statistics(split, batches, _mse(split), dendrite_layers(split), curvature={"a", "b"})
    assert stats.groups == 2 and torch.allclose(stats.group(1).xx, alone["b"].xx, rtol=1e-12)
    fit = _fit(stats, order == 2, None, 1e-3, None)
    parts = [_fit(alone[h], order == 2, None, 1e-3, None) for h in "ab"]
    expected = torch.cat([p.weight for p in parts])
    if order == 2:  # a direction's sign is arbitrary
        expected = expected * torch.sign((fit.weight * expected).sum(1, keepdim=True))
    assert fit.weight.shape == (6, 18) and torch.allclose(fit.weight, expected, atol=1e-8)
    assert abs(fit.gain - sum(p.gain for p in parts)) < 1e-6 * fit.gain  # e: float32 convs, computed apart
    assert torch.allclose(fit.row_var, torch.cat([p.row_var for p in parts]))


@pytest.mark.parametrize("groups", [1, 2, 6])  # 6: depthwise
def test_conv_target_gets_a_dendrite_of_its_groups_that_removes_its_error(groups):
    """y* = W * x + b + s sigmoid(V * x), W and V grouped convs: the student has W and b (absorbing the
    residual's mean), so its error is an exact function of the patches its groups see. (The fit is exact, see
    above; the conservative line search takes 30-40 % of the loss here, not the 99.9 % a longer step would.)"""
    g = torch.Generator().manual_seed(1)
    conv = lambda: nn.Conv2d(6, 6, 3, padding=1, groups=groups)  # noqa: E731
    student, hidden = nn.Sequential(conv()), conv()
    x = torch.randn(256, 6, 5, 5, generator=g)
    with torch.no_grad():
        residual = 2 * torch.sigmoid(hidden(x))
        y = student(x) + residual
        student[0].bias += residual.mean((0, 2, 3))
    model = convert(student, DendriteConfig()).model
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    report = add_closed_form_dendrites(model, batches, _mse(model), FIRST)["0"]
    dendrite = dendrite_layers(model)["0"].dendrite_layers[0]
    assert report.grown and report.loss_after < 0.8 * report.loss_before
    assert dendrite.groups == groups and dendrite.weight.shape == (6, 6 // groups, 3, 3)


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_closed_form_dendrites_of_a_depthwise_cnn_fold_and_export_exactly(tmp_path, layout):
    """Grown dendrites of grouped, depthwise and pointwise convs (with BatchNorm) go through the fold and run in
    onnxruntime as the model computes them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))
    converted = convert(net, DendriteConfig(), example_inputs=[{"shape": [2, 3, 8, 8]}])
    model = converted.model
    x, labels = torch.randn(128, 3, 8, 8), torch.randint(0, 3, (128,))
    batches = [(x[i:i + 32], labels[i:i + 32]) for i in range(0, 128, 32)]
    reports = add_closed_form_dendrites(model, batches,
                                        lambda b: nn.functional.cross_entropy(model(b[0]), b[1]))
    assert reports["3"].order and reports["6"].order and not reports["3"].reason.startswith("grouped")
    grown = [name for name, r in reports.items() if r.grown]
    assert grown, {name: r.reason for name, r in reports.items()}
    exact = copy.deepcopy(model).double().eval()  # the fold's algebra, without float32's rounding
    probe = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert float((fold_model(exact, gemm_layout=layout)(probe) - exact(probe)).abs().max()) < 1e-10
    # float32: the second-order dendrite of the logits layer cancels large linear parts (|s| ~ 150 here), so the
    # model itself is only good to about 1e-4 in float32, and the export is verified at the default tolerance
    report = export(converted, tmp_path / "m.onnx", ExportConfig(gemm_layout=layout, latency=False))
    assert report.verify.ok and (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("curvature", [False, True])
@pytest.mark.parametrize("groups", [None, 4])
def test_the_memory_budget_counts_what_the_statistics_hold(curvature, groups):
    from dendrite_convert.training.objectives.closed_form_fit import TargetStatistics

    stats = TargetStatistics.empty(18, 3, curvature, groups)
    held = sum(t.numel() * t.element_size() for t in (stats.sum_x, stats.sum_e, stats.xx, stats.xe, stats.exx)
               if t is not None)
    assert TargetStatistics.nbytes(18, 3, curvature, groups) == held
