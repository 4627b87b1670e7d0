"""What every command shares: the error funnel, the stderr console and option aliases."""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from ..core.errors import DendriteError, UsageError

console = Console(stderr=True)

ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
_TRUST = "Trust: code named by a file runs only with these"
TrustOpt = Annotated[bool, typer.Option(
    "--trust-code", rich_help_panel=_TRUST,
    help="Run the code the input names: full unpickling, TorchScript, .pt2 pickles, a directory's recorded "
         "factory or stored model, the adapter recorded for --resume. Only for files you trust.")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", hidden=True, help="Old name of --trust-code.")]
AllowModuleOpt = Annotated[list[str] | None, typer.Option(
    "--allow-module", rich_help_panel=_TRUST, show_default=False,
    help="A module (pkg or pkg.sub, or path/to/file.py) whose classes a pickled model may use (repeatable).")]
FactoryAgainOpt = Annotated[str | None, typer.Option(
    "--factory", rich_help_panel=_TRUST, show_default=False,
    help="Name the directory's factory again (pkg.module:fn or file.py:fn, your own code) so it may run; "
         "its file must be the one recorded at conversion.")]


class _FlagsWithoutType:
    """On/off flags show no `<bool>` type column in --help (Typer prints one for every flag, --help included)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsWithoutType, TyperCommand):
    pass


class Group(_FlagsWithoutType, TyperGroup):
    pass


def command_app(fn, help: str | None = None) -> typer.Typer:
    """A one-command Typer app, so each `dendrite-*` script runs its command without a subcommand name."""
    app = typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_show_locals=False)
    app.command(help=help, cls=Command)(fn)
    return app


class _StderrWarnings(logging.Handler):
    """Library warnings as `warning: ...` lines on whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"warning: {record.getMessage()}\n")


_library_log = logging.getLogger("dendrite_convert")
_library_log.addHandler(_StderrWarnings(logging.WARNING))
_library_log.propagate = False


def handle_errors(fn):
    """Map library errors to one sentence on stderr and the exit codes of docs/design.md §6."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DendriteError as exc:
            console.print(f"[red]error:[/red] {cli_message(exc, fn, kwargs)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # a command may add what to do next as the exception's argument
            next_step = f"; {exc.args[0]}" if exc.args else ""
            console.print(f"[red]interrupted[/red]; completed outputs were kept, partial ones removed{next_step}.",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except OSError as exc:  # a full disk, a file-size limit, a read-only folder: say what and where
            where = f" {exc.filename}" if exc.filename else ""
            console.print(f"[red]error:[/red] could not read or write{where}: {exc.strerror or exc}; "
                          "earlier outputs were left as they were.", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            if os.environ.get("DENDRITE_DEBUG"):
                raise
            console.print(
                f"[red]unexpected error:[/red] {type(exc).__name__}: {exc} (set DENDRITE_DEBUG=1 for the traceback)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def cli_message(exc: DendriteError, command, values: dict | None = None) -> str:
    """The library's sentence with the arguments named as this command spells them: the Python name that
    starts the message (`switch_every must be ...`) becomes the option (`--switch-every must be ...`), and so
    do other arguments it mentions as keywords (`pass force=True` -> `pass --force`, `adapter=` ->
    `--adapter`, `allow_modules=['m']` -> `--allow-module m`, `format='onnx'` -> `--onnx`), unless the message
    names that option itself already. `values` are the command's arguments:
    an option that takes a value, mentioned as `name=True`, applies to the argument at fault (train's
    `resume=True` continues `output`), so it is spelled with that argument's value (`--resume RUN`)."""
    text, name = str(exc), exc.parameter
    flag = _option_name(command, name) if name and text.startswith(name) else None
    text = text if flag is None else flag + text[len(name):]
    subject = (values or {}).get(name) if name else None

    def spell(match: re.Match) -> str:
        option = _option_name(command, match[1])
        if option is None or not option.startswith("--") or _appears(option, text):
            return match[0]
        if match[2] and not _is_flag(command, match[1]) and subject is not None:
            return f"{option} {subject}"
        return option

    def spell_value(match: re.Match) -> str:
        if match[2].startswith("["):  # a repeatable option: `allow_modules=['a', 'b']` -> `--allow-module a ...`
            option = _option_name(command, match[1])
            items = ast.literal_eval(match[2])
            return " ".join(f"{option} {item}" for item in items) if option and option.startswith("--") else match[0]
        choice = match[2][1:-1]  # a value the command spells as its own flag: `format='onnx'` -> `--onnx`
        if _option_name(command, match[1]) is None and _is_flag(command, choice):
            return _option_name(command, choice) or match[0]
        return match[0]

    return _KEYWORD.sub(spell, _VALUED.sub(spell_value, text))


_KEYWORD = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*)=(True\b)?(?![\w'\"(\[{-])")
_VALUED = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*)=('[a-z][a-z0-9_]*'|\[(?:'[^'\]]*'(?:, )?)+\])")
# library names whose command-line option is spelled differently (`DendriteConfig.rank` is `--dendrite-rank`)
_OPTION_FOR = {"allow_modules": "allow_module", "rank": "dendrite_rank", "channel_fraction": "dendrite_channels",
               "pair_norms": "norm_pairs", "correlation_samples": "grow_samples"}


def _appears(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _is_flag(command, parameter: str) -> bool:
    hint = typing.get_type_hints(command, include_extras=True).get(parameter)
    return (typing.get_args(hint)[:1] or (hint,))[0] is bool


def _option_name(command, parameter: str) -> str | None:
    """How `command` spells its `parameter` on the command line: the longest `--option`, or the argument's
    metavar; None when the command has no such parameter (the Python name is then the clearest)."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameter = parameter if parameter in hints else _OPTION_FOR.get(parameter, parameter)
    info = next((m for m in getattr(hints.get(parameter), "__metadata__", ())
                 if isinstance(m, (typer.models.OptionInfo, typer.models.ArgumentInfo))), None)
    if isinstance(info, typer.models.ArgumentInfo):
        return parameter.upper()
    if isinstance(info, typer.models.OptionInfo):  # inside Annotated, Typer reads a first "--name" as a declaration
        decls = [info.default, *(info.param_decls or ())]
        return max((d for d in decls if isinstance(d, str) and d.startswith("--")), key=len,
                   default=f"--{parameter.replace('_', '-')}")
    return None


def parse_json_option(text: str | None, option: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} must be a JSON object, e.g. '{{\"width\": 8}}' ({exc}).") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object, not {type(value).__name__}.")
    return value


def parse_shape(text: str | None, option: str = "--input-shape") -> list[int] | None:
    if not text:
        return None
    try:
        shape = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError as exc:
        raise UsageError(f"{option} must be comma-separated integers such as 2,3,32,32, not {text!r}.") from exc
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"{option} must be positive integers such as 2,3,32,32, not {text!r}.")
    return shape


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def consent(trust_code: bool, trust_pickle: bool, factory: str | None, allow_modules: list[str] | None) -> dict:
    """The consent keywords of the library's loaders, from the trust options."""
    return {"trust_code": trust_code or trust_pickle, "factory": factory, "allow_modules": tuple(allow_modules or ())}


def existing_path(path: Path, option: str) -> Path:
    if not path.exists():
        raise UsageError(f"{option} {path} does not exist.")
    return path
