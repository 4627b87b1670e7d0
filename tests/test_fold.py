"""The fold (docs/design.md §5): folded torch vs the unfolded dendritic model, with scales, cascades and BN."""

import pytest
import torch
from torch import nn

from dendrite_convert import DendriteConfig, DendriteLayer, convert, dendrite_layers
from dendrite_convert.exporting.fold import fold, fold_model, strip_dendrites
from dendrite_convert.exporting.folded import FoldedDendrites
from tests.helpers_export import add_dendrites, cnn, conv1d_net, mlp, tiny_bert, tiny_bert_classifier, tiny_gpt2

MODELS = {
    "mlp": (mlp, lambda b: torch.randn(b, 12)),
    "conv1d": (conv1d_net, lambda b: torch.randn(b, 4, 20)),
    "cnn": (cnn, lambda b: torch.randn(b, 3, 16, 16)),
}


def _dendritic(factory, activation="sigmoid", **kw):
    return add_dendrites(convert(factory(), DendriteConfig(activation=activation)).model, **kw)


def _plain_types(model):
    """Every module type in a folded model: no dendrite class, no norm paired into a target."""
    return {type(m) for m in model.modules()}


def _gemm_layers(model):
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_fold_matches_unfolded(name, activation, layout):
    factory, make = MODELS[name]
    model = _dendritic(factory, activation)
    assert all(layer.num_dendrites == 3 for layer in dendrite_layers(model).values())
    x = make(5)
    with torch.no_grad():
        ref, base = model(x), strip_dendrites(model)(x)
        folded = fold_model(model, gemm_layout=layout)
        out = folded(x)
    assert (ref - base).abs().max() > 1e-2  # the dendrites really change the output
    assert (out - ref).abs().max().item() <= 1e-5
    assert not any(issubclass(t, DendriteLayer) for t in _plain_types(folded))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())  # all BN were paired
    assert not any(p.requires_grad for p in folded.parameters())


def test_folded_mlp_stores_exactly_what_it_uses():
    from dendrite_convert import count_parameters

    model = _dendritic(mlp)  # no BatchNorm: every dendrite tensor is used, nothing else is added
    assert count_parameters(fold_model(model)) == count_parameters(model)
    with torch.no_grad():
        dendrite_layers(model)["0"].dendrite_cascade[2].zero_()  # two links fewer in the first layer
    assert count_parameters(fold_model(model)) == count_parameters(model) - 2 * 16


def test_grouped_and_depthwise_keep_group_assignment_in_concat():
    model = _dendritic(cnn)
    folded = fold_model(model, gemm_layout="concat")
    depthwise = folded.depthwise
    assert isinstance(depthwise, FoldedDendrites) and depthwise.fused.groups == 8
    assert depthwise.fused.out_channels == 4 * 8  # main + 3 dendrites, interleaved per group
    assert folded.expand.fused.groups == 8 and folded.expand.fused.out_channels == 4 * 16


@pytest.mark.parametrize("name", MODELS)
def test_identity_dendrites_fold_into_one_layer(name):
    factory, make = MODELS[name]
    model = _dendritic(factory, "identity")
    base = strip_dendrites(model)
    result = fold(model)
    x = make(4)
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max().item() <= 1e-5
    assert all(r.form == "layer" and r.folded == 3 for r in result.records)
    assert _gemm_layers(result.model) == _gemm_layers(base)


def test_zero_scale_dendrites_are_dropped_exactly():
    model = _dendritic(mlp, zero_scales=True)
    result = fold(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(result.model(x), strip_dendrites(model)(x))
    assert all(r.form == "layer" and r.dropped == 3 for r in result.records)


def test_zero_scale_dendrite_read_by_the_cascade_is_kept():
    model = _dendritic(mlp)
    layer = dendrite_layers(model)["0"]
    with torch.no_grad():
        layer.dendrite_scales[0].zero_()  # h_0 still feeds dendrites 1 and 2
    result = fold(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max().item() <= 1e-5
    assert result.records[0].kept == 3 and result.model[0].emits == [1, 2]


def test_prune_below_drops_small_dendrites_and_reports_them():
    model = _dendritic(mlp)
    with torch.no_grad():
        for layer in dendrite_layers(model).values():
            layer.dendrite_scales[2].mul_(1e-4 / layer.dendrite_scales[2].abs().max())
            layer.dendrite_cascade[2].zero_()
    result = fold(model, prune_below=1e-3)
    assert all(r.kept == 2 and r.pruned and r.pruned[0][0] == 2 for r in result.records)
    x = torch.randn(8, 12)
    with torch.no_grad():
        change = (result.model(x) - model(x)).abs().max().item()
    assert 0 < change < 1e-2


def test_fold_is_idempotent_and_leaves_the_original_alone():
    model = _dendritic(cnn)
    folded = fold_model(model)
    again = fold_model(folded)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(folded(x), again(x))
    assert len(dendrite_layers(model)) == 6  # the input model still has its dendrite layers


def test_auto_layout_benchmarks_with_example_inputs():
    model = _dendritic(mlp)
    x = torch.randn(4, 12)
    result = fold(model, gemm_layout="auto", example_inputs=(x,))
    assert {r.layout for r in result.records} <= {"separate", "concat"}
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max().item() <= 1e-5


def test_track_running_stats_false_cannot_fold():
    from dendrite_convert import ConversionError

    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False))
    model = convert(net, DendriteConfig(dendrites=1)).model
    with pytest.raises(ConversionError, match="running statistics"):
        fold_model(model)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_bert_classifier, tiny_gpt2])
def test_transformers_fold(factory):
    model = _dendritic(factory)
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        ref = model(ids)[0]
        base = strip_dendrites(model)(ids)[0]
        for layout in ("separate", "concat"):
            out = fold_model(model, gemm_layout=layout)(ids)[0]
            assert (out - ref).abs().max().item() <= 1e-5
    assert (ref - base).abs().max() > 1e-2
    if factory is tiny_gpt2:  # transformers Conv1D ([in, out] weight) folds into nn.Linear
        assert isinstance(fold_model(model).h[0].mlp.c_fc.main, nn.Linear)
