"""The Trainer and Lightning callbacks (issue 6): dendrites added inside unmodified loops, checkpoints
that save and reload, the best model restored at the end, and a core that works without either library."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from dendrite_convert import DendriteConfig, convert
from dendrite_convert.training.growth import Growth
from dendrite_convert.core.structure import add_dendrites, dendrite_counts, restore, restore_structure, set_dendrite_counts, snapshot
from dendrite_convert.training.schedule import ScheduleConfig




# ---- growth: the in-place operations both callbacks use --------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), DendriteConfig()).model


def test_snapshot_restore_changes_structure_back_in_place():
    model = _mlp()
    x = torch.randn(5, 6)
    snap = snapshot(model)
    before = model(x).detach()
    add_dendrites(model)
    add_dendrites(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1)  # scales too: the function changes
    assert dendrite_counts(model) == {"0": 2, "2": 2}
    assert not torch.allclose(model(x), before)
    restore(model, snap)
    assert dendrite_counts(model) == {"0": 0, "2": 0}
    assert torch.equal(model(x), before)
    # and forwards again: restoring a 2-dendrite snapshot into a bare model adds them back
    add_dendrites(model)
    add_dendrites(model)
    with torch.no_grad():
        model[0].dendrite_scales[1].fill_(0.5)
    grown, grown_out = snapshot(model), model(x).detach()
    set_dendrite_counts(model, 0)
    restore(model, grown)
    assert torch.equal(model(x), grown_out)


def test_restore_structure_from_state_dict_keys():
    model = _mlp()
    add_dendrites(model)
    state = model.state_dict()
    fresh = _mlp()
    assert restore_structure(fresh, state) == {"0": 1, "2": 1}
    fresh.load_state_dict(state, strict=True)


def test_growth_adds_retries_and_restores_the_best():
    model = _mlp()
    growth = Growth(ScheduleConfig(patience=1, maximize=False))
    assert growth.observe(model, 1.0).action == "continue"  # best: 0 dendrites
    best_out = model(torch.ones(1, 6)).detach()
    assert growth.observe(model, 2.0).action == "add"
    assert set(dendrite_counts(model).values()) == {1}
    assert growth.observe(model, 3.0).action == "continue"  # the first score of a cycle is its best
    assert growth.observe(model, 3.0).action == "retry"  # 1 dendrite never beat 1.0: a fresh one
    assert set(dendrite_counts(model).values()) == {1}
    assert growth.observe(model, 3.0).action == "continue"
    decision = growth.observe(model, 3.0)
    assert decision.action == "stop"
    assert set(dendrite_counts(model).values()) == {0}
    assert torch.equal(model(torch.ones(1, 6)), best_out)
    # the schedule state survives a round trip
    again = Growth(ScheduleConfig(patience=1, maximize=False))
    again.load_state_dict(growth.state_dict())
    assert again.schedule.to_dict() == growth.schedule.to_dict() and again.best_value == 1.0


# ---- Hugging Face Trainer --------------------------------------------------------------------------

VOCAB, SEQ = 16, 10


def _marker_data(n: int, seed: int):
    """Label 1 when token 4 occurs more often than token 5 (the rest is filler 6..15)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, SEQ), generator=g)
    marks = torch.randint(0, 4, (n, SEQ), generator=g)
    ids = torch.where(marks == 0, torch.full_like(ids, 4), torch.where(marks == 1, torch.full_like(ids, 5), ids))
    labels = ((ids == 4).sum(1) > (ids == 5).sum(1)).long()
    return [{"input_ids": i, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


def _tiny_bert(cls_name: str = "BertForSequenceClassification", converted: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2)
    torch.manual_seed(0)
    result = convert(getattr(transformers, cls_name)(config), DendriteConfig())
    return result if converted else result.model


def _args(out, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(eval_strategy="steps", eval_steps=5, save_steps=5, max_steps=40, per_device_train_batch_size=32,
                per_device_eval_batch_size=128, learning_rate=3e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                logging_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """One Trainer run with the callback; records the model's logits whenever a checkpoint is saved."""
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    out = tmp_path_factory.mktemp("hf")
    probe = torch.stack([b["input_ids"] for b in _marker_data(8, 99)])
    saved: dict[int, torch.Tensor] = {}

    steps: list[dict] = []

    class Recorder(transformers.TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            was = model.training
            model.eval()
            with torch.no_grad():
                saved[state.global_step] = model(input_ids=probe).logits.clone()
            model.train(was)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            steps.append({"step": state.global_step, "lr": trainer.optimizer.param_groups[0]["lr"],
                          "optimizes_all": optimized == {id(p) for p in model.parameters()},
                          "dendrites": max(dendrite_counts(model).values())})

    model = _tiny_bert()
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=_marker_data(256, 1),
                                   eval_dataset=_marker_data(128, 2), callbacks=[Recorder()])
    callback = DendriteCallback(switch_every=2, max_dendrites=2).attach(trainer)
    trainer.train()
    return {"trainer": trainer, "callback": callback, "out": out, "saved": saved, "probe": probe, "steps": steps}


def test_trainer_optimizer_is_rebuilt_and_the_lr_schedule_continues(hf_run):
    steps, max_steps, lr = hf_run["steps"], 40, 3e-3
    assert any(s["dendrites"] >= 1 for s in steps)
    assert all(s["optimizes_all"] for s in steps)  # new dendrites are trained from the step after they appear
    for s in steps:  # the Trainer's linear decay, as a function of the global step, across every rebuild
        assert s["lr"] == pytest.approx(lr * (max_steps - s["step"]) / max_steps, rel=1e-6)


def test_trainer_callback_adds_dendrites_and_restores_the_best(hf_run):
    trainer, callback = hf_run["trainer"], hf_run["callback"]
    actions = [h for h in trainer.state.log_history if "dendrite_action" in h]
    assert [h["dendrite_action"] for h in actions][:2] == ["continue", "add"]
    assert max(h["dendrites"] for h in actions) >= 1  # a model with dendrites was trained and evaluated
    # at the end, trainer.model is the best model: re-evaluating it gives the best recorded loss
    best = callback.best_value
    losses = [h["eval_loss"] for h in actions]
    assert best in losses and min(losses) >= best * (1 - 1e-3) - 1e-5  # nothing beat it by the schedule's margin
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best, rel=1e-6, abs=1e-7)
    assert set(dendrite_counts(trainer.model).values()) == {callback.growth.schedule.best_dendrites}


def test_trainer_checkpoint_reloads_into_a_fresh_converted_model(hf_run):
    from safetensors.torch import load_file

    out, saved, probe = hf_run["out"], hf_run["saved"], hf_run["probe"]
    grown = []
    for step in sorted(saved):
        structure = json.loads((out / f"checkpoint-{step}" / "dendrite_structure.json").read_text())
        if max(structure["dendrites"].values()) >= 1:
            grown.append(step)
    assert grown, "no checkpoint was written with dendrites"
    step = grown[0]
    folder = out / f"checkpoint-{step}"
    fresh = _tiny_bert()
    counts = restore_structure(fresh, folder)
    assert max(counts.values()) >= 1 and len(counts) == 14  # q, k, v, o, two FFN per layer; pooler, classifier
    result = fresh.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=probe).logits, saved[step])


def _grown_checkpoint(out, last: bool = False):
    """The first (or last) checkpoint written while the model had dendrites."""
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    grown = [out / f"checkpoint-{s}" for s in steps
             if max(json.loads((out / f"checkpoint-{s}" / "dendrite_structure.json").read_text())
                    ["dendrites"].values()) >= 1]
    return grown[-1 if last else 0]


def test_trainer_trained_bert_exports_to_onnx(hf_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file

    from dendrite_convert.exporting.export import ExportConfig, export

    converted = _tiny_bert(converted=True)
    folder = _grown_checkpoint(hf_run["out"], last=True)
    restore_structure(converted.model, folder)
    converted.model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    scales = [p for n, p in converted.model.named_parameters() if "dendrite_scales" in n]
    assert scales and any(p.abs().max() > 0 for p in scales)  # trained dendrites, not zero-scale no-ops
    report = export(converted, tmp_path / "bert.onnx",
                    ExportConfig(format="onnx", gemm_layout="separate", latency=False))
    assert report.verify is not None and report.verify.ok
    assert report.verify.max_abs <= 1e-4


def test_trainer_resumes_from_a_checkpoint_with_dendrites(hf_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    out = hf_run["out"]
    folder = _grown_checkpoint(out)
    fresh = _tiny_bert()
    trainer = transformers.Trainer(model=fresh, args=_args(tmp_path, save_strategy="no"),
                                   train_dataset=_marker_data(256, 1), eval_dataset=_marker_data(128, 2))
    callback = DendriteCallback(switch_every=2, max_dendrites=2, resume_from=folder).attach(trainer)
    saved_schedule = json.loads((folder / "dendrite_structure.json").read_text())["callback"]["schedule"]
    assert callback.growth.schedule.to_dict() == saved_schedule
    assert callback.best_value == saved_schedule["best"]
    trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.state.global_step == 40 or callback.growth.done
    assert trainer.evaluate()["eval_loss"] == pytest.approx(callback.best_value, rel=1e-6, abs=1e-7)


def test_trainer_saves_tied_weights_of_a_converted_masked_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    model = _tiny_bert("BertForMaskedLM")
    data = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in _marker_data(64, 3)]
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=4, eval_steps=2, save_steps=2),
                                   train_dataset=data, eval_dataset=data[:16])
    DendriteCallback(switch_every=1, max_dendrites=1).attach(trainer)
    trainer.train()  # saves checkpoints through save_pretrained: tied decoder/embedding de-duplicated
    decoder = trainer.model.cls.predictions.decoder
    assert decoder.base_layer.weight is trainer.model.bert.embeddings.word_embeddings.weight
    trainer.save_model(str(tmp_path / "final"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "cls.predictions.decoder.base_layer.weight" not in keys
    assert "bert.embeddings.word_embeddings.weight" in keys
    # it reloads: structure inferred from the weight names, tied tensors filled through the tie
    from safetensors.torch import load_file

    fresh = _tiny_bert("BertForMaskedLM")
    assert set(restore_structure(fresh, tmp_path / "final").values()) == set(dendrite_counts(trainer.model).values())
    result = fresh.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")), strict=False)
    assert set(result.missing_keys) <= {"cls.predictions.decoder.base_layer.weight",
                                        "cls.predictions.decoder.base_layer.bias"} and not result.unexpected_keys
    probe = torch.stack([b["input_ids"] for b in data[:4]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=probe).logits, trainer.model(input_ids=probe).logits)


def test_trainer_callback_refuses_arguments_it_cannot_work_with(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dendrite_convert.integrations.transformers import DendriteCallback

    data = _marker_data(8, 0)
    for kw, words in [({"eval_strategy": "no"}, "eval_strategy"),
                      ({"load_best_model_at_end": True, "metric_for_best_model": "loss"}, "load_best_model_at_end")]:
        trainer = transformers.Trainer(model=_tiny_bert(), args=_args(tmp_path, **kw), train_dataset=data,
                                       eval_dataset=data)
        with pytest.raises(ValueError, match=words):
            DendriteCallback().attach(trainer)


# ---- Lightning -------------------------------------------------------------------------------------


def _lightning_setup(seed: int = 0):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(256, 6, generator=g), torch.randn(128, 6, generator=g)

    def target(x):
        return torch.sin(x[:, :3].sum(1, keepdim=True)) + 0.3 * x[:, 3:4] ** 2

    class Regressor(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)}

    def module():
        torch.manual_seed(0)
        return Regressor(convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)), DendriteConfig()).model)

    train = DataLoader(TensorDataset(x, target(x)), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(xv, target(xv)), batch_size=128)
    return pl, module, train, val


def _pl_trainer(pl, tmp_path, callbacks, max_epochs=10):
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1,
                                               filename="{epoch}")
    return pl.Trainer(max_epochs=max_epochs, callbacks=[*callbacks, checkpoints], logger=False, accelerator="cpu",
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run checkpoints elsewhere
def test_lightning_callback_adds_dendrites_checkpoints_and_restores_the_best(tmp_path):
    pl, module, train, val = _lightning_setup()
    from dendrite_convert.integrations.lightning import DendriteCallback

    probe = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    saved: dict[int, torch.Tensor] = {}

    optimizes_all: list[bool] = []

    class Recorder(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            with torch.no_grad():
                saved[checkpoint["epoch"]] = pl_module(probe).clone()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
            optimizes_all.append(optimized == {id(p) for p in pl_module.parameters()})

    model = module()
    callback = DendriteCallback(monitor="val_loss", switch_every=2, max_dendrites=2)
    trainer = _pl_trainer(pl, tmp_path, [callback, Recorder()])
    trainer.fit(model, train, val)

    actions = [h["action"] for h in callback.growth.history]
    assert actions[:2] == ["continue", "add"] and "add" in actions
    assert optimizes_all and all(optimizes_all)  # configure_optimizers() ran again on the grown module
    assert max(h["dendrites"] for h in callback.growth.history) >= 1
    # the best model is back in the module at the end
    values = [h["value"] for h in callback.growth.history]
    assert callback.best_value in values and min(values) >= callback.best_value * (1 - 1e-3) - 1e-5
    assert trainer.validate(model, val, verbose=False)[0]["val_loss"] == pytest.approx(callback.best_value, rel=1e-6)

    # the trained dendritic network exports to ONNX and onnxruntime reproduces it
    import dendrite_convert as dc

    model.net.eval()
    assert max(layer.num_dendrites for layer in dc.dendrite_layers(model.net).values()) >= 1
    report = dc.export(model.net, tmp_path / "lightning.onnx", dc.ExportConfig(input_shape=[2, 6], latency=False))
    assert report.verify.ok and max(o.max_abs for o in report.verify.outputs) <= 1e-4

    # a checkpoint written with dendrites reloads into a fresh converted module
    grown = [p for p in sorted(tmp_path.glob("*.ckpt"))
             if max(restore_structure(module(), p).values()) >= 1]
    assert grown
    ckpt = grown[0]
    fresh = module()
    restore_structure(fresh, ckpt)
    blob = torch.load(ckpt, weights_only=True)
    fresh.load_state_dict(blob["state_dict"], strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(probe), saved[blob["epoch"]])

    # and fit() resumes from it (weights, optimizer, schedule state, best state)
    resumed = DendriteCallback(monitor="val_loss", switch_every=2, max_dendrites=2, resume_from=ckpt)
    again = module()
    trainer2 = _pl_trainer(pl, tmp_path / "resumed", [resumed], max_epochs=blob["epoch"] + 3)
    trainer2.fit(again, train, val, ckpt_path=str(ckpt))
    assert len(resumed.growth.history) > len(blob["callbacks"][resumed.state_key]["history"])
    assert trainer2.validate(again, val, verbose=False)[0]["val_loss"] == pytest.approx(resumed.best_value, rel=1e-6)


# ---- the core without the optional libraries -------------------------------------------------------

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("transformers", "lightning", "pytorch_lightning", "accelerate")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""


def test_core_and_cli_work_without_transformers_and_lightning():
    code = BLOCKER + textwrap.dedent("""
        import dendrite_convert, torch
        from torch import nn
        from typer.testing import CliRunner
        from dendrite_convert.cli import app
        m = dendrite_convert.convert(nn.Sequential(nn.Linear(3, 4)), dendrite_convert.DendriteConfig(dendrites=1))
        assert len(dendrite_convert.dendrite_layers(m.model)) == 1
        runner = CliRunner()
        result = runner.invoke(app, ["--help"])
        assert result.exit_code == 0, result.output
        names = [c.name for c in app.registered_commands]
        for name in names:
            sub = runner.invoke(app, [name, "--help"])
            assert sub.exit_code == 0, (name, sub.output)
        for extra in ("transformers", "lightning"):
            try:
                __import__(f"dendrite_convert.integrations.{extra}")
            except ImportError as exc:
                assert f"pip install 'dendrite-convert[{extra}]'" in str(exc), str(exc)
            else:
                raise AssertionError(f"{extra} integration imported without its library")
        assert not any(k.split(".")[0] in ("transformers", "lightning", "accelerate") for k in sys.modules)
        print("OK", ",".join(names))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK") and "convert" in proc.stdout


# ---- the text-classification example ---------------------------------------------------------------


def test_text_classification_example_adapter_drives_the_converted_bert():
    """The example's data is learnable-shaped and its adapter fits the model dendrite-train gets."""
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    from dendrite_convert.training.adapter import load_adapter

    folder = Path(__file__).resolve().parents[1] / "examples" / "text_classification"
    adapter = load_adapter(folder / "adapter.py")
    spec = importlib.util.spec_from_file_location("_example_task", folder / "task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    assert len(task.VOCAB) == 33
    ids, labels = task.make_reviews(64, 0)
    assert torch.equal(ids, task.make_reviews(64, 0)[0])  # fixed seeds: the same data every run
    assert 0.3 < labels.float().mean() < 0.7 and (ids[:, 0] == task.TOKEN["[CLS]"]).all()
    torch.manual_seed(0)
    model = convert(transformers.BertForSequenceClassification(task.tiny_bert_config()), DendriteConfig()).model
    batch = next(iter(adapter.train_data()))
    args, kwargs = adapter.model_inputs(batch)
    outputs = model(*args, **kwargs)
    loss = adapter.loss(outputs, batch)
    assert loss.ndim == 0 and 0.3 < loss.item() < 1.2  # two balanced classes at random init: about ln 2
    assert 0 <= adapter.score(outputs, batch) <= 100 and adapter.maximize
