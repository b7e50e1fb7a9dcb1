"""FSDP2 edge cases: NaN in one shard only; an EMA made after an eval forward (forkable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emaweights import EMA
from emaweights.ema import NonFiniteError
from emaweights.io import save_state
from tests.distributed._workers import DECAY, sharded, small


def _first_nonempty(ema: EMA) -> torch.Tensor:
    return next(p for p in ema.model.parameters() if p.to_local().numel())


def one_rank_nan(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """NaN in rank 0's shard alone: skip, raise and refuse-to-swap must happen on every rank."""
    out: dict[str, Any] = {}
    skipping = EMA(sharded(small()), DECAY, nonfinite="skip")
    if rank == 0:
        with torch.no_grad():
            _first_nonempty(skipping).to_local()[0] = float("nan")
    skipping.update()
    out["skipped"] = skipping.skipped_updates

    checking = EMA(sharded(small()), DECAY)  # nonfinite="check": refused when read
    if rank == 0:
        with torch.no_grad():
            next(iter(checking._shadow.local_tensors.values())).view(-1)[0] = float("nan")
    try:
        with checking.applied():
            checking.model(torch.zeros(2, 6))  # a collective forward: a lone rank would hang
        out["swap_refused"] = False
    except NonFiniteError:
        out["swap_refused"] = True

    try:
        save_state(skipping.state_dict(), folder / f"torch_save_{rank}.pt")
        out["torch_save_refused"] = False
    except ValueError:
        out["torch_save_refused"] = True
    except RuntimeError:  # what torch.save itself may raise on a DTensor: not a clear refusal
        out["torch_save_refused"] = False
    return out


def after_eval_forward(rank: int, world: int, folder: Path) -> dict[str, Any]:
    """An eval forward leaves the root unsharded: EMA creation and copy_to must still shard."""
    model = sharded(small())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # the root keeps its gathered, full parameters
    ema = EMA(model, DECAY)
    sharded_shadow = all(type(t).__name__ == "DTensor" for t in ema.shadow.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()
        ema.update()
    with torch.no_grad():
        with ema.applied():
            averaged = model(x)
        model(x)  # the root is unsharded again, holding the live weights
        ema.copy_to()
        copied = model(x)
    return {"sharded_shadow": sharded_shadow, "copy_to_used": torch.equal(copied, averaged)}
