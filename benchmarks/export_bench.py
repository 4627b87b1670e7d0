"""Export latency against the FLOP floor: an MLP and a CNN with 1 and 3 sigmoid dendrites per target.

Run: .venv/bin/python benchmarks/export_bench.py [--threads N]
For each model: base (no dendrites), unfolded dendritic torch, folded torch, and onnxruntime for the base and
for the folded export in each GEMM layout. "× FLOP pred." divides a latency by what FLOPs predict from the base
of the same runtime (torch rows by base torch, onnxruntime rows by base onnxruntime): 1.00 means the dendrites
cost exactly their FLOPs. Goal (docs/design.md §5): onnxruntime within 1.15x of the prediction, never slower than the
unfolded torch model. Latencies are medians of interleaved runs in one process.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dendrite_convert import DendriteConfig, ExportConfig, convert, dendrite_layers, export  # noqa: E402
from dendrite_convert.exporting.fold import fold_model, strip_dendrites  # noqa: E402
from dendrite_convert.exporting.latency import latency_table  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64)
        self.dw, self.b3 = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64)
        self.c3 = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(F.relu(self.b3(self.dw(x)))))
        return self.head(x.mean((2, 3)))


STATS = {"median": statistics.median, "p10": lambda xs: sorted(xs)[len(xs) // 10]}
CASES = {"MLP 256-1024-1024-10": (mlp, [64, 256]), "CNN 32x32 (BN, depthwise)": (CNN, [16, 3, 32, 32])}


def dendritic(factory, k: int) -> nn.Module:
    model = convert(factory(), DendriteConfig(dendrites=k)).model
    with torch.no_grad():
        for layer in dendrite_layers(model).values():
            for p in [*layer.dendrite_scales, *layer.dendrite_cascade]:
                p.normal_(0, 0.1)
            for d in layer.dendrite_layers:
                for p in d.parameters():
                    p.normal_(0, 0.05)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1: stable on shared machines)")
    parser.add_argument("--stat", choices=list(STATS), default="median",
                        help="median, or p10 (10th percentile: closer to the intrinsic cost when other jobs share the CPUs)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: CPU time of the (single) compute thread, robust to other jobs on the machine; wall: elapsed time")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of interleaved timing per model")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread; use --clock wall with --threads > 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="export_bench_"))
    print(f"torch {torch.__version__}, {args.threads} thread(s) on {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f} at start); latency = {args.stat} {args.clock}-clock ms per batch, interleaved\n")
    header = f"{'model':<28}{'variant':<28}{'ms':>9}{'FLOPs×base':>12}{'× FLOP pred.':>14}"
    for name, (factory, shape) in CASES.items():
        x = (torch.randn(shape),)
        base_onnx = tmp / "base.onnx"
        export(factory().eval(), base_onnx, ExportConfig(input_shape=shape, latency=False, force=True))
        for k in (1, 3):
            model = dendritic(factory, k)
            start = time.perf_counter()
            onnx = {}
            for layout in ("separate", "concat", "auto"):
                path = tmp / f"{layout}.onnx"
                report = export(model, path, ExportConfig(input_shape=shape, gemm_layout=layout, latency=False, force=True))
                onnx[layout] = (path, report)
            chosen = sorted({r.layout for r in onnx["auto"][1].folds if r.layout})  # auto: timed in onnxruntime
            models = {"base torch": strip_dendrites(model), "unfolded torch": model,
                      "folded torch": fold_model(model, gemm_layout="separate"), "base onnxruntime": base_onnx}
            for layout in ("separate", "concat"):
                models[f"onnxruntime {layout}"] = onnx[layout][0]
            models[f"onnxruntime auto ({chosen[0]})"] = onnx["auto"][0]
            rows = latency_table(models, x, budget_s=args.budget, stat=STATS[args.stat], threads=args.threads,
                                 clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
            rows[3].flops = rows[0].flops  # base onnxruntime computes the base model's FLOPs
            print(f"{name}, {k} dendrite{'s' * (k > 1)} per target (export+verify of 3 layouts "
                  f"{time.perf_counter() - start:.1f}s, max |ORT - unfolded| {max(r.verify.max_abs for _, r in onnx.values()):.2g})")
            print(header)
            for row in rows:
                ref = rows[3] if "onnxruntime" in row.name else rows[0]
                predicted = ref.ms * row.flops / ref.flops
                print(f"{'':<28}{row.name:<28}{row.ms:>9.3f}{row.flops / ref.flops:>12.2f}{row.ms / predicted:>14.2f}")
            ort = min(r.ms for r in rows[4:])
            auto = rows[-1]
            pred = rows[3].ms * auto.flops / rows[3].flops
            print(f"{'':<28}goal: auto ORT {auto.ms / pred:.2f}x of FLOP prediction (<= 1.15), "
                  f"{auto.ms / rows[1].ms:.2f}x of unfolded torch (<= 1); best ORT layout {ort:.3f} ms\n")


if __name__ == "__main__":
    main()
