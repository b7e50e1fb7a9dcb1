"""A user schedule defined outside emaweights, and a worker that resumes an EMA using it.

python -m tests._schedules DIR
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from emaweights import EMA, Schedule


@dataclass(frozen=True)
class Ramp(Schedule):
    """A user schedule: the decay rises linearly from ``low`` to ``high`` over ``steps``."""

    kind: ClassVar[str] = "tests.ramp"
    low: float = 0.5
    high: float = 0.9
    steps: int = 10

    def __call__(self, step: int) -> float:
        """The decay at ``step``."""
        t = min(step, self.steps) / self.steps
        return self.low + (self.high - self.low) * t


SCHEDULE = Ramp(low=0.4, high=0.95, steps=6)


def model() -> nn.Module:
    """A small model with the same weights in every process."""
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def train(net: nn.Module, ema: EMA, steps: range) -> None:
    """Move the weights deterministically (by step) and update the EMA after each move."""
    for step in steps:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.full_like(p, 0.1 * step))
        ema.update()


def main(folder: Path) -> None:
    """Load the state saved at step 3 into a fresh EMA, run to step 6, save its shadow."""
    saved = torch.load(folder / "at3.pt", weights_only=True)
    net = model()
    net.load_state_dict(saved["model"])
    ema = EMA(net, Ramp(low=0.4, high=0.95, steps=6))
    ema.load_state_dict(saved["ema"])
    train(net, ema, range(3, 6))
    torch.save(dict(ema.shadow), folder / "resumed.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
