"""Benchmark models, each a factory of one width argument so a widened plain model can match a dendritic one."""

import sys
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def digits_mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def mnist1d_mlp(width: int = 16) -> nn.Module:
    """For the 40-sample MNIST-1D signals: two hidden layers, too narrow for the task (capacity-limited)."""
    return nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def cancer_mlp(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(30, width), nn.ReLU(), nn.Linear(width, 2))


def wine_mlp(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(13, width), nn.ReLU(), nn.Linear(width, 3))


def bars_cnn(width: int = 4) -> nn.Module:
    """For 1x12x12 images: two conv+BN stages and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(width, 4),
    )


def text_bert(width: int = 16) -> nn.Module:
    """A tiny random-init BERT classifier (hidden size = width) for the synthetic review task."""
    import transformers

    sys.path.insert(0, str(ROOT / "examples" / "text_classification"))
    from task import NUM_LABELS, SEQ_LEN, VOCAB

    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * width, max_position_embeddings=SEQ_LEN, num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)
