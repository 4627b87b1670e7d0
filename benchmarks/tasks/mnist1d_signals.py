"""Adapter: MNIST-1D (Greydanus & Steinbach), the ten digit templates as 40-sample 1-D signals, padded,
scaled, sheared, shifted and noised. The data are generated here, procedurally, by the `mnist1d` package's
own `make_dataset` with its default arguments (5000 signals, seed 42); nothing is downloaded (its
`get_dataset`, which may download, is not used). Split: the package's 4000 training signals as 3000 train /
1000 validation, its 1000 test signals as test. (Not named mnist1d.py: that would shadow the package.)"""

import random

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tabular import classification_functions

try:
    from mnist1d.data import get_dataset_args, make_dataset
except ModuleNotFoundError as missing:  # a benchmark-only dependency
    raise ModuleNotFoundError("the mnist1d task needs the mnist1d package: pip install -e '.[bench]'",
                              name=missing.name) from None

MAXIMIZE = True


def _generate() -> dict:
    states = random.getstate(), np.random.get_state()  # make_dataset seeds the global generators
    data = make_dataset(get_dataset_args())
    random.setstate(states[0])
    np.random.set_state(states[1])
    x, y = torch.from_numpy(data["x"]).float(), torch.from_numpy(data["y"]).long()
    x_test, y_test = torch.from_numpy(data["x_test"]).float(), torch.from_numpy(data["y_test"]).long()
    return {"train": TensorDataset(x[:3000], y[:3000]), "val": TensorDataset(x[3000:], y[3000:]),
            "test": TensorDataset(x_test, y_test)}


train_data, val_data, test_data, loss, optimizer, score = classification_functions(_generate(), batch_size=64,
                                                                                  eval_batch_size=1000)
