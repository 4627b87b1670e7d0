"""nn.LSTM and nn.GRU as a layer family: dendrites on the gate pre-activations, exact conversion, the gate math
checked against a step-by-step loop, training, the fold (exact for identity dendrites), ONNX and safetensors export,
and the configurations refused with a reason."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves

import dendrite_convert as dc
from dendrite_convert.core.layers import added_parameters, dendrite_class_for
from dendrite_convert.core.recurrent import FoldedRecurrent
from dendrite_convert.exporting.fold import fold_layer

FEATURES, HIDDEN, STEPS = 3, 8, 6
KINDS = {"LSTM": nn.LSTM, "GRU": nn.GRU}


class Forecaster(nn.Module):
    """A recurrent layer over [batch, time, features] (transposed for a time-major layer) and a Linear head on the
    last step."""

    def __init__(self, kind: str = "LSTM", batch_first: bool = True):
        super().__init__()
        self.rnn = KINDS[kind](FEATURES, HIDDEN, batch_first=batch_first)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        time_major = not self.rnn.batch_first
        y, _ = self.rnn(x.transpose(0, 1) if time_major else x)
        return self.head((y[-1] if time_major else y[:, -1]))


class Stacked(nn.Module):
    """An LSTM feeding a time-major GRU: both families in one graph."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.gru = nn.GRU(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, h = self.gru(y.transpose(0, 1))
        return self.head(z[-1] + h[0])


def forecaster():
    return Forecaster()


def stacked():
    return Stacked()


SERIES = [{"shape": [2, STEPS, FEATURES], "dtype": "float32"}]


def _randomize(layer, std=0.5):
    with torch.no_grad():
        for d in layer.dendrite_layers:
            for p in d.parameters():
                p.normal_(0, std)
        for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
            p.normal_(0, std)


def _outputs(result):
    return [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]


def _reference(layer, x, hx=None):
    """The gate math of torch's LSTM/GRU, one step at a time, with sum_i s_i h_i added to the input-side gates."""
    base = layer.base_layer
    xs = x if not base.batch_first else x.transpose(0, 1)  # [T, B, in]
    extra = sum(s * h for s, h in zip(layer.dendrite_scales, layer.dendrite_outputs(xs)))
    gi = xs @ base.weight_ih_l0.t() + base.bias_ih_l0 + extra
    h = torch.zeros(xs.shape[1], base.hidden_size) if hx is None else (hx[0] if isinstance(hx, tuple) else hx)[0]
    c = torch.zeros_like(h) if hx is None or not isinstance(hx, tuple) else hx[1][0]
    steps = []
    for t in range(xs.shape[0]):
        gh = h @ base.weight_hh_l0.t() + base.bias_hh_l0
        if isinstance(base, nn.LSTM):
            i, f, g, o = (gi[t] + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            (ir, iz, in_), (hr, hz, hn) = gi[t].chunk(3, -1), gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
        steps.append(h)
    y = torch.stack(steps)
    return y.transpose(0, 1) if base.batch_first else y


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_layers_are_opt_in_and_convert_bit_for_bit(kind, batch_first):
    x = torch.randn(4, STEPS, FEATURES)
    model = Forecaster(kind, batch_first)
    reference = model(x)
    default = dc.convert(Forecaster(kind, batch_first))
    assert [t.name for t in default.report.targets] == ["head"]
    assert "only when --include names them" in {s.name: s.reason for s in default.report.skipped}["rnn"]
    converted = dc.convert(model, dc.DendriteConfig(include=[kind, "head"]), example_inputs=SERIES)
    assert {t.name: (t.type, t.out_channels) for t in converted.report.targets} == {
        "rnn": (kind, (4 if kind == "LSTM" else 3) * HIDDEN), "head": ("Linear", 1)}
    assert any("bit for bit" in note for note in converted.report.notes)  # the self-check ran the LSTM path
    layer = converted.model.rnn
    assert type(layer).__name__ == f"Dendrite{kind}" and layer.hidden_size == HIDDEN  # attributes read through
    assert torch.equal(converted.model(x), reference)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dendrites_add_to_the_gate_pre_activations_of_every_step(kind):
    base = KINDS[kind](FEATURES, HIDDEN, batch_first=True)
    layer = dendrite_class_for(base)(base)
    x, hx = torch.randn(3, STEPS, FEATURES), torch.randn(1, 3, HIDDEN)
    hx = (hx, torch.randn(1, 3, HIDDEN)) if kind == "LSTM" else hx
    with torch.no_grad():
        before = _outputs(layer(x, hx))
        layer.add_dendrite()
        layer.add_dendrite()
        zero_scale = _outputs(layer(x, hx))  # the fused kernel on the precomputed gates: float rounding only
    assert max(float((a - b).abs().max()) for a, b in zip(before, zero_scale)) <= 1e-6
    _randomize(layer)
    y, state = layer(x, hx)
    assert float((y - before[0]).abs().max()) > 0.05
    torch.testing.assert_close(y, _reference(layer, x, hx), rtol=0, atol=1e-5)
    (y.square().sum() + _outputs(state)[0].sum()).backward()
    for p in [layer.dendrite_layers[0].weight, layer.dendrite_scales[1], layer.dendrite_cascade[1], base.weight_hh_l0]:
        assert p.grad is not None and p.grad.abs().max() > 0
    single = layer(x[0], tuple(h[:, 0] for h in hx) if kind == "LSTM" else hx[:, 0])  # unbatched input
    torch.testing.assert_close(single[0], y[0], rtol=0, atol=1e-6)


def test_packed_sequences_run_through_the_dendrites():
    base = nn.LSTM(FEATURES, HIDDEN)
    layer = dendrite_class_for(base)(base, rank=2)
    layer.add_dendrite()
    _randomize(layer)
    sequences = [torch.randn(n, FEATURES) for n in (5, 3, 4)]
    out, (h, c) = layer(pack_sequence(sequences, enforce_sorted=False))
    padded, lengths = pad_packed_sequence(out)
    for i, seq in enumerate(sequences):
        alone, (h_alone, _) = layer(seq)
        torch.testing.assert_close(padded[: lengths[i], i], alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(h[0, i], h_alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_the_fold_is_a_plain_layer_or_a_projection_before_a_plain_recurrence(kind, activation, rank):
    base = KINDS[kind](FEATURES, HIDDEN, batch_first=True)
    layer = dendrite_class_for(base)(base, activation=activation, rank=rank)
    for _ in range(3):
        dendrite = layer.add_dendrite()
    if rank:
        assert [type(m) for m in dendrite] == [nn.Linear, nn.Linear] and dendrite[0].out_features == 2
    assert added_parameters(base, rank) == (
        (FEATURES * 2 + 2 * layer.out_channels + layer.out_channels) if rank else (FEATURES + 1) * layer.out_channels)
    _randomize(layer)
    with torch.no_grad():
        layer.dendrite_scales[2].zero_()  # dead unless the cascade reads it
        layer.dendrite_cascade[2].zero_()
    x = torch.randn(4, STEPS, FEATURES)
    expected = _outputs(layer.eval()(x))
    folded, record = fold_layer(layer)
    if activation == "identity":  # exact: the dendrites fold into W_ih
        assert type(folded) is KINDS[kind] and folded.input_size == FEATURES and record.folded == 2
    else:
        assert type(folded) is FoldedRecurrent and record.kept == 2 and record.dropped == 1
        assert type(folded.recurrence) is KINDS[kind] and folded.hidden_size == HIDDEN
    assert record.form == ("layer" if activation == "identity" else "dendrites")
    for got, want in zip(_outputs(folded(x)), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dendrite_train_grows_and_trains_lstm_dendrites(tmp_path):
    """dendrite-train (gradient objective) on a tiny forecasting task: predict the sum of the last inputs."""
    adapter = tmp_path / "adapter.py"
    adapter.write_text(
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"x = torch.randn(96, {STEPS}, {FEATURES}, generator=g)\n"
        "y = torch.sin(2 * x[:, -3:, :1].sum(1))\n"
        "batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]\n"
        "def train_data(): return batches\n"
        "def val_data(): return batches[:1]\n"
        "def loss(outputs, batch): return torch.nn.functional.mse_loss(outputs, batch[1])\n"
        "def optimizer(params): return torch.optim.Adam(params, lr=0.03)\n"
    )
    torch.manual_seed(0)
    converted = dc.convert(forecaster(), dc.DendriteConfig(include=["rnn"]), factory="tests.test_recurrent:forecaster",
                           example_inputs=SERIES)
    summary = dc.train(converted, str(adapter), tmp_path / "run",
                       dc.TrainConfig(switch_every=3, max_dendrites=1, max_epochs=6, plot=False))
    layer = dc.load(tmp_path / "run" / "best", factory="tests.test_recurrent:forecaster").rnn
    assert summary["objective"] == "gradient" and layer.num_dendrites == 1
    assert layer.dendrite_scales[0].abs().max() > 0.01  # the dendrite's output is used
    assert layer.dendrite_layers[0].weight.std() > 0.02  # and it trained away from N(0, 0.01^2)
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[4]) for r in rows]
    assert [int(r.split(",")[2]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert losses[-1] < losses[0] * 0.8


@pytest.mark.slow
def test_onnx_and_safetensors_exports_reproduce_lstm_and_gru_dendrites(tmp_path):
    import onnx

    from dendrite_convert.exporting.foldeddir import load_folded

    converted = dc.convert(stacked(), dc.DendriteConfig(dendrites=2, include=["*"]), factory="tests.test_recurrent:stacked",
                           example_inputs=SERIES)
    for name in ("lstm", "gru"):
        _randomize(getattr(converted.model, name))
    converted.model.eval()
    config = dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="separate", latency=False)
    report = dc.export(converted, tmp_path / "model.onnx", config)
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    assert report.verify.input_shapes == [[3, STEPS + 1, FEATURES]]  # another batch size and length than the example's
    assert {r.name: (r.form, r.kept) for r in report.folds if r.name != "head"} == {"lstm": ("dendrites", 2),
                                                                                 "gru": ("dendrites", 2)}
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"LSTM", "GRU"} <= ops  # onnxruntime's own recurrent kernels, not an unrolled loop
    report = dc.export(converted, tmp_path / "folded", dc.ExportConfig(format="safetensors", latency=False))
    assert report.verify.ok
    folded = load_folded(tmp_path / "folded", factory="tests.test_recurrent:stacked")
    assert type(folded.lstm) is FoldedRecurrent and type(folded.gru.recurrence) is nn.GRU
    x = torch.randn(5, STEPS, FEATURES)
    torch.testing.assert_close(folded(x), converted.model(x), rtol=0, atol=1e-5)


class Custom(nn.GRU):
    def forward(self, input, hx=None):
        return super().forward(input.flip(0), hx)


@pytest.mark.parametrize("layer, reason", [
    (nn.LSTM(3, 4, num_layers=2, proj_size=2), "LSTM with proj_size=2: ONNX's LSTM has no projection"),
    (Custom(3, 4, bidirectional=True), "Custom computes its output in its own forward"),
])
def test_unsupported_recurrent_configurations_are_skipped_with_a_reason(layer, reason):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            width = (layer.proj_size or layer.hidden_size) * (1 + layer.bidirectional)
            self.rnn, self.head = layer, nn.Linear(width, 1)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y)

    report = dc.convert(Model(), dc.DendriteConfig(include=["*"]), example_inputs=[{"shape": [5, 2, 3]}]).report
    assert [t.name for t in report.targets] == ["head"]
    assert reason in {s.name: s.reason for s in report.skipped}["rnn"]


def _task(batches=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32 * batches, STEPS, FEATURES, generator=g)
    y = torch.sin(2 * x[:, -3:, :1].sum(1))
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]


def _loss(model):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


def test_channel_selective_dendrites_serve_the_gate_channels_with_the_largest_error():
    from dendrite_convert.core.structure import add_dendrites
    from dendrite_convert.training.error_signal import error_ranked_channels

    torch.manual_seed(0)
    model = dc.convert(forecaster(), dc.DendriteConfig(include=["rnn"], channel_fraction=0.25)).model
    layer = model.rnn
    assert layer.width == HIDDEN and layer.dendrite_channels is not None  # 8 of the 32 gate channels
    batches = _task()
    ranked = error_ranked_channels(model, {"rnn": layer}, batches, _loss(model))
    errors = []  # dloss/dG by hand: G as a leaf, the recurrence run on it
    for x, y in batches:
        gates = layer.neuron(x).detach().requires_grad_(True)
        out, _ = _identity_input(layer)(gates)
        loss = nn.functional.mse_loss(model.head(out[:, -1]), y)
        errors.append(torch.autograd.grad(loss, gates)[0].flatten(0, 1))
    e = torch.cat(errors).double()
    assert torch.equal(ranked["rnn"], e.var(0, correction=0).topk(HIDDEN).indices.sort().values)
    add_dendrites(model, ranked)
    assert torch.equal(layer.dendrite_channels[0], ranked["rnn"])
    _randomize(layer)
    x = torch.randn(4, STEPS, FEATURES)
    folded, record = fold_layer(layer.eval())
    assert record.kept == 1
    torch.testing.assert_close(folded(x)[0], layer(x)[0], rtol=0, atol=1e-6)


def _identity_input(layer):
    """An nn.LSTM/GRU(C, H) reading G directly (identity input weight, no input bias), sharing the layer's W_hh, b_hh."""
    base = layer.base_layer
    twin = type(base)(layer.out_channels, base.hidden_size, batch_first=True)
    with torch.no_grad():
        twin.weight_ih_l0.copy_(torch.eye(layer.out_channels))
        twin.bias_ih_l0.zero_()
        twin.weight_hh_l0.copy_(base.weight_hh_l0)
        twin.bias_hh_l0.copy_(base.bias_hh_l0)
    return twin


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_correlation_candidates_fit_the_gate_error_signal(kind):
    from dendrite_convert.training.objectives.correlation import CorrelationConfig, add_correlation_dendrites

    torch.manual_seed(0)
    model = dc.convert(Forecaster(kind), dc.DendriteConfig(include=["rnn"])).model
    config = CorrelationConfig(candidates=2, epochs=5, max_samples=96)
    corr = add_correlation_dendrites(model, {"rnn": model.rnn}, _task(), _loss(model), config)
    assert model.rnn.num_dendrites == 1
    assert corr["rnn"] > 0.05  # a candidate was trained on recorded (x, dloss/dG) pairs, not left at random
    x = torch.randn(2, STEPS, FEATURES)
    assert not model.rnn.dendrite_layers[0].weight.requires_grad  # kept frozen, as for every family
    assert torch.equal(model.rnn.gate_inputs(x, x), x)


def test_low_rank_dendrites_convert():
    low_rank = dc.convert(forecaster(), dc.DendriteConfig(dendrites=1, include=["rnn"], rank=1)).model.rnn
    assert [m.out_features for m in low_rank.dendrite_layers[0]] == [1, 4 * HIDDEN]
