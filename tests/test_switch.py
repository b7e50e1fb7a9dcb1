"""Tests of Switch-EMA against a float64 EMA that is copied into the weights by hand."""

from __future__ import annotations

import torch

from emaweights.switch import SwitchEMA
from tests._models import mlp, train_step


def test_switch_copies_average_into_live_weights() -> None:
    """Every switch_every steps the live weights become a float64 reference EMA and go on."""
    torch.manual_seed(0)
    model = mlp()
    ref_model = mlp()
    ref_model.load_state_dict(model.state_dict())
    sw = SwitchEMA(model, 0.8, switch_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    shadow = {k: v.double().clone() for k, v in ref_model.named_parameters()}
    for s in range(1, 10):
        train_step(model, opt, seed=s)
        sw.update()
        train_step(ref_model, ref_opt, seed=s)
        with torch.no_grad():
            for k, p in ref_model.named_parameters():
                shadow[k] = 0.8 * shadow[k] + 0.2 * p.double()
                if s % 3 == 0:
                    p.copy_(shadow[k])
        for k, p in model.named_parameters():
            torch.testing.assert_close(
                p.double(), ref_model.get_parameter(k).double(), rtol=1e-5, atol=1e-6
            )
    assert sw.switches == 3


def test_switch_state_keeps_switch_count_and_loads_old_format() -> None:
    """The state saves switches; a pre-0.2 EMA-format state loads with the same average."""
    from emaweights import EMA
    from emaweights.averager import Averager

    model = mlp()
    sw = SwitchEMA(model, 0.8, switch_every=2)
    assert isinstance(sw, Averager) and not isinstance(sw, EMA)
    for _ in range(4):
        sw.update()
    other = SwitchEMA(model, 0.8, switch_every=2)
    other.load_state_dict(sw.state_dict())
    assert other.switches == sw.switches == 2
    ema = EMA(model, 0.8)
    for _ in range(4):
        ema.update()
    old = SwitchEMA(model, 0.8, switch_every=2)
    old.load_state_dict(ema.state_dict())
    assert old.step == 4 and old.switches == 2 and old.init_weight == ema.init_weight
    for k, v in ema.shadow.items():
        assert torch.equal(old.shadow[k], v)
