"""Worker for the exact-resume test: train from step START to STOP, resuming from CKPT if given.

Usage: python _resume_worker.py START STOP CKPT_IN|- CKPT_OUT
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from emaweights import EMA, Warmup, io


def build() -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(
        model, Warmup(0.99), update_every=3, start_step=2, anchor="debiased", nonfinite="skip"
    )
    return model, opt, ema


def main(start: int, stop: int, ckpt_in: str, ckpt_out: str) -> None:
    model, opt, ema = build()
    if ckpt_in != "-":
        state = io.load_state(ckpt_in)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
    for step in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(step)  # the data of a step depends only on the step
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update()
    io.save_state(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict()},
        ckpt_out,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
