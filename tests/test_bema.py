"""Tests of BEMA against a float64 transcription of its update rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from emaweights.averager import SwapError
from emaweights.bema import BEMA
from tests._history import run
from tests._models import mlp, train_step


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


def _trained(steps: int = 3, **options: object) -> tuple[nn.Module, torch.optim.Optimizer, BEMA]:
    torch.manual_seed(0)
    model = mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bema = BEMA(model, **options)  # type: ignore[arg-type]
    for s in range(1, steps + 1):
        train_step(model, opt, seed=s)
        bema.update()
    return model, opt, bema


def test_applied_has_emas_guards() -> None:
    """In BEMA.applied(): optimizer.step(), update(), nesting raise; in-place edits are caught."""
    model, opt, bema = _trained()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    average = {k: v.clone() for k, v in bema.shadow.items()}
    with bema.applied():
        with pytest.raises(SwapError):
            opt.step()  # would train the average
        with pytest.raises(SwapError):
            bema.update()
        with pytest.raises(SwapError), bema.applied():
            pass  # a second swap would lose the live weights
    with pytest.raises(SwapError, match="modified in place"), bema.applied() as m, torch.no_grad():
        next(m.parameters()).mul_(0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert bema.num_updates == 3
    for k, v in bema.shadow.items():
        if k != "0.weight":
            assert torch.equal(v, average[k]), k


def test_state_resumes_bitwise(tmp_path: Path) -> None:
    """A BEMA loaded from torch.load(weights_only=True) continues exactly like the original."""
    model, opt, bema = _trained(update_every=2, start_step=1)
    torch.save(bema.state_dict(), tmp_path / "bema.pt")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    resumed = BEMA(twin, update_every=2, start_step=1)
    resumed.load_state_dict(torch.load(tmp_path / "bema.pt", weights_only=True))
    for s in range(4, 8):
        for m, o, b in ((model, opt, bema), (twin, twin_opt, resumed)):
            train_step(m, o, seed=s)
            b.update()
    assert resumed.init_weight == bema.init_weight
    for a, b in ((bema.shadow, resumed.shadow), (bema.ema, resumed.ema)):
        for k, v in a.items():
            assert torch.equal(b[k], v), k


def test_burn_in_follows_the_live_weights_then_holds_between_updates() -> None:
    """Until start_step the result is the live weights; it changes only every update_every steps."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bema = BEMA(model, start_step=3, update_every=2)
    seen = []
    for s in range(1, 10):
        train_step(model, opt, seed=s)
        bema.update()
        if s <= 3:
            for k, v in bema.averaged_state_dict().items():
                assert torch.equal(v, model.state_dict()[k]), (s, k)
                assert torch.equal(bema.ema[k], model.state_dict()[k]), (s, k)
        seen.append(bema.shadow["0.weight"].clone())
    changed = [s for s in range(2, 10) if not torch.equal(seen[s - 1], seen[s - 2])]
    assert changed == [2, 3, 5, 7, 9]
    assert bema.num_updates == 3


def test_state_of_another_configuration_is_refused_unchanged() -> None:
    """A state with another lag (or a malformed weight) is refused and the BEMA is unchanged."""
    _, _, bema = _trained()
    state = bema.state_dict()
    before = {k: v.clone() for k, v in bema.shadow.items()}
    with pytest.raises(ValueError, match="lag"):
        bema.load_state_dict({**state, "config": {**state["config"], "lag": 20.0}})
    with pytest.raises(ValueError, match="init_weight"):
        bema.load_state_dict({**state, "init_weight": float("nan")})
    for k, v in bema.shadow.items():
        assert torch.equal(v, before[k]), k


def test_foreach_option_gives_the_same_numbers() -> None:
    """BEMA(foreach=False) (per-tensor kernels) equals foreach=True bit for bit."""
    results = [_trained(5, foreach=f)[2].averaged_state_dict() for f in (True, False)]
    for k, v in results[0].items():
        assert torch.equal(results[1][k], v), k
