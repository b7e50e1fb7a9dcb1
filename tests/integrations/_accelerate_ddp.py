"""Two-process CPU run of the Accelerate helpers (launched with torchrun by a test).

Usage: torchrun --nproc_per_node 2 _accelerate_ddp.py OUT
Trains 2 epochs with a save_state after the first, then a fresh model/EMA
loads that state and trains the second epoch again. Each rank writes both
EMA states to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emaweights import EMA
from emaweights.integrations.accelerate import prepare_ema, update
from emaweights.io import save_state


def setup(seed: int) -> tuple[Accelerator, nn.Module, Any, Any, EMA]:
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    return accelerator, model, opt, loader, prepare_ema(accelerator, model, 0.8)


def epoch(accelerator: Accelerator, model: nn.Module, opt: Any, loader: Any, ema: EMA) -> None:
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        update(ema, accelerator)


def main(out: Path) -> None:
    accelerator, model, opt, loader, straight = setup(0)
    epoch(accelerator, model, opt, loader, straight)
    accelerator.save_state(str(out / "ckpt"))
    epoch(accelerator, model, opt, loader, straight)
    accelerator.wait_for_everyone()
    accelerator, model, opt, loader, resumed = setup(7)
    accelerator.load_state(str(out / "ckpt"))
    epoch(accelerator, model, opt, loader, resumed)
    rank = accelerator.process_index
    save_state(
        {"straight": straight.state_dict(), "resumed": resumed.state_dict()},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
