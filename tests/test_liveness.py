"""Issue 19 item 2: a target whose forward never runs because the model reads its weight is skipped, not given dead dendrites."""

import pytest
import torch

import dendrite_convert as dc
from conftest import randomize_dendrites
from dendrite_convert.conversion.liveness import REASON, unreached_targets
from fixtures.probe_models import weight_reader

SPEC = [{"shape": [4, 6], "dtype": "float32"}]


def _skipped(report) -> dict[str, str]:
    return {s.name: s.reason for s in report.skipped}


def test_a_target_read_directly_is_skipped_with_the_reason_and_reload_agrees(tmp_path):
    converted = dc.convert(weight_reader(), dc.DendriteConfig(dendrites=1), factory="fixtures.probe_models:weight_reader",
                           example_inputs=SPEC)
    assert _skipped(converted.report)["proj"] == REASON
    assert sorted(t.name for t in converted.report.targets) == ["head", "spare"]  # spare: an untaken branch, kept
    assert type(converted.model.proj) is torch.nn.Linear  # the original module, no dendrite layer around it

    randomize_dendrites(converted.model)
    x = torch.randn(4, 6)
    converted.model.eval()
    expected = converted.model(x)
    converted.save(tmp_path / "converted")
    reloaded = dc.load_converted(tmp_path / "converted", factory="fixtures.probe_models:weight_reader")  # named again: consent
    assert _skipped(reloaded.report)["proj"] == REASON
    assert torch.equal(reloaded.model.eval()(x), expected)


def test_every_dendrite_left_gets_a_gradient():
    converted = dc.convert(weight_reader(), dc.DendriteConfig(dendrites=1), example_inputs=SPEC)
    randomize_dendrites(converted.model)
    converted.model(torch.randn(4, 6)).square().sum().backward()
    head = converted.model.head
    assert head.dendrite_layers[0].weight.grad.abs().sum() > 0


def test_the_self_checks_derived_input_serves_liveness_and_without_any_input_nothing_is_skipped():
    converted = dc.convert(weight_reader())  # no example given: the input derived from the first layer is used
    assert _skipped(converted.report)["proj"] == REASON
    assert unreached_targets(weight_reader(), []) == {}


def test_transformers_mamba_skips_conv1d_and_dt_proj_and_trains_the_rest():
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1,
                                      intermediate_size=32, conv_kernel=3, time_step_rank=4)
    converted = dc.convert(transformers.MambaModel(config).eval(), dc.DendriteConfig(dendrites=1))
    skipped = _skipped(converted.report)
    assert skipped["layers.0.mixer.conv1d"] == REASON and skipped["layers.0.mixer.dt_proj"] == REASON
    assert {t.name for t in converted.report.targets} == {f"layers.0.mixer.{n}" for n in ("in_proj", "x_proj", "out_proj")}
    randomize_dendrites(converted.model)
    ids = torch.randint(0, 50, (2, 8))
    converted.model(ids).last_hidden_state.square().sum().backward()
    for name, layer in dc.dendrite_layers(converted.model).items():
        assert layer.dendrite_scales[0].grad.abs().sum() > 0, name
