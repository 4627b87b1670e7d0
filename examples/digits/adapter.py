"""Data adapter for sklearn's bundled 8x8 digits (offline): standardised pixels, fixed 50/25/25 split."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

MAXIMIZE = True
torch.set_num_threads(1)  # a 700-parameter model: more threads only add overhead (and thrash on a busy CPU)


def _split():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))  # fixed split, independent of --seed
    x, y = x[order].astype(np.float32), y[order]
    n_train, n_val = int(0.5 * len(y)), int(0.25 * len(y))
    # Statistics of the training part only. Pixels take 17 grey levels (0-16): a spread below one level is no
    # scale to divide by (4 border pixels are always 0 in training, so `std + 1e-6` made a 1 there 1e6).
    mean, std = x[:n_train].mean(0), np.maximum(x[:n_train].std(0), 1.0)
    x = (x - mean) / std
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    return {k: TensorDataset(torch.from_numpy(x[s]), torch.from_numpy(y[s])) for k, s in parts.items()}


_DATA = _split()


def train_data():
    return DataLoader(_DATA["train"], batch_size=64, shuffle=True)


def val_data():
    return DataLoader(_DATA["val"], batch_size=512)


def test_data():
    return DataLoader(_DATA["test"], batch_size=512)


def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch[1])


def optimizer(params):
    """Rebuilt at every phase change; a higher rate than the default 1e-3 suits this small problem."""
    return torch.optim.Adam(params, lr=3e-3)


def score(outputs, batch):
    """Accuracy in percent."""
    return (outputs.argmax(-1) == batch[1]).float().mean().item() * 100
