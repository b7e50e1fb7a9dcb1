# python examples/lightning_ema.py --epochs 5 --out /tmp/emaweights-lightning
"""Lightning + EMACallback: accumulation, validation on the average, resume.

Trains a small regressor on noisy synthetic data with gradient accumulation,
validates with the averaged weights (and the live weights in a separate
``trainer.validate`` with ``evaluate`` off), checkpoints every epoch, then
resumes from the last checkpoint for two more epochs: the EMA state comes back with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emaweights.integrations.lightning import EMACallback


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    x = torch.randn(640, 8, generator=g)
    y = x @ w + 0.5 * torch.randn(640, 1, generator=g)  # noisy targets: SGD jitters
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[512:], y[512:]), batch_size=128)
    return train, val


def trainer(epochs: int, out: Path, ema: EMACallback) -> L.Trainer:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    return L.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=2,  # the EMA moves once per 2 batches
        callbacks=[ema, ckpt],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/emaweights-lightning"))
    args = parser.parse_args()
    torch.manual_seed(0)
    train, val = loaders()

    # Training from scratch: "debiased" removes the weight the average keeps on the
    # random initial weights (the default "init" anchor is meant for fine-tuning).
    ema_cb = EMACallback(decay=0.99, anchor="debiased")
    t = trainer(args.epochs, args.out, ema_cb)
    model = Regressor()
    t.fit(model, train, val)
    print(f"after {t.global_step} optimizer steps ({ema_cb.ema.num_updates} EMA updates):")
    report(t, ema_cb, model, val)

    resumed_cb = EMACallback(decay=0.99, anchor="debiased")
    t = trainer(args.epochs + 2, args.out, resumed_cb)
    model = Regressor()
    t.fit(model, train, val, ckpt_path=args.out / "last.ckpt")
    print(f"resumed to {t.global_step} steps ({resumed_cb.ema.num_updates} EMA updates):")
    report(t, resumed_cb, model, val)


def report(t: L.Trainer, cb: EMACallback, model: Regressor, val: Any) -> None:
    """Print the averaged weights' validation loss and, in a second pass, the live one."""
    averaged = t.callback_metrics["val_loss"].item()
    cb.evaluate = False  # validate the live weights: a separate run, its own metrics
    live = t.validate(model, val, verbose=False)[0]["val_loss"]
    cb.evaluate = True
    print(f"  val_loss averaged {averaged:.4f}   live {live:.4f}")


if __name__ == "__main__":
    main()
