"""Train a tiny random BERT with dendrites through an unmodified `transformers.Trainer`.

    python examples/text_classification/train_with_trainer.py [--out DIR] [--steps N] [--onnx model.onnx]

The model is converted with `dendrite_convert.convert`, trained by the Trainer with
`DendriteCallback` attached (dendrites are added when eval accuracy stops improving), and the best
model is what `trainer.model` holds at the end. Takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch
import transformers

from dendrite_convert import DendriteConfig, convert, count_parameters
from dendrite_convert.core.structure import dendrite_counts
from dendrite_convert.integrations.transformers import DendriteCallback
from task import as_records, make_reviews, tiny_bert_config


def accuracy(prediction: transformers.EvalPrediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--patience", type=int, default=2, help="evaluations without improvement before a switch")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--onnx", default=None, help="also export the best model to this ONNX file (needs [onnx])")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="dendrite-trainer-")
    start = time.perf_counter()
    torch.set_num_threads(1)  # a 20k-parameter model: more threads only add overhead (and thrash on a busy CPU)

    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(tiny_bert_config())
    base_params = count_parameters(base)
    converted = convert(base, DendriteConfig())  # in place: every Linear is now a DendriteLayer
    model = converted.model

    train, val, test = (as_records(*make_reviews(n, seed)) for n, seed in ((2048, 1), (512, 2), (512, 3)))
    training_args = transformers.TrainingArguments(
        out, eval_strategy="steps", eval_steps=args.eval_steps,  # evaluations drive the dendrite schedule
        save_steps=4 * args.eval_steps, save_total_limit=2,  # checkpoints carry dendrite_structure.json
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=512,
        learning_rate=args.lr, warmup_steps=20, logging_steps=100, report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                                   compute_metrics=accuracy)
    callback = DendriteCallback(metric="loss", patience=args.patience, max_dendrites=3).attach(trainer)
    trainer.train()

    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    events = [h for h in trainer.state.log_history if "dendrite_action" in h]
    summary = {
        "best_val_loss": callback.best_value,
        "val_accuracy": trainer.evaluate()["eval_accuracy"],
        "test_accuracy": test_metrics["test_accuracy"],
        "dendrites": max(dendrite_counts(model).values()),
        "switches": [(h["step"], h["dendrite_action"]) for h in events if h["dendrite_action"] in ("add", "retry")],
        "params": count_parameters(model),
        "base_params": base_params,
        "seconds": round(time.perf_counter() - start, 1),
        "output_dir": out,
    }
    if args.onnx:
        summary["onnx"] = export_onnx(converted, args.onnx)
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    return summary


def export_onnx(converted, path: str) -> str:
    """Fold the dendrites and write an ONNX file verified by onnxruntime (what dendrite-export does)."""
    from dendrite_convert.exporting.export import ExportConfig, export

    report = export(converted, path, ExportConfig(format="onnx", force=True, latency=False))
    return f"{path} (onnxruntime vs unfolded PyTorch: max abs error {report.verify.max_abs:.2g})"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("dendrite_convert").setLevel(logging.INFO)  # one line per dendrite switch
    transformers.utils.logging.disable_progress_bar()
    main()
