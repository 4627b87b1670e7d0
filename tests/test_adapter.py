"""The data adapter contract (docs/design.md §4): loading, checks, defaults, and the CLI's errors for bad adapters."""

import json
import textwrap

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dendrite_convert import DendriteConfig, LoadError, convert
from dendrite_convert.training.adapter import TEMPLATE, Adapter, batch_size, load_adapter
from dendrite_convert.cli.train import app

runner = CliRunner()

GOOD = """
import torch
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=g)
Y = (X[:, 0] > 0).long()
def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
def val_data(): return DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)
def loss(outputs, batch): return torch.nn.functional.cross_entropy(outputs, batch[1])
"""


def write(tmp_path, text, name="adapter.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def converted_dir(tmp_path_factory):
    """A tiny converted classifier on disk (rebuilt from a factory file)."""
    root = tmp_path_factory.mktemp("conv")
    (root / "net.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
    )
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    convert(model, DendriteConfig(), factory=f"{root / 'net.py'}:build").save(root / "converted")
    return root / "converted"


def test_good_adapter_loads_with_defaults(tmp_path):
    adapter = load_adapter(write(tmp_path, GOOD))
    assert adapter.maximize is True and adapter.score is None and adapter.test_data is None
    batch = next(iter(adapter.train_data()))
    args, kwargs = adapter.model_inputs(batch)
    assert args[0] is batch[0] and kwargs == {}
    opt = adapter.build_optimizer([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    assert adapter.build_scheduler(opt) is None


def test_inputs_forms_and_batch_size():
    a = Adapter("x", list, list, lambda o, b: o)
    assert a.model_inputs({"input_ids": 1, "mask": 2}) == ((), {"input_ids": 1, "mask": 2})
    a.inputs = lambda b: ((b, b), {"k": 1})
    assert a.model_inputs(3) == ((3, 3), {"k": 1})
    a.inputs = lambda b: (b, b)
    assert a.model_inputs(3) == ((3, 3), {})
    assert batch_size((torch.zeros(7, 2), torch.zeros(7))) == 7
    assert batch_size({"ids": torch.zeros(5, 3)}) == 5


def test_template_is_a_valid_adapter_once_filled(tmp_path):
    text = TEMPLATE.replace("DataLoader(...,", "DataLoader(list(zip(torch.randn(8, 4), torch.zeros(8).long())),")
    adapter = load_adapter(write(tmp_path, text))
    assert len(list(adapter.train_data())) == 1


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.replace("def loss(outputs, batch)", "def not_loss(outputs, batch)"),
         "has no loss(); it must define `def loss(outputs, batch) -> torch.Tensor"),
        (lambda s: s.replace("def loss(outputs, batch)", "def loss(outputs)"),
         "loss(outputs) cannot be called with 2 arguments; expected `def loss(outputs, batch)"),
        (lambda s: s.replace("def val_data():", "def val_data(split):"),
         "val_data(split) cannot be called with 0 arguments"),
        (lambda s: s + "\nscore = 3\n", "score is a int, not a function"),
        (lambda s: s + "\nMAXIMIZE = 'yes'\n", "MAXIMIZE must be True or False"),
        (lambda s: s + "\nraise RuntimeError('boom')\n", "cannot be imported: RuntimeError: boom"),
    ],
)
def test_mistyped_adapters_are_load_errors(tmp_path, edit, expected):
    with pytest.raises(LoadError) as err:
        load_adapter(write(tmp_path, edit(GOOD)))
    assert expected in str(err.value)


def test_module_spec_and_missing_file(tmp_path, monkeypatch):
    write(tmp_path, GOOD, "my_adapter_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_adapter("my_adapter_mod").spec == "my_adapter_mod"
    with pytest.raises(LoadError, match="file does not exist"):
        load_adapter(tmp_path / "nope.py")


def test_near_miss_names_are_warned_about_once_each(tmp_path, caplog):
    text = (GOOD.replace("def loss(", "def lost(") + "def loss(outputs, batch): return lost(outputs, batch)\n"
            + "def scores(outputs, batch): return 1.0\n"
            + "def optimiser(params): return torch.optim.SGD(params, lr=0.1)\n"
            + "def train_dataset(): return None\nMAXIMISE = False\n"
            + "def _helper(): return None\ndef accuracy(outputs, batch): return 0.0\n")
    with caplog.at_level("WARNING", logger="dendrite_convert"):
        adapter = load_adapter(write(tmp_path, text))
    assert adapter.score is None and adapter.optimizer is None  # the defaults apply, as the warnings say
    lines = [r.getMessage() for r in caplog.records]
    assert any("defines scores(), which dendrite-train does not use; did you mean score()?" in m for m in lines)
    assert any("defines optimiser()" in m and "did you mean optimizer()?" in m for m in lines)
    assert any("defines MAXIMISE" in m and "did you mean MAXIMIZE?" in m for m in lines)
    assert not any(w in m for m in lines for w in ("lost", "train_dataset", "_helper", "accuracy", "torch"))
    assert len(lines) == 3


def test_near_miss_of_a_required_name_comes_before_the_error(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dendrite_convert"), pytest.raises(LoadError, match="has no val_data"):
        load_adapter(write(tmp_path, GOOD.replace("def val_data(", "def val_dat(")))
    assert "defines val_dat(), which dendrite-train does not use; did you mean val_data()?" in caplog.text


def test_cli_shows_the_near_miss_warning_on_stderr(tmp_path, converted_dir):
    adapter = write(tmp_path, GOOD + "def optimiser(params): return torch.optim.SGD(params, lr=0.1)\n")
    result = runner.invoke(app, [str(converted_dir), "--adapter", str(adapter), "-o", str(tmp_path / "run"),
                                 "--max-epochs", "1", "--factory", f"{converted_dir.parent / 'net.py'}:build"])
    assert result.exit_code == 0, result.output  # the factory named again: the consent rule
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "optimiser()" in warning[0] and "did you mean optimizer()?" in warning[0]


def _cli(converted_dir, adapter, out, *extra):
    return runner.invoke(app, [str(converted_dir), "--adapter", str(adapter), "-o", str(out), "--max-epochs", "3",
                               "--quiet", "--trust-code", *extra])


@pytest.mark.parametrize(
    "edit, code, expected",
    [
        (lambda s: s.replace("def loss(", "def lost("), 3, "has no loss()"),
        (lambda s: s.replace("batch_size=32)", "batch_size=32) if False else []"), 3,
         "val_data() yielded no batches"),
        (lambda s: s.replace("cross_entropy(outputs, batch[1])", "cross_entropy(outputs, batch[1], reduction='none')"),
         3, "returned a tensor of shape [16]; it must return a scalar"),
        (lambda s: s.replace("def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)",
                             "def train_data(): return iter(DataLoader(TensorDataset(X, Y), batch_size=16))"),
         3, "not a generator"),
    ],
)
def test_cli_adapter_errors_exit_3_with_one_sentence(tmp_path, converted_dir, edit, code, expected):
    result = _cli(converted_dir, write(tmp_path, edit(GOOD)), tmp_path / "run")
    assert result.exit_code == code, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_cli_nan_loss_stops_keeps_best_and_exits_1(tmp_path, converted_dir):
    # finite for the first two epochs (8 steps), then NaN
    text = GOOD + textwrap.dedent("""
        calls = [0]
        def loss(outputs, batch):
            calls[0] += torch.is_grad_enabled()  # training steps only (4 per epoch)
            value = torch.nn.functional.cross_entropy(outputs, batch[1])
            return value * float('nan') if calls[0] > 8 else value
    """)
    out = tmp_path / "run"
    result = _cli(converted_dir, write(tmp_path, text), out, "--max-epochs", "6", "--json")
    assert result.exit_code == 1, result.output
    assert "training stopped: the training loss became nan at epoch 3" in result.output
    assert "the best model so far (epoch" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite"] is True and summary["epochs"] == 3 and summary["best_epoch"] in (1, 2)
    assert summary["best_val"] is not None and summary["dendrites"] == 0
    from dendrite_convert import load

    model = load(out / "best", trust_code=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_usage_errors(tmp_path, converted_dir):
    adapter = write(tmp_path, GOOD)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # an empty folder may be used; one holding files may not
    result = _cli(converted_dir, adapter, tmp_path / "run")
    assert result.exit_code == 2 and "already holds files; pass --force" in result.output
    result = runner.invoke(app, [str(converted_dir), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "--adapter is required" in result.output
    result = _cli(converted_dir, adapter, tmp_path / "r3", "--objective", "magic")
    assert result.exit_code == 2 and "--objective must be one of gradient, correlation" in result.output
    result = runner.invoke(app, ["--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_cli_adapter_template_prints_valid_python():
    result = runner.invoke(app, ["--adapter-template"])
    assert result.exit_code == 0
    compile(result.stdout, "adapter.py", "exec")
    assert "def train_data():" in result.stdout and "def loss(outputs, batch):" in result.stdout


def test_a_loader_with_workers_is_not_iterated_just_to_check_it(tmp_path, converted_dir):
    """Checking that train_data() is re-iterable starts no worker processes: a DataLoader with workers makes
    exactly one iterator per training epoch, and training with real workers works."""
    passes = tmp_path / "passes.txt"
    text = GOOD.replace("def train_data(): return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)",
                        textwrap.dedent(f"""
        class Counting(DataLoader):
            def _get_iterator(self):
                with open({str(passes)!r}, "a") as f:
                    f.write("pass\\n")
                return super()._get_iterator()
        def train_data(): return Counting(TensorDataset(X, Y), batch_size=16, shuffle=True, num_workers=2)
        """))
    out = tmp_path / "run"
    result = _cli(converted_dir, write(tmp_path, text), out, "--max-dendrites", "0")
    assert result.exit_code == 0, result.output
    epochs = json.loads((out / "summary.json").read_text())["epochs"]
    assert epochs >= 1 and passes.read_text().count("pass") == epochs
