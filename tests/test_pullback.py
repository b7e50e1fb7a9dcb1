"""Tests of the periodic pull-back toward the starting weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from emaweights.averager import SwapError
from emaweights.pullback import PullBack
from tests._models import mlp, train_step


def test_merges_with_reference_every_n_steps() -> None:
    """Each merge gives (1-w) theta + w theta_0 (float64 reference); other steps nothing."""
    torch.manual_seed(0)
    model = mlp()
    theta0 = {k: v.double().clone() for k, v in model.named_parameters()}
    pb = PullBack(model, update_every=2, reference_weight=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(1, 7):
        train_step(model, opt, seed=s)
        before = {k: v.double().clone() for k, v in model.named_parameters()}
        pb.update()
        for k, p in model.named_parameters():
            ref = 0.7 * before[k] + 0.3 * theta0[k] if s % 2 == 0 else before[k]
            torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=1e-7)
    assert pb.merges == 3


def test_bad_reference_weight() -> None:
    """A reference weight outside [0, 1] is refused naming the value."""
    with pytest.raises(ValueError, match=r"1\.5"):
        PullBack(mlp(), update_every=1, reference_weight=1.5)
    with pytest.raises(TypeError, match="update_every"):
        PullBack(mlp())


def test_old_argument_names_warn_and_mean_the_same() -> None:
    """every= and beta= still work for one release, with a DeprecationWarning; both names clash."""
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    with pytest.warns(DeprecationWarning) as caught:
        old = PullBack(a, every=2, beta=0.3)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "use reference_weight=" in messages[0] and "use update_every=" in messages[1]
    new = PullBack(b, update_every=2, reference_weight=0.3)
    assert (old.update_every, old.reference_weight) == (new.update_every, new.reference_weight)
    with pytest.raises(TypeError, match="beta"):
        PullBack(mlp(), update_every=2, reference_weight=0.3, beta=0.3)


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, pb: PullBack, steps: range) -> None:
    for s in steps:
        train_step(model, opt, seed=s)
        pb.update()


def test_reference_is_kept_in_state_and_restored_bitwise(tmp_path: Path) -> None:
    """A PullBack made on trained weights and loaded from a state merges toward the saved θ_o."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pb = PullBack(model, update_every=2, reference_weight=0.4)
    _run(model, opt, pb, range(1, 4))
    torch.save(pb.state_dict(), tmp_path / "pb.pt")
    twin = copy.deepcopy(model)  # its weights now are not the reference
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    resumed = PullBack(twin, update_every=2, reference_weight=0.4)
    resumed.load_state_dict(torch.load(tmp_path / "pb.pt", weights_only=True))
    for k, v in pb.shadow.items():
        assert torch.equal(resumed.shadow[k], v), k
    _run(model, opt, pb, range(4, 9))
    _run(twin, twin_opt, resumed, range(4, 9))
    assert resumed.merges == pb.merges == 4
    for k, v in model.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k


def test_start_step_sets_the_reference_and_applied_shows_it() -> None:
    """With start_step the reference is the weights at that step; applied() and export give it."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pb = PullBack(model, update_every=3, start_step=2)
    _run(model, opt, pb, range(1, 3))
    at2 = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, opt, pb, range(3, 5))
    for k, v in pb.averaged_state_dict().items():
        assert torch.equal(v, at2[k]), k
    with pb.applied() as m:
        for k, v in m.state_dict().items():
            assert torch.equal(v, at2[k]), k
        with pytest.raises(SwapError):
            pb.pull()
    assert pb.merges == 0


def test_foreach_option_gives_the_same_numbers() -> None:
    """PullBack(foreach=False) (per-tensor merge) leaves the same weights as foreach=True."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _run(model, opt, PullBack(model, update_every=2, foreach=foreach), range(1, 6))
        results.append(model.state_dict())
    for k, v in results[0].items():
        assert torch.equal(results[1][k], v), k
