"""A small MLP for sklearn's bundled 8x8 digits (64 inputs, 10 classes)."""

from torch import nn


def build(width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )
