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
