"""fx graph rewriting: fallbacks, functional calls, shared modules, filters and honest skips."""

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from fixtures import models


def _convert(model, **config):
    return dc.convert(model, dc.DendriteConfig(**config))


def test_untraceable_submodule_falls_back_and_is_reported():
    model = models.GatedNet().eval()
    x = torch.randn(4, 6)
    expected = model(x)
    converted = _convert(model)
    [fallback] = converted.report.fallbacks
    assert fallback.module == "gate"
    assert "TraceError" in fallback.reason
    assert fallback.source.endswith("if x.mean() > 0:") and "fixtures/models.py:" in fallback.source
    reached = {t.name: (t.reached, t.via) for t in converted.report.targets}
    assert reached == {
        "inp": ("fx graph", ""), "out": ("fx graph", ""),
        "gate.up": ("module swap", "inside gate"), "gate.down": ("module swap", "inside gate"),
    }
    assert torch.equal(converted.model(x), expected)


def test_strict_graph_refuses_a_fallback():
    with pytest.raises(dc.ConversionError, match=r"gate cannot be traced.*models.py:\d+"):
        _convert(models.GatedNet(), strict_graph=True)


def test_functional_calls_on_own_parameters_become_dendrite_layers(tmp_path):
    model = models.FunctionalNet().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    converted = dc.convert(model, dc.DendriteConfig(dendrites=1), factory="fixtures.models:FunctionalNet")
    targets = {t.name: t for t in converted.report.targets}
    assert set(targets) == {"fn_kernel", "fn_proj"}
    assert {t.reached for t in targets.values()} == {"fx functional"}
    assert targets["fn_kernel"].type == "Conv2d" and targets["fn_kernel"].weight_shape == [4, 3, 3, 3]
    assert torch.equal(converted.model(x), expected)
    from conftest import randomize_dendrites

    randomize_dendrites(converted.model)
    changed = converted.model(x)
    assert not torch.equal(changed, expected)
    loaded = dc.load(converted.save(tmp_path / "fn"), factory="fixtures.models:FunctionalNet").eval()
    assert torch.equal(loaded(x), changed)


def test_shared_module_and_tied_weights_get_one_set_of_dendrites(tmp_path):
    model = models.SharedNet().eval()
    x = torch.randn(3, 8)
    expected = model(x)
    converted = dc.convert(model, dc.DendriteConfig(dendrites=1), factory="fixtures.models:SharedNet")
    targets = {t.name: t for t in converted.report.targets}
    assert set(targets) == {"block", "left"}
    assert targets["block"].shared == ["called 2×"]
    assert targets["left"].shared == ["right", "called 2×"]
    assert converted.model.left is converted.model.right
    assert len(dc.dendrite_layers(converted.model)) == 2
    assert torch.equal(converted.model(x), expected)
    loaded = dc.load(converted.save(tmp_path / "shared"), factory="fixtures.models:SharedNet")
    assert loaded.left is loaded.right


def test_include_and_exclude_by_name_and_type():
    names = lambda **kw: {t.name for t in _convert(models.small_cnn(), **kw).report.targets}  # noqa: E731
    assert names(include=["Conv2d"]) == {"stem", "grouped", "depthwise"}
    assert names(exclude=["Conv*d"]) == {"head"}  # globs match type names too
    assert names(exclude=["head", "temporal"]) == {"stem", "grouped", "depthwise"}
    report = _convert(models.small_cnn(), exclude=["head"]).report
    assert any(s.name == "head" and "--exclude head" in s.reason for s in report.skipped)
    with pytest.raises(dc.ConversionError, match="filters left none"):
        _convert(models.small_cnn(), include=["nothing*"])


def test_layers_used_inside_torch_modules_are_skipped_with_a_reason():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x, _ = self.mha(x, x, x)
            x, _ = self.lstm(x)
            return self.head(x)

    report = _convert(Attn()).report
    assert [t.name for t in report.targets] == ["head"]
    skipped = {s.name: s.reason for s in report.skipped}
    assert "reads its weights directly" in skipped["mha.out_proj"]
    assert "not supported" in skipped["mha"] and "only when --include names them" in skipped["lstm"]


def test_a_model_without_targets_names_what_it_found():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 4))
    with pytest.raises(dc.ConversionError, match="layer types found: Embedding, LSTM"):
        _convert(model)


def test_converting_twice_is_refused_clearly():
    converted = _convert(models.mlp())
    with pytest.raises(dc.ConversionError, match="already holds dendrite layers"):
        _convert(converted.model)


@pytest.mark.parametrize("build,vocab_targets", [
    ("tiny_bert", {"Linear"}),
    ("tiny_gpt2", {"Conv1D", "Linear"}),
])
def test_transformers_every_linear_and_conv1d_found(build, vocab_targets, tmp_path):
    from transformers.pytorch_utils import Conv1D

    model = getattr(models, build)()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    every = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    converted = _convert(model, dendrites=1)
    assert {t.name for t in converted.report.targets} == every
    assert {t.type for t in converted.report.targets} == vocab_targets
    assert converted.report.fallbacks  # transformers v5 models never trace whole: partial tracing
    with torch.no_grad():
        assert torch.equal(converted.model(input_ids=ids).logits, expected)


def test_converted_transformers_model_with_tied_weights_saves_with_save_pretrained(tmp_path):
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = dc.convert(transformers.BertForMaskedLM(config).eval(), dc.DendriteConfig(dendrites=1)).model
    decoder = model.cls.predictions.decoder
    assert decoder.base_layer.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path / "mlm")  # refuses shared tensors unless the tied keys point inside the layer
    ids = torch.randint(0, 100, (2, 7))
    reloaded = dc.convert(transformers.BertForMaskedLM(config).eval(), dc.DendriteConfig(dendrites=1)).model
    from safetensors.torch import load_file

    missing, unexpected = reloaded.load_state_dict(load_file(tmp_path / "mlm" / "model.safetensors"), strict=False)
    tied = {"cls.predictions.decoder.base_layer.weight", "cls.predictions.decoder.base_layer.bias"}
    assert not unexpected and set(missing) <= tied  # only the tied copies are stored once
    reloaded.tie_weights()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
