"""One error hierarchy: library messages in Python terms, the CLI names its own options and exit codes."""

import ast
import inspect
import pickle
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dendrite_convert as dc
from dendrite_convert.cli._common import cli_message
from dendrite_convert.cli.train import app as train_app
from dendrite_convert.cli.train import train as train_command
from dendrite_convert.training.adapter import load_adapter
from dendrite_convert.training.schedule import ScheduleConfig

PACKAGE = Path(dc.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def test_library_errors_name_the_python_parameter():
    with pytest.raises(dc.UsageError) as err:
        dc.TrainConfig(switch_every=0)
    assert str(err.value) == "switch_every must be at least 1, not 0." and err.value.parameter == "switch_every"
    assert isinstance(err.value, ValueError) and err.value.exit_code == 2  # callers catching ValueError still do
    with pytest.raises(ValueError, match="^max_epochs must be at least 1"):
        ScheduleConfig(max_epochs=0)
    with pytest.raises(dc.LoadError, match="^adapter .*nope.py: file does not exist") as err:
        load_adapter("nope.py")
    assert err.value.parameter == "adapter" and err.value.exit_code == 3


def test_the_cli_names_its_own_option_for_the_parameter():
    command = inspect.unwrap(train_command)
    assert cli_message(dc.UsageError("switch_every must be at least 1.", parameter="switch_every"),
                       command) == "--switch-every must be at least 1."
    assert cli_message(dc.UsageError("json_out clash.", parameter="json_out"), command) == "--json clash."
    assert cli_message(dc.UsageError("converted is missing.", parameter="converted"), command) == "CONVERTED is missing."
    # no such option: the Python name stays, and so does a message that does not start with the name
    assert cli_message(dc.UsageError("checkpoint_budget must be positive.", parameter="checkpoint_budget"),
                       command) == "checkpoint_budget must be positive."
    assert cli_message(dc.UsageError("the objective is odd.", parameter="objective"), command) == "the objective is odd."


def test_the_cli_spells_other_arguments_a_message_mentions_as_keywords():
    """Library advice names arguments in Python (`pass force=True`); the command shows its own options."""
    command = inspect.unwrap(train_command)
    error = dc.UsageError("output run already holds a run; pass force=True to replace it or resume=True to continue "
                          "it.", parameter="output")
    assert cli_message(error, command, {"output": Path("run"), "resume": None}) == (
        "--output run already holds a run; pass --force to replace it or --resume run to continue it.")
    error = dc.LoadError("resume run: name the adapter again (adapter=) or pass trust_code=True to run it; "
                         "drop_last=True is not ours.", parameter="resume")
    assert cli_message(error, command) == ("--resume run: name the adapter again (--adapter) or pass --trust-code to "
                                           "run it; drop_last=True is not ours.")
    # a message that already spells the option keeps its Python keyword as the hint for Python callers
    both = dc.LoadError("pass --trust-code (trust_code=True) if you trust it.")
    assert cli_message(both, command) == "pass --trust-code (trust_code=True) if you trust it."


def test_the_cli_spells_list_values_choices_and_renamed_options():
    """`allow_modules=['a']` is the repeatable `--allow-module a`, `format='onnx'` the export flag `--onnx`, and a
    library name the command spells otherwise (`channel_fraction`) its own option (`--dendrite-channels`)."""
    from dendrite_convert.cli.convert import convert as convert_command
    from dendrite_convert.cli.export import export as export_command

    convert, export = inspect.unwrap(convert_command), inspect.unwrap(export_command)
    refused = dc.LoadError("m.pt names code; pass allow_modules=['helper', 'pkg'] or trust_code=True.")
    assert cli_message(refused, convert) == ("m.pt names code; pass --allow-module helper --allow-module pkg or "
                                             "--trust-code.")
    assert cli_message(dc.ConversionError("export with format='onnx' or format='safetensors' instead."), export) \
        == "export with --onnx or --safetensors instead."
    assert cli_message(dc.ConversionError("format='onnx' is odd."), convert) == "format='onnx' is odd."
    with pytest.raises(dc.UsageError) as err:
        dc.DendriteConfig(dendrites=1, channel_fraction=0.5)
    assert str(err.value).startswith("dendrites cannot be combined with channel_fraction= below 1")
    assert cli_message(err.value, convert).startswith("--dendrites cannot be combined with --dendrite-channels below 1")


def test_cli_reports_a_library_error_with_the_flag_and_its_exit_code(tmp_path):
    digits = PACKAGE.parent / "examples" / "digits"
    sys.path.insert(0, str(digits))
    from model import build

    factory = f"{digits / 'model.py'}:build"
    converted = dc.convert(build(8), factory=factory).save(tmp_path / "conv")
    # the consent rule: the directory's factory runs when it is named again
    result = CliRunner().invoke(train_app, [str(converted), "--adapter", str(tmp_path / "nope.py"), "-o",
                                            str(tmp_path / "run"), "--factory", factory])
    assert result.exit_code == 3 and "error: --adapter " in result.stderr and "file does not exist" in result.stderr


def test_errors_survive_pickling_with_their_parameter():
    """`compare(jobs=N)` runs seeds in worker processes, whose errors come back pickled."""
    again = pickle.loads(pickle.dumps(dc.UsageError("patience must be at least 1.", parameter="patience")))
    assert type(again) is dc.UsageError and str(again) == "patience must be at least 1." and again.parameter == "patience"


@pytest.mark.parametrize("package", ["core", "conversion", "exporting", "training", "integrations"])
def test_library_raises_do_not_word_command_line_flags(package):
    """Messages of raised errors hold no `--flag`: the library is also called from Python."""
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for const in ast.walk(node.exc):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) and FLAG.search(const.value):
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {FLAG.search(const.value)[0]}")
    assert not offenders, "library raises worded with CLI flags:\n" + "\n".join(offenders)
