"""Training runs for the exact-resume test; also runnable as a fresh process.

``python -m tests.reliability._resume_worker first N CKPT`` trains steps 1..N
and saves a checkpoint (model, optimizer, EMA) with :func:`emaweights.io.save_state`;
``... resume M CKPT OUT`` loads it in a new process, trains to step M and saves
the EMA states. Every configuration of :data:`CONFIGS` runs in each call.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from emaweights import EMA, io
from emaweights.schedules import Warmup
from tests._models import mlp, train_step

# Each exercises a part of the state: schedule position, update_every phase,
# start_step, the debiased anchor's P_T, buffers, and skipped-update counts.
CONFIGS: dict[str, dict[str, Any]] = {
    "constant": {"decay": 0.9},
    "warmup_every3_start5_debiased": {
        "decay": Warmup(0.99),
        "update_every": 3,
        "start_step": 5,
        "anchor": "debiased",
    },
    "halflife_skip_nonfinite": {"decay": 0.95, "nonfinite": "skip"},
}
NAN_STEPS = (4, 13)  # steps at which the live weights are non-finite during update()


def build(name: str) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    """Model (with BatchNorm buffers), Adam and the EMA of one configuration."""
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, EMA(model, **CONFIGS[name])


def train(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA, start: int, end: int) -> None:
    """Optimizer steps ``start+1 .. end``, each followed by an EMA update."""
    weight = next(model.parameters())
    for step in range(start + 1, end + 1):
        train_step(model, opt, seed=step)
        if ema.nonfinite == "skip" and step in NAN_STEPS:
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0] = float("nan")
            ema.update()
            with torch.no_grad():
                weight.copy_(saved)
        else:
            ema.update()


def first(n: int, ckpt: str) -> None:
    """Train every configuration for ``n`` steps and save one checkpoint."""
    out = {}
    for name in CONFIGS:
        model, opt, ema = build(name)
        train(model, opt, ema, 0, n)
        out[name] = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}
    io.save_state(out, ckpt)


def resume(m: int, ckpt: str, dest: str) -> None:
    """Load the checkpoint into fresh objects, train to step ``m``, save the EMA states."""
    saved = io.load_state(ckpt)
    out = {}
    for name in CONFIGS:
        model, opt, ema = build(name)
        model.load_state_dict(saved[name]["model"])
        opt.load_state_dict(saved[name]["opt"])
        ema.load_state_dict(saved[name]["ema"])
        train(model, opt, ema, ema.step, m)
        out[name] = ema.state_dict()
    io.save_state(out, dest)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    if sys.argv[1] == "first":
        first(int(sys.argv[2]), sys.argv[3])
    else:
        resume(int(sys.argv[2]), sys.argv[3], sys.argv[4])
