"""The caveats in ``emaweights.flat``'s docstring, each checked as it is written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emaweights import EMA, flatten_parameters

DECAY = 0.9


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("cast", [nn.Module.half, lambda m: m.to(torch.float64)])
def test_dtype_change_after_flattening_raises(cast: object) -> None:
    """model.half() / .to(dtype) after making the EMA: its next update raises, naming the change."""
    model = _net()
    flatten_parameters(model)
    ema = EMA(model, DECAY)
    ema.update()
    cast(model)  # type: ignore[operator]
    with pytest.raises(RuntimeError, match=r"model changed.*dtype torch\.float32 ->"):
        ema.update()


def test_reallocation_keeps_averaging_with_same_numbers() -> None:
    """Re-allocated parameters (layout undone, same dtype) average as an unflattened model's."""
    flat, plain = _net(), _net()
    flatten_parameters(flat)
    ema_flat, ema_plain = EMA(flat, DECAY), EMA(plain, DECAY)
    for step in range(4):
        if step == 2:  # undo the layout: every parameter gets its own storage again
            for p in flat.parameters():
                p.data = p.data.clone()
        with torch.no_grad():
            for p, q in zip(flat.parameters(), plain.parameters(), strict=True):
                p.add_(0.1 * (step + 1))
                q.add_(0.1 * (step + 1))
        ema_flat.update()
        ema_plain.update()
    for name, t in ema_plain.shadow.items():
        torch.testing.assert_close(ema_flat.shadow[name], t, rtol=0, atol=0, msg=name)
