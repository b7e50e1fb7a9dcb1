"""Tests of BEMA against a float64 transcription of its update rule."""

from __future__ import annotations

import pytest
import torch

from emaweights.bema import BEMA
from tests._history import run
from tests._models import mlp


@pytest.mark.parametrize(("every", "start"), [(1, 0), (2, 3)])
def test_matches_float64_reference(every: int, start: int) -> None:
    """BEMA equals mu_t + alpha_t (theta_t - theta_0) with the paper's beta, alpha (float64)."""
    torch.manual_seed(0)
    model = mlp()
    bema = BEMA(model, update_every=every, start_step=start)
    history = run(model, 15, lambda s: bema.update())
    for name, t in bema.shadow.items():
        theta0 = history[start][name]
        mu, out = theta0.clone(), theta0.clone()
        for s in range(start + 1, 16):
            k = s - start
            if k % every:
                continue
            base = 10.0 + k
            beta, alpha = base**-0.5, base**-0.2
            mu = (1 - beta) * mu + beta * history[s][name]
            out = mu + alpha * (history[s][name] - theta0)
        torch.testing.assert_close(t.double(), out, rtol=1e-5, atol=1e-6)


def test_weight_on_theta0_closed_form() -> None:
    """After a jump from theta_0=1 to 0, BEMA is prod(1-beta_k) - alpha_t, below its EMA."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    bema = BEMA(model)
    with torch.no_grad():
        model.weight.fill_(0.0)
    p = 1.0
    for t in range(1, 30):
        bema.update()
        p *= 1 - (10.0 + t) ** -0.5
    alpha = (10.0 + 29) ** -0.2
    assert float(bema.ema["weight"]) == pytest.approx(p, rel=1e-5)
    assert float(bema.shadow["weight"]) == pytest.approx(p - alpha, rel=1e-5)
    assert bema.init_weight == pytest.approx(p - alpha, rel=1e-9)


def test_bad_lag() -> None:
    """A lag below 1 (EMA weight above 1) is refused with the value in the message."""
    with pytest.raises(ValueError, match=r"0\.5"):
        BEMA(mlp(), lag=0.5)
