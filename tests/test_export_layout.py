"""`--gemm-layout auto` for ONNX: each kind of concatenable target timed once in onnxruntime, the model exported once."""

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

from dendrite_convert import DendriteConfig, ExportConfig, convert, export
from dendrite_convert.exporting import layout as layout_module
from tests.helpers_export import add_dendrites


def _dendritic(model: nn.Module, shape: list[int], activation: str = "sigmoid"):
    converted = convert(model, DendriteConfig(activation=activation), example_inputs=[{"shape": shape, "dtype": "float32"}])
    add_dendrites(converted.model)
    return converted


def _same_blocks() -> nn.Module:
    """Three identical Linear(8, 8) targets and one Linear(8, 3): two kinds."""
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


@pytest.fixture
def onnx_calls(monkeypatch):
    """(exporter, dynamic shapes) of every torch.onnx.export call; the real export runs."""
    calls, real = [], torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(("dynamo" if kwargs.get("dynamo") else "torchscript", kwargs.get("dynamic_shapes")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    return calls


def _gemms(path) -> int:
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return ops["Gemm"] + ops["MatMul"]


def test_one_export_when_every_dendrite_folds_into_the_weight(tmp_path, onnx_calls):
    report = export(_dendritic(_same_blocks(), [2, 8], "identity"), tmp_path / "m.onnx", ExportConfig(latency=False))
    assert report.verify.ok and len(onnx_calls) == 1 and not report.notes
    assert _gemms(tmp_path / "m.onnx") == 4


def test_one_export_when_no_target_can_use_the_concat_layout(tmp_path, onnx_calls):
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3))  # outputs on axis 1 of W
    report = export(_dendritic(model, [2, 3, 6, 6]), tmp_path / "m.onnx", ExportConfig(latency=False))
    assert report.verify.ok and len(onnx_calls) == 1
    assert report.notes == ["--gemm-layout auto: no target with nonlinear dendrites can use the concat layout -> separate"]
    assert {r.layout for r in report.folds} == {"separate"}


def test_each_kind_is_timed_once_and_the_model_exported_once(tmp_path, onnx_calls):
    report = export(_dendritic(_same_blocks(), [2, 8]), tmp_path / "m.onnx", ExportConfig(atol=1e-5, latency=False))
    assert report.verify.ok
    (timing, _), (model, axes) = onnx_calls  # the timing graph by the fast exporter, then the model once
    assert timing == "torchscript" and model == "dynamo" and axes is not None
    (note,) = report.notes
    assert note.startswith("--gemm-layout auto: onnxruntime separate ") and "4 concatenable targets (2 kinds" in note
    concat = [r.name for r in report.folds if r.layout == "concat"]
    assert f"-> concat for {len(concat)}," in note
    # the file holds what the records say: 1 + 3 GEMMs per separate target, 1 per concatenated one
    assert _gemms(tmp_path / "m.onnx") == sum(1 if r.layout == "concat" else 4 for r in report.folds)
    same = [r.layout for r in report.folds if r.name in ("0", "2", "4")]
    assert len(set(same)) == 1  # one kind, one decision


@pytest.mark.slow
@pytest.mark.parametrize("winner", ["separate", "concat"])
def test_the_faster_layout_of_a_kind_is_what_its_targets_get(tmp_path, monkeypatch, winner):
    real = layout_module.faster_layout
    monkeypatch.setattr(layout_module, "faster_layout", lambda runners, budget_s: (winner, real(runners, budget_s)[1]))
    report = export(_dendritic(_same_blocks(), [2, 8]), tmp_path / "m.onnx", ExportConfig(atol=1e-5, latency=False))
    assert report.verify.ok and {r.layout for r in report.folds} == {winner}
    assert _gemms(tmp_path / "m.onnx") == (4 if winner == "concat" else 16)
    assert report.notes[0].endswith(f"-> concat for {4 if winner == 'concat' else 0}, separate for the rest")


@pytest.mark.slow
def test_a_timing_failure_exports_the_separate_layout(tmp_path, monkeypatch, onnx_calls):
    def broken(*args, **kwargs):
        raise RuntimeError("no extractor today")

    monkeypatch.setattr("onnx.utils.Extractor", broken)
    report = export(_dendritic(_same_blocks(), [2, 8]), tmp_path / "m.onnx", ExportConfig(atol=1e-5, latency=False))
    assert report.verify.ok and {r.layout for r in report.folds} == {"separate"}
    assert report.notes == ["--gemm-layout auto: the layouts could not be timed (RuntimeError: no extractor today) "
                            "-> separate"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.slow
def test_the_timing_graph_falls_back_to_dynamo(tmp_path, monkeypatch):
    calls, real = [], torch.onnx.export

    def no_torchscript(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        if not kwargs.get("dynamo"):
            raise RuntimeError("the TorchScript exporter is gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    report = export(_dendritic(_same_blocks(), [2, 8]), tmp_path / "m.onnx", ExportConfig(atol=1e-5, latency=False))
    assert report.verify.ok and calls == [False, True, True] and "onnxruntime separate" in report.notes[0]
