"""docs/reliability.md: stochastic rounding's noise comes from torch's default generator."""

from __future__ import annotations

import torch
from torch import nn

from emaweights import EMA

DECAY, STEPS, CUT = 0.99, 6, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 4).bfloat16()


def _drive(model: nn.Module, ema: EMA, steps: range) -> None:
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
        ema.update()


def _resumed(restore_rng: bool) -> dict[str, torch.Tensor]:
    model = _model()
    torch.manual_seed(1)
    first = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic")
    _drive(model, first, range(CUT))
    state, rng = first.state_dict(), torch.get_rng_state()
    torch.manual_seed(123)  # what a new process would have
    if restore_rng:
        torch.set_rng_state(rng)
    second = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic")
    second.load_state_dict(state)
    _drive(model, second, range(CUT, STEPS))
    return {n: t.clone() for n, t in second.shadow.items()}


def _uninterrupted() -> dict[str, torch.Tensor]:
    model = _model()
    torch.manual_seed(1)
    ema = EMA(model, DECAY, dtype=torch.bfloat16, rounding="stochastic")
    _drive(model, ema, range(STEPS))
    return {n: t.clone() for n, t in ema.shadow.items()}


def test_resume_with_restored_rng_is_bit_exact() -> None:
    """Restoring torch.get_rng_state() beside EMA.state_dict() resumes bit for bit."""
    oracle, resumed = _uninterrupted(), _resumed(restore_rng=True)
    for name, t in oracle.items():
        assert torch.equal(resumed[name], t), name


def test_resume_without_rng_differs_in_rounding_noise() -> None:
    """Without the generator's state, the resumed shadow differs from the uninterrupted one."""
    oracle, resumed = _uninterrupted(), _resumed(restore_rng=False)
    assert any(not torch.equal(resumed[n], t) for n, t in oracle.items())
