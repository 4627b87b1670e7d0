"""Channel-selective dendrites (--dendrite-channels F): same contract as full ones, on a fraction of the channels."""

import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from dendrite_convert.core.channels import select_channels
from dendrite_convert.training.objectives.correlation import CorrelationConfig, add_correlation_dendrites
from dendrite_convert.core.layers import added_parameters, count_parameters, dendrite_class_for
from dendrite_convert.exporting.fold import fold_layer
from dendrite_convert.exporting.folded import FoldedDendrites
from fixtures.models import small_cnn

MODELS = {
    "mlp": lambda: (nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5)), torch.randn(7, 12)),
    "cnn+bn": lambda: (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Conv2d(16, 8, 3)), torch.randn(2, 3, 8, 8)),
    "conv-transpose": lambda: (nn.Sequential(nn.ConvTranspose2d(3, 10, 2, stride=2), nn.ReLU()), torch.randn(2, 3, 4, 4)),
    # BN pairs, grouped and depthwise convs (they keep full-width dendrites) and a Conv1d; saved by its factory
    "small-cnn": lambda: (small_cnn(), torch.randn(2, 3, 8, 8)),
}


def _dendritic(kind: str, fraction: float = 0.3, rank=None, activation="sigmoid", k=3):
    """A converted model with k dendrites per target on random channel sets, every weight non-trivial."""
    torch.manual_seed(0)
    model, x = MODELS[kind]()
    factory = "fixtures.models:small_cnn" if kind == "small-cnn" else None
    converted = dc.convert(model, dc.DendriteConfig(channel_fraction=fraction, rank=rank, activation=activation), factory=factory)
    converted.model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in dc.dendrite_layers(converted.model).values():
            for _ in range(k):
                chosen = torch.randperm(layer.out_channels, generator=generator)[:layer.width].sort().values
                layer.add_dendrite(channels=chosen if layer.dendrite_channels is not None else None)
                for p in layer.dendrite_layers[-1].parameters():
                    p.normal_(0, 0.3)
            for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
                p.normal_(0, 0.5)
        for m in converted.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return converted, x


def _full_space_reference(layer, x):
    """The layer computed with every dendrite in the full channel space, zero where it does not serve."""
    y = layer.neuron(x)
    served = [torch.zeros(layer.out_channels).index_fill(0, row, 1.0) for row in layer.dendrite_channels]
    spread = [lambda v, i=i: torch.zeros(layer.out_channels).index_copy(0, layer.dendrite_channels[i], v)
              for i in range(layer.num_dendrites)]
    axis, hs = layer.channel_axis(y.ndim), []
    for i, (dendrite, cascade) in enumerate(zip(layer.dendrite_layers, layer.dendrite_cascade)):
        z = torch.zeros_like(y).index_copy(axis, layer.dendrite_channels[i], dendrite(x))
        for j, h in enumerate(hs):
            z = z + layer.per_channel(spread[i](cascade[j]) * served[j], z) * h
        hs.append(torch.sigmoid(z) * layer.per_channel(served[i], z))
        y = y + layer.per_channel(spread[i](layer.dendrite_scales[i]), y) * hs[-1]
    return y


@pytest.mark.parametrize("kind", list(MODELS))
def test_selective_layer_is_the_full_space_computation_restricted_to_its_channels(kind):
    converted, x = _dendritic(kind)
    model = converted.model
    layer = next(iter(dc.dendrite_layers(model).values()))
    assert layer.dendrite_channels.shape == (3, layer.width) and layer.width < layer.out_channels
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _full_space_reference(layer, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("base,shape,fraction,rank,expected", [
    (nn.Linear(64, 32), (4, 64), 0.25, None, 64 * 8 + 8),
    (nn.Linear(64, 32), (4, 64), 0.25, 2, 2 * 64 + 8 * 2 + 8),
    (nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6), 0.5, None, 16 * 16 * 9 + 16),
    (nn.Conv1d(8, 10, 5, bias=False), (2, 8, 20), 0.25, None, 3 * 8 * 5),  # ceil(2.5) = 3 channels
])
def test_selective_dendrite_parameters_and_zero_start(base, shape, fraction, rank, expected):
    layer = dendrite_class_for(base)(base, rank=rank, channel_fraction=fraction)
    x = torch.randn(shape)
    y0 = layer(x)
    before = count_parameters(layer)
    layer.add_dendrite(channels=torch.arange(layer.width) * 2 % layer.out_channels)
    assert torch.equal(layer(x), y0)  # zero-scale start
    assert added_parameters(base, rank, fraction) == expected
    assert count_parameters(layer) - before == expected + layer.width  # + its scale
    with torch.no_grad():
        layer.dendrite_scales[0].fill_(1.0)
    changed = (layer(x) - y0).abs().movedim(layer.channel_axis(y0.ndim), 0).flatten(1).amax(1) > 0
    assert changed.nonzero().flatten().tolist() == layer.dendrite_channels[0].tolist()  # only its channels


def test_bad_channel_sets_and_fractions_are_refused():
    layer = dendrite_class_for(nn.Linear(4, 8))(nn.Linear(4, 8), channel_fraction=0.25)
    for bad in (torch.tensor([1, 1]), torch.tensor([0, 8]), torch.tensor([0, 1, 2]), torch.tensor([3, 1])):
        with pytest.raises(ValueError, match="2 increasing indices below 8"):  # unsorted would misplace outputs
            layer.add_dendrite(channels=bad)
    assert layer.num_dendrites == 0
    full = dendrite_class_for(nn.Linear(4, 8))(nn.Linear(4, 8))
    with pytest.raises(ValueError, match="serve every channel"):
        full.add_dendrite(channels=torch.tensor([0, 1]))
    for fraction in (0, 1.5, -0.1):
        with pytest.raises(dc.UsageError, match="^channel_fraction"):
            dc.DendriteConfig(channel_fraction=fraction)
    with pytest.raises(dc.UsageError, match="^dendrites"):  # pre-inserted dendrites could not rank channels
        dc.DendriteConfig(channel_fraction=0.5, dendrites=1)
    assert dc.DendriteConfig(channel_fraction=1.0, dendrites=1).dendrites == 1  # F = 1 serves every channel


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_selective_fold_matches_unfolded(kind, activation, rank):
    converted, x = _dendritic(kind, rank=rank, activation=activation)
    with torch.no_grad():
        reference = converted.model(x)
        for layout in ("separate", "concat"):
            folded = dc.fold_model(converted.model, gemm_layout=layout)
            assert not dc.dendrite_layers(folded)
            torch.testing.assert_close(folded(x), reference, rtol=0, atol=1e-5)
    first = folded.stem if kind == "small-cnn" else folded[0]
    if activation == "identity":  # a selective stack is still linear: one plain layer, no extra cost
        assert not any(isinstance(m, FoldedDendrites) for m in folded.modules())
    else:
        assert isinstance(first, FoldedDendrites) and first.channels.shape == (3, first.scales.shape[1])
        if kind != "conv-transpose":  # concat: the main layer and the m channels (or rank) of each dendrite
            width = rank or first.scales.shape[1]
            assert first.layout == "concat" and first.widths == [first.out_channels] + [width] * 3


def test_zero_overlap_cascade_is_dropped_by_the_fold():
    layer = dendrite_class_for(nn.Linear(6, 8))(nn.Linear(6, 8), channel_fraction=0.25).eval()
    layer.add_dendrite(channels=torch.tensor([0, 1]))
    layer.add_dendrite(channels=torch.tensor([5, 6]))
    with torch.no_grad():
        layer.dendrite_scales[1].fill_(1.0)
        layer.dendrite_cascade[1].fill_(3.0)  # reads h_0 on channels 5, 6: h_0 has none, so it reads nothing
    folded, record = fold_layer(layer)
    assert record.kept == 1 and record.dropped == 1 and folded.links == [[]]
    x = torch.randn(4, 6)
    torch.testing.assert_close(folded(x), layer(x), rtol=0, atol=1e-6)


def test_selective_flops_and_onnx_export(tmp_path):
    """Folded FLOPs are the formula's, and onnxruntime matches torch within 1e-5."""
    from dendrite_convert.exporting.latency import count_flops

    n_in, n_out, fraction, k, batch = 64, 48, 0.25, 3, 8
    torch.manual_seed(0)
    converted = dc.convert(nn.Sequential(nn.Linear(n_in, n_out)), dc.DendriteConfig(channel_fraction=fraction))
    layer = converted.model[0]
    for i in range(k):
        layer.add_dendrite(channels=torch.arange(12) + 4 * i)  # overlapping: every cascade link is used
    from conftest import randomize_dendrites

    randomize_dendrites(converted.model)
    folded = dc.fold_model(converted.model)
    width = 12
    assert count_flops(folded, (torch.randn(batch, n_in),)) == 2 * batch * (n_in * n_out + k * n_in * width)
    cascade_rows = k * (k - 1) // 2
    assert dc.count_parameters(folded) == n_in * n_out + n_out + k * (n_in * width + width) + (k + cascade_rows) * width
    # the layout `folded` has, not one chosen by timing ("auto")
    config = dc.ExportConfig(input_shape=[2, n_in], atol=1e-5, rtol=1e-5, gemm_layout="separate")
    report = dc.export(converted, tmp_path / "sel.onnx", config)
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    rows, timed = {row.name: row for row in report.latency}, report.latency_inputs[0][0]  # the table shows them
    assert rows["onnxruntime"].flops == 2 * timed * (n_in * n_out + k * n_in * width)
    assert rows["onnxruntime"].params == rows["folded torch"].params == dc.count_parameters(folded)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_concat_layout_of_cheap_dendrites_exports_and_reloads(tmp_path, fmt, rank):
    """One conv computes the main channels, the selected channels and the rank-R factors; its slices are split."""
    from dendrite_convert.exporting.foldeddir import load_folded

    converted, x = _dendritic("small-cnn", rank=rank)
    path = tmp_path / ("cnn.onnx" if fmt == "onnx" else "folded")
    report = dc.export(converted, path, dc.ExportConfig(format=fmt, input_shape=list(x.shape), atol=1e-5, rtol=1e-5,
                                                         gemm_layout="concat", latency=False))
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-5
    if fmt == "safetensors":
        recipe = json.loads((path / "folded_config.json").read_text())["targets"]["stem"]["module"]
        assert recipe["layout"] == "concat" and recipe["widths"][1:] == [rank or recipe["width"]] * 3
        with torch.no_grad():
            torch.testing.assert_close(load_folded(path, trust_code=True)(x), converted.model(x), rtol=0, atol=1e-5)
        recipe["widths"] = recipe["widths"][:2]
        config = json.loads((path / "folded_config.json").read_text())
        config["targets"]["stem"]["module"] = recipe
        (path / "folded_config.json").write_text(json.dumps(config))
        with pytest.raises(dc.LoadError, match="malformed module spec.*widths"):
            load_folded(path, trust_code=True)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_selective_export_round_trips_a_cnn(tmp_path, fmt):
    converted, x = _dendritic("small-cnn")
    path = tmp_path / ("cnn.onnx" if fmt == "onnx" else "folded")
    report = dc.export(converted, path, dc.ExportConfig(format=fmt, input_shape=list(x.shape), atol=1e-5, rtol=1e-5))
    assert report.verify.ok
    if fmt == "safetensors":  # the plain-torch artifact rebuilds with the channel sets it was saved with
        from safetensors.torch import load_file, save_file

        from dendrite_convert.exporting.foldeddir import load_folded

        with torch.no_grad():
            torch.testing.assert_close(load_folded(path, trust_code=True)(x), converted.model(x), rtol=0, atol=1e-5)
        weights = load_file(path / "model.safetensors")
        assert not any("link_positions" in key for key in weights)  # derived from the channel sets on load
        save_file({**weights, "stem.link_positions": torch.zeros(1, 2, dtype=torch.long)}, path / "model.safetensors")
        with torch.no_grad():  # files of dev builds saved them: ignored, not loaded
            torch.testing.assert_close(load_folded(path, trust_code=True)(x), converted.model(x), rtol=0, atol=1e-5)
        buffer = io.BytesIO()
        torch.save(load_folded(path, trust_code=True), buffer)  # a folded model pickles whole, as a plain torch model does
        buffer.seek(0)
        with torch.no_grad():
            torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), converted.model(x), rtol=0, atol=1e-5)
        for row, column, value in ((1, 2, 16), (1, 0, int(weights["stem.channels"][1, 1]))):  # out of range, repeated
            damaged = {key: t.clone() for key, t in weights.items()}
            damaged["stem.channels"][row, column] = value
            save_file(damaged, path / "model.safetensors")
            with pytest.raises(dc.LoadError, match="channel sets of stem are not increasing indices below 8"):
                load_folded(path, trust_code=True)
        save_file(weights, path / "model.safetensors")
        config = json.loads((path / "folded_config.json").read_text())
        for width in (-1, "4", 9):
            config["targets"]["stem"]["module"]["width"] = width
            (path / "folded_config.json").write_text(json.dumps(config))
            with pytest.raises(dc.LoadError, match="stem.*malformed module spec.*width"):
                load_folded(path, trust_code=True)


def test_selective_structure_is_saved_and_reloaded(tmp_path):
    converted, x = _dendritic("small-cnn")
    with torch.no_grad():
        expected = converted.model(x)
    loaded = dc.load(converted.save(tmp_path / "converted"), trust_code=True).eval()
    original_layers, loaded_layers = dc.dendrite_layers(converted.model), dc.dendrite_layers(loaded)
    selective = [name for name, layer in original_layers.items() if layer.dendrite_channels is not None]
    assert selective == ["stem", "temporal", "head"]  # grouped and depthwise convs keep full-width dendrites
    for name in selective:
        assert torch.equal(loaded_layers[name].dendrite_channels, original_layers[name].dendrite_channels)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def _error_concentrated_task():
    """A 8-channel layer whose loss depends only on channels 2 and 5: they carry all the remaining error."""
    torch.manual_seed(0)
    model = dc.convert(nn.Sequential(nn.Linear(6, 8)), dc.DendriteConfig(channel_fraction=0.25)).model
    batches = [(torch.randn(32, 6), torch.randn(32, 2)) for _ in range(4)]

    def forward_loss(batch):
        x, target = batch
        return (model(x)[:, [2, 5]] - target).square().mean()

    return model, batches, forward_loss


def test_channels_with_the_largest_error_variance_are_chosen():
    layer = dendrite_class_for(nn.Linear(2, 4))(nn.Linear(2, 4), channel_fraction=0.5)
    errors = [torch.randn(100, 4) * torch.tensor([0.1, 3.0, 0.2, 2.0]) + torch.tensor([50.0, 0, 0, 0])]
    assert select_channels(layer, errors).tolist() == [1, 3]  # a constant error (channel 0) is the bias's job


@pytest.mark.parametrize("objective", ["gradient", "correlation"])
def test_new_dendrites_serve_the_channels_that_carry_the_error(objective):
    from dendrite_convert.training.error_signal import error_ranked_channels
    from dendrite_convert.core.structure import add_dendrites

    model, batches, forward_loss = _error_concentrated_task()
    layers = dc.dendrite_layers(model)
    if objective == "gradient":
        add_dendrites(model, error_ranked_channels(model, layers, batches, forward_loss, 1000))
    else:
        add_correlation_dendrites(model, layers, batches, forward_loss, CorrelationConfig(candidates=2, epochs=2))
    assert model[0].dendrite_channels.tolist() == [[2, 5]]


def test_channels_are_ranked_inside_inference_mode():
    """Callbacks run inside evaluation loops (inference mode, no grad): ranking still sees the error."""
    from dendrite_convert.training.error_signal import error_ranked_channels

    model, batches, forward_loss = _error_concentrated_task()
    skipping = lambda batch: None if batch is batches[0] else forward_loss(batch)  # noqa: E731 - a skipped batch
    with torch.inference_mode():
        ranked = error_ranked_channels(model, dc.dendrite_layers(model), iter(batches), skipping)
    assert ranked["0"].tolist() == [2, 5]


def test_growth_without_a_loss_refuses_selective_models():
    from dendrite_convert.training.growth import Growth
    from dendrite_convert.training.schedule import ScheduleConfig

    model, _, _ = _error_concentrated_task()
    with pytest.raises(dc.UsageError, match="dendrite-train or the DendriteCallback"):
        Growth(ScheduleConfig()).start(copy.deepcopy(model))

    def never(model):
        raise AssertionError("ranked the channels of a model without selective dendrites")

    plain = dc.convert(nn.Sequential(nn.Linear(6, 8)), dc.DendriteConfig()).model
    growth = Growth(ScheduleConfig(capacity_test=True), training_data=never)
    assert growth.observe(plain, 1.0).action == "add" and plain[0].num_dendrites == 1


def _concentrated_samples(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)


def test_lightning_callback_ranks_channels_with_the_training_step_loss(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from dendrite_convert.integrations.lightning import DendriteCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, _, _ = _error_concentrated_task()

        def training_step(self, batch, _):
            loss = (self.net(batch[0])[:, [2, 5]] - batch[1]).square().mean()
            self.log("train_loss", loss)  # muted while the callback ranks channels outside the loop
            return {"loss": loss}

        def validation_step(self, batch, _):
            self.log("val_loss", (self.net(batch[0])[:, [2, 5]] - batch[1]).square().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    served: list[list[list[int]]] = []
    seen: list[list[float]] = []  # per epoch, the first value of every training batch

    class Recorder(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append([])
            if module.net[0].num_dendrites:
                served.append(module.net[0].dendrite_channels.tolist())

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen[-1].append(float(batch[0][0, 0]))

    def fit(module, precision="32-true"):
        trainer = pl.Trainer(max_epochs=3, callbacks=[DendriteCallback(switch_every=1, max_dendrites=2), Recorder()],
                             logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=str(tmp_path),
                             val_check_interval=2, precision=precision)
        data = TensorDataset(*_concentrated_samples())
        loader = DataLoader(data, batch_size=32, num_workers=1, persistent_workers=True)  # ranking leaves it alone
        trainer.fit(module, loader, DataLoader(data, batch_size=128))

    fit(Module())
    assert served and all(row == [2, 5] for row in served[0])
    # the loop's own iterator was left alone: epoch 0 saw its 4 batches in order, later ones (cut short when
    # the schedule stops) the same order
    assert len(set(seen[0])) == 4 and all(epoch == seen[0][:len(epoch)] for epoch in seen)
    served.clear()
    fit(Module(), precision="bf16-true")  # batches converted by the precision plugin, as in training
    assert served and all(row == [2, 5] for row in served[0])
    manual = Module()
    manual.automatic_optimization = False  # its training_step would step the optimizer during ranking
    with pytest.raises(ValueError, match="automatic_optimization=False"):
        fit(manual)


def test_trainer_callback_ranks_channels_with_the_trainer_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, _, _ = _error_concentrated_task()

        def forward(self, x, labels=None):
            out = self.net(x)[:, [2, 5]]
            return {"loss": (out - labels).square().mean(), "logits": out}

    served: list[list[list[int]]] = []

    class Recorder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model.net[0].num_dendrites:
                served.append(model.net[0].dendrite_channels.tolist())

    x, y = _concentrated_samples()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    args = transformers.TrainingArguments(str(tmp_path), eval_strategy="steps", eval_steps=2, max_steps=6,
                                          per_device_train_batch_size=32, learning_rate=0.05, report_to=[],
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no",
                                          seed=0)
    trainer = transformers.Trainer(model=Net(), args=args, train_dataset=data, eval_dataset=data,
                                   callbacks=[Recorder()])
    DendriteCallback(switch_every=1, max_dendrites=1).attach(trainer)
    trainer.train()
    assert served and served[0] == [[2, 5]]


def test_cli_pipeline_trains_and_exports_selective_dendrites(fixture_files, tmp_path):
    """convert --dendrite-channels -> train (both objectives rank channels by error) -> ONNX within 1e-5."""
    import json
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from dendrite_convert.cli.convert import app as convert_app
    from dendrite_convert.cli.export import app as export_app
    from dendrite_convert.cli.train import app as train_app

    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    sys.path.insert(0, str(digits))
    from model import build

    torch.manual_seed(0)
    torch.save(build(8).state_dict(), tmp_path / "digits.pt")
    runner = CliRunner()
    result = runner.invoke(convert_app, [str(tmp_path / "digits.pt"), "-o", str(tmp_path / "conv"), "--factory",
                                         f"{digits / 'model.py'}:build", "--dendrite-channels", "0.25"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "conv" / "dendrite_config.json").read_text())["dendrite_config"]["channel_fraction"] == 0.25
    result = runner.invoke(train_app, ["--trust-code", str(tmp_path / "conv"), "--adapter", str(digits / "adapter.py"), "-o",
                                       str(tmp_path / "run"), "--switch-every", "3", "--max-dendrites", "2",
                                       "--max-epochs", "9"])
    assert result.exit_code == 0, result.output
    trained = dc.load(tmp_path / "run" / "best", trust_code=True)
    rows = [layer.dendrite_channels for layer in dc.dendrite_layers(trained).values()]
    assert all(r.shape[0] >= 1 for r in rows)
    assert any(not torch.equal(r, torch.arange(r.shape[1]).expand_as(r)) for r in rows)  # ranked, not placeholders
    result = runner.invoke(export_app, ["--trust-code", str(tmp_path / "run" / "best"), "--onnx", "-o", str(tmp_path / "m.onnx"),
                                        "--atol", "1e-5", "--rtol", "1e-5", "--no-latency", "--input-shape", "4,64"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(convert_app, [str(tmp_path / "digits.pt"), "-o", str(tmp_path / "bad"), "--factory",
                                      f"{digits / 'model.py'}:build", "--dendrite-channels", "1.5"])
    assert bad.exit_code == 2 and "--dendrite-channels must be a fraction" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_damaged_channel_sets_are_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    converted, _ = _dendritic("small-cnn")
    path = converted.save(tmp_path / "converted")
    weights = load_file(path / "model.safetensors")
    weights["stem.dendrite_channels"][0, 0] = 99
    save_file(weights, path / "model.safetensors")
    with pytest.raises(dc.LoadError, match=r"stem\.dendrite_channels .* damaged"):
        dc.load(path, trust_code=True)


def test_weight_normed_and_grouped_layers_keep_full_width_dendrites():
    """Their dendrites cannot compute a subset of channels, so they serve all of them (not selective)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old hook-based weight norm is deprecated
        old_style = nn.utils.weight_norm(nn.Linear(6, 8))
    for base in (nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.utils.spectral_norm(nn.Linear(6, 8)),
                 nn.Conv2d(4, 8, 3, groups=2)):
        layer = dendrite_class_for(base)(base, channel_fraction=0.25)
        assert (layer.width, layer.dendrite_channels) == (8, None)
        layer.add_dendrite()
        assert layer.dendrite_layers[0].weight.shape == base.weight.shape
    # a hook-computed weight cannot be copied into a dendrite: convert skips the layer and says why
    converted = dc.convert(nn.Sequential(old_style, nn.ReLU(), nn.Linear(8, 2)), dc.DendriteConfig(channel_fraction=0.25))
    assert list(dc.dendrite_layers(converted.model)) == ["2"]
    assert any(r.name == "0" and "parametrizations" in r.reason for r in converted.report.skipped)
    assert dc.DendriteConfig.from_dict({"channels": 0.25}).channel_fraction == 0.25  # its dev-build name
