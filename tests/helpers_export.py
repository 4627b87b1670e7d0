"""Tiny models with non-trivial dendrites for the fold/export tests (also a --factory for saved directories)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 5, stride=2, padding=4, dilation=2, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.c1(x))).mean(-1))


class CNN(nn.Module):
    """conv -> BN pairs, a grouped and a depthwise conv (with and without BN), a Linear -> BN1d head."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.grouped = nn.Conv2d(channels, channels, 3, padding=1, groups=2)
        self.g_bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels)
        self.dw_bn = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * channels, 1, groups=channels)  # depthwise multiplier 2
        self.fc = nn.Linear(2 * channels, 16)
        self.fc_bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.g_bn(self.grouped(x))) + x
        x = F.relu(self.dw_bn(self.depthwise(x)))
        x = self.expand(x).mean((2, 3))
        return self.head(F.relu(self.fc_bn(self.fc(x))))


def cnn() -> nn.Module:
    return CNN()


def conv1d_net() -> nn.Module:
    return Conv1dNet()


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine (default BN is the identity and hides fold bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def randomize_dendrites(layer: nn.Module, scale: float = 0.5) -> None:
    """Dendrite weights big enough to matter, and non-zero random scales and cascade weights."""
    with torch.no_grad():
        for d in layer.dendrite_layers:
            for p in d.parameters():
                p.normal_(0, 0.3)
        for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
            p.normal_(0, scale)


def add_dendrites(model: nn.Module, k: int = 3, scale: float = 0.5, zero_scales: bool = False) -> nn.Module:
    """k dendrites per target with non-zero random scales, cascade weights and weights big enough to matter."""
    from dendrite_convert import dendrite_layers

    with torch.no_grad():
        for layer in dendrite_layers(model).values():
            for _ in range(k):
                layer.add_dendrite()
            randomize_dendrites(layer, scale)
            if zero_scales:
                for p in layer.dendrite_scales:
                    p.zero_()
    randomize_norms(model)
    return model.eval()


def tiny_bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


def tiny_bert() -> nn.Module:
    from transformers import BertModel

    return BertModel(tiny_bert_config())


def tiny_bert_classifier() -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config(num_labels=3))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))


def unfoldable_bn() -> nn.Module:
    """Linear -> BatchNorm1d without running statistics: it normalises by the batch even in eval, so no fold."""
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2))


def perturb_the_fold(monkeypatch) -> None:
    """Make export's fold move one bias (`head.main.bias`) by 0.01: a wrong fold that verification must catch."""
    import sys

    module = sys.modules["dendrite_convert.exporting.export"]  # the package's `export` name is the function
    real_fold = module.fold

    def perturbed(*args, **kwargs):
        result = real_fold(*args, **kwargs)
        with torch.no_grad():
            result.model.head.main.bias.add_(0.01)
        return result

    monkeypatch.setattr(module, "fold", perturbed)
