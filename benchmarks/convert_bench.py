"""Conversion time as a ratio to a plain `torch.load` of the same file (goal: under 3x).

Run: .venv/bin/python benchmarks/convert_bench.py
Models: a ~25M-parameter CNN (whole pickled module) and a BERT-base-sized random transformers
model (Hugging Face directory). Conversion = load + fx analysis + rewrite + building the report.
"""

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dendrite_convert as dc  # noqa: E402


class WideCNN(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for width in (128, 256, 512, 512, 1024, 1024, 1024):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1000)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _median_seconds(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    tmp = Path(tempfile.mkdtemp())
    try:
        cnn = WideCNN()
        torch.save(cnn, tmp / "cnn.pt")
        import transformers

        bert = transformers.BertForSequenceClassification(transformers.BertConfig())
        bert.save_pretrained(tmp / "bert")
        cases = [
            ("CNN (pickled module)", tmp / "cnn.pt", lambda: torch.load(tmp / "cnn.pt", weights_only=False), cnn),
            ("BERT-base (HF directory)", tmp / "bert",
             lambda: transformers.BertForSequenceClassification.from_pretrained(tmp / "bert"), bert),
        ]
        print(f"{'model':28s} {'params':>12s} {'load s':>8s} {'convert s':>10s} {'ratio':>6s}")
        for name, path, plain_load, model in cases:
            params = dc.count_parameters(model)
            load_s = _median_seconds(plain_load)
            convert_s = _median_seconds(lambda: dc.convert(path))
            print(f"{name:28s} {params:12,d} {load_s:8.3f} {convert_s:10.3f} {convert_s / load_s:6.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
