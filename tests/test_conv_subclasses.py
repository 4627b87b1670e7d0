"""Issue 19 item 1: layer subclasses that compute their output in their own forward, read through that computation.

timm's ScaledStdConv2d/StdConv2d (NF-ResNets, BiT) standardise their weight in forward, Conv2dSame (TF-ported
EfficientNets) pads by the input size, timm's Linear calls F.linear itself. Each is read as the plain layer that
computes the same (its effective weight, 'SAME' padding as a TFSameConv), so it gets dendrites and folds exactly;
a subclass whose forward is not one plain call is left alone with the reason. Tests run on timm's own classes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dendrite_convert as dc
from dendrite_convert.core.layers import family_of
from dendrite_convert.core.tfsame import TFSameConv2d
from dendrite_convert.exporting.fold import fold_model
from dendrite_convert.exporting.folded import module_from_spec, module_spec
from fixtures.timm_import import import_timm
from tests.helpers_export import add_dendrites


@pytest.fixture(scope="module")
def timm():
    try:
        return import_timm()
    except ImportError as exc:
        pytest.skip(str(exc))


def _layers(timm):
    """One of each timm class, with strides and sizes where 'SAME' pads unevenly."""
    from timm.layers import Conv2dSame, Linear, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    torch.manual_seed(0)
    return {"scaled_std": ScaledStdConv2d(3, 8, 3, gain_init=1.5), "same": Conv2dSame(8, 8, 3, stride=2),
            "std": StdConv2d(8, 8, 3, bias=True), "same_depthwise": Conv2dSame(8, 8, 5, stride=2, groups=8),
            "scaled_std_same": ScaledStdConv2dSame(8, 8, 4, stride=3, padding="same"),
            "std_same": StdConv2dSame(8, 8, 3, padding="same"), "linear": Linear(8, 4)}


class Net(nn.Module):
    def __init__(self, layers: dict, extra: nn.Module | None = None):
        super().__init__()
        self.convs = nn.ModuleDict({k: v for k, v in layers.items() if k != "linear"})
        self.extra, self.head = extra or nn.Identity(), layers["linear"]

    def forward(self, x):
        for conv in self.convs.values():
            x = F.relu(conv(x))
        return self.head(self.extra(x).mean((2, 3)))


def test_the_timm_classes_are_read_as_plain_layers(timm):
    """Their plain form computes their output bit for bit; a plain layer from the raw weight (the old fold) does not."""
    x = torch.randn(2, 8, 17, 14)
    for name, layer in _layers(timm).items():
        layer.eval()
        inputs = x.mean((2, 3)) if name == "linear" else x[:, :layer.in_channels]
        family = family_of(layer)
        plain = family.plain_form(layer)
        assert type(plain) in (nn.Conv2d, TFSameConv2d, nn.Linear), name
        assert (type(plain) is TFSameConv2d) == (name in ("same", "same_depthwise", "scaled_std_same")), name
        assert torch.equal(plain(inputs), layer(inputs)), name
        raw = family.plain_layer(layer, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
        if name != "linear":  # timm's Linear computes exactly what nn.Linear computes
            ours = raw(inputs)
            assert ours.shape != layer(inputs).shape or (ours - layer(inputs)).abs().max() > 1e-2, name


@pytest.mark.parametrize("config", [dict(activation="identity"), dict(activation="sigmoid"),
                                    dict(activation="tanh", rank=2, channel_fraction=0.5)], ids=["identity", "sigmoid", "cheap"])
def test_they_get_dendrites_convert_exactly_and_fold_exactly(timm, config):
    model = Net(_layers(timm)).eval()
    x = torch.randn(3, 3, 19, 22)
    with torch.no_grad():
        reference = model(x)
    converted = dc.convert(model, dc.DendriteConfig(**config))
    assert len(converted.report.targets) == 7 and not converted.report.skipped
    with torch.no_grad():
        assert torch.equal(converted.model.eval()(x), reference)  # zero dendrites: the original, bit for bit
        dendritic = add_dendrites(converted.model, k=2)
        out = dendritic(x)
        assert (out - reference).abs().max() > 1e-2  # the dendrites matter
        for layout in ("separate", "concat"):
            folded = fold_model(dendritic, gemm_layout=layout)
            assert (folded(x) - out).abs().max() <= 1e-5 * max(1.0, out.abs().max().item()), layout
    kinds = {type(m) for m in folded.modules()}
    assert not kinds & {type(v) for v in _layers(timm).values()} - {nn.Linear}  # no timm class is left
    if config["activation"] == "identity":
        assert type(folded.convs.same) is TFSameConv2d and type(folded.convs.scaled_std) is nn.Conv2d


def test_a_folded_tf_same_conv_is_saved_as_a_spec_and_rebuilt(timm):
    model = add_dendrites(dc.convert(Net(_layers(timm)), dc.DendriteConfig()).model, k=2)
    folded = fold_model(model)
    x = torch.randn(2, 3, 15, 16)
    for name in ("same", "scaled_std_same"):
        module = folded.convs[name]
        again = module_from_spec(module_spec(module))
        again.load_state_dict(module.state_dict())
        assert module_spec(module)["layer"]["padding"] == "tf_same"
        folded.convs[name] = again
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name,nfnet", [("test_nfnet", True), ("test_efficientnet", False)])
def test_real_models_fold_exactly(timm, name, nfnet):
    """timm's NF-Net (ScaledStdConv2d everywhere) and a TF-padded EfficientNet (Conv2dSame, depthwise)."""
    model = timm.create_model(name, num_classes=5, **({} if nfnet else {"pad_type": "same"})).eval()
    kind = "ScaledStdConv2d" if nfnet else "Conv2dSame"
    count = sum(type(m).__name__ == kind for m in model.modules())
    x = torch.randn(2, 3, 33, 30)
    with torch.no_grad():
        reference = model(x)
    converted = dc.convert(model, dc.DendriteConfig())
    assert sum(t.type == kind for t in converted.report.targets) == count > 4
    assert not [s for s in converted.report.skipped if s.type == kind]
    with torch.no_grad():
        assert torch.equal(converted.model.eval()(x), reference)
        dendritic = add_dendrites(converted.model, k=1, scale=0.1)
        out = dendritic(x)
        assert (fold_model(dendritic)(x) - out).abs().max() <= 1e-5 * max(1.0, out.abs().max().item())


class TwoConvs(nn.Conv2d):
    def forward(self, x):
        return super().forward(super().forward(x))


class Doubled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class Reflected(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), self.weight, self.bias)


class PadsItsOwnWay(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, [0, 2, 0, 2]), self.weight, self.bias)


class InputScaledWeight(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight * x.abs().mean(), self.bias, padding=1)


class OtherStride(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=self.padding)


@pytest.mark.parametrize("kind,reason", [
    (TwoConvs, "it makes 2 conv2d calls, not one"), (Doubled, "its output is not that of its conv2d call"),
    (Reflected, "it transforms its input before its conv2d call"),
    (PadsItsOwnWay, "it pads its input otherwise than TensorFlow's 'SAME' padding"),
    (InputScaledWeight, "the weight, bias or padding of its conv2d call depends on the input"),
    (OtherStride, "it calls conv2d with other stride, padding, dilation or groups than its attributes")])
def test_a_forward_that_is_not_one_plain_call_is_left_alone_with_the_reason(kind, reason):
    model = nn.Sequential(kind(8, 8, 3, padding=1), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(2, 8, 9, 9)
    reference = model(x)
    converted = dc.convert(model, dc.DendriteConfig(dendrites=1))
    (skipped,) = [s for s in converted.report.skipped if s.name == "0"]
    assert skipped.reason == (f"{kind.__name__} computes its output in its own forward (it overrides Conv2d's), "
                              f"which is not one plain Conv2d computation: {reason}")
    assert type(converted.model[0]) is kind and torch.equal(converted.model(x), reference)


def test_a_model_with_them_exports_to_onnx_with_parity(timm, tmp_path):
    """Every timm class folded, plus a refused subclass exported as its own code."""
    model = Net(_layers(timm), extra=Doubled(8, 8, 3, padding=1))
    converted = dc.convert(model, dc.DendriteConfig(dendrites=2), example_inputs=[{"shape": [2, 3, 21, 18]}])
    add_dendrites(converted.model, k=0)
    report = dc.export(converted, tmp_path / "m.onnx", dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="separate",
                                                                        latency=False))
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    assert len(report.folds) == 7 and "extra" not in {r.name for r in report.folds}


def test_a_converted_nfnet_saves_and_reloads_exactly(timm, tmp_path):
    """Reloading checks the recipe on the meta device first, where the reading sees the structure only."""
    from fixtures.real_zoo import build

    factory = {"factory": "fixtures.real_zoo:build", "factory_kwargs": {"name": "test_nfnet"}}
    converted = dc.convert(build("test_nfnet"), dc.DendriteConfig(rank=2), **factory)
    add_dendrites(converted.model, k=2, scale=0.1)
    converted.save(tmp_path / "converted")
    again = dc.load_converted(tmp_path / "converted", factory=factory["factory"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), converted.model.eval()(x))
    assert sum(layer.num_dendrites for layer in dc.dendrite_layers(again.model).values()) == 2 * 34
