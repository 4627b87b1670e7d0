"""Adapter: sklearn's bundled wine data (178 samples, 13 features, 3 classes), fixed 50/25/25 split."""

import numpy as np
import torch
from sklearn.datasets import load_wine
from torch.utils.data import DataLoader, TensorDataset

MAXIMIZE = True


def _split():
    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    n_train, n_val = int(0.5 * len(y)), int(0.25 * len(y))
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    return {k: TensorDataset(torch.from_numpy(x[s]), torch.from_numpy(y[s])) for k, s in parts.items()}


_DATA = _split()


def train_data():
    return DataLoader(_DATA["train"], batch_size=16, shuffle=True)


def val_data():
    return DataLoader(_DATA["val"], batch_size=512)


def test_data():
    return DataLoader(_DATA["test"], batch_size=512)


def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def optimizer(params):
    return torch.optim.Adam(params, lr=3e-3)


def score(outputs, batch):
    return (outputs.argmax(-1) == batch[1]).float().mean().item() * 100
