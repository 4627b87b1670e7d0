"""The correlation objective: the score, candidate training, and insertion that leaves the network unchanged."""

import numpy as np
import torch
from torch import nn

from dendrite_convert import DendriteConfig, convert, dendrite_layers
from dendrite_convert.training.error_signal import record_error_signals
from dendrite_convert.training.objectives.correlation import (
    CorrelationConfig, add_correlation_dendrites, correlation_score, train_candidates,
)


def test_correlation_score_matches_numpy():
    h, e = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    e[:, 1] = -2 * h[:, 1] + 0.1 * e[:, 1]
    expected = sum(abs(np.corrcoef(h[:, c], e[:, c])[0, 1]) for c in range(3))
    assert abs(correlation_score(h, e).item() - expected) < 1e-9


def test_candidates_learn_a_nonlinear_error_signal():
    torch.manual_seed(0)
    layer = convert(nn.Sequential(nn.Linear(6, 4)), DendriteConfig()).model[0]
    x = torch.randn(512, 6)
    e = torch.sigmoid(3 * x[:, :4] - 1)  # channel c's error is a sigmoid of input c: a dendrite can fit it
    untrained = CorrelationConfig(candidates=1, epochs=0)
    trained = CorrelationConfig(candidates=3, epochs=60, lr=0.05)
    _, _, before = train_candidates(layer, [(x, e)], untrained)
    module, cascade, after = train_candidates(layer, [(x, e)], trained)
    assert after > 0.9 and after > before + 0.2
    assert isinstance(module, nn.Linear) and cascade.shape == (0, 4)


def test_conv_error_signals_are_per_position_and_cascade_is_used():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 25, 2)),
                    DendriteConfig(dendrites=1)).model
    layers = dendrite_layers(model)
    batches = [(torch.randn(8, 2, 5, 5), torch.randint(0, 2, (8,))) for _ in range(3)]

    def forward_loss(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    records = record_error_signals(model, layers, batches, forward_loss, max_samples=100)
    x, e = records["0"][0]
    assert x.shape == (8, 2, 5, 5) and e.shape == (8, 3, 5, 5)
    x_before = torch.randn(4, 2, 5, 5)
    y_before = model(x_before)
    before = {n: p.clone() for n, p in model.named_parameters()}
    corr = add_correlation_dendrites(model, layers, batches, forward_loss, CorrelationConfig(candidates=2, epochs=2))
    assert set(corr) == {"0", "3"} and all(0 <= v <= 1 for v in corr.values())
    conv = layers["0"]
    assert conv.num_dendrites == 2 and conv.dendrite_cascade[1].shape == (1, 3)
    assert not any(p.requires_grad for p in conv.dendrite_layers[1].parameters())
    assert not conv.dendrite_cascade[1].requires_grad and conv.dendrite_scales[1].requires_grad
    assert conv.dendrite_layers[0].weight.requires_grad  # earlier dendrites are left as they were
    assert torch.equal(model(x_before), y_before)  # scale 0: the network function is unchanged
    after = dict(model.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in before.items())  # the network stayed frozen


def test_frozen_dendrites_keep_their_batchnorm_statistics():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 25, 2)), DendriteConfig(dendrites=1)).model.train()
    conv = dendrite_layers(model)["0"]
    assert isinstance(conv.dendrite_layers[0][1], nn.BatchNorm2d)  # conv -> BN is one neuron: dendrites copy the pair
    batches = [(torch.randn(8, 2, 5, 5) * 3 + 1, torch.randint(0, 2, (8,))) for _ in range(3)]

    def forward_loss(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    earlier = {k: v.clone() for k, v in conv.dendrite_layers[0][1].state_dict().items()}
    add_correlation_dendrites(model, dendrite_layers(model), batches, forward_loss, CorrelationConfig(candidates=2, epochs=2))
    # the earlier (trainable) dendrite fed the candidates' cascade without its statistics moving
    assert all(torch.equal(v, conv.dendrite_layers[0][1].state_dict()[k]) for k, v in earlier.items())
    frozen_norm = conv.dendrite_layers[1][1]
    inserted = {k: v.clone() for k, v in frozen_norm.state_dict().items()}
    network_mean = conv.norm.running_mean.clone()
    model.train()  # what every neuron epoch does
    for batch in batches:
        forward_loss(batch).backward()
    assert not torch.equal(conv.norm.running_mean, network_mean)  # the network itself trains in train mode
    assert not frozen_norm.training
    assert all(torch.equal(v, frozen_norm.state_dict()[k]) for k, v in inserted.items())
