"""Adapter: a synthetic image task generated here. 12x12 images hold 1-4 bars (horizontal or vertical)
plus noise; the class is the number of bars minus one. Counting needs more than one local feature."""

import torch
from torch.utils.data import TensorDataset

from tabular import classification_functions

MAXIMIZE = True


def _images(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.3
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        rows = torch.randperm(6, generator=g)[: int(y[i]) + 1] * 2
        vertical = bool(torch.rand((), generator=g) < 0.5)
        for r in rows.tolist():
            if vertical:
                x[i, 0, :, r] += 1.0
            else:
                x[i, 0, r, :] += 1.0
    return TensorDataset(x, y)


train_data, val_data, test_data, loss, optimizer, score = classification_functions(
    {"train": _images(1200, 0), "val": _images(400, 1), "test": _images(400, 2)}, batch_size=64, eval_batch_size=400)
