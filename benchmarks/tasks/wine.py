"""Adapter: sklearn's bundled wine data (178 samples, 13 features, 3 classes), fixed 50/25/25 split."""

from sklearn.datasets import load_wine
from tabular import classification_adapter

MAXIMIZE = True
train_data, val_data, test_data, loss, optimizer, score = classification_adapter(load_wine, batch_size=16)
