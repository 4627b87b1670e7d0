"""Adapter: the synthetic review task of examples/text_classification for a tiny BERT (token ids in, logits out)."""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "text_classification"))
from task import make_reviews  # noqa: E402

MAXIMIZE = True
_DATA = {name: TensorDataset(*make_reviews(n, seed)) for name, n, seed in
         (("train", 1024, 0), ("val", 256, 1), ("test", 256, 2))}


def train_data():
    return DataLoader(_DATA["train"], batch_size=64, shuffle=True)


def val_data():
    return DataLoader(_DATA["val"], batch_size=256)


def test_data():
    return DataLoader(_DATA["test"], batch_size=256)


def inputs(batch):
    return {"input_ids": batch[0]}


def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits, batch[1])


def optimizer(params):
    return torch.optim.Adam(params, lr=3e-3)


def score(outputs, batch):
    return (outputs.logits.argmax(-1) == batch[1]).float().mean().item() * 100
