"""One list of every averager: a new averager gets the conformance battery by adding one line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import emaweights
from emaweights import EMA, SWA, MultiEMA, SwitchEMA


@dataclass(frozen=True)
class Case:
    """How to make one averager for the battery."""

    name: str
    make: Callable[..., Any]  # (model, **options) -> averager


AVERAGERS = [
    Case("EMA", lambda m, **o: EMA(m, 0.9, **o)),
    Case("EMA-debiased", lambda m, **o: EMA(m, 0.9, anchor="debiased", **o)),
    Case(
        "EMA-stochastic",
        lambda m, **o: EMA(m, 0.9, dtype=torch.bfloat16, rounding="stochastic", seed=0, **o),
    ),
    Case("MultiEMA", lambda m, **o: MultiEMA(m, [0.9, 0.5], **o)),
    Case("SWA", lambda m, **o: SWA(m, **o)),
    Case("SwitchEMA", lambda m, **o: SwitchEMA(m, 0.9, switch_every=4, **o)),
    Case("LAWA", lambda m, **o: emaweights.LAWA(m, k=2, **o)),
    Case("BEMA", lambda m, **o: emaweights.BEMA(m, **o)),
    Case("PullBack", lambda m, **o: emaweights.PullBack(m, update_every=2, **o)),
]

BY_NAME = {c.name: c for c in AVERAGERS}


def bn_model(seed: int = 0) -> nn.Module:
    """A tiny model with BatchNorm (float and integer buffers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


class Tied(nn.Module):
    """A tiny language-model shape: the head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight


@torch.no_grad()
def train_step(model: nn.Module, step: int) -> None:
    """A deterministic stand-in for an optimizer step (depends only on ``step``)."""
    for i, p in enumerate(model.parameters()):
        p.add_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step + i).view(p.shape) * 0.1)
