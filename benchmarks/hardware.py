"""dendrite-train at realistic sizes: a ResNet-18 on 32x32 images and a ~20M-parameter transformer, against the
hand-written loop of the same model on the same device and precision.

    python benchmarks/hardware.py [--device auto] [--precision fp32|bf16|fp16] [--images 50000] [--epochs 5]
                                  [--sequences 20000] [--correlation-samples 4096] [--repeats 1] [--quick]

Data are generated and learnable: each image class is a fixed random pattern under noise (10 classes), each token
sequence follows a fixed random successor table (next token = table[token] 90% of the time). For each model the
script times a fixed number of epochs of (a) a hand-written loop (training pass, validation pass, the best
weights kept in memory and saved at the end) and (b) a whole `train()` call of dendrite-train with 0, 1 and 3
dendrites per target (setup, checkpoints, every output), and reports samples/s, the ratio of (b) to (a) at the same
dendrite count, in wall time and in CPU time, and the peak memory (CUDA: max allocated; CPU: the process's peak RSS).
Then the cost of one correlation phase on the ResNet (recording error signals and training candidates for every
target, within the default memory budget). Every measurement runs in a fresh process, which generates the data
before its clock starts; --repeats N alternates N pairs of runs and reports the median ratio and its range.
--quick: a narrow ResNet-18 (width 8) and a small transformer on a few samples, to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]


# ---- models: factories named by file, which the converted directories copy (so each file stands alone) --------

class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Transformer(nn.Module):
    """A GPT-style decoder: 19.9M parameters at d=512, 5 layers, 4096 tokens, 128 positions."""

    def __init__(self, d: int = 512, layers: int = 5, heads: int = 8, vocab: int = 4096, length: int = 128):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions.weight[: ids.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def transformer(d: int = 512, layers: int = 5, heads: int = 8, vocab: int = 4096, length: int = 128) -> nn.Module:
    return Transformer(d, layers, heads, vocab, length)


# name -> (factory file, function): the ResNet-18 is the zoo's, built from its BasicBlock
FACTORIES = {"resnet": (ROOT / "fixtures" / "zoo.py", "resnet18"), "gpt": (HERE, "transformer")}


def build(name: str, **kwargs) -> nn.Module:
    from dendrite_convert.conversion.factories import import_file

    file, function = FACTORIES[name]
    return getattr(import_file(file), function)(**kwargs)


# ---- data: an adapter file, so that dendrite-train and the hand-written loop read the same batches ---------------

ADAPTER = '''
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

KIND, N, VAL, PIN = {kind!r}, {n}, {val}, {pin}
g = torch.Generator().manual_seed(0)
if KIND == "images":
    patterns = torch.randn(10, 3, 32, 32, generator=g)
    Y = torch.randint(0, 10, (N + VAL,), generator=g)
    X = 0.5 * patterns[Y] + torch.randn(N + VAL, 3, 32, 32, generator=g)
else:
    V, L = {vocab}, {length}
    table = torch.randperm(V, generator=g)
    ids = torch.empty(N + VAL, L + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (N + VAL,), generator=g)
    for t in range(L):
        follow = torch.rand(N + VAL, generator=g) < 0.9
        ids[:, t + 1] = torch.where(follow, table[ids[:, t]], torch.randint(0, V, (N + VAL,), generator=g))
    X, Y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
TRAIN, HELD = TensorDataset(X[:N], Y[:N]), TensorDataset(X[N:], Y[N:])


def _loader(data, batch, shuffle):
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(1)) if shuffle else SequentialSampler(data)
    # whole batches indexed at once (TensorDataset takes a list of indices): no per-sample collation
    return DataLoader(data, sampler=BatchSampler(sampler, batch, drop_last=shuffle), batch_size=None,
                      pin_memory=PIN)


def train_data(): return _loader(TRAIN, {batch}, True)
def val_data(): return _loader(HELD, 256, False)
def loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), batch[1].reshape(-1))
'''


# ---- one measurement, in a fresh process -------------------------------------------------------------------------

def hand_written(spec: dict, adapter) -> dict:
    """The loop a user writes: epochs of training and validation on the device, autocast (and a gradient scaler
    in fp16) as dendrite-train uses, the best weights kept and saved at the end (a run's product, as best/ is)."""
    from dendrite_convert import load
    from dendrite_convert.training.device import resolve_device, to_device
    from dendrite_convert.training.precision import Precision

    device = resolve_device(spec["device"])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load(spec["converted"], trust_code=True).to(device)
    precision = Precision(spec["precision"], device)
    optimizer = adapter.build_optimizer([p for p in model.parameters() if p.requires_grad])
    train, val = adapter.train_data(), adapter.val_data()
    best, best_state = math.inf, None
    for _ in range(spec["epochs"]):
        model.train()
        for batch in train:
            x, y = to_device(batch, device)
            with precision.autocast():
                loss = adapter.loss(model(x), (x, y))
            optimizer.zero_grad(set_to_none=True)
            precision.backward_step(loss, optimizer)
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad(), precision.autocast():
            for batch in val:
                x, y = to_device(batch, device)
                total += adapter.loss(model(x), (x, y)) * len(y)
        if total.item() < best:
            best, best_state = total.item(), {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    torch.save(best_state, Path(spec["output"]).with_name("hand_best.pt"))
    _sync(device)
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak(device)}


def tool(spec: dict, adapter) -> dict:
    """A whole dendrite-train run: `epochs` epochs at the converted model's dendrites (no switch), or with
    `correlation`, a neuron epoch, a correlation phase (its own time and peak are reported) and a neuron epoch."""
    from dendrite_convert import TrainConfig, train
    from dendrite_convert.training.device import resolve_device

    epochs, k = spec["epochs"], spec["dendrites"]
    if spec.get("correlation"):
        config = TrainConfig(objective="correlation", max_epochs=3, switch_every=1, max_dendrites=1,
                             correlation_samples=spec["correlation"], correlation_epochs=spec["correlation_epochs"],
                             candidates=spec["candidates"], device=spec["device"], precision=spec["precision"])
    else:
        config = TrainConfig(max_epochs=epochs, switch_every=epochs + 1, max_dendrites=k, device=spec["device"],
                             precision=spec["precision"])
    start = time.perf_counter()
    summary = train(spec["converted"], adapter, spec["output"], config, force=True, trust_code=True)
    _sync(resolve_device(spec["device"]))
    seconds = time.perf_counter() - start
    phase = next((r for r in _rows(Path(spec["output"])) if r["phase"] == "dendrite"), None)
    return {"seconds": seconds, "peak_mb": summary["peak_mem_mb"], "device": summary["device"],
            "phase_seconds": None if phase is None else float(phase["seconds"]),
            "phase_peak_mb": None if phase is None else float(phase["peak_mem_mb"])}


def _rows(run: Path) -> list[dict]:
    import csv

    with open(run / "scores.csv") as f:
        return list(csv.DictReader(f))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> float | None:
    from dendrite_convert.training.device import peak_memory_mb

    return peak_memory_mb(device)


def one(spec: dict) -> None:
    from dendrite_convert.training.adapter import load_adapter
    from dendrite_convert.training.device import resolve_device

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    adapter = load_adapter(spec["adapter"])  # generates the data, before any clock starts
    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _cpu_seconds()
    result = hand_written(spec, adapter) if spec["kind"] == "hand" else tool(spec, adapter)
    result["cpu_seconds"] = _cpu_seconds() - before
    print(json.dumps(result))


def _cpu_seconds() -> float:
    """This process's CPU time: on a CPU shared with other work, a steadier measure of the work done than wall
    time (training here, with every thread torch uses; the plot helper's own import is not included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(spec: dict) -> dict:
    done = subprocess.run([sys.executable, str(HERE), "--one", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {spec['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the benchmark -----------------------------------------------------------------------------------------------

def _prepare(tmp: Path, name: str, kwargs: dict, adapter: dict, dendrites) -> dict:
    from dendrite_convert import DendriteConfig, convert

    (tmp / f"{name}_adapter.py").write_text(ADAPTER.format(**adapter))
    file, function = FACTORIES[name]
    dirs = {}
    for k in dendrites:
        torch.manual_seed(0)
        dirs[k] = tmp / f"{name}_{k}"
        convert(build(name, **kwargs), DendriteConfig(dendrites=k), factory=f"{file}:{function}",
                factory_kwargs=kwargs).save(dirs[k])
    return dirs


def run_model(label: str, samples: int, dirs: dict, adapter: Path, args, tmp: Path,
              correlation: int | None) -> list[str]:
    base = {"adapter": str(adapter), "device": args.device, "precision": args.precision, "epochs": args.epochs,
            "threads": args.threads}
    lines = []
    for k, converted in dirs.items():
        spec = {**base, "converted": str(converted), "dendrites": k, "output": str(tmp / "run")}
        hands, ours = [], []
        for _ in range(args.repeats):  # side by side: each ratio compares runs made one after the other
            hands.append(measure({**spec, "kind": "hand"}))
            ours.append(measure({**spec, "kind": "tool"}))
        rate = lambda runs: samples * args.epochs / statistics.median(r["seconds"] for r in runs)  # noqa: E731
        wall = [o["seconds"] / h["seconds"] for o, h in zip(ours, hands)]
        cpu = [o["cpu_seconds"] / h["cpu_seconds"] for o, h in zip(ours, hands)]
        ratio = statistics.median(wall)
        goal = ("  goal <= 1.05: " + ("met" if ratio <= 1.05 else "NOT met")) if k == 0 and "ResNet" in label else ""
        lines.append(f"| {label} | {k} | {rate(hands):,.1f} | {rate(ours):,.1f} | {_spread(wall)}{goal} | "
                     f"{_spread(cpu)} | {_mb(max(h['peak_mb'] or 0 for h in hands))} | "
                     f"{_mb(max(o['peak_mb'] or 0 for o in ours))} |")
        print(lines[-1], flush=True)
    if correlation:
        spec = {**base, "converted": str(dirs[0]), "dendrites": 0, "output": str(tmp / "corr"), "kind": "tool",
                "correlation": correlation, "correlation_epochs": args.correlation_epochs,
                "candidates": args.candidates}
        got = measure(spec)
        if got["phase_seconds"] is None:
            raise SystemExit("the correlation run recorded no dendrite phase")
        lines.append(f"\ncorrelation phase on the {label} (0 -> 1 dendrite per target, {correlation} samples recorded, "
                     f"{args.candidates} candidates x {args.correlation_epochs} passes, 512 MB budget): "
                     f"{got['phase_seconds']:.1f} s, peak {_mb(got['phase_peak_mb'])} MB")
        print(lines[-1], flush=True)
    return lines


def _spread(ratios: list[float]) -> str:
    """The median ratio, and the range when there are several."""
    median = f"{statistics.median(ratios):.3f}"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.3f}-{max(ratios):.3f})"


def _count(params: int) -> str:
    return f"{params / 1e6:.1f}M parameters" if params >= 100_000 else f"{params:,} parameters"


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--images", type=int, default=50_000, help="training images (plus 10%% for validation)")
    parser.add_argument("--sequences", type=int, default=20_000, help="training sequences of 128 tokens")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the first and the last always checkpoint)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dendrites", default="0,1,3")
    parser.add_argument("--correlation-samples", type=int, default=4096, help="0: skip the correlation phase")
    parser.add_argument("--correlation-epochs", type=int, default=20, help="candidate passes (dendrite-train's default)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per target (dendrite-train's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (hand-written, then dendrite-train) per "
                        "row; the ratios' median and range are reported")
    parser.add_argument("--skip", choices=["resnet", "transformer"], action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="tiny models and data: checks that the script works")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    from dendrite_convert.training.device import describe, resolve_device

    dendrites = [int(k) for k in args.dendrites.split(",")]
    resnet_kwargs, gpt_kwargs = {"width": 64}, {"d": 512, "layers": 5, "heads": 8, "vocab": 4096, "length": 128}
    if args.quick:
        resnet_kwargs, gpt_kwargs = {"width": 8}, {"d": 32, "layers": 2, "heads": 4, "vocab": 64, "length": 16}
        args.images, args.sequences, args.epochs, args.batch = min(args.images, 64), min(args.sequences, 32), 1, 32
        args.correlation_samples, args.correlation_epochs = min(args.correlation_samples, 32), 2
    device = resolve_device(args.device)
    pin = device.type == "cuda"
    if args.threads:  # as each measuring process sets them
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} on {describe(device)}, {args.precision}, {args.epochs} epoch(s) per run, "
          f"each run in a fresh process, {args.repeats} pair(s) of runs per row")
    header = ["| model | dendrites | hand-written /s | dendrite-train /s | ratio (wall) | ratio (CPU time) | "
              "hand peak MB | dendrite-train peak MB |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "resnet" not in args.skip:
            params = sum(p.numel() for p in build("resnet", **resnet_kwargs).parameters())
            dirs = _prepare(tmp, "resnet", resnet_kwargs,
                            {"kind": "images", "n": args.images, "val": max(args.images // 10, 1), "pin": pin,
                             "vocab": 0, "length": 0, "batch": min(args.batch, args.images)}, dendrites)
            run_model(f"ResNet-18 ({_count(params)}), {args.images} images, images/s", args.images, dirs, tmp / "resnet_adapter.py", args, tmp, args.correlation_samples)
        if "transformer" not in args.skip:
            params = sum(p.numel() for p in build("gpt", **gpt_kwargs).parameters())
            dirs = _prepare(tmp, "gpt", gpt_kwargs,
                            {"kind": "tokens", "n": args.sequences, "val": max(args.sequences // 10, 1), "pin": pin,
                             "vocab": gpt_kwargs["vocab"], "length": gpt_kwargs["length"],
                             "batch": min(max(args.batch // 4, 1), args.sequences)}, dendrites)
            run_model(f"transformer ({_count(params)}), {args.sequences}x{gpt_kwargs['length']} tokens, "
                               "tokens/s", args.sequences * gpt_kwargs["length"], dirs,
                               tmp / "gpt_adapter.py", args, tmp, None)


if __name__ == "__main__":
    main()
