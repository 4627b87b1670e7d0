"""What the callback tests of every objective share: a small regression task, its converted net, and a
Lightning fit of that net with a given DendriteCallback."""

import torch
from torch import nn

import dendrite_convert as dc


def regression_data(n: int = 128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, torch.stack([torch.sin(x[:, :3].sum(1)), x[:, 3] * x[:, 4]], 1)


def regression_net(rank=None):
    torch.manual_seed(0)
    return dc.convert(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)), dc.DendriteConfig(rank=rank)).model


def lightning_fit(tmp_path, callback, max_epochs: int):
    """Fit a LightningModule around `regression_net()` on `regression_data()` with `callback`; the module."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = regression_net()

        def training_step(self, batch, _):
            loss = (self.net(batch[0]) - batch[1]).square().mean()
            self.log("train_loss", loss)  # muted while an objective reads the error signal
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", (self.net(batch[0]) - batch[1]).square().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.02)

    data = TensorDataset(*regression_data())
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[callback], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    module = Module()
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=128))
    return module


def hf_trainer(tmp_path, max_steps: int, callbacks=()):
    """A transformers Trainer of `regression_net()` on `regression_data()`, evaluating every 3 steps."""
    import transformers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = regression_net()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": (out - labels).square().mean(), "logits": out}

    x, y = regression_data()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    args = transformers.TrainingArguments(str(tmp_path), eval_strategy="steps", eval_steps=3, max_steps=max_steps,
                                          per_device_train_batch_size=32, learning_rate=0.02, report_to=[],
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no",
                                          seed=0)
    return transformers.Trainer(model=Net(), args=args, train_dataset=data, eval_dataset=data, callbacks=list(callbacks))
