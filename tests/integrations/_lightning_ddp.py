"""Two-process CPU DDP run of the Lightning callback (launched by test_lightning_ddp.py).

Lightning's DDP launcher re-runs this script for rank 1. Each rank writes
what it saw to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emaweights.integrations.lightning import EMACallback

DECAY = 0.8


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append(
                {n: t.detach().clone() for n, t in self.state_dict().items()}
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_step.append({n: t.detach().clone() for n, t in self.state_dict().items()})


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=g), torch.randn(32, 1, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    model, cb = Net(), EMACallback(DECAY)
    theta0 = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    trainer.save_checkpoint(out / "end.ckpt")
    assert cb.ema is not None
    torch.save(
        {
            "theta0": theta0,
            "after_step": model.after_step,
            "seen_in_validation": model.seen_in_validation,
            "global_step": trainer.global_step,
            "ema": cb.ema.state_dict(),
            "live": {n: t.detach().clone() for n, t in model.state_dict().items()},
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
