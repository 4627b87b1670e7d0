"""Low-rank dendrites: same contract as full ones, parameters as the formula predicts."""

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from dendrite_convert.core.layers import added_parameters, count_parameters, dendrite_class_for


@pytest.mark.parametrize("base,shape,rank,expected", [
    (nn.Linear(64, 32), (4, 64), 4, 4 * 64 + 32 * 4 + 32),
    (nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6), 4, 4 * 16 * 9 + 32 * 4 + 32),
    (nn.Conv1d(8, 16, 5, stride=2, bias=False), (2, 8, 20), 2, 2 * 8 * 5 + 16 * 2),
])
def test_low_rank_dendrite_parameters_and_contract(base, shape, rank, expected):
    layer = dendrite_class_for(base)(base, rank=rank)
    x = torch.randn(shape)
    y0 = layer(x)
    before = count_parameters(layer)
    d = layer.add_dendrite()
    assert isinstance(d, nn.Sequential) and d[0].weight.shape[0] == rank
    assert torch.equal(layer(x), y0)  # zero-scale start
    channels = layer.out_channels
    assert count_parameters(layer) - before == expected + channels  # + its scale
    assert added_parameters(base, rank) == expected
    assert d(x).shape == base(x).shape
    with torch.no_grad():
        layer.dendrite_scales[0].fill_(1.0)
    assert not torch.equal(layer(x), y0)


def test_low_rank_falls_back_to_a_full_copy_when_not_cheaper():
    layer = dendrite_class_for(nn.Linear(4, 4))(nn.Linear(4, 4), rank=3)
    assert isinstance(layer.add_dendrite(), nn.Linear)
    grouped = nn.Conv2d(8, 8, 3, groups=4)
    assert isinstance(dendrite_class_for(grouped)(grouped, rank=2).add_dendrite(), nn.Conv2d)


def test_rank_is_recorded_and_rebuilt(tmp_path):
    from fixtures.models import mlp

    converted = dc.convert(mlp(32), dc.DendriteConfig(dendrites=1, rank=2), factory="fixtures.models:mlp",
                           factory_kwargs={"width": 32})
    converted.model.eval()
    x = torch.randn(3, 12)
    from conftest import randomize_dendrites

    randomize_dendrites(converted.model)
    expected = converted.model(x)
    loaded = dc.load(converted.save(tmp_path / "lr"), factory="fixtures.models:mlp").eval()
    assert isinstance(loaded[0].dendrite_layers[0], nn.Sequential)
    assert torch.equal(loaded(x), expected)


def _randomized(model, config, bn=False):
    from conftest import randomize_dendrites

    converted = dc.convert(model, config)
    converted.model.eval()
    randomize_dendrites(converted.model)
    if bn:
        with torch.no_grad():
            for m in converted.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
    return converted


@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
@pytest.mark.parametrize("kind", ["mlp", "cnn+bn"])
def test_low_rank_fold_matches_unfolded(kind, activation):
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 6)), torch.randn(5, 24)
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))
        x = torch.randn(2, 3, 8, 8)
    converted = _randomized(model, dc.DendriteConfig(dendrites=3, rank=2, activation=activation), bn=True)
    reference = converted.model(x)
    concat = dc.fold_model(converted.model, gemm_layout="concat")
    folded = dc.fold_model(converted.model)
    assert not dc.dendrite_layers(folded)
    torch.testing.assert_close(folded(x), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(concat(x), reference, rtol=0, atol=1e-5)
    first = folded[0]
    if activation == "identity":  # a low-rank stack still folds exactly into one plain layer
        assert isinstance(first, (nn.Linear, nn.Conv2d))
    else:  # each dendrite stays two small layers: in -> rank -> out
        assert [tuple(b[0].weight.shape[:2]) for b in first.branches] == [(2, first.main.weight.shape[1])] * 3
        # concat: the first factors join the main layer, the second factors run on their slices
        assert concat[0].widths == [first.out_channels, 2, 2, 2] and len(concat[0].tails) == 3


def test_low_rank_adds_what_the_formula_predicts_and_exports(tmp_path):
    """Parameters and FLOPs of the folded model, and onnxruntime parity, for rank-R dendrites."""
    from dendrite_convert.exporting.latency import count_flops

    n_in, n_out, rank, k, batch = 64, 48, 4, 3, 8
    base = nn.Sequential(nn.Linear(n_in, n_out))
    converted = _randomized(base, dc.DendriteConfig(dendrites=k, rank=rank))
    x = torch.randn(batch, n_in)
    folded = dc.fold_model(converted.model)
    plain = n_in * n_out + n_out
    per_dendrite = added_parameters(nn.Linear(n_in, n_out), rank)  # rank*in + out*rank + out
    assert per_dendrite == rank * n_in + n_out * rank + n_out
    cascade_rows = k * (k - 1) // 2
    assert dc.count_parameters(folded) == plain + k * per_dendrite + (k + cascade_rows) * n_out
    assert count_flops(folded, (x,)) == 2 * batch * (n_in * n_out + k * (rank * n_in + n_out * rank))
    # the layout `folded` has: "auto" would time both and may pick concat, whose GEMM carries zero biases
    config = dc.ExportConfig(input_shape=[2, n_in], atol=1e-5, rtol=1e-5, gemm_layout="separate")
    report = dc.export(converted, tmp_path / "lr.onnx", config)
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    rows, timed = {row.name: row for row in report.latency}, report.latency_inputs[0][0]  # the table shows them
    assert rows["onnxruntime"].flops == 2 * timed * (n_in * n_out + k * (rank * n_in + n_out * rank))
    assert rows["onnxruntime"].params == rows["folded torch"].params == dc.count_parameters(folded)
