"""The adapter functions the classification tasks share (cross-entropy, Adam at 3e-3, accuracy in percent), and
those of a bundled sklearn set: a fixed 50/25/25 split (seed 0), inputs standardised with the training part's
statistics."""

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def classification_adapter(load, batch_size: int):
    """(train_data, val_data, test_data, loss, optimizer, score) for `load(return_X_y=True)`."""
    x, y = load(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order]
    n_train, n_val = int(0.5 * len(y)), int(0.25 * len(y))
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    data = {k: TensorDataset(torch.from_numpy(x[s]), torch.from_numpy(y[s])) for k, s in parts.items()}
    return classification_functions(data, batch_size, eval_batch_size=512)


def classification_functions(data: dict, batch_size: int, eval_batch_size: int):
    """(train_data, val_data, test_data, loss, optimizer, score) of a classification task whose `data` holds the
    "train", "val" and "test" datasets: cross-entropy, Adam at 3e-3, accuracy in percent."""

    def train_data():
        return DataLoader(data["train"], batch_size=batch_size, shuffle=True)

    def val_data():
        return DataLoader(data["val"], batch_size=eval_batch_size)

    def test_data():
        return DataLoader(data["test"], batch_size=eval_batch_size)

    def loss(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch[1])

    def optimizer(params):
        return torch.optim.Adam(params, lr=3e-3)

    def score(outputs, batch):
        return (outputs.argmax(-1) == batch[1]).float().mean().item() * 100

    return train_data, val_data, test_data, loss, optimizer, score
