"""Stacked and bidirectional nn.LSTM/GRU: one target per layer and direction, bit for bit at zero dendrites (with and
without initial states, either layout), the parts composed as torch composes them (checked against the step-by-step
gate math), packed sequences, gradients with dropout in training, error signals, the fold, reload, the sequence
axis found at conversion, and ONNX and .pt2 at other sequence lengths than the example's."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves

import dendrite_convert as dc
from dendrite_convert.core.layers import dendrite_layers
from dendrite_convert.core.recurrent import FoldedRecurrent
from dendrite_convert.core.recurrent_stack import RecurrentStack
from dendrite_convert.exporting.fold import fold
from tests.test_recurrent import _randomize, _reference

FEATURES, HIDDEN, STEPS = 3, 4, 5
KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU}
PARTS = ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]


class Encoder(nn.Module):
    """A stacked recurrent layer with optional initial states (h0, and c0 for an LSTM) and a Linear on every step."""

    def __init__(self, kind="LSTM", layers=2, bidirectional=True, batch_first=True, dropout=0.25):
        super().__init__()
        self.rnn = KINDS[kind](FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional,
                               batch_first=batch_first, dropout=dropout)
        self.head = nn.Linear(HIDDEN * (1 + bidirectional), 1)

    def forward(self, x, h0=None, c0=None):
        state = h0 if c0 is None else (h0, c0)
        y, final = self.rnn(x, state)
        return self.head(y), final


def encoder():
    return Encoder()


class Bare(nn.Module):
    """Just the recurrent layer: its output and final states."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None):
        return self.rnn(x, hx)


def _stack(base, **config):
    """`base` converted (batch-first example), its RecurrentStack with randomized dendrites in every part."""
    x = [2, STEPS, FEATURES] if base.batch_first else [STEPS, 2, FEATURES]
    stack = dc.convert(Bare(base), dc.DendriteConfig(include=["*"], **config), example_inputs=[{"shape": x}]).model.rnn
    for part in stack.children():
        _randomize(part)
    return stack


def _leaves(result):
    return [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]


def _specs(kind, batch_first, states, layers=2, directions=2):
    x = [2, STEPS, FEATURES] if batch_first else [STEPS, 2, FEATURES]
    state = {"shape": [layers * directions, 2, HIDDEN]}
    return [{"shape": x}] + ([state] * (2 if kind == "LSTM" else 1) if states else [])


@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_stacked_bidirectional_layers_convert_bit_for_bit_one_target_per_layer_and_direction(kind, batch_first, states):
    specs = _specs(kind, batch_first, states)
    model = Encoder(kind, batch_first=batch_first)
    inputs = [torch.randn(s["shape"]) for s in specs]
    torch.manual_seed(1)
    trained = _leaves(model(*inputs))  # in training: dropout between the layers
    expected = _leaves(model.eval()(*inputs))
    converted = dc.convert(model.train(), dc.DendriteConfig(include=[kind, "head"]), example_inputs=specs)
    assert [t.name for t in converted.report.targets] == [*PARTS, "head"]
    assert [t.out_channels for t in converted.report.targets][:4] == [(4 if kind == "LSTM" else 3) * HIDDEN] * 4
    stack = converted.model.rnn
    assert type(stack) is RecurrentStack
    assert (stack.hidden_size, stack.num_layers, stack.bidirectional) == (HIDDEN, 2, True)
    assert stack.weight_ih_l1_reverse is stack.l1_reverse.base_layer.weight_ih_l0  # the original's, not copies
    assert stack.l1.input_size == 2 * HIDDEN  # layer 1 reads both directions of layer 0
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(converted.model(*inputs)), trained))
    assert all(torch.equal(a, b) for a, b in zip(_leaves(converted.model.eval()(*inputs)), expected))
    for layer in dendrite_layers(converted.model).values():  # zero scales: the parts run one by one
        layer.add_dendrite()
    with torch.no_grad():
        assert max(float((a - b).abs().max()) for a, b in zip(_leaves(converted.model(*inputs)), expected)) <= 1e-6


@pytest.mark.parametrize("layers, bidirectional", [(3, False), (1, True), (2, True)])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_the_parts_compose_as_torch_stacks_layers_and_directions(kind, layers, bidirectional):
    stack = _stack(KINDS[kind](FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional, batch_first=True),
                   dendrites=2)
    parts = list(stack.children())
    x = torch.randn(3, STEPS, FEATURES)
    h0 = torch.randn(layers * (1 + bidirectional), 3, HIDDEN)
    hx = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0
    y, final = stack(x, hx)
    h_n = final[0] if kind == "LSTM" else final
    expected, inputs = [], x
    for layer in range(layers):  # torch's composition by hand, on the step-by-step gate math of each part
        outputs = []
        for direction in range(1 + bidirectional):
            k = layer * (1 + bidirectional) + direction
            state = tuple(h[k:k + 1] for h in hx) if kind == "LSTM" else hx[k:k + 1]
            out = _reference(parts[k], inputs.flip(1) if direction else inputs, state)
            expected.append(out[:, -1])  # the part's final h
            outputs.append(out.flip(1) if direction else out)
        inputs = torch.cat(outputs, -1)
    torch.testing.assert_close(y, inputs, rtol=0, atol=1e-5)
    torch.testing.assert_close(h_n, torch.stack(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dendrites_of_every_layer_and_direction_get_gradients_with_dropout_in_training(kind):
    model = dc.convert(Encoder(kind), dc.DendriteConfig(dendrites=1, include=["rnn"])).model.train()
    for layer in dendrite_layers(model).values():
        _randomize(layer)
    y, final = model(torch.randn(4, STEPS, FEATURES))
    (y.square().sum() + _leaves(final)[0].sum()).backward()
    for name, layer in dendrite_layers(model).items():
        for p in [layer.dendrite_layers[0].weight, layer.dendrite_scales[0], layer.base_layer.weight_hh_l0]:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    single, _ = model.eval()(torch.randn(STEPS, FEATURES))  # unbatched input
    assert single.shape == (STEPS, 1)


def test_error_signals_reach_every_layer_and_direction():
    """Channel-selective ranking and correlation candidates read dloss/dG at each part's own gate inputs."""
    from dendrite_convert.core.structure import add_dendrites
    from dendrite_convert.training.error_signal import error_ranked_channels
    from dendrite_convert.training.objectives.correlation import CorrelationConfig, add_correlation_dendrites

    torch.manual_seed(0)
    x, y = torch.randn(64, STEPS, FEATURES), torch.randn(64, STEPS, 1)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    selective = dc.convert(Encoder(), dc.DendriteConfig(include=["rnn"], channel_fraction=0.25)).model
    ranked = error_ranked_channels(selective, dendrite_layers(selective), batches,
                                   lambda b: nn.functional.mse_loss(selective(b[0])[0], b[1]))
    assert sorted(ranked) == PARTS and all(rows.shape == (HIDDEN,) for rows in ranked.values())
    assert len({tuple(rows.tolist()) for rows in ranked.values()}) > 1  # each part ranks its own gate channels
    add_dendrites(selective, ranked)
    assert all(torch.equal(layer.dendrite_channels[0], ranked[name])
               for name, layer in dendrite_layers(selective).items())
    model = dc.convert(Encoder("GRU"), dc.DendriteConfig(include=["rnn"])).model
    corr = add_correlation_dendrites(model, dendrite_layers(model), batches,
                                     lambda b: nn.functional.mse_loss(model(b[0])[0], b[1]),
                                     CorrelationConfig(candidates=2, epochs=3, max_samples=64))
    assert sorted(corr) == PARTS and min(corr.values()) > 0.05


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_sequences_run_each_direction_within_their_own_length(kind):
    stack = _stack(KINDS[kind](FEATURES, HIDDEN, num_layers=2, bidirectional=True), dendrites=1)
    sequences = [torch.randn(n, FEATURES) for n in (3, 6, 1, 4)]
    out, final = stack(pack_sequence(sequences, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    for i, seq in enumerate(sequences):
        alone, alone_final = stack(seq[:, None])
        torch.testing.assert_close(padded[: lengths[i], i], alone[:, 0], rtol=0, atol=1e-6)
        for got, want in zip(_leaves(final), _leaves(alone_final)):
            torch.testing.assert_close(got[:, i], want[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("activation", ["identity", "sigmoid"])
def test_the_fold_makes_each_part_plain_and_a_reload_is_exact(tmp_path, activation):
    converted = dc.convert(encoder(), dc.DendriteConfig(dendrites=2, include=["*"], activation=activation),
                           factory="tests.test_recurrent_stack:encoder", example_inputs=_specs("LSTM", True, False))
    for layer in dendrite_layers(converted.model).values():
        _randomize(layer)
    model = converted.model.eval()
    x = torch.randn(3, STEPS + 2, FEATURES)
    result = fold(model)
    plain = nn.LSTM if activation == "identity" else FoldedRecurrent
    assert [type(m) for m in result.model.rnn.children()] == [plain] * 4
    for got, want in zip(_leaves(result.model(x)), _leaves(model(x))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    converted.save(tmp_path / "converted")
    reloaded = dc.load(tmp_path / "converted", factory="tests.test_recurrent_stack:encoder").eval()
    assert all(torch.equal(a, b) for a, b in zip(_leaves(reloaded(x)), _leaves(model(x))))


class Flattening(nn.Module):
    """A GRU whose every step feeds one Linear: the sequence length is part of the architecture."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(FEATURES, HIDDEN, batch_first=True), nn.Linear(STEPS * HIDDEN, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0].flatten(1))


def test_conversion_names_the_time_axis_only_where_the_model_takes_any_length():
    x = {"shape": [STEPS, STEPS, FEATURES]}  # batch and time of one size: only growing the time axis grows T
    converted = dc.convert(Encoder(), dc.DendriteConfig(include=["*"]), example_inputs=[x])
    assert converted.example_inputs == [{**x, "axes": {"0": "batch", "1": "sequence"}}]
    assert "input 0: axis 1 is time; the export takes any sequence length" in converted.report.notes
    named = {**x, "axes": {"0": "batch"}}  # a spec that names its own axes keeps them
    assert dc.convert(Encoder(), dc.DendriteConfig(include=["*"]), example_inputs=[named]).example_inputs == [named]
    assert dc.convert(Encoder(), dc.DendriteConfig(), example_inputs=[x]).example_inputs == [x]  # no recurrent target
    fixed = dc.convert(Flattening(), dc.DendriteConfig(include=["*"]), example_inputs=[{"shape": [2, STEPS, FEATURES]}])
    assert [t.name for t in fixed.report.targets] == ["rnn", "head"] and "axes" not in fixed.example_inputs[0]


@pytest.mark.slow
def test_onnx_of_stacked_layers_runs_at_other_sequence_lengths_and_the_safetensors_fold_reloads(tmp_path):
    import onnx
    import onnxruntime as ort

    from dendrite_convert.exporting.foldeddir import load_folded

    converted = dc.convert(encoder(), dc.DendriteConfig(dendrites=2, include=["*"], rank=2),
                           factory="tests.test_recurrent_stack:encoder", example_inputs=_specs("LSTM", True, False))
    for layer in dendrite_layers(converted.model).values():
        _randomize(layer)
    model = converted.model.eval()
    config = dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="separate", latency=False)
    report = dc.export(converted, tmp_path / "model.onnx", config)
    assert report.verify.ok and report.verify.input_shapes == [[3, STEPS + 1, FEATURES]]  # batch and length both grow
    assert [(r.name, r.form, r.kept) for r in report.folds][:4] == [(name, "dendrites", 2) for name in PARTS]
    assert [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node].count("LSTM") == 4
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    for shape in ([1, 2 * STEPS + 3, FEATURES], [4, 2, FEATURES]):
        x = torch.randn(shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for a, b in zip(got, _leaves(model(x))):
            torch.testing.assert_close(torch.from_numpy(a), b.detach(), rtol=1e-5, atol=1e-5)
    other = {"gemm_layout": "separate", "latency": False}
    program = dc.export(converted, tmp_path / "model.pt2", dc.ExportConfig(format="pt2", atol=1e-5, **other))
    assert program.verify.ok and program.verify.input_shapes == [[3, STEPS + 1, FEATURES]]  # a while_loop program
    assert dc.export(converted, tmp_path / "folded", dc.ExportConfig(format="safetensors", **other)).verify.ok
    folded = load_folded(tmp_path / "folded", factory="tests.test_recurrent_stack:encoder")
    assert [type(m) for m in folded.rnn.children()] == [FoldedRecurrent] * 4
    x = torch.randn(2, STEPS + 4, FEATURES)
    for a, b in zip(_leaves(folded(x)), _leaves(model(x))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
