"""Issue 15: --device, --precision, --compile, peak memory, resume on another device and the correlation memory
budget, on the CPU here; the copies marked `cuda` run wherever a GPU is (skipped without one)."""

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dendrite_convert import DendriteConfig, TrainConfig, convert, train
from dendrite_convert.cli.train import app
from dendrite_convert.core.layers import dendrite_layers
from dendrite_convert.training import compiling
from dendrite_convert.training.device import resolve_device, to_device

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
ADAPTER = """
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
X = torch.randn(256, 8, generator=g)
Y = (X[:, 0] + X[:, 1] - X[:, 2] > 0).long()
DTYPES = []  # the dtype of the model's outputs in every training loss
def train_data(): return DataLoader(TensorDataset(X[:192], Y[:192]), batch_size=32, shuffle=True)
def val_data(): return DataLoader(TensorDataset(X[192:], Y[192:]), batch_size=64)
def loss(outputs, batch):
    DTYPES.append(outputs.dtype)
    return torch.nn.functional.cross_entropy(outputs, batch[1])
def score(outputs, batch): return (outputs.argmax(-1) == batch[1]).float().mean().item()
"""


@pytest.fixture
def converted(tmp_path):
    """A tiny MLP, converted and saved (torch classes only: it loads without a trust flag)."""
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), tmp_path / "mlp.pt")
    convert(tmp_path / "mlp.pt").save(tmp_path / "converted")
    return tmp_path / "converted"


@pytest.fixture
def adapter(tmp_path):
    path = tmp_path / "adapter.py"
    path.write_text(ADAPTER)
    return path


def _one_sentence(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _rows(run: Path) -> list[dict]:
    import csv

    with open(run / "scores.csv") as f:
        return list(csv.DictReader(f))


def _computed(rows: list[dict]) -> list[dict]:
    """A row without what is measured (time, memory)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_mb")} for r in rows]


# ---- device selection -----------------------------------------------------------------------------------------

def test_auto_takes_cuda_then_mps_then_cpu():
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = "cuda" if HAS_CUDA else "mps" if mps else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "CPU", "cuda:"])
def test_an_unknown_device_is_one_sentence_and_exit_2(converted, adapter, tmp_path, name):
    result = runner.invoke(app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                 "--device", name])
    line = _one_sentence(result, 2)
    assert "--device must be auto, cpu, cuda, cuda:N or mps" in line and repr(name) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_exit_2_before_anything_is_written(converted, adapter, tmp_path, name):
    result = runner.invoke(app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                 "--device", name])
    line = _one_sentence(result, 2)
    assert f"--device {name}: CUDA is not available here" in line and "use the cpu or auto device" in line
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_the_cli_says_where_it_trains_and_summary_records_it(converted, adapter, tmp_path):
    result = runner.invoke(app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                 "--max-epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "training on cpu (1 thread), fp32"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["device"], summary["precision"], summary["compiled"]) == ("cpu", "fp32", False)


# ---- batches --------------------------------------------------------------------------------------------------

class _Recorded(torch.Tensor):
    """A tensor that records the keyword arguments of every .to() call made on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.calls.append(dict(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def test_nested_batches_move_whole_and_non_blocking():
    Pair = namedtuple("Pair", "a b")
    x = torch.randn(2, 3).as_subclass(_Recorded)
    _Recorded.calls.clear()
    batch = {"inputs": (x, [torch.ones(2), {"mask": torch.zeros(2, dtype=torch.bool)}]), "ids": [1, 2],
             "name": "b", "pair": Pair(torch.ones(1), 2)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["inputs"][0].device.type == "meta" and isinstance(moved["inputs"], tuple)
    assert moved["inputs"][1][0].device.type == "meta" and moved["inputs"][1][1]["mask"].dtype == torch.bool
    assert moved["inputs"][1][1]["mask"].device.type == "meta"
    assert moved["ids"] == [1, 2] and moved["name"] == "b"
    assert moved["pair"] is batch["pair"]  # a named tuple is the adapter's own type: left as it is
    assert _Recorded.calls == [{"non_blocking": True}]


# ---- precision ------------------------------------------------------------------------------------------------

def _adapter_module(path: Path):
    from dendrite_convert.training.adapter import load_adapter

    return load_adapter(path)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_with_finite_falling_loss(converted, adapter, tmp_path, device):
    loaded = _adapter_module(adapter)
    import sys

    dtypes = sys.modules[loaded.loss.__module__].DTYPES
    summary = train(converted, loaded, tmp_path / "run", TrainConfig(max_epochs=4, max_dendrites=0, plot=False,
                                                                       device=device, precision="bf16"))
    rows = _rows(tmp_path / "run")
    losses = [float(r["train_loss"]) for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert set(dtypes) == {torch.bfloat16}  # the forward really ran under autocast
    assert summary["precision"] == "bf16" and summary["device"].startswith(device)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_scaler_state_is_checkpointed_and_restored_on_resume(converted, adapter, tmp_path, device):
    config = TrainConfig(max_epochs=5, max_dendrites=1, switch_every=3, plot=False, device=device,
                         precision="fp16", checkpoint_budget=1e9)  # a checkpoint every epoch
    train(converted, adapter, tmp_path / "full", config)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(converted, adapter, tmp_path / "killed", config, on_epoch=stop_after_two)
    state = torch.load(tmp_path / "killed" / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 2 * 6  # 6 steps an epoch
    train(None, adapter, tmp_path / "killed", resume=True)
    scalers = [torch.load(tmp_path / run / "checkpoint" / "training_state.pt", weights_only=True)["scaler"]
               for run in ("full", "killed")]
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 5 * 6  # one scaler for the whole run
    assert _computed(_rows(tmp_path / "killed")) == _computed(_rows(tmp_path / "full"))


def test_an_unknown_precision_is_exit_2(converted, adapter, tmp_path):
    result = runner.invoke(app, [str(converted), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                 "--precision", "fp8"])
    assert "--precision must be one of fp32, bf16, fp16, not 'fp8'" in _one_sentence(result, 2)


def test_error_signals_reach_the_objectives_in_fp32_under_autocast():
    from dendrite_convert.training.error_signal import each_error_signal

    model = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), DendriteConfig()).model
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))

    def forward_loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(model(batch[0]), batch[1])

    seen = []
    each_error_signal(model, dendrite_layers(model), [(x, y)], forward_loss, 32,
                      lambda name, xs, e: seen.append((xs.dtype, e.dtype)))
    assert seen and set(seen) == {(torch.float32, torch.float32)}


# ---- resume on another device ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_a_cpu_checkpoint_resumes_on_the_device_named_on_resume(converted, adapter, tmp_path, device):
    config = TrainConfig(max_epochs=4, max_dendrites=1, switch_every=2, plot=False, device="cpu", checkpoint_budget=1e9)
    train(converted, adapter, tmp_path / "full", config)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(converted, adapter, tmp_path / "run", config, on_epoch=stop_after_two)
    result = runner.invoke(app, ["--resume", str(tmp_path / "run"), "--adapter", str(adapter), "--device", device,
                                 "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["device"].startswith(device) and summary["finished"] and len(summary["switches"]) == 1
    rows, full = _rows(tmp_path / "run"), _rows(tmp_path / "full")
    if device == "cpu":  # bit for bit on the CPU
        assert _computed(rows) == _computed(full)
    else:
        assert [r["dendrites"] for r in rows] == [r["dendrites"] for r in full]


def test_resume_on_a_missing_device_is_exit_2_and_the_checkpoint_stays(converted, adapter, tmp_path):
    train(converted, adapter, tmp_path / "run", TrainConfig(max_epochs=1, plot=False))
    before = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    result = runner.invoke(app, ["--resume", str(tmp_path / "run"), "--adapter", str(adapter), "--device", "gpu"])
    assert "--device must be" in _one_sentence(result, 2)
    assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == before


# ---- peak memory ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_peak_memory_is_in_scores_csv_and_summary(converted, adapter, tmp_path, device):
    summary = train(converted, adapter, tmp_path / "run", TrainConfig(max_epochs=3, max_dendrites=1, switch_every=2,
                                                                      plot=False, device=device))
    rows = _rows(tmp_path / "run")
    assert list(rows[0])[-1] == "peak_mem_mb"
    peaks = [float(r["peak_mem_mb"]) for r in rows]
    assert all(p > 0 for p in peaks) and summary["peak_mem_mb"] == max(peaks)
    if device == "cpu":
        import resource

        assert max(peaks) <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 0.1  # the process's RSS


# ---- compile --------------------------------------------------------------------------------------------------

def test_compile_recompiles_after_every_structure_change(converted, adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # dynamo's capture and AOT autograd, no C++ build
    compiled = []
    original = compiling.compile_module
    monkeypatch.setattr(compiling, "compile_module", lambda m: compiled.append(len(dendrite_layers(m)[
        "0"].dendrite_layers)) or original(m))
    config = TrainConfig(max_epochs=5, max_dendrites=2, switch_every=2, plot=False, compile=True)
    summary = train(converted, adapter, tmp_path / "run", config)
    assert summary["compiled"] and summary["compile_fallback"] is None
    phases = [0] + [s["dendrites"] for s in summary["switches"]]
    assert len(phases) == 3 and compiled == phases  # one compile per phase, each after its dendrite was added
    eager = train(converted, adapter, tmp_path / "eager", TrainConfig(max_epochs=5, max_dendrites=2, switch_every=2,
                                                                       plot=False))
    assert [r["dendrites"] for r in _rows(tmp_path / "run")] == [r["dendrites"] for r in _rows(tmp_path / "eager")]
    assert abs(summary["best_val"] - eager["best_val"]) < 0.05


def test_a_failing_compile_falls_back_to_eager_with_the_reason_once(converted, adapter, tmp_path, monkeypatch,
                                                                   caplog):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(compiling, "BACKEND", no_compiler)
    config = TrainConfig(max_epochs=4, max_dendrites=1, switch_every=2, plot=False, compile=True)
    with caplog.at_level("WARNING", logger="dendrite_convert"):
        summary = train(converted, adapter, tmp_path / "run", config)
    warnings = [r.getMessage() for r in caplog.records if "--compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "long details" not in warnings[0]
    assert not summary["compiled"] and "no C++ compiler found" in summary["compile_fallback"]
    eager = train(converted, adapter, tmp_path / "eager", TrainConfig(max_epochs=4, max_dendrites=1, switch_every=2,
                                                                       plot=False))
    assert _computed(_rows(tmp_path / "run")) == _computed(_rows(tmp_path / "eager"))  # the failed step was redone
    assert summary["best_val"] == eager["best_val"]


@pytest.mark.slow
def test_compile_with_inductor_trains_on_this_machine(converted, adapter, tmp_path):
    summary = train(converted, adapter, tmp_path / "run", TrainConfig(max_epochs=2, max_dendrites=0, plot=False,
                                                                       compile=True))
    assert summary["epochs"] == 2 and (summary["compiled"] or summary["compile_fallback"])


# ---- growth on the target's device and dtype ------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["gradient", "correlation"])
@pytest.mark.parametrize("device", DEVICES)
def test_growth_makes_dendrites_on_the_targets_device_and_dtype(objective, device):
    from dendrite_convert.training.growth import Growth
    from dendrite_convert.training.objectives import TrainingData
    from dendrite_convert.training.schedule import ScheduleConfig
    from contextlib import contextmanager

    model = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                    DendriteConfig(channel_fraction=0.5)).model.to(device=device, dtype=torch.float64)
    x, y = torch.randn(64, 8, dtype=torch.float64, device=device), torch.randint(0, 2, (64,), device=device)

    @contextmanager
    def data(m):
        yield TrainingData([(x, y)], lambda b: nn.functional.cross_entropy(m(b[0]), b[1]))

    growth = Growth(ScheduleConfig(switch_every=1, max_dendrites=2), objective, data)
    growth.observe(model, 0.5)
    for layer in dendrite_layers(model).values():
        assert layer.num_dendrites == 1
        for t in [*layer.dendrite_layers[0].parameters(), layer.dendrite_scales[0], layer.dendrite_cascade[0]]:
            assert (t.device.type, t.dtype) == (device, torch.float64)
    model(x)  # and the grown model runs


# ---- correlation within a memory budget -----------------------------------------------------------------------

def _conv_net():
    return convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(8 * 8 * 8, 4)), DendriteConfig()).model


def _conv_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(8)]


def test_recordings_that_do_not_fit_together_are_recorded_in_turn():
    from dendrite_convert.training.objectives.recording import record_within_budget

    model, batches = _conv_net(), _conv_batches()
    layers = dendrite_layers(model)
    loss = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    per_sample = {"0": (3 + 8) * 64 * 4, "2": (8 + 8) * 64 * 4, "5": (512 + 4) * 4}  # x + e bytes, fp32
    everything = record_within_budget(model, layers, batches, loss, 64, 2**30)
    assert set(everything) == {"0", "2", "5"} and all(sum(x.shape[0] for x, _ in p) == 64 for p in everything.values())
    budget = 2 * per_sample["2"] * 64 + 1000  # conv 2 and its working copy; conv 0 before it does not leave room
    pending, passes = dict(layers), []
    while pending:
        got = record_within_budget(model, pending, batches, loss, 64, budget)
        held = sum(x.nbytes + e.nbytes for p in got.values() for x, e in p)
        assert got and held <= budget
        passes.append(sorted(got))
        pending = {n: v for n, v in pending.items() if n not in got}
    assert "0" in passes[0] and "2" not in passes[0] and sorted(sum(passes, [])) == ["0", "2", "5"]
    # a target larger than the budget on its own records fewer samples, within it
    small = record_within_budget(model, {"2": layers["2"]}, batches, loss, 64, per_sample["2"] * 20)
    samples = sum(x.shape[0] for x, _ in small["2"])
    assert 1 <= samples < 64 and samples * per_sample["2"] * 2 <= per_sample["2"] * 20


def test_correlation_within_a_small_budget_grows_every_target():
    from dendrite_convert.training.objectives.correlation import CorrelationConfig, add_correlation_dendrites

    model, batches = _conv_net(), _conv_batches()
    loss = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    corr = add_correlation_dendrites(model, dendrite_layers(model), batches, loss,
                                     CorrelationConfig(candidates=2, epochs=2, max_samples=64, memory_mb=1))
    assert list(corr) == ["0", "2", "5"] and all(0 < c <= 1 for c in corr.values())
    assert {layer.num_dendrites for layer in dendrite_layers(model).values()} == {1}


# ---- export ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_a_model_on_cuda_exports_folded_and_verified_on_the_cpu(tmp_path):
    from dendrite_convert import export
    from dendrite_convert.exporting.export import ExportConfig

    converted_model = convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), DendriteConfig(dendrites=1))
    converted_model.model.to("cuda")
    report = export(converted_model.model, tmp_path / "m.onnx", ExportConfig(input_shape=[2, 8], latency=False))
    assert report.verify.ok and next(converted_model.model.parameters()).device.type == "cuda"


def test_the_hardware_options_are_in_help():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output  # rich reads the width from COLUMNS
    assert all(option in out for option in ("--device", "--precision", "--compile", "--correlation-memory-mb"))


# ---- small runs: training.png drawn with Pillow in the training process -----------------------------------------

def test_training_png_is_drawn_in_the_run_with_nice_ticks(converted, adapter, tmp_path):
    from PIL import Image

    from dendrite_convert.training.plots import COLORS, ticks

    train(converted, adapter, tmp_path / "run", TrainConfig(max_epochs=3, max_dendrites=0))
    with Image.open(tmp_path / "run" / "training.png") as png:
        assert png.format == "PNG" and png.size == (960, 720)
        colors = {color for _, color in png.convert("RGB").getcolors(960 * 720)}
    assert {COLORS["val"], COLORS["neuron"], COLORS["ink"]} <= colors and len(colors) > 50  # lines, bars, text
    assert ticks(79.3, 93.5) == ([80, 85, 90], 0) and ticks(0.4, 1.6, 6, whole=True) == ([1], 0)
    assert ticks(-0.02, 0.43) == (pytest.approx([0, 0.1, 0.2, 0.3, 0.4]), 1)
    assert ticks(0.0027, 0.0033) == (pytest.approx([0.0028, 0.003, 0.0032]), 4)
    assert ticks(0, 1.0, 4) == (pytest.approx([0, 0.25, 0.5, 0.75, 1.0]), 2) and ticks(0, 1.1, 4)[0] == [0, 0.5, 1.0]


def test_seeds_and_baseline_train_on_the_chosen_device_and_precision(converted, adapter, tmp_path):
    from dendrite_convert.conversion.consent import Consent
    from dendrite_convert.training.compare import compare

    config = TrainConfig(max_epochs=2, max_dendrites=1, switch_every=1, plot=False, device="cpu", precision="bf16")
    compare(converted, adapter, tmp_path / "cmp", config, seeds=2, baseline=True, consent=Consent())
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "cmp").glob("*/seed_*/summary.json"))]
    assert len(summaries) == 4
    assert {(s["device"], s["precision"]) for s in summaries} == {("cpu", "bf16")}


def test_the_benchmark_models_load_from_their_factory_copies_in_a_fresh_process(tmp_path):
    """benchmarks/hardware.py converts the zoo's ResNet-18 (built from the zoo's BasicBlock) and its own transformer,
    each with its file as the factory; a converted directory keeps a copy of that file, which must load alone:
    in a fresh process, with the repository off its path."""
    import os
    import subprocess
    import sys

    from dendrite_convert.conversion.factories import import_file

    root = Path(__file__).resolve().parents[1]
    hardware = import_file(root / "benchmarks" / "hardware.py")
    sizes = {"resnet": {"width": 8}, "gpt": {"d": 32, "layers": 2, "heads": 4, "vocab": 64, "length": 16}}
    expected = []
    for name, kwargs in sizes.items():
        model = hardware.build(name, **kwargs)
        file, function = hardware.FACTORIES[name]
        convert(model, DendriteConfig(), factory=f"{file}:{function}", factory_kwargs=kwargs).save(tmp_path / name)
        expected.append(str(sum(p.numel() for p in model.parameters())))
    code = ("import sys, dendrite_convert as dc\n"
            f"sys.path[:] = [p for p in sys.path if p not in ('', {str(root)!r})]\n"
            f"for name in {list(sizes)!r}:\n"
            f"    print(sum(p.numel() for p in dc.load({str(tmp_path)!r} + '/' + name, trust_code=True).parameters()))\n"
            "print('fixtures' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [*expected, "False"]


@pytest.mark.slow
def test_the_hardware_benchmark_runs_in_quick_mode():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "hardware.py"), "--quick", "--dendrites", "0,1",
                           "--threads", "1"], capture_output=True, text=True, timeout=1200, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ResNet-18") or line.startswith("| transf")]
    cells = [r.split("|") for r in rows]
    assert len(rows) == 4 and all(float(c[5].split()[0]) > 0 and float(c[6].split()[0]) > 0 for c in cells)  # ratios
    assert "correlation phase on the ResNet-18" in done.stdout
