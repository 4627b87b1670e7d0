"""Conversion proves itself: the trace cache never shares a graph between blocks that trace differently,
and a rewrite that changes what the model computes fails with exit 4 naming the first target that differs."""

import torch
from torch import nn
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli.convert import app as convert_app
from dendrite_convert.conversion import convert as convert_module, rewrite
from dendrite_convert.conversion.tracing import forward_key

runner = CliRunner()


class Block(nn.Module):
    """Which conv feeds the BatchNorm depends on a plain attribute, not on the structure or the repr."""

    def __init__(self, swap: bool):
        super().__init__()
        self.swap = swap
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if self.swap:
            return self.bn(self.b(x)) + self.a(x)
        return self.bn(self.a(x)) + self.b(x)


class DataDependent(nn.Module):
    """fx cannot trace the parent, so its children are traced one by one (the fallback path)."""

    def __init__(self, *swaps: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.ModuleList(Block(s) for s in swaps)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x + 1
        for block in self.blocks:
            x = block(x)
        return x


def _with_running_stats(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_sibling_blocks_that_differ_in_a_plain_attribute_convert_exactly():
    model = _with_running_stats(DataDependent(False, True))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    converted = dc.convert(model)
    assert any(f.module == "" for f in converted.report.fallbacks)  # the parent fell back: children traced alone
    pairs = {t.name: t.via for t in converted.report.targets}
    assert pairs["blocks.0.a"] == "+ BatchNorm2d blocks.0.bn" and pairs["blocks.0.b"] == ""
    assert pairs["blocks.1.b"] == "+ BatchNorm2d blocks.1.bn" and pairs["blocks.1.a"] == ""
    assert torch.equal(converted.model(x), expected)
    assert converted.report.notes[-1].startswith("self-check passed")


def test_identical_blocks_are_still_traced_once(monkeypatch):
    traced = []
    real_trace = rewrite.trace
    monkeypatch.setattr(rewrite, "trace", lambda m, *a, **k: traced.append(m) or real_trace(m, *a, **k))
    model = DataDependent(False, False, False, True)
    assert forward_key(model.blocks[0]) == forward_key(model.blocks[1]) != forward_key(model.blocks[3])
    dc.convert(model)
    blocks = [m for m in traced if isinstance(m, Block)]
    assert [b.swap for b in blocks] == [False, True]  # three equal blocks share one trace; the odd one has its own


def test_forward_key_sees_every_attribute_that_can_steer_forward():
    one, two = Block(False), Block(False)
    assert forward_key(one) == forward_key(two)
    for change in (lambda b: setattr(b, "scale", 1.0), lambda b: b.a.train(False), lambda b: setattr(b.bn, "eps", 2e-5),
                   lambda b: setattr(b, "flag", 1), lambda b: setattr(b.a, "padding_mode", "reflect")):
        other = Block(False)
        change(other)
        assert forward_key(other) != forward_key(one)
    floats, ints = Block(False), Block(False)
    floats.scale, ints.scale = 1.0, 1  # equal in Python, but x * 1.0 and x * 1 differ for integer tensors
    assert forward_key(floats) != forward_key(ints)
    tied = Block(False)
    tied.b = tied.a  # the same module under two names traces to another graph than two equal modules
    assert forward_key(tied) != forward_key(one)


def test_a_broken_rewrite_fails_with_exit_4_naming_the_first_target_that_differs(fixture_files, tmp_path, monkeypatch):
    real_convert_model = convert_module.convert_model

    def perturbing(model, config, *args):
        model, report = real_convert_model(model, config, *args)
        model.get_submodule("grouped").register_forward_hook(lambda m, args, out: out + 1e-6)
        model.get_submodule("head").register_forward_hook(lambda m, args, out: out + 1)
        return model, report

    monkeypatch.setattr(convert_module, "convert_model", perturbing)
    out = tmp_path / "conv"
    result = runner.invoke(convert_app, [str(fixture_files["state dict"]["path"]), "-o", str(out), "--factory",
                                         "fixtures.models:small_cnn", "--input-shape", "2,3,8,8"])
    assert result.exit_code == 4, result.output
    assert "self-check failed" in result.stderr and "target grouped differs" in result.stderr
    assert not out.exists()


def test_running_the_check_leaves_the_model_state_as_it_was():
    model = DataDependent(False, True).train()
    model.blocks.append(nn.Dropout(0.5))  # train-mode dropout: both runs must draw the same masks
    rng = torch.get_rng_state()
    converted = dc.convert(model)
    assert converted.report.notes[-1].startswith("self-check passed")
    assert torch.equal(torch.get_rng_state(), rng)
    for name, buffer in converted.model.named_buffers():
        if "running_var" in name:
            assert torch.equal(buffer, torch.ones(4)), name
        elif "running_mean" in name or "num_batches" in name:
            assert not buffer.any(), name


def test_without_an_input_the_check_is_reported_as_skipped():
    class OnlyParameters(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w)

    converted = dc.convert(OnlyParameters())
    assert converted.report.notes[-1].startswith("self-check skipped: no example input")
    shaped = dc.convert(OnlyParameters(), example_inputs=[{"shape": [2, 5], "dtype": "float32"}])
    assert shaped.report.notes[-1].startswith("self-check passed")


def test_an_input_shape_the_model_cannot_take_is_a_usage_error(fixture_files, tmp_path):
    result = runner.invoke(convert_app, [str(fixture_files["state dict"]["path"]), "-o", str(tmp_path / "c"), "--factory",
                                         "fixtures.models:small_cnn", "--input-shape", "2,7"])
    assert result.exit_code == 2, result.output
    assert "cannot run on the example input of shape [2, 7]" in result.stderr and "--input-shape" in result.stderr


def test_a_forward_that_reassigns_a_buffer_is_compared_from_the_same_state():
    class Counting(nn.Module):
        """Adds how often it has run: the converted model must start from the same count as the original."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1  # a new tensor, not an in-place update
            return self.lin(x) + self.calls

    model = Counting()
    converted = dc.convert(model)
    assert converted.report.notes[-1].startswith("self-check passed")
    assert converted.model.calls.item() == 0


def test_an_output_layer_tied_to_the_embedding_is_compared_with_its_own_output():
    """GPT-2's lm_head shares its weight with the token embedding: both are candidate targets with the same
    parameters, yet they are different layers, so each is compared with its own recorded output."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.embed(ids))))

    converted = dc.convert(TiedLM(), dc.DendriteConfig(dendrites=1))
    assert {t.name for t in converted.report.targets} == {"mix", "head"}
    assert converted.report.notes[-1].startswith("self-check passed: with zero dendrites the output matches the "
                                                 "original bit for bit")
    with_embedding = dc.convert(TiedLM(), dc.DendriteConfig(dendrites=1, include=["embed", "mix", "head"]))
    assert with_embedding.report.notes[-1].startswith("self-check passed")
