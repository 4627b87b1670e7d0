"""nn.Embedding as a layer family: opt-in targets, table dendrites (full, low-rank, channel-selective), an exact
fold into one table of the original size, training with the gradient objective, ONNX and safetensors export."""

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from dendrite_convert.core.layers import added_parameters, dendrite_class_for
from dendrite_convert.exporting.fold import fold_layer
from tests.helpers_export import randomize_dendrites

VOCAB, DIM = 20, 6


class Tagger(nn.Module):
    """Token embeddings (row 0 is padding) and a per-position Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.head = nn.Linear(DIM, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def tagger() -> nn.Module:
    return Tagger()


TOKENS = [{"shape": [2, 5], "dtype": "int64", "high": VOCAB}]


def test_embeddings_are_opt_in_and_convert_exactly():
    ids = torch.randint(0, VOCAB, (3, 7))
    model = tagger()
    reference = model(ids)
    default = dc.convert(tagger())
    assert [t.name for t in default.report.targets] == ["head"]
    assert "only when --include names them" in {s.name: s.reason for s in default.report.skipped}["emb"]
    converted = dc.convert(model, dc.DendriteConfig(include=["*"]))
    assert {t.name: t.type for t in converted.report.targets} == {"emb": "Embedding", "head": "Linear"}
    assert type(converted.model.emb).__name__ == "DendriteEmbedding"
    assert torch.equal(converted.model(ids), reference)


@pytest.mark.parametrize("kind", ["full", "low rank", "channels", "low rank + channels"])
@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_dendrites_fold_exactly_into_one_table_of_the_original_size(kind, activation):
    base = nn.Embedding(VOCAB, DIM, padding_idx=0)
    rank = 2 if "low rank" in kind else None
    fraction = 0.5 if "channels" in kind else None
    layer = dendrite_class_for(base)(base, activation=activation, rank=rank, channel_fraction=fraction)
    ids = torch.randint(0, VOCAB, (4, 9))
    before = layer(ids)
    for channels in ([0, 2, 5], [1, 2, 3], [0, 3, 5]):  # overlapping sets: the cascade reads shared channels
        dendrite = layer.add_dendrite(channels=torch.tensor(channels) if fraction else None)
        assert torch.equal(layer(ids), before)  # a new dendrite leaves the function unchanged
    if rank:  # a smaller table times a projection
        assert isinstance(dendrite[0], nn.Embedding) and dendrite[0].weight.shape == (VOCAB, 2)
        assert isinstance(dendrite[1], nn.Linear) and dendrite[1].bias is None
    assert layer.width == (3 if fraction else DIM)
    assert added_parameters(base, rank, fraction) == ((VOCAB + layer.width) * 2 if rank else VOCAB * layer.width)
    randomize_dendrites(layer)
    expected = layer.eval()(ids)
    assert (expected - before).abs().max() > 1e-2  # the dendrites matter
    folded, record = fold_layer(layer)
    assert type(folded) is nn.Embedding and folded.weight.shape == (VOCAB, DIM) and folded.padding_idx == 0
    assert record.form == "layer" and record.folded == 3
    torch.testing.assert_close(folded(ids), expected, rtol=0, atol=1e-6)


def test_embedding_dendrite_trains_with_the_gradient_objective():
    """A zero scale passes gradient to the scale first; once it moves, the dendrite table learns and the loss drops."""
    torch.manual_seed(0)
    model = dc.convert(tagger(), dc.DendriteConfig(dendrites=1, include=["emb"])).model
    ids, labels = torch.randint(1, VOCAB, (64, 5)), torch.randint(0, 3, (64, 5))
    layer = model.emb
    table = layer.dendrite_layers[0].weight
    model.requires_grad_(False)
    trainable = [table, *layer.dendrite_scales]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    losses = []
    for step in range(40):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert layer.dendrite_scales[0].grad.abs().max() > 0 and table.grad.abs().max() == 0
        optimizer.step()
        losses.append(loss.item())
    assert table.grad.abs().max() > 0
    assert losses[-1] < losses[0] - 0.05


def test_dendrite_train_adds_and_trains_embedding_dendrites(tmp_path):
    """dendrite-train (gradient objective) on a token-tagging task where only the embedding has dendrites."""
    adapter = tmp_path / "adapter.py"
    adapter.write_text(
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"ids = torch.randint(1, {VOCAB}, (96, 5), generator=g)\n"
        "labels = (ids * 7 % 3)\n"
        "batches = [(ids[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]\n"
        "def train_data(): return batches\n"
        "def val_data(): return batches[:1]\n"
        "def loss(outputs, batch): return torch.nn.functional.cross_entropy(outputs.flatten(0, 1), batch[1].flatten())\n"
        "def optimizer(params): return torch.optim.Adam(params, lr=0.05)\n"
    )
    converted = dc.convert(tagger(), dc.DendriteConfig(include=["emb"]), factory="tests.test_embedding:tagger")
    summary = dc.train(converted, str(adapter), tmp_path / "run",
                       dc.TrainConfig(switch_every=2, max_dendrites=1, max_epochs=4, plot=False))
    trained = dc.load(tmp_path / "run" / "best", factory="tests.test_embedding:tagger")  # named again: consent
    layer = trained.emb
    assert summary["objective"] == "gradient" and layer.num_dendrites == 1
    assert layer.dendrite_scales[0].abs().max() > 0.01  # the dendrite's output is used
    assert layer.dendrite_layers[0].weight.std() > 0.05  # and its table trained away from N(0, 0.01^2)
    rows = (tmp_path / "run" / "scores.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[4]) for r in rows]
    assert [int(r.split(",")[2]) for r in rows] == [0, 0, 1, 1] and losses[3] < losses[1]


def test_onnx_and_safetensors_exports_reproduce_the_dendritic_model(tmp_path):
    from dendrite_convert.exporting.foldeddir import load_folded

    converted = dc.convert(tagger(), dc.DendriteConfig(dendrites=3, include=["*"]), factory="tests.test_embedding:tagger",
                           example_inputs=TOKENS)
    randomize_dendrites(converted.model.emb)
    randomize_dendrites(converted.model.head)
    converted.model.eval()
    report = dc.export(converted, tmp_path / "model.onnx", dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="separate", latency=False))
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    assert report.verify.input_shapes != [TOKENS[0]["shape"]]  # fresh inputs at other sizes
    assert {r.name: (r.form, r.folded) for r in report.folds}["emb"] == ("layer", 3)
    report = dc.export(converted, tmp_path / "folded", dc.ExportConfig(format="safetensors", latency=False))
    assert report.verify.ok
    folded = load_folded(tmp_path / "folded", factory="tests.test_embedding:tagger")  # named again: consent
    assert type(folded.emb) is nn.Embedding and folded.emb.weight.shape == (VOCAB, DIM)
    ids = torch.randint(0, VOCAB, (3, 4))
    torch.testing.assert_close(folded(ids), converted.model(ids), rtol=0, atol=1e-5)
