"""Real timm and transformers architectures through every stage (issue 19), with export timing shares.

    .venv/bin/python benchmarks/zoo_real.py --readme     # every model of fixtures/real_zoo.py; the README's table
    .venv/bin/python benchmarks/zoo_real.py --quick      # the reduced mode (run by a slow test)
    .venv/bin/python benchmarks/zoo_real.py --only test_nfnet hf:T5ForConditionalGeneration --merge --readme
                                                         # rerun two models; the other rows stay as they were
    .venv/bin/python benchmarks/zoo_real.py --only --merge --readme  # rewrite both tables from the stored rows

Stages per model: convert (0 dendrites) and exactness against the untouched model; one dendrite per target
with random scales, save and reload exactly; train steps (on a copy) where every dendrite
must get a gradient when its base layer's weight gets one; the capacity test (`train --capacity-test` on
generated data); closed-form growth (`--objective closed-form`'s step on generated batches: every dendrite it
grows must lower the training loss, with finite weights); ONNX export with parity. A stage that stops with a DendriteError is a refusal (its message
is the reason); any other exception, an inexact result or a dead dendrite is a failure. Writes
benchmarks/results/zoo_real.md (or zoo_real_quick.md) and, beside it, the rows as JSON, which `--merge` reads back.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import dendrite_convert as dc  # noqa: E402
from conftest import randomize_dendrites  # noqa: E402
from dendrite_convert.core.structure import add_dendrites  # noqa: E402
from dendrite_convert.exporting.export import resolve_inputs  # noqa: E402
from dendrite_convert.training.objectives.closed_form_growth import add_closed_form_dendrites  # noqa: E402
from dendrite_convert.training.adapter import Adapter  # noqa: E402
from fixtures.real_zoo import NAMES, build, example_specs  # noqa: E402

# conv + BatchNorm, attention, HF Linear with a pooler, HF Conv1D, targets read directly and an export refusal
QUICK = ["test_resnet", "test_vit", "hf:BertForSequenceClassification", "hf:GPT2LMHeadModel", "hf:MambaModel"]
STAGES = ("convert", "exact", "reload", "train", "capacity", "closed-form", "export")


class Refused(Exception):
    """A stage stopped with the tool's own clear message."""


class Silent(Exception):
    """A stage finished but its result is wrong: the failure the tool did not report."""


@dataclass
class Row:
    name: str
    targets: int = 0
    skipped: list[str] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)
    grown: str = "-"  # closed-form: targets grown / fitted
    onnx_err: float = float("nan")
    export_s: float = float("nan")
    shares: dict[str, float] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(self.status.get(s) in ("ok", "not run") for s in STAGES)


def _outputs(model, example) -> list[torch.Tensor]:
    out = model(**example) if isinstance(example, dict) else model(*example)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise Silent(f"{len(a)} outputs instead of {len(b)}")
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b)), default=0.0)


class _Clock:
    """Accumulates the time spent in patched functions during one export, by phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.onnx_calls: list[float] = []

    def wrap(self, phase: str, fn, calls: list | None = None):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds[phase] += spent
                if calls is not None:
                    calls.append(spent)
        return timed


@contextlib.contextmanager
def _timed_export(clock: _Clock):
    """Patch the phases of `dc.export`: fold, torch.export capture, ONNX translation, layout choice, checks."""
    import onnx

    from dendrite_convert.exporting import export as export_module, latency

    patches = [(torch.export, "export", "capture"), (torch.export, "draft_export", "capture"),
               (torch.onnx, "export", "onnx", clock.onnx_calls), (export_module, "fold", "fold"),
               (torch.export.ExportedProgram, "run_decompositions", "decompositions"),
               (torch.onnx.ONNXProgram, "optimize", "ONNX optimizer"),
               (latency, "median_ms", "layout timing"), (export_module, "verify_onnx", "verify"),
               (onnx.checker, "check_model", "verify"), (export_module, "reference_outputs", "verify")]
    saved = []
    for owner, attr, phase, *calls in patches:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, clock.wrap(phase, getattr(owner, attr), *calls))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _shares(clock: _Clock, total: float) -> dict[str, float]:
    """Seconds by phase; 'second layout export' is any extra torch.onnx.export call (the auto layout's timing graph)."""
    extra = sum(sorted(clock.onnx_calls)[:-1]) if len(clock.onnx_calls) > 1 else 0.0
    first = 1 - extra / max(sum(clock.onnx_calls), 1e-9)  # the inner phases of one torch.onnx.export call
    inner = {"capture (torch.export)": clock.seconds["capture"] * first,
             "decompositions": clock.seconds["decompositions"] * first,
             "ONNX optimizer": clock.seconds["ONNX optimizer"] * first}
    shares = {**inner, "ONNX translation": max(0.0, max(clock.onnx_calls, default=0.0) - sum(inner.values())),
              "second layout export": extra, "layout timing": clock.seconds["layout timing"],
              "fold": clock.seconds["fold"], "verification": clock.seconds["verify"]}
    shares["other"] = max(0.0, total - sum(shares.values()))
    return shares


def dead_dendrite_layers(model: torch.nn.Module) -> list[str]:
    """Dendrite layers whose dendrites get no gradient although their base layer's weight does, after a backward.

    The base weight's gradient shows that the error reaches the layer's output (or that the model reads the weight
    directly); dendrites that then get none never run or are cut off. A layer whose base gets no gradient either
    (test_nfnet's SE branch behind timm's zero-initialised `conv3.gain`) has nothing to learn from yet: not dead.
    """
    def moved(params) -> bool:
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    return [name for name, layer in dc.dendrite_layers(model).items()
            if moved([layer.main_weight(layer.base_layer)])
            and not moved([*layer.dendrite_layers.parameters(), *layer.dendrite_scales])]


def _adapter(name: str, example) -> Adapter:
    """Generated inputs, a fixed random target for the first float output, MSE loss (as fixtures/zoo.py)."""
    torch.manual_seed(0)
    with torch.no_grad():
        target = torch.randn_like(_outputs(build(name), example)[0])
    data = [(example, target)] * 2

    def loss(outputs, batch):
        return (_first(outputs) - batch[1]).pow(2).mean()

    inputs = (lambda batch: ((), batch[0])) if isinstance(example, dict) else (lambda batch: batch[0])
    return Adapter(spec=f"zoo_real:{name}", train_data=lambda: data, val_data=lambda: data[:1], loss=loss,
                   maximize=False, inputs=inputs, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def _first(outputs) -> torch.Tensor:
    return next(t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())


def run_model(name: str, tmp: Path, capacity: bool = True) -> Row:
    row = Row(name)
    specs = example_specs(name)
    example = resolve_inputs(dc.ExportConfig(), specs).example
    factory = {"factory": "fixtures.real_zoo:build", "factory_kwargs": {"name": name}}
    state: dict = {}

    def convert():
        with torch.no_grad():
            state["reference"] = _outputs(build(name), example)
        converted = dc.convert(build(name), dc.DendriteConfig(), example_inputs=specs, **factory)
        row.targets = len(converted.report.targets)
        row.skipped = sorted({f"{s.type}: {s.reason}" for s in converted.report.skipped})
        state["converted"] = converted

    def exact():
        with torch.no_grad():
            diff = _max_diff(_outputs(state["converted"].model.eval(), example), state["reference"])
        if diff != 0:
            raise Silent(f"zero-dendrite output differs by {diff:.2e}")

    def reload():
        converted = state["converted"]
        add_dendrites(converted.model)
        randomize_dendrites(converted.model)
        converted.save(tmp / "converted")
        again = dc.load_converted(tmp / "converted", factory=factory["factory"])  # named again: the consent rule
        with torch.no_grad():
            diff = _max_diff(_outputs(again.model.eval(), example), _outputs(converted.model.eval(), example))
        if diff != 0:
            raise Silent(f"reloaded output differs by {diff:.2e}")

    def train():
        # a copy: three raw SGD steps on output² can blow random weights up until float32 itself disagrees with
        # float64 (rexnet, fbnet: NaN), which export's verification would then report as a wrong fold
        model = copy.deepcopy(state["converted"].model).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        for step in range(3):
            optimizer.zero_grad()
            loss = sum(o.float().pow(2).mean() for o in _outputs(model, example))  # all: a pooler's output too
            loss.backward()
            if step == 0:
                dead = dead_dendrite_layers(model)
                if dead:
                    raise Silent(f"{len(dead)} dendrite layers get no gradient while their base layer's weight does "
                                 f"({', '.join(dead[:3])})")
            if not math.isfinite(loss.item()):
                raise Silent(f"loss {loss.item()} at step {step}")
            optimizer.step()

    def capacity_test():
        fresh = dc.convert(build(name), dc.DendriteConfig(), example_inputs=specs, **factory)
        summary = dc.train(fresh, _adapter(name, example), tmp / "run", dc.TrainConfig(capacity_test=True, max_epochs=8),
                           force=True)
        if [s["dendrites"] for s in summary["switches"]] != [1, 2, 3] or not math.isfinite(summary["best_val"]):
            raise Silent(f"capacity test switches {summary['switches']}, best {summary['best_val']}")

    def closed_form():
        model = dc.convert(build(name), dc.DendriteConfig(), example_inputs=specs, **factory).model.train()
        adapter = _adapter(name, example)

        def loss(batch):
            args, kwargs = adapter.model_inputs(batch)
            return adapter.loss(model(*args, **kwargs), batch)

        reports = add_closed_form_dendrites(model, adapter.train_data() * 4, loss)  # 6 batches fitted, 2 searched
        grown = [r for r in reports.values() if r.grown]
        row.grown = f"{len(grown)}/{sum(r.order > 0 for r in reports.values())}"
        worse = [n for n, r in reports.items() if r.grown and not r.loss_after < r.loss_before]
        if worse or not all(torch.isfinite(p).all() for p in model.parameters()):
            raise Silent(f"closed-form growth raised the loss ({', '.join(worse[:3])}) or made a weight non-finite")

    def export():
        clock = _Clock()
        start = time.perf_counter()
        with _timed_export(clock):
            report = dc.export(state["converted"], tmp / "model.onnx", dc.ExportConfig(latency=False, force=True))
        row.export_s = time.perf_counter() - start
        row.shares = _shares(clock, row.export_s)
        row.onnx_err = max(o.max_abs for o in report.verify.outputs)

    stages = {"convert": convert, "exact": exact, "reload": reload, "train": train,
              "capacity": capacity_test if capacity else None, "closed-form": closed_form, "export": export}
    for stage, fn in stages.items():
        if fn is None:
            row.status[stage] = "not run"
            continue
        if stage != "capacity" and any(row.status.get(s, "ok") != "ok" for s in ("convert", "reload")):
            row.status[stage] = "-"
            continue
        start = time.perf_counter()
        try:
            fn()
            row.status[stage] = "ok"
        except dc.VerificationError as exc:  # the tool caught a wrong result itself (exit 5): not silent, not a refusal
            row.status[stage] = f"verification failed: {_one_line(str(exc))}"
        except dc.DendriteError as exc:
            row.status[stage] = f"refused: {_one_line(str(exc))}"
        except Silent as exc:
            row.status[stage] = f"SILENT FAILURE: {exc}"
        except Exception as exc:  # a crash is a row, not the end of the benchmark
            traceback.print_exc(file=sys.stderr)
            row.status[stage] = f"FAILED ({type(exc).__name__}: {_one_line(str(exc))})"
        row.stage_s[stage] = time.perf_counter() - start
    return row


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500].replace("|", "/")


def render(rows: list[Row], commands: list[str]) -> tuple[str, str]:
    """The results file's text, and the part of it the README shows (all but the layers left without dendrites)."""
    passed = sum(r.passed for r in rows)
    refused = [r for r in rows if not r.passed and all(
        v in ("ok", "not run", "-") or v.startswith("refused") for v in r.status.values())]
    caught = [r for r in rows if any(v.startswith("verification failed") for v in r.status.values())]
    silent = [r for r in rows if any(v.startswith("SILENT") for v in r.status.values())]
    crashed = [r for r in rows if any(v.startswith("FAILED") for v in r.status.values())]
    timm_n = sum(not r.name.startswith("hf:") for r in rows)
    no_capacity = sum(r.status.get("capacity") == "not run" for r in rows)
    runs = "; ".join(f"`{c}`" for c in commands)
    lines = [f"Generated by {runs} (torch {torch.__version__}, random weights, tiny configs; "
             f"{len(rows)} of the {len(NAMES)} models of fixtures/real_zoo.py: {timm_n} timm, "
             f"{len(rows) - timm_n} transformers; {sum(r.seconds for r in rows) / 60:.0f} min of model time, "
             "1 thread).",
             "", f"**{passed}/{len(rows)} pass every stage; {len(refused)} stop with a clear refusal; {len(caught)} "
             f"stop at export verification (exit 5: a wrong fold caught, nothing written); {len(crashed)} fail with "
             f"an unexpected error; {len(silent)} silent failures.**"
             + (f" Capacity test not run for {no_capacity}." if no_capacity else ""), "",
             "| model | targets | " + " | ".join(STAGES) + " | ONNX max err | export s |",
             "|---|---|" + "---|" * len(STAGES) + "---|---|"]
    for r in rows:
        cells = [_cell(r.status.get(s, "-")) + (f" ({r.grown} grew)" if s == "closed-form" and r.grown != "-" else "")
                 for s in STAGES]
        err = f"{r.onnx_err:.1e}" if math.isfinite(r.onnx_err) else "-"
        secs = f"{r.export_s:.1f}" if math.isfinite(r.export_s) else "-"
        lines.append(f"| `{r.name}` | {r.targets} | " + " | ".join(cells) + f" | {err} | {secs} |")
    notes = [f"- `{r.name}`: " + "; ".join(f"{s}: {v}" for s, v in r.status.items() if v not in ("ok", "not run", "-"))
             for r in rows if not r.passed]
    if notes:
        lines += ["", "Stages that did not pass (the message is the tool's own):", "", *notes]
    timed = [r for r in rows if r.shares]
    if timed:
        total = sum(r.export_s for r in timed)
        phases = {p: sum(r.shares[p] for r in timed) for p in timed[0].shares}
        lines += ["", f"Export time: median {statistics.median(r.export_s for r in timed):.1f} s per model "
                      f"(max {max(r.export_s for r in timed):.1f} s, {len(timed)} exports). Where it goes:", "",
                  "| phase | share |", "|---|---|"]
        lines += [f"| {p} | {100 * s / total:.0f} % |" for p, s in phases.items()]
    shown = "\n".join(lines) + "\n"
    skipped = [f"- `{r.name}`: " + "; ".join(r.skipped) for r in rows if r.skipped]
    if skipped:
        lines += ["", "Layers left without dendrites, with the reason conversion gave:", "", *skipped]
    return "\n".join(lines) + "\n", shown


def _cell(status: str) -> str:
    if status.startswith("refused"):
        return "refused"
    if status.startswith("verification failed"):
        return "exit 5"
    if status.startswith("SILENT"):
        return "**SILENT**"
    if status.startswith("FAILED"):
        return "**FAILED**"
    return status


README = ROOT / "README.md"
BEGIN, END = "<!-- zoo_real.py --readme: begin -->", "<!-- zoo_real.py --readme: end -->"
NOTES = "\n## Notes"  # what is written by hand below this heading of the results file survives regeneration


def _load(results: Path) -> tuple[list[str], dict[str, Row]]:
    """The commands and rows a previous run stored beside its results file (nothing when there is none)."""
    stored = results.with_suffix(".json")
    if not stored.exists():
        return [], {}
    data = json.loads(stored.read_text())
    return data["commands"], {r["name"]: Row(**r) for r in data["rows"]}


def _write(results: Path, commands: list[str], rows: list[Row], readme: bool) -> str:
    text, shown = render(rows, commands)
    old = results.read_text() if results.exists() else ""
    results.write_text(text + (old[old.index(NOTES):] if NOTES in old else ""))
    results.with_suffix(".json").write_text(json.dumps({"commands": commands, "rows": [asdict(r) for r in rows]},
                                                       indent=1))
    if readme:
        page = README.read_text()
        head, rest = page.split(BEGIN)
        README.write_text(f"{head}{BEGIN}\n{shown}{END}{rest.split(END)[1]}")
    return text


def _command(argv: list[str], only: list[str] | None) -> str:
    """The command line as the results file shows it: a long --only list as its length."""
    if only and len(only) > 3:
        argv = [f"--only <{len(only)} models>" if a == "--only" else a for a in argv if a not in only]
    return " ".join(["python benchmarks/zoo_real.py", *argv])


def _ordered(rows: dict[str, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: NAMES.index(r.name))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", nargs="*", help="these models only (none: rewrite the files from the stored rows)")
    parser.add_argument("--merge", action="store_true",
                        help="replace these models' rows in the results file, keeping the others (with --only)")
    parser.add_argument("--readme", action="store_true", help="copy the table into README.md between its markers")
    parser.add_argument("--no-capacity", action="store_true", help="skip the capacity test")
    parser.add_argument("--budget-min", type=float, help="start no new model after this many minutes")
    parser.add_argument("--output", type=Path, help="where to write the markdown (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    names = args.only if args.only is not None else (QUICK if args.quick else NAMES)
    if not names and not args.merge:
        parser.error("--only without model names rewrites the stored rows: add --merge")
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"not in fixtures/real_zoo.py: {', '.join(unknown)}")
    output = args.output or ROOT / "benchmarks" / "results" / ("zoo_real_quick.md" if args.quick else "zoo_real.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    commands, kept = _load(output) if args.merge else ([], {})
    commands += [_command(argv if argv is not None else sys.argv[1:], args.only)] if names else []
    torch.set_num_threads(1)
    start = time.perf_counter()
    for name in names:
        if args.budget_min and time.perf_counter() - start > 60 * args.budget_min:
            print(f"time budget spent: {names.index(name)} of {len(names)} models run", file=sys.stderr)
            break
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            kept[name] = run_model(name, Path(tmp), capacity=not args.no_capacity)
            kept[name].seconds = time.perf_counter() - t0
            print(f"{name}: {'pass' if kept[name].passed else kept[name].status} ({kept[name].seconds:.0f} s)",
                  file=sys.stderr, flush=True)
        _write(output, commands, _ordered(kept), args.readme)  # after each model: a partial table if stopped
    print(_write(output, commands, _ordered(kept), args.readme))
    return [kept[n] for n in names if n in kept]


if __name__ == "__main__":
    main()
