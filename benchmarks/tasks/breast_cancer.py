"""Adapter: sklearn's bundled breast cancer data (569 samples, 30 features), fixed 50/25/25 split."""

from sklearn.datasets import load_breast_cancer
from tabular import classification_adapter

MAXIMIZE = True
train_data, val_data, test_data, loss, optimizer, score = classification_adapter(load_breast_cancer, batch_size=32)
