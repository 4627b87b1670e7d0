"""Data adapter for `dendrite-train`: the synthetic review task of task.py, for the tiny BERT.

    dendrite-train converted/ --adapter examples/text_classification/adapter.py -o run/ --patience 3
"""

import importlib.util
from pathlib import Path

import torch
from torch.utils.data import DataLoader

_spec = importlib.util.spec_from_file_location("text_classification_task", Path(__file__).with_name("task.py"))
task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task)

MAXIMIZE = True
torch.set_num_threads(1)  # a 20k-parameter model: more threads only add overhead (and thrash on a busy CPU)
_DATA = {name: task.as_records(*task.make_reviews(n, seed))
         for name, n, seed in (("train", 2048, 1), ("val", 512, 2), ("test", 512, 3))}


def train_data():
    return DataLoader(_DATA["train"], batch_size=32, shuffle=True)


def val_data():
    return DataLoader(_DATA["val"], batch_size=512)


def test_data():
    return DataLoader(_DATA["test"], batch_size=512)


def inputs(batch):
    """The model's keyword arguments (labels stay out: the loss is computed here)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])


def score(outputs, batch):
    """Accuracy in percent."""
    return (outputs.logits.argmax(-1) == batch["labels"]).float().mean().item() * 100


def optimizer(params):
    return torch.optim.AdamW(params, lr=3e-3)
