"""Write an untrained digits MLP as a state dict (what most users have on disk)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from model import build  # noqa: E402

torch.manual_seed(0)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "model.pt")
out.parent.mkdir(parents=True, exist_ok=True)
torch.save(build().state_dict(), out)
print(f"wrote {out}")
