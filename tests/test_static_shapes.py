"""Issue 19: a .pt2 exported with a static batch size is flagged at conversion, not at the first training step."""

import logging

import pytest
import torch
from torch import nn

import dendrite_convert as dc


def _save_pt2(path, dynamic: bool):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (torch.randn(4, 3),), dynamic_shapes=shapes), str(path))
    return path


def test_a_static_batch_pt2_is_flagged_with_the_size_and_the_fix(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dendrite_convert"):
        converted = dc.convert(_save_pt2(tmp_path / "static.pt2", dynamic=False))
    notes = [n for n in converted.report.notes if "static shape" in n]
    assert len(notes) == 1 and "only accepts batch size 4" in notes[0] and "torch.export.Dim('batch')" in notes[0]
    assert any("only accepts batch size 4" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match="== 4"):  # the note is true: another batch size fails on the program's guard
        converted.model(torch.randn(6, 3))


def test_a_dynamic_batch_pt2_gets_no_note(tmp_path):
    converted = dc.convert(_save_pt2(tmp_path / "dynamic.pt2", dynamic=True))
    assert not [n for n in converted.report.notes if "static shape" in n]
    assert converted.model(torch.randn(6, 3)).shape == (6, 2)
