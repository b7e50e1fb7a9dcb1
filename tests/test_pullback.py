"""Tests of the periodic pull-back toward the starting weights."""

from __future__ import annotations

import pytest
import torch

from emaweights.pullback import PullBack
from tests._models import mlp, train_step


def test_merges_with_reference_every_n_steps() -> None:
    """Each merge gives (1-beta) theta + beta theta_0 (float64 reference); other steps nothing."""
    torch.manual_seed(0)
    model = mlp()
    theta0 = {k: v.double().clone() for k, v in model.named_parameters()}
    pb = PullBack(model, every=2, beta=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(1, 7):
        train_step(model, opt, seed=s)
        before = {k: v.double().clone() for k, v in model.named_parameters()}
        pb.update()
        for k, p in model.named_parameters():
            ref = 0.7 * before[k] + 0.3 * theta0[k] if s % 2 == 0 else before[k]
            torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=1e-7)
    assert pb.merges == 3


def test_bad_beta() -> None:
    """Beta outside [0, 1] is refused naming the value."""
    with pytest.raises(ValueError, match=r"1\.5"):
        PullBack(mlp(), every=1, beta=1.5)
