"""Low-rank dendrites: same contract as full ones, parameters as the formula predicts."""

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from dendrite_convert.cheap import added_parameters
from dendrite_convert.layers import count_parameters, dendrite_class_for


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
    loaded = dc.load(converted.save(tmp_path / "lr")).eval()
    assert isinstance(loaded[0].dendrite_layers[0], nn.Sequential)
    assert torch.equal(loaded(x), expected)
