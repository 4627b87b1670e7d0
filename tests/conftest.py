import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test models are tiny: one intra-op thread is faster and does not thrash a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory):
    """Every saved-model form of docs/design.md §3, written once per session."""
    from fixtures.make_fixtures import make_fixtures

    return make_fixtures(tmp_path_factory.mktemp("fixtures"))


def randomize_dendrites(model: torch.nn.Module) -> None:
    """Non-zero scales and cascade weights, so a test can see every dendrite."""
    from dendrite_convert import dendrite_layers

    with torch.no_grad():
        for layer in dendrite_layers(model).values():
            for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
                p.normal_(0, 0.5)
