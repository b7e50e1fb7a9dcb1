"""Tests of exact bias correction (``EMA(anchor="debiased")``) against its closed form."""

from __future__ import annotations

import pytest
import torch

from emaweights import EMA, Warmup
from tests._models import mlp, train_step


def _train(model: torch.nn.Module, emas: list[EMA], steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        train_step(model, opt, seed=s)
        for e in emas:
            e.update()


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99])
def test_debiased_equals_closed_form(decay: float) -> None:
    """Debiased average equals (shadow_T - beta^T theta0) / (1 - beta^T) of the anchored one."""
    torch.manual_seed(0)
    model = mlp()
    theta0 = {k: v.double().clone() for k, v in model.state_dict().items()}
    anchored, debiased = EMA(model, decay), EMA(model, decay, anchor="debiased")
    _train(model, [anchored, debiased], steps=15)
    p = decay**15
    assert anchored.init_weight == pytest.approx(p)
    for name, t in debiased.shadow.items():
        ref = (anchored.shadow[name].double() - p * theta0[name]) / (1 - p)
        torch.testing.assert_close(t.double(), ref, rtol=1e-4, atol=1e-5)


def test_debiased_schedule_closed_form() -> None:
    """With a schedule and update_every, debiasing uses P_T = product of the per-update decays."""
    torch.manual_seed(1)
    model = mlp()
    theta0 = {k: v.double().clone() for k, v in model.state_dict().items()}
    opts = {"update_every": 2}
    anchored = EMA(model, Warmup(0.99), **opts)
    debiased = EMA(model, Warmup(0.99), anchor="debiased", **opts)
    _train(model, [anchored, debiased], steps=12)
    p = anchored.init_weight
    assert 0 < p < 1
    for name, t in debiased.shadow.items():
        ref = (anchored.shadow[name].double() - p * theta0[name]) / (1 - p)
        torch.testing.assert_close(t.double(), ref, rtol=1e-4, atol=1e-5)


def test_debiased_constant_input_is_exact() -> None:
    """When the weights jump once to a constant, the debiased average is that constant (no lag)."""
    model = mlp()
    debiased = EMA(model, 0.99, anchor="debiased")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    for _ in range(5):
        debiased.update()
    for t in debiased.shadow.values():
        torch.testing.assert_close(t, torch.full_like(t, 3.0))
