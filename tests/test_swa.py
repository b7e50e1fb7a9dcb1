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
