"""A training run that records every state in float64, for reference computations."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests._models import train_step


def run(
    model: torch.nn.Module, steps: int, hook: Callable[[int], None], lr: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """Train, calling ``hook(step)`` after each step; return float64 states 0..steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    for s in range(1, steps + 1):
        train_step(model, opt, seed=s)
        hook(s)
        history.append({k: v.double().clone() for k, v in model.state_dict().items()})
    return history
