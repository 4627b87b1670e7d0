"""The dendrite layer math of docs/design.md §2."""

import pytest
import torch
from torch import nn

from dendrite_convert.core.layers import DendriteLayer, count_parameters, dendrite_class_for

CASES = [
    (lambda: nn.Linear(6, 4), (5, 6)),
    (lambda: nn.Linear(6, 4), (2, 3, 6)),  # transformer-style [B, T, F]
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 7, 7)),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 5, 5)),  # depthwise
    (lambda: nn.Conv2d(4, 6, 3), (4, 7, 7)),  # unbatched input
    (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1), (2, 3, 7)),
]


def _layer(factory, **kw) -> DendriteLayer:
    base = factory()
    return dendrite_class_for(base)(base, **kw)


@pytest.mark.parametrize("factory,shape", CASES)
def test_add_dendrite_keeps_function_then_scales_change_it(factory, shape):
    layer = _layer(factory)
    x = torch.randn(shape)
    y0 = layer.base_layer(x)
    layer.add_dendrite()
    layer.add_dendrite()
    assert torch.equal(layer(x), y0)
    assert [tuple(c.shape) for c in layer.dendrite_cascade] == [(0, layer.out_channels), (1, layer.out_channels)]
    with torch.no_grad():
        for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
            p.normal_()
    assert (layer(x) - y0).abs().max() > 1e-4


def test_forward_matches_the_formula():
    """y = Wx + b + Σ s_i ⊙ h_i,  h_i = tanh(D_i x + Σ_j u_ij ⊙ h_j), channel by channel."""
    layer = _layer(lambda: nn.Conv2d(3, 4, 3, padding=1), activation="tanh")
    for _ in range(3):
        layer.add_dendrite()
    with torch.no_grad():
        for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
            p.normal_()
    x = torch.randn(2, 3, 5, 5)
    hs, y = [], layer.base_layer(x)
    for i, d in enumerate(layer.dendrite_layers):
        z = d(x) + sum(layer.dendrite_cascade[i][j].view(1, -1, 1, 1) * hs[j] for j in range(i))
        hs.append(torch.tanh(z))
        y = y + layer.dendrite_scales[i].view(1, -1, 1, 1) * hs[-1]
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)


def test_norm_pair_dendrite_is_a_copy_of_the_pair():
    layer = _layer(lambda: nn.Conv2d(3, 4, 3), norm=nn.BatchNorm2d(4))
    d = layer.add_dendrite()
    assert isinstance(d, nn.Sequential) and isinstance(d[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    layer.eval()
    assert torch.equal(layer(x), layer.norm(layer.base_layer(x)))


def test_new_dendrite_weights_are_small_and_trainable():
    layer = _layer(lambda: nn.Linear(64, 32), init_std=0.01)
    layer.base_layer.requires_grad_(False)
    d = layer.add_dendrite()
    assert 0.007 < d.weight.std().item() < 0.013
    assert all(p.requires_grad for p in d.parameters())
    assert not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_follows_the_wrapped_layer(dtype):
    layer = _layer(lambda: nn.Linear(5, 3).to(dtype))
    layer.add_dendrite()
    assert {p.dtype for p in layer.parameters()} == {dtype}
    assert layer(torch.randn(2, 5, dtype=dtype)).dtype == dtype


def test_hf_conv1d_channels_last():
    from transformers.pytorch_utils import Conv1D

    layer = _layer(lambda: Conv1D(6, 4))  # nf=6 outputs, nx=4 inputs
    assert type(layer).__name__ == "DendriteHFConv1D" and layer.out_channels == 6
    layer.add_dendrite()
    with torch.no_grad():
        layer.dendrite_scales[0].fill_(1.0)
    x = torch.randn(2, 3, 4)
    expected = layer.base_layer(x) + torch.sigmoid(layer.dendrite_layers[0](x))
    torch.testing.assert_close(layer(x), expected)


def test_count_parameters_counts_tied_tensors_once():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    assert count_parameters(nn.Sequential(a, b)) == 16 + 4 + 4
    bn = nn.BatchNorm1d(4)
    assert count_parameters(bn) == 16  # weight, bias, running mean/var; not num_batches_tracked


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        _layer(lambda: nn.Linear(2, 2), activation="relu6")
