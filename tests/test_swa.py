"""Tests of uniform averaging (SWA) and BatchNorm recomputation against float64 references."""

from __future__ import annotations

import pytest
import torch

from emaweights.swa import SWA, update_bn
from tests._history import run
from tests._models import mlp


@pytest.mark.parametrize(("every", "start"), [(1, 0), (4, 0), (3, 5)])
def test_equal_weights_over_chosen_steps(every: int, start: int) -> None:
    """SWA equals the float64 mean of the weights at steps start+every, start+2*every, ..."""
    torch.manual_seed(0)
    model = mlp()
    swa = SWA(model, update_every=every, start_step=start)
    history = run(model, 20, lambda s: swa.update())
    points = [s for s in range(start + every, 21, every)]
    assert swa.n_averaged == len(points)
    for name, t in swa.shadow.items():
        ref = sum(history[s][name] for s in points) / len(points)
        torch.testing.assert_close(t.double(), ref, rtol=1e-5, atol=1e-6)


def test_update_bn_equals_full_batch_statistics() -> None:
    """update_bn sets BatchNorm running mean/var to the statistics of the whole loader."""
    torch.manual_seed(1)
    model = mlp(batchnorm=True)
    model.eval()
    data = torch.randn(64, 6)
    loader = [(data[i : i + 16], None) for i in range(0, 64, 16)]
    update_bn(loader, model)
    bn = model[1]
    h = model[0](data).detach().double()
    batch_means = torch.stack([h[i : i + 16].mean(0) for i in range(0, 64, 16)])
    batch_vars = torch.stack([h[i : i + 16].var(0) for i in range(0, 64, 16)])
    torch.testing.assert_close(bn.running_mean.double(), batch_means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), batch_vars.mean(0), rtol=1e-5, atol=1e-6)
    assert not model.training and bn.momentum == 0.1


def test_swa_is_an_averager_not_an_ema() -> None:
    """SWA composes on the Averager base and does not inherit from EMA."""
    from emaweights import EMA
    from emaweights.averager import Averager

    swa = SWA(mlp())
    assert isinstance(swa, Averager) and not isinstance(swa, EMA)


def test_old_ema_format_state_loads_and_continues() -> None:
    """A pre-0.2 SWA state (EMA format, PowerFunction(0)) loads and continues like a new SWA."""
    from emaweights import EMA
    from emaweights.schedules import PowerFunction

    torch.manual_seed(0)
    model = mlp()
    old, new = EMA(model, PowerFunction(0.0)), SWA(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        old.update()
        new.update()
    resumed = SWA(model)
    resumed.load_state_dict(old.state_dict())
    assert resumed.n_averaged == new.n_averaged == 3
    for k, v in new.shadow.items():
        torch.testing.assert_close(resumed.shadow[k], v)


def test_other_ema_state_is_refused() -> None:
    """An EMA state with another schedule is refused, naming the schedule."""
    from emaweights import EMA

    model = mlp()
    with pytest.raises(ValueError, match="not an emaweights SWA state"):
        SWA(model).load_state_dict(EMA(model, 0.9).state_dict())
