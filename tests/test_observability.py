"""Observability: decay, horizon, init_weight (both anchors), drift norm, stats()."""

from __future__ import annotations

import math

import pytest
import torch

from emaweights import EMA, MultiEMA
from emaweights.schedules import Warmup
from tests._models import mlp, train_step


def _run(steps: int, **options: object) -> tuple[torch.nn.Module, EMA]:
    torch.manual_seed(0)
    model = mlp()
    ema = EMA(model, **options)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps):
        train_step(model, opt, i)
        ema.update()
    return model, ema


def test_decay_and_horizon_of_a_constant() -> None:
    """The decay is the constant; horizon is 1 / (1 - decay) steps, also with update_every."""
    _, ema = _run(4, decay=0.9, update_every=2)
    assert ema.decay == 0.9
    assert ema.horizon == pytest.approx(10.0)


def test_decay_follows_a_schedule() -> None:
    """With a warm-up schedule, decay is the schedule's value at the latest optimizer step."""
    schedule = Warmup(0.999)
    _, ema = _run(5, decay=schedule)
    assert ema.decay == schedule(4)
    assert ema.horizon == pytest.approx(1 / (1 - schedule(4)))


def test_horizon_of_decay_one_is_infinite() -> None:
    """A decay of 1 freezes the average: the horizon is infinite."""
    _, ema = _run(1, decay=1.0)
    assert ema.horizon == math.inf


def test_init_weight_is_the_product_of_decays_when_anchored() -> None:
    """anchor='init': init_weight is prod(beta_t) (closed form beta**T)."""
    _, ema = _run(6, decay=0.8)
    assert ema.init_weight == pytest.approx(0.8**6)


def test_init_weight_is_zero_when_debiased() -> None:
    """anchor='debiased': the average holds none of theta_0 after an update, so init_weight is 0."""
    _, ema = _run(0, decay=0.8, anchor="debiased")
    assert ema.init_weight == 1.0
    _, ema = _run(3, decay=0.8, anchor="debiased")
    assert ema.init_weight == 0.0


def test_debiased_state_and_resume_keep_the_product() -> None:
    """The saved init_weight is still P_T, so a resumed debiased run equals an uninterrupted one."""
    model, ema = _run(3, decay=0.8, anchor="debiased")
    assert ema.state_dict()["init_weight"] == pytest.approx(0.8**3)
    other = EMA(model, 0.8, anchor="debiased")
    other.load_state_dict(ema.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt, 9)
    ema.update()
    other.update()
    assert all(torch.equal(ema.shadow[k], other.shadow[k]) for k in ema.shadow)


def test_drift_matches_a_float64_oracle() -> None:
    """drift() is ||theta - avg|| / ||avg|| over the averaged parameters (float64 oracle)."""
    model, ema = _run(4, decay=0.7)
    params = {k: p.detach() for k, p in model.named_parameters()}
    num = sum(((params[k].double() - ema.shadow[k].double()) ** 2).sum() for k in params)
    den = sum((ema.shadow[k].double() ** 2).sum() for k in params)
    got = ema.drift()
    assert isinstance(got, torch.Tensor) and got.dim() == 0
    assert float(got) == pytest.approx(float((num / den).sqrt()), rel=1e-5)


def test_drift_is_zero_right_after_creation() -> None:
    """Before any step the average equals the live weights: drift 0."""
    _, ema = _run(0, decay=0.7)
    assert float(ema.drift()) == 0.0


def test_stats_has_plain_floats_and_drift_only_when_asked() -> None:
    """stats() holds floats for decay/horizon/init_weight/step; drift only with drift=True."""
    _, ema = _run(2, decay=0.9)
    stats = ema.stats()
    assert set(stats) == {"step", "num_updates", "decay", "horizon", "init_weight"}
    assert all(type(v) is float for v in stats.values())
    assert stats["init_weight"] == pytest.approx(0.81)
    assert isinstance(ema.stats(drift=True)["drift"], torch.Tensor)


def test_multi_ema_stats_name_each_decay() -> None:
    """MultiEMA.stats() reports every member under '<key>/<index>'."""
    torch.manual_seed(0)
    multi = MultiEMA(mlp(), [0.5, 0.9])
    multi.update()
    stats = multi.stats()
    assert stats["decay/0"] == 0.5 and stats["decay/1"] == 0.9
