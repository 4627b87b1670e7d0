"""Every input form of docs/design.md §3 converts, saves and loads back to the original function (0 dendrites)."""

import pytest
import torch

import dendrite_convert as dc

FORMS = [
    "pickled module", "state dict", "checkpoint dict", "DDP prefix", "safetensors",
    "torch.export .pt2", "TorchScript", "Hugging Face directory",
]


def _run(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("form", FORMS)
def test_convert_save_load_is_exact(form, fixture_files, tmp_path):
    spec = fixture_files[form]
    if form == "torch.export .pt2":
        reference = torch.export.load(str(spec["path"])).module()
    else:
        reference = spec["model"]
    expected = _run(reference, spec["inputs"])

    # consent: the fixture's pickle names fixtures.models classes; TorchScript runs its own code when loaded
    allowed = {"allow_modules": ["fixtures"]} if form == "pickled module" else {"trust_code": form == "TorchScript"}
    converted = dc.convert(spec["path"], factory=spec["factory"], **allowed)
    assert converted.report.targets, "no targets found"
    assert torch.equal(_run(converted.model.eval(), spec["inputs"]), expected)

    out = converted.save(tmp_path / "converted")
    copies = {"pickled module": ["source_model.pt"], "torch.export .pt2": ["source_model.pt2"]}.get(form, [])
    assert sorted(p.name for p in out.iterdir()) == ["dendrite_config.json", "model.safetensors", *copies]
    loaded = dc.load(out, factory=spec["factory"], allow_modules=["fixtures"]).eval()
    assert torch.equal(_run(loaded, spec["inputs"]), expected)


def test_cnn_targets_and_norm_pairs(fixture_files):
    converted = dc.convert(fixture_files["state dict"]["path"], factory="fixtures.models:small_cnn")
    targets = {t.name: t for t in converted.report.targets}
    assert set(targets) == {"stem", "grouped", "depthwise", "temporal", "head"}
    assert targets["stem"].via == "+ BatchNorm2d bn"
    assert targets["depthwise"].via == "+ BatchNorm2d dw_bn"
    assert targets["grouped"].via == ""
    assert all(t.reached == "fx graph" for t in targets.values())
    assert isinstance(converted.model.bn, torch.nn.Identity)  # the norm moved into its neuron


def test_pt2_targets_come_from_aten_calls(fixture_files):
    converted = dc.convert(fixture_files["torch.export .pt2"]["path"])
    reached = {t.reached for t in converted.report.targets}
    assert reached == {"fx functional"}
    assert len(converted.report.targets) == 5


def test_dendrites_preinserted_and_saved_exactly(fixture_files, tmp_path):
    from conftest import randomize_dendrites

    spec = fixture_files["state dict"]
    converted = dc.convert(spec["path"], dc.DendriteConfig(dendrites=2), factory=spec["factory"])
    model = converted.model.eval()
    expected = _run(spec["model"], spec["inputs"])
    assert torch.equal(_run(model, spec["inputs"]), expected)  # new scales are zero
    randomize_dendrites(model)
    changed = _run(model, spec["inputs"])
    assert (changed - expected).abs().max() > 1e-3
    loaded = dc.load(converted.save(tmp_path / "c"), factory=spec["factory"]).eval()
    assert torch.equal(_run(loaded, spec["inputs"]), changed)
    assert {t.dendrites for t in dc.load_converted(tmp_path / "c", trust_code=True).report.targets} == {2}


def test_example_inputs_recorded_when_the_model_states_them(fixture_files):
    pt2 = dc.convert(fixture_files["torch.export .pt2"]["path"])
    assert pt2.example_inputs == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    hf = dc.convert(fixture_files["Hugging Face directory"]["path"])
    assert hf.example_inputs == [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 100}]
