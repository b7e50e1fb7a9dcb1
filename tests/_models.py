"""Tiny models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(dtype: torch.dtype = torch.float32, batchnorm: bool = False) -> nn.Module:
    """A small MLP, optionally with BatchNorm (float and integer buffers)."""
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One optimizer step on a deterministic random batch."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()
