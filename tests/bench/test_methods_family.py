"""Tests of the averaging-family benchmark adapters on a toy model."""

from __future__ import annotations

import pytest
import torch

from emaweights.bench.methods import Method as RunnerMethod
from emaweights.bench.methods_family import L2SPMethod, SWAMethod, family_methods
from tests._models import mlp

STEPS_PER_EPOCH, EPOCHS = 3, 4


def _drive(method, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Run the protocol as the runner does; return float64 states after each epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.start(model)
    ends = []
    step = 0
    for epoch in range(1, EPOCHS + 1):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            extra = method.penalty(model)
            (loss if extra is None else loss + extra).backward()
            opt.step()
            method.after_step(model, step)
        method.after_epoch(model, epoch)
        ends.append({k: v.double().clone() for k, v in model.state_dict().items()})
    return ends


@pytest.mark.parametrize(
    "index", range(len(family_methods(STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS)))
)
def test_each_adapter_runs_and_returns_a_state_dict(index: int) -> None:
    """Every family method follows the protocol and returns finite weights under the model keys."""
    method = family_methods(STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS)[index]
    assert isinstance(method, RunnerMethod)
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    live_before = {k: v.clone() for k, v in model.state_dict().items()}
    _drive(method, model)
    out = method.result(model)
    assert set(out) == set(live_before)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    w0 = method.w0()
    assert w0 is None or isinstance(w0, float)


def test_swa_adapter_is_mean_of_epoch_ends() -> None:
    """The SWA adapter's result is the float64 mean of the epoch-end weights."""
    torch.manual_seed(1)
    model = mlp()
    method = SWAMethod(STEPS_PER_EPOCH)
    ends = _drive(method, model)
    out = method.result(model)
    for name in out:
        ref = sum(e[name] for e in ends) / len(ends)
        torch.testing.assert_close(out[name].double(), ref, rtol=1e-5, atol=1e-6)


def test_l2sp_penalty_closed_form() -> None:
    """The L2-SP penalty is alpha/2 * ||theta - theta0||^2 over trainable parameters."""
    model = mlp()
    method = L2SPMethod(0.3)
    method.start(model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    expected = 0.15 * sum(
        ((p - q) ** 2).sum() for p, q in zip(model.parameters(), theta0, strict=True)
    )
    torch.testing.assert_close(method.penalty(model), expected)
